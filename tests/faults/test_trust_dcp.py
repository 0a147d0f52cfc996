"""T01: no byte of a DCP directory (or a torch.save file) reaches an unpickler without an allowlist.

torch's DCP planner loads every non-tensor item with ``torch.load(weights_only=False)``, and an
allowlisted global can still be mutated through ``BUILD``: both are planted here for real.
"""

from __future__ import annotations

import io
import os
import pathlib
import zipfile

import helpers
import pytest
import torch
from dg_harness import run_ranks

from dist_guardian import Guardian


class Payload:
    """A non-tensor DCP value whose pickle runs ``touch MARKER`` when unpickled without an allowlist."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Note:
    """A user class a run opts in to with ``extra_safe_globals``."""

    def __init__(self, text: str = ""):
        self.text = text


def _dcp_save(tree: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(tree, checkpoint_id=path)


def _model_tree(seed: int, trainer: dict) -> tuple[dict, dict]:
    state = helpers.make_state(seed=seed)
    return {"model": state["model"], "trainer": trainer}, {"model": state["model"].state_dict(), "trainer": trainer}


def _save_native(root: str, run: str, seed: int, step: int) -> dict:
    state = helpers.make_state(seed=seed)
    g = Guardian(stores=[root], run=run)
    g.save({"model": state["model"], "trainer": state["trainer"]}, step=step)
    g.close()
    return helpers.model_tensors(state)


def _fresh() -> dict:
    s = helpers.make_state(seed=9)
    return {"model": s["model"], "trainer": {"epoch": 0, "seen": 0}}


def _failed(r, step: int) -> str:
    got = [a for a in r.attempts if a.step == step]
    assert got and got[0].outcome == "failed", r.to_json()
    return " ".join(why for _rank, why in got[0].reasons)


def _prefix_metadata(path: str, prefix: bytes) -> None:
    """Run ``prefix`` (opcodes leaving nothing on the stack) before the genuine ``.metadata`` pickle."""
    md = os.path.join(path, ".metadata")
    data = open(md, "rb").read()
    with open(md, "wb") as f:
        f.write(prefix + data)


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def test_T01_dcp_bytes_item_pickle_never_runs(tmp_path):
    root, marker = str(tmp_path / "ck"), tmp_path / "MARKER"
    want = _save_native(root, "r", seed=3, step=100)
    _dcp_save(_model_tree(4, {"epoch": Payload(str(marker)), "seen": 0})[1], os.path.join(root, "r", "dcp-step-300"))
    fresh = _fresh()
    r = Guardian(stores=[root], run="r").resume(fresh)
    assert not marker.exists()
    assert r.resumed and r.step == 100 and r.tier == "V", r.to_json()
    assert helpers.same(helpers.model_tensors(fresh), want)
    why = _failed(r, 300)
    assert "DCP item 'trainer.epoch': unsafe_globals=['posix.system']; loading it would run code" in why, why


def test_T01_top_level_planted_dcp_never_runs_at_an_unrelated_resume(tmp_path):
    root, marker = str(tmp_path / "ck"), tmp_path / "MARKER"
    want = _save_native(root, "r1", seed=3, step=100)
    _dcp_save(_model_tree(4, {"epoch": Payload(str(marker)), "seen": 0})[1], os.path.join(root, "dcp-step-900"))
    fresh = _fresh()
    r = Guardian(stores=[root], run="r1").resume(fresh)
    assert not marker.exists()
    assert r.resumed and r.step == 100, r.to_json()
    assert helpers.same(helpers.model_tensors(fresh), want)
    assert "unsafe_globals=['posix.system']" in _failed(r, 900)


def test_T01_dcp_metadata_build_never_sets_state_on_an_allowed_class(tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    owner = pathlib.PosixPath.owner
    monkeypatch.setattr(pathlib.PosixPath, "owner", owner)  # restored even if the planted BUILD runs
    want = _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    # GLOBAL pathlib.PosixPath (allowlisted), state (None, {"owner": "pwned"}), BUILD: setattr(PosixPath, ...)
    _prefix_metadata(d, b"\x80\x02cpathlib\nPosixPath\nN}" + _u("owner") + _u("pwned") + b"s\x86b0")
    fresh = _fresh()
    r = Guardian(stores=[root], run="r").resume(fresh)
    assert pathlib.PosixPath.owner is owner
    assert r.resumed and r.step == 100 and helpers.same(helpers.model_tensors(fresh), want), r.to_json()
    assert "state_on_class: BUILD would set attributes of the class pathlib.PosixPath" in _failed(r, 300)


def test_T01_dcp_metadata_build_refuses_dunder_state_keys(tmp_path):
    root = str(tmp_path / "ck")
    _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    # PosixPath("/x") (allowlisted), then BUILD with slot state {"__class__": PurePosixPath}
    _prefix_metadata(
        d,
        b"\x80\x02cpathlib\nPosixPath\n"
        + _u("/x")
        + b"\x85RN}"
        + _u("__class__")
        + b"cpathlib\nPurePosixPath\ns\x86b0",
    )
    r = Guardian(stores=[root], run="r").resume(_fresh())
    assert r.step == 100, r.to_json()
    assert "unsafe_build_key: BUILD of a pathlib.PosixPath sets '__class__'" in _failed(r, 300)


def _plant_note_dcp(root: str) -> dict:
    _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    tree, saved = _model_tree(4, {"epoch": 1, "seen": 0, "note": Note("kept")})
    _dcp_save(saved, d)
    _prefix_metadata(d, b"\x80\x02c" + Note.__module__.encode() + b"\nNote\n)R0")  # .metadata needs Note too
    return helpers.model_tensors(tree)


def _resume_with_note(rank: int, world: int, *, root: str) -> dict:
    fresh = _fresh()
    fresh["trainer"]["note"] = Note()
    r = Guardian(stores=[root], run="r", timeout=20, extra_safe_globals=[Note]).resume(fresh)
    return {
        "step": r.step,
        "tier": r.tier,
        "note": fresh["trainer"]["note"].text,
        "json": r.to_json(),
        "weights": {k: v.clone() for k, v in helpers.model_tensors(fresh).items()},
    }


def test_T01_dcp_extra_safe_globals_honoured_when_loading(tmp_path):
    root = str(tmp_path / "ck")
    want = _plant_note_dcp(root)
    got = _resume_with_note(0, 1, root=root)
    assert got["step"] == 300 and got["tier"] == "L", got["json"]
    assert helpers.same(got["weights"], want) and got["note"] == "kept"
    # Without the opt-in it is refused at plan time, before anything is unpickled.
    r2 = Guardian(stores=[root], run="r").resume(_fresh())
    assert r2.step == 100 and not [a for a in r2.attempts if a.step == 300]


def test_T01_dcp_extra_safe_globals_honoured_on_every_rank(tmp_path):
    root = str(tmp_path / "ck")
    want = _plant_note_dcp(root)
    out = run_ranks(_resume_with_note, 2, root=root)
    assert out.ok(), out.errors
    for rank in range(2):
        got = out.results[rank]
        assert got["step"] == 300 and got["note"] == "kept", (rank, got["json"])
        assert helpers.same(got["weights"], want)


def test_T01_dcp_metadata_build_never_sets_state_on_an_allowed_function(tmp_path):
    import torch._utils

    root = str(tmp_path / "ck")
    _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    # GLOBAL torch._utils._rebuild_tensor, state {"dg_planted": 1}, BUILD: the function's __dict__. A DCP
    # .metadata never needs it (planning rejects it); allowlisted by the user, BUILD on it is still refused.
    _prefix_metadata(d, b"\x80\x02ctorch._utils\n_rebuild_tensor\n}" + _u("dg_planted") + b"K\x01sb0")
    try:
        r = Guardian(stores=[root], run="r", extra_safe_globals=["torch._utils._rebuild_tensor"]).resume(_fresh())
        assert not hasattr(torch._utils._rebuild_tensor, "dg_planted")
    finally:
        torch._utils._rebuild_tensor.__dict__.pop("dg_planted", None)
    assert r.step == 100, r.to_json()
    assert "unsafe_build: BUILD of a builtins.function instance" in _failed(r, 300)


def test_T01_dcp_metadata_build_never_changes_a_shared_enum_member(tmp_path):
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING as Enc

    root = str(tmp_path / "ck")
    _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    member, value = Enc.TORCH_CONTIGUOUS_FORMAT, Enc.TORCH_CONTIGUOUS_FORMAT.value
    # _MEM_FORMAT_ENCODING(value) is the process's one member; BUILD {"_value_": 99} would rewrite it
    enc = b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
    _prefix_metadata(d, b"\x80\x02" + enc + b"K" + bytes([value]) + b"\x85R}" + _u("_value_") + b"Kcsb0")
    try:
        r = Guardian(stores=[root], run="r").resume(_fresh())
        assert member._value_ == value
    finally:
        member._value_ = value
    assert r.step == 100, r.to_json()
    assert "state_on_enum_member: BUILD would set attributes of" in _failed(r, 300)


def _planted_pt(path: str, prefix: bytes) -> None:
    """A genuine torch.save file whose data.pkl runs ``prefix`` first (stored, CRCs recomputed)."""
    buf = io.BytesIO()
    torch.save({"trainer": {"epoch": 1}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            z.writestr(info.filename, prefix + data if info.filename.endswith("/data.pkl") else data)


def test_T01_allowlist_name_check_matches_the_whole_string(tmp_path):
    root = str(tmp_path / "ck")
    _save_native(root, "r", seed=3, step=100)
    path = os.path.join(root, "r", "step_300.pt")
    _planted_pt(path, b"\x80\x02" + _u("torch") + _u("Size\n") + b"\x930")  # STACK_GLOBAL torch "Size\n"
    r = Guardian(stores=[root], run="r").resume(_fresh())
    assert r.step == 100 and not [a for a in r.attempts if a.step == 300], r.to_json()
    assert dict(r.rejected)[path] == "unsafe_globals=['torch.Size\\n']"


def test_T01_pt_file_build_on_an_allowed_class_is_refused_by_weights_only(tmp_path, monkeypatch):
    root = str(tmp_path / "ck")
    owner = pathlib.PosixPath.owner
    monkeypatch.setattr(pathlib.PosixPath, "owner", owner)
    want = _save_native(root, "r", seed=3, step=100)
    path = os.path.join(root, "r", "step_300.pt")
    # the same planted BUILD on a class the run opted in to, ahead of the genuine data.pkl
    _planted_pt(path, b"\x80\x02cpathlib\nPosixPath\nN}" + _u("owner") + _u("pwned") + b"s\x86b0")
    fresh = _fresh()
    r = Guardian(stores=[root], run="r", extra_safe_globals=[pathlib.PosixPath]).resume(fresh)
    assert pathlib.PosixPath.owner is owner
    assert r.step == 100 and helpers.same(helpers.model_tensors(fresh), want), r.to_json()
    assert "torch.load(weights_only=True) refused it" in _failed(r, 300)


def test_T01_dcp_per_rank_metadata_goes_through_the_same_unpickler(tmp_path, monkeypatch):
    """DCP reads ``__N.metadata`` (``read_metadata(rank=N)``) when collectives are off: the same unpickler."""
    from dist_guardian import foreign_loading
    from dist_guardian.errors import CheckpointFormatError

    owner = pathlib.PosixPath.owner
    monkeypatch.setattr(pathlib.PosixPath, "owner", owner)
    d = str(tmp_path / "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    genuine = open(os.path.join(d, ".metadata"), "rb").read()
    with open(os.path.join(d, "__0.metadata"), "wb") as f:
        f.write(b"\x80\x02cpathlib\nPosixPath\nN}" + _u("owner") + _u("pwned") + b"s\x86b0" + genuine)
    reader = foreign_loading._safe_dcp_reader(d, ())
    assert reader.read_metadata().storage_data  # the genuine .metadata reads
    with pytest.raises(CheckpointFormatError, match="state_on_class: BUILD would set attributes of the class pathlib"):
        reader.read_metadata(rank=0)
    assert pathlib.PosixPath.owner is owner


@pytest.mark.parametrize("global_", [b"builtins\nbytearray", b"torch\nUntypedStorage"])
def test_T01_dcp_metadata_may_not_allocate_through_storage_or_bytearray(tmp_path, global_):
    """torch.save's allowlist has storages and bytearray; a DCP .metadata needs neither, and with them a planted
    one allocates any size while it is unpickled (here 1 MB; 2**40 would take the process down)."""
    root = str(tmp_path / "ck")
    want = _save_native(root, "r", seed=3, step=100)
    d = os.path.join(root, "r", "dcp-step-300")
    _dcp_save(_model_tree(4, {"epoch": 1, "seen": 0})[1], d)
    _prefix_metadata(d, b"\x80\x02c" + global_ + b"\nJ\x00\x00\x10\x00\x85R0")  # GLOBAL, BININT 2**20, REDUCE, POP
    fresh = _fresh()
    r = Guardian(stores=[root], run="r").resume(fresh)
    assert r.resumed and r.step == 100 and helpers.same(helpers.model_tensors(fresh), want), r.to_json()
    qual = global_.decode().replace("\n", ".")
    assert [why for _path, why in r.rejected] == [f"unsafe_globals=[{qual!r}]"], r.to_json()

"""Findings of the security review of dist_guardian, one test per finding (each fails on the code before its fix).

Reviewed: every open of a path that comes from a store or a user, every deserialisation
(``torch.load``, pickle, JSON), every place a remote or listed name becomes a local path
(stores, copying.copy_checkpoint/repair_replica, verify, loading, journal, cli verify/prune).
There is no subprocess in the package. The findings:

1. DCP ``.metadata`` was unpickled by torch's ``FileSystemReader`` with plain ``pickle.load``: a
   planted DCP-looking directory in any local or node-local store ran code at resume. Now its
   globals are checked at verification (tier R, ``unsafe_globals``), and the load itself uses an
   allowlisting unpickler that also refuses files named outside the directory.
2. F37: files in the node-local (``tmp://``) store were never checked for their owner: see
   test_faults_security.py (both the verification on rank 0 and the availability check on every rank).
3. The crash-loop journal followed a symlinked ``<run>/.journal`` (or ``<run>``): resume wrote
   files outside the store root. Now it refuses symlinked components, before and after makedirs.
4. ``statetree.decode`` resolved ``__dtype__`` names with ``getattr(torch, name)``: a name from the
   file could make torch import a heavy submodule (``torch.__getattr__`` imports lazily by name).
5. A plan (JSON broadcast by rank 0) was turned into candidates with ``cls(**d)``: a malformed one
   crashed with a bare TypeError deep inside, and ``rel``/file names were joined to local roots
   unchecked. Now :class:`PlanFormatError` names the field, and paths that leave the root are refused.
6. Parsers of untrusted bytes raised outside their contract (found by tests/unit/test_fuzz.py):
   ``sniff_torch_file`` on a zip with a bad local header (BadZipFile), ``parse_header`` on an
   unhashable dtype (TypeError), ``manifest.parse`` on ``created_unix: 10**400`` (OverflowError).
7. ``dist-guardian verify tmp://NAME/<run>/<dir>`` looked for a local directory literally named ``tmp:``.
8. ``torch>=2.4`` allowed a torch whose ``weights_only=True`` loader can run code (CVE-2025-32434,
   fixed in 2.6); the floor is now 2.6.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import struct
import zipfile

import helpers
import pytest
import repo_paths
import torch
from helpers import assert_nothing_lost, committed, make_state, same, snapshot

from dist_guardian import Guardian, cli, foreign_loading, formats, statetree, stores
from dist_guardian.candidate import Candidate
from dist_guardian.errors import CheckpointFormatError, PlanFormatError
from dist_guardian.planning import Plan

RUN = "r"


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture
def ab(tmp_path):
    root = str(tmp_path / "ck")
    return {"root": root, "snap_b": helpers.save_a_b([root], RUN).snap_b, "before": committed(root, RUN)}


def _dcp_dir(path: str, seed: int = 4) -> None:
    import torch.distributed.checkpoint as dcp

    state = make_state(seed=seed)
    dcp.save({"model": state["model"].state_dict(), "trainer": dict(state["trainer"])}, checkpoint_id=path)


# ----------------------------------------------------------------------------- 1. DCP metadata pickle


def test_dcp_metadata_with_a_code_payload_is_rejected_and_never_unpickled(ab, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dist_guardian")
    marker = tmp_path / "pwned"
    evil = os.path.join(ab["root"], RUN, "dcp-step-900")
    _dcp_dir(evil)
    with open(os.path.join(evil, ".metadata"), "wb") as f:
        pickle.dump(_Evil(f"touch {marker}"), f)
    # Control: torch's own DCP reader runs the payload (the finding).
    from torch.distributed.checkpoint import FileSystemReader

    control_dir = str(tmp_path / "control_dcp")
    _dcp_dir(control_dir)
    control = tmp_path / "control_marker"
    with open(os.path.join(control_dir, ".metadata"), "wb") as f:
        pickle.dump(_Evil(f"touch {control}"), f)
    try:
        FileSystemReader(control_dir).read_metadata()
    except Exception:
        pass  # what os.system returned is not a Metadata; the command already ran
    assert control.exists()

    state = make_state(seed=42)
    g = Guardian(stores=[ab["root"]], run=RUN)
    try:
        r = g.resume(state)
    finally:
        g.close()
    assert not marker.exists()
    assert r.resumed and r.step == 200 and same(snapshot(state), ab["snap_b"]), r.to_json()
    assert dict(r.rejected)[evil] == "unsafe_globals=['posix.system']"
    assert any(
        m.getMessage().startswith("security_event:") and "posix.system" in m.getMessage() for m in caplog.records
    )
    assert_nothing_lost(ab["before"], committed(ab["root"], RUN))


def test_dcp_load_itself_refuses_the_payload_even_if_verification_was_bypassed(tmp_path):
    """A file swapped after verification (or a caller of load_dcp) still never reaches pickle.load."""
    marker = tmp_path / "pwned"
    root = str(tmp_path / "st")
    d = os.path.join(root, RUN, "dcp-step-900")
    _dcp_dir(d)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(_Evil(f"touch {marker}"), f)
    store = stores.resolve(root)
    c = Candidate(
        id="0:x", store=root, store_index=0, rel=f"{RUN}/dcp-step-900", path=d, kind="dcp", step=900, tier="L"
    )
    with pytest.raises(CheckpointFormatError, match="unsafe_global posix.system"):
        foreign_loading.load_dcp(c, store, make_state(seed=1))
    assert not marker.exists()


def test_dcp_metadata_naming_a_file_outside_its_directory_is_refused(tmp_path):
    root = str(tmp_path / "st")
    d = os.path.join(root, RUN, "dcp-step-900")
    _dcp_dir(d)
    secret = tmp_path / "secret.distcp"
    shutil.copy(os.path.join(d, "__0_0.distcp"), secret)  # a real file, outside the directory
    md = foreign_loading.read_dcp_metadata(os.path.join(d, ".metadata"))  # the clean one passes
    for info in md.storage_data.values():
        info.relative_path = "../../../secret.distcp"
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    store = stores.resolve(root)
    c = Candidate(
        id="0:x", store=root, store_index=0, rel=f"{RUN}/dcp-step-900", path=d, kind="dcp", step=900, tier="L"
    )
    with pytest.raises(CheckpointFormatError, match="outside its directory"):
        foreign_loading.load_dcp(c, store, make_state(seed=1))


# ----------------------------------------------------------------------------- 3. journal through a symlink


def test_journal_is_never_written_through_a_symlinked_directory(ab, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dist_guardian")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(ab["root"], RUN, ".journal"))
    state = make_state(seed=42)
    g = Guardian(stores=[ab["root"]], run=RUN)
    try:
        r = g.resume(state)
    finally:
        g.close()
    assert r.resumed and r.step == 200
    assert os.listdir(outside) == [], "the journal wrote outside the store"
    assert any(
        "could not write the resume journal" in m.getMessage() and "symlink" in m.getMessage() for m in caplog.records
    )


def test_journal_never_creates_directories_through_a_symlinked_run_dir(tmp_path):
    from dist_guardian import journal

    root = tmp_path / "st"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(root / RUN))
    store = stores.resolve(str(root))
    c = Candidate(
        id="0:x", store=str(root), store_index=0, rel=f"{RUN}/step-000000000100", path="p", kind="native", step=100
    )
    journal.record(store, RUN, c, started=1)  # advisory: logs, never raises
    assert os.listdir(outside) == []


# ----------------------------------------------------------------------------- 4. dtype names from a file


def test_state_tree_dtype_names_never_trigger_torch_lazy_imports(monkeypatch):
    calls: list[str] = []

    def spy(name):
        calls.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", spy, raising=False)
    for name in ("no_such_thing", "_inductor_like_name", "onnx_x"):
        with pytest.raises(CheckpointFormatError, match="unknown dtype"):
            statetree.decode({"__dtype__": name}, {})
    assert calls == [], f"torch.__getattr__ was asked for {calls}"
    assert statetree.decode({"__dtype__": "bfloat16"}, {}) is torch.bfloat16
    assert statetree.decode({"__dtype__": "float32"}, {}) is torch.float32


# ----------------------------------------------------------------------------- 5. plans


def _good_candidate() -> dict:
    return Candidate(
        id="0:r/step-000000000200",
        store="/s",
        store_index=0,
        rel="r/step-000000000200",
        path="/s/r/step-000000000200",
        kind="native",
        step=200,
    ).to_json()


@pytest.mark.parametrize("rel", ["../../etc", "/etc/passwd", "r/../../x", "r//x", "r/./x", "r/x\x00y", ""])
def test_plan_candidate_whose_rel_leaves_the_store_is_refused(rel):
    d = _good_candidate() | {"rel": rel}
    with pytest.raises(PlanFormatError, match="rel"):
        Candidate.from_json(d)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "x\x00"])
def test_plan_file_name_with_a_separator_is_refused(name):
    d = _good_candidate() | {"files": [{"name": name, "size": 1, "digest": None, "rank": None}]}
    with pytest.raises(PlanFormatError, match="plain file name"):
        Candidate.from_json(d)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("candidates"),
        lambda d: d.update(candidates=[{"id": "x"}]),
        lambda d: d.update(candidates=[_good_candidate() | {"bogus": 1}]),
        lambda d: d.update(candidates=[_good_candidate() | {"step": "200"}]),
        lambda d: d.update(candidates=[_good_candidate() | {"tier": ["V"]}]),
        lambda d: d.update(generation=-1),
        lambda d: d.update(rejected=[["only one"]]),
        lambda d: d.update(more="yes"),
    ],
)
def test_malformed_plan_raises_a_named_error_not_a_crash_inside(mutate):
    doc = Plan(
        candidates=(Candidate.from_json(_good_candidate()),),
        rejected=(),
        unreachable=(),
        warnings=(),
        generation=1,
        sightings=1,
    ).to_json()
    assert Plan.from_json(json.loads(json.dumps(doc))).candidates[0].step == 200
    mutate(doc)
    with pytest.raises(PlanFormatError, match="malformed plan"):
        Plan.from_json(doc)


# ----------------------------------------------------------------------------- 6. parsers outside their contract


def test_sniff_zip_with_a_bad_local_header_is_a_report_not_an_exception():
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.arange(3.0)}}, buf)
    raw = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo("archive/data.pkl")
    # The central directory is intact; data.pkl's local header names another file (zipfile: BadZipFile
    # on every open of it, including the raw re-read the sniffer tries after a CRC error).
    raw[info.header_offset + 30] ^= 0x01
    rep = formats.sniff_torch_file(io.BytesIO(bytes(raw)), len(raw), "x.pt")
    assert rep.ok is False and "broken zip structure" in rep.problems[0]


def test_parse_header_with_an_unhashable_dtype_is_a_format_error():
    blob = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    raw = struct.pack("<Q", len(blob)) + blob + b"\x00" * 4
    with pytest.raises(CheckpointFormatError, match="unknown dtype"):
        formats.parse_header(io.BytesIO(raw), len(raw))


def test_torch_save_step_key_is_found_after_the_memo_opcode():
    buf = io.BytesIO()
    torch.save({"model": {}, "step": 4321}, buf)
    rep = formats.sniff_torch_file(io.BytesIO(buf.getvalue()), len(buf.getvalue()), "legacy.pt")
    assert rep.ok and rep.step_key == 4321


# ----------------------------------------------------------------------------- 7. cli verify tmp://


def test_cli_verify_accepts_a_node_local_checkpoint(tmp_path, capsys):
    state = make_state(seed=0)
    g = Guardian(stores=["tmp://nl"], run=RUN)
    assert g.save(state, step=100).committed
    g.close()
    assert cli.main(["verify", f"tmp://nl/{RUN}/{stores.step_dir_name(100)}", "--json"]) == cli.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["tier"] == "V" and out["reasons"] == []
    assert cli.main(["verify", "tmp://nl/../../etc"]) == cli.EXIT_USAGE


# ----------------------------------------------------------------------------- 8. dependency floor


def test_torch_floor_excludes_the_weights_only_rce():
    import tomllib

    with open(os.path.join(repo_paths.REPO_ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"^torch\b", d))
    m = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert m and (int(m.group(1)), int(m.group(2))) >= (2, 6), spec
    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)

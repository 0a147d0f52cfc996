"""T08: planning and verification work bounded by what an attacker controls (memory, bytes read, time).

(a) Full verification (``dist-guardian verify``, retention's check of counted checkpoints) streams each
file in ``formats.DIGEST_CHUNK`` pieces instead of reading it whole.
(b) A torch.save zip whose data.pkl declares more than ``formats.MAX_PICKLE_BYTES`` is R
(``planning_cap_exceeded``) before anything is inflated.
(c) Planning checks zip CRCs up to ``PLANNING_CRC_BYTES``/``PLANNING_CRC_SECONDS``; the rest is named
(``crc_unchecked``, tier L) and checked by the load, which still finds the damage.
(d) A DCP ``.metadata`` over the pickle cap is refused by its listed size, and a pickle walk longer than
``PLANNING_SCAN_SECONDS`` is R.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import repo_paths
import torch

from dist_guardian import Guardian, discovery, foreign_loading, formats, stores, verify

RUN = "r"
REPL = "replicated.dgt"
ROOT_DIR = repo_paths.REPO_ROOT

_PEAK_CHILD = r"""
import json, sys
from dist_guardian import stores, verify

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")

from dist_guardian import cli
store = stores.resolve(sys.argv[2])
before = hwm()
if sys.argv[1] == "verify":
    tier, reasons = verify.verify_full(store, sys.argv[3])
    print(json.dumps({"tier": tier, "reasons": reasons, "rise": hwm() - before}))
else:
    cli.main(["ls", sys.argv[2], "--run", sys.argv[3], "--json"])
    print(json.dumps({"rise": hwm() - before}))
"""


def _child_peak(mode: str, root: str, arg: str) -> tuple[dict, list[str]]:
    """Run ``verify_full`` or ``dist-guardian ls --json`` in a fresh interpreter; its peak RSS rise and output."""
    env = dict(os.environ, PYTHONPATH=ROOT_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, mode, root, arg],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1]


def _verdicts(root: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    store = stores.resolve(root)
    got = verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
    return {c.rel: (c.tier, c.reasons) for c in got}


def _stored_zip(path: str, members: list[tuple[str, bytes | int, int]]) -> None:
    """A zip of stored members, written by hand: (name, bytes, crc) or (name, size, crc) for a sparse hole."""
    central = b""
    with open(path, "wb") as f:
        for name, data, crc in members:
            size = data if isinstance(data, int) else len(data)
            offset = f.tell()
            nb = name.encode()
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, size, size, len(nb), 0) + nb)
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)  # a hole: zeros that cost nothing to make, but must be read
            else:
                f.write(data)
            central += (
                struct.pack(
                    "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, size, size, len(nb), 0, 0, 0, 0, 0, offset
                )
                + nb
            )
        cd_at = f.tell()
        f.write(
            central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), cd_at, 0)
        )


def _flip_byte(path: str, tensor: str, at: int) -> None:
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin = json.loads(f.read(n))[tensor]["data_offsets"][0]
        f.seek(8 + n + begin + at)
        b = f.read(1)
        f.seek(8 + n + begin + at)
        f.write(bytes([b[0] ^ 0x40]))


def test_T08a_verify_full_streams_a_256MB_checkpoint(tmp_path):
    root = str(tmp_path / "ck")
    big = torch.zeros(64 << 20)  # 256 MiB in one tensor: far larger than a chunk
    g = Guardian(stores=[root], run=RUN)
    assert g.save({"trainer": {"big": big, "small": torch.ones(3)}}, step=100).committed
    g.close()
    del big
    rel = f"{RUN}/{stores.step_dir_name(100)}"
    got, _ = _child_peak("verify", root, rel)
    assert (got["tier"], got["reasons"]) == ("V", [])
    assert got["rise"] < 64 << 20, f"verify_full raised peak RSS by {got['rise'] >> 20} MiB for a 256 MiB file"
    # A damaged byte deep inside the big tensor (past the first chunks) is still found and named.
    path = os.path.join(root, rel, REPL)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        name = next(k for k, v in json.loads(f.read(n)).items() if k != "__metadata__" and v["shape"] == [64 << 20])
    _flip_byte(path, name, 200 << 20)
    tier, reasons = verify.verify_full(stores.resolve(root), rel)
    assert tier == "S" and len(reasons) == 1 and reasons[0].startswith(f"checksum_mismatch: {REPL}")
    assert f"damaged_tensors=[{name!r}]" in reasons[0]


def test_T08b_zip_bomb_data_pkl_is_R_before_it_is_inflated(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    path = str(root / "step_50.pt")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as m:
            zeros = bytes(8 << 20)
            for _ in range(32):  # 256 MiB of zeros: about 256 KB deflated
                m.write(zeros)
        zf.writestr(zipfile.ZipInfo("archive/version"), b"3\n")
    assert os.path.getsize(path) < 2 << 20
    got, out = _child_peak("ls", str(root), RUN)
    listing = {c["path"]: (c["tier"], c["reasons"]) for c in json.loads("\n".join(out))["listing"]}
    assert got["rise"] < 64 << 20, f"ls of a 1 MB zip bomb raised peak RSS by {got['rise'] >> 20} MiB"
    tier, reasons = listing[path]
    assert tier == "R" and reasons[0].startswith("planning_cap_exceeded: archive/data.pkl (declared 268435456 bytes)")


def test_T08c_planning_crc_check_is_bounded_on_a_sparse_3_5GiB_file(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    pkl = pickle.dumps({"step": 7}, protocol=2)
    big = 7 << 29  # 3.5 GiB hole: costs seconds to read and CRC, nothing to make; its CRC is wrong
    _stored_zip(
        str(root / "huge.pt"),
        [
            ("archive/data.pkl", pkl, zlib.crc32(pkl)),
            ("archive/data/0", big, 1),
            ("archive/version", b"3\n", zlib.crc32(b"3\n")),
        ],
    )
    t0 = time.monotonic()
    tier, reasons = _verdicts(str(root))["huge.pt"]
    took = time.monotonic() - t0
    assert tier == "L", reasons
    assert reasons == (
        "legacy_unverified: torch.save file, zip CRCs clean as far as checked",
        f"crc_unchecked: {big} of {os.path.getsize(root / 'huge.pt')} bytes past the planning budget"
        f" ({formats.PLANNING_CRC_BYTES} bytes, {formats.PLANNING_CRC_SECONDS:g} s); checked when loaded",
    )
    assert took < formats.PLANNING_CRC_SECONDS + 1.5, f"planning one candidate took {took:.1f} s"


def test_T08c_damage_past_the_planning_budget_is_found_by_the_load(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    path = str(root / "step_60.pt")
    torch.save({"weight": torch.zeros((formats.PLANNING_CRC_BYTES >> 2) + 1024)}, path)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    with open(path, "r+b") as f:  # one flipped bit near the end of the tensor's member
        f.seek(info.header_offset)
        nlen, xlen = struct.unpack("<2H", f.read(30)[26:30])
        f.seek(info.header_offset + 30 + nlen + xlen + info.file_size - 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    store = stores.resolve(str(root))
    c = next(
        c
        for c in verify.verify_all(discovery.discover_store(store, RUN), run=RUN, compat=None).candidates
        if c.rel == "step_60.pt"
    )
    assert c.tier == "L" and any(r.startswith("crc_unchecked: ") for r in c.reasons), c.reasons
    staged = foreign_loading.load_torch_file(c, store, {"model": torch.nn.Linear(1, 1)})
    assert staged.suspect and staged.suspect[0].startswith("checksum_mismatch: ")
    assert "zip CRC32 mismatch in" in staged.suspect[0] and "/data/0" in staged.suspect[0]


def _dcp_dir(root, name: str) -> str:
    d = root / name
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    return str(d / ".metadata")


def test_T08d_dcp_metadata_over_the_cap_is_R_by_its_listed_size(tmp_path):
    md = _dcp_dir(tmp_path / "ck", "dcp_step_5")
    with open(md, "wb") as f:
        f.write(b"\x80\x02N.")
        f.truncate(formats.MAX_PICKLE_BYTES + 1)
    tier, reasons = _verdicts(str(tmp_path / "ck"))["dcp_step_5"]
    assert tier == "R" and reasons == (
        f"planning_cap_exceeded: .metadata is {formats.MAX_PICKLE_BYTES + 1} bytes, over the cap of"
        f" {formats.MAX_PICKLE_BYTES}",
    )


def test_T08d_dcp_metadata_pickle_walk_is_bounded_in_time(tmp_path):
    md = _dcp_dir(tmp_path / "ck", "dcp_step_6")
    with open(md, "wb") as f:  # 16 MB of one-byte opcodes (NONE, POP): the walk took 14 s
        f.write(b"\x80\x02" + b"N0" * (8 << 20) + b"N.")
    t0 = time.monotonic()
    tier, reasons = _verdicts(str(tmp_path / "ck"))["dcp_step_6"]
    took = time.monotonic() - t0
    # Planning stops paying at the cap; the candidate stays L (a big real model's .metadata must stay
    # loadable) and its globals are judged by the allowlisting unpickler when it is loaded.
    assert tier == "L" and reasons[-1] == (
        f"scan_incomplete: .metadata: walking a {16 << 20 | 4}-byte pickle is over the planning cap of"
        f" {formats.PLANNING_SCAN_SECONDS:g} s; its globals are judged when loaded"
    ), reasons
    assert took < formats.PLANNING_SCAN_SECONDS + 2.0, f"planning one DCP candidate took {took:.1f} s"


def test_T08b_zip_central_directory_over_the_cap_is_R_before_zipfile_parses_it(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    pkl = pickle.dumps({"step": 1}, protocol=2)
    long = [(f"archive/data/{i}-" + "x" * 60_000, b"", 0) for i in range(300)]  # an 18 MB central directory
    _stored_zip(str(root / "wide.pt"), [("archive/data.pkl", pkl, zlib.crc32(pkl))] + long)
    tier, reasons = _verdicts(str(root))["wide.pt"]
    assert (
        tier == "R"
        and reasons[0].startswith("planning_cap_exceeded: a ")
        and reasons[0].endswith(
            f"-byte zip central directory is over the planning cap of {formats.MAX_ZIP_DIRECTORY_BYTES} bytes"
        )
    ), reasons

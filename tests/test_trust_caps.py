"""T08: planning and verification work bounded by what an attacker controls (memory, bytes read, time).

(a) Full verification (``dist-guardian verify``, retention's check of counted checkpoints) streams each
file in ``formats.DIGEST_CHUNK`` pieces instead of reading it whole.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import torch

from dist_guardian import Guardian, stores, verify

RUN = "r"
REPL = "replicated.dgt"
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PEAK_CHILD = r"""
import json, sys
from dist_guardian import stores, verify

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")

store = stores.resolve(sys.argv[1])
before = hwm()
tier, reasons = verify.verify_full(store, sys.argv[2])
print(json.dumps({"tier": tier, "reasons": reasons, "rise": hwm() - before}))
"""


def _child_peak(root: str, rel: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, root, rel], env=env, capture_output=True, text=True,
                         timeout=90, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    got = _child_peak(root, rel)
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

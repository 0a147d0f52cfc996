"""A claim left by a writer that died on this host does not block the next incarnation's mirror."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import helpers

from dist_guardian import Guardian


def test_claim_of_a_dead_local_writer_is_taken_over_at_once(tmp_path, s3):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    claim = {
        "token": "someone-else",
        "step": 5,
        "writer": {"host": socket.gethostname(), "pid": dead.pid},
        "created_unix": 0,
    }
    s3.put("ckpt/r/.writers/step-000000000005.json", json.dumps(claim).encode())
    state = helpers.make_state(seed=1)
    g = Guardian(
        stores=[str(tmp_path / "ck"), s3.url], run="r", storage_options=s3.storage_options(), mirror_timeout=20
    )
    assert g.save(state, step=5).committed
    left = g.close()  # stale_s is an hour by default: without the fix this waits and reports the step
    assert left == []
    assert "ckpt/r/step-000000000005/manifest.json" in s3.keys("ckpt/r/")


def test_claim_of_a_live_writer_still_conflicts(tmp_path, s3):
    claim = {"token": "someone-else", "step": 5, "writer": {"host": socket.gethostname(), "pid": 1}, "created_unix": 0}
    s3.put("ckpt/r/.writers/step-000000000005.json", json.dumps(claim).encode())  # pid 1 is alive
    g = Guardian(stores=[str(tmp_path / "ck"), s3.url], run="r", storage_options=s3.storage_options(), mirror_timeout=2)
    assert g.save(helpers.make_state(seed=1), step=5).committed
    left = g.close()
    assert left and "step 5" in left[0]
    assert "ckpt/r/step-000000000005/manifest.json" not in s3.keys("ckpt/r/")

"""CUDA-only checks (marker `gpu`): skipped on CPU-only machines, run unchanged on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import repo_paths
import torch

from dist_guardian import Guardian

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_resume_into_cuda_model_through_pinned_staging(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 256, device="cuda")).sum().backward()
    opt.step()
    g = Guardian(stores=[str(tmp_path)], run="g")
    assert g.save({"model": m, "optim": opt}, step=1).committed
    g.close()
    m2 = torch.nn.Linear(256, 256).cuda()
    opt2 = torch.optim.AdamW(m2.parameters())
    r = Guardian(stores=[str(tmp_path)], run="g").resume({"model": m2, "optim": opt2})
    assert r.resumed and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert m2.weight.device.type == "cuda"


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_runs(tmp_path):
    bench = os.path.join(repo_paths.REPO_ROOT, "benchmarks", "bench_gpu.py")
    p = subprocess.run(
        [sys.executable, bench, "--size-mb", "64", "--runs", "2", "--out", str(tmp_path / "g.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "dist_guardian resume into cuda model" in p.stdout

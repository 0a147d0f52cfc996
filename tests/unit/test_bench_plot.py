"""``dist-guardian bench --plot``: a PNG of time against size and tensor count, or a clear error without matplotlib."""

from __future__ import annotations

import sys

import pytest

from dist_guardian import bench, cli


def test_plot_without_matplotlib_fails_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before the check"))
    code = cli.main(["bench", str(tmp_path), "--size-mb", "1", "--runs", "1", "--plot", str(tmp_path / "p.png")])
    assert code == cli.EXIT_USAGE
    assert "pip install 'dist-guardian[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png_with_both_sweeps(tmp_path):
    import matplotlib  # noqa: F401  (make test installs the plot extra: this test runs, never skips)

    out = tmp_path / "bench.png"
    store = tmp_path / "store"
    store.mkdir()
    assert cli.main(["bench", str(store), "--size-mb", "4", "--runs", "1", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_rows_cover_sizes_counts_and_peers(tmp_path):
    rows = bench.sweep(str(tmp_path), size_mb=2, counts=(10, 1_000))
    assert {r["sweep"] for r in rows} == {"size_mb", "tensors"}
    assert {r["x"] for r in rows if r["sweep"] == "tensors"} == {10, 1_000}
    methods = {r["method"] for r in rows}
    assert {"dist_guardian save", "dist_guardian resume", "torch.save", "torch.load"} <= methods
    assert all(r["seconds"] > 0 for r in rows)

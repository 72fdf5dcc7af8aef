"""Smoke test of experiments/bench_meta.py: one tiny configuration (K=1, B=1, bio, one repeat) end to end, the
children run in this process (a spawned child would spend most of the time importing torch)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_meta.py"


def test_bench_meta_prints_rows_and_verdicts(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_meta", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_spawn", lambda cfg, timeout: bench._child(cfg))
    threads = torch.get_num_threads()
    try:
        args = ["--K", "1", "--Q", "1", "--batches", "1", "--rules", "bio", "--repeats", "1", "--check-B", "1"]
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ERROR" not in out, out
    rows = [line.split() for line in out.splitlines() if line.startswith("  bio")]
    assert [r[1] for r in rows] == ["naive", "fast", "floor", "check"]
    assert all(float(r[3]) > 0 and float(r[5]) >= 0 for r in rows[:3])  # episodes/s, RSS MB/episode
    assert float(rows[1][8]) > 0  # fast/floor, from pairs timed in the fast child
    verdicts = [line for line in out.splitlines() if line.startswith("# ") and "(target" in line]
    assert len(verdicts) == 4
    assert verdicts[0].endswith("n/a (not measured)")  # B=32 not run
    assert verdicts[3].endswith("PASS")  # float64 agreement holds on any size

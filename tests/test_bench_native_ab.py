"""Smoke test of experiments/bench_native_ab.py: the kernel at HEAD against the working tree's (the same source in a
clean checkout, so no second build), two rounds of one episode, F^bio."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rulesearch.inner.native import native_ready

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

pytestmark = pytest.mark.skipif(not native_ready(torch.float32), reason="no C compiler builds the native kernel")


def _script():
    sys.path.insert(0, str(EXPERIMENTS))  # the script imports bench_meta beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_native_ab", EXPERIMENTS / "bench_native_ab.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return mod


def test_rows_of_both_timings_and_a_ratio(capsys):
    threads = torch.get_num_threads()
    try:
        assert _script().main(["--base", "HEAD", "--rounds", "2", "--B", "1", "--rules", "bio"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("bio")]
    assert [" ".join(r[1:3]) for r in rows] == ["meta-gradient base", "online steps"]
    for r in rows:
        numbers = [float(x) for x in r if x.replace(".", "", 1).isdigit()]
        assert len(numbers) == 5 and all(x > 0 for x in numbers)  # base min, median; head min, median; ratio


def test_an_unknown_revision_names_the_problem():
    with pytest.raises(SystemExit, match="Name a commit of this repository"):
        _script().kernel_source("no-such-revision")

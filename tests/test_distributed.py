"""Data-parallel meta-training: rank shares of the meta-batch, and a 2-process torchrun ``rulesearch discover`` that
follows the single-process parameter trajectory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.errors import ConfigError
from rulesearch.train import RuleSearch
from rulesearch.train import distributed as rsd

ROOT = Path(__file__).resolve().parents[1]
# 3 runs x B=2: the ranks' shares are episodes 0-2 and 3-5 of the step, so run 1 is split across the ranks
ARGS = [
    "--rule", "bio", "--dataset", "digits", "--sizes", "64,16,10", "-M", "3", "-K", "4", "-Q", "2",
    "--episodes", "5", "--meta-batch", "2", "--runs", "3", "--lr", "1e-2", "--l1", "0.1", "--dtype", "float64",
    "--threads", "1", "--no-compare", "--no-progress",
]  # fmt: skip


@pytest.mark.parametrize("n", [0, 1, 5, 7, 32])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_episodes_disjoint_and_covering(n, world_size):
    shares = [rsd.rank_episodes(n, r, world_size) for r in range(world_size)]
    flat = [k for s in shares for k in s]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_single_process_helpers():
    assert rsd.world() == (0, 1) and rsd.is_rank0()
    assert rsd.rank_episodes(4) == [0, 1, 2, 3]
    assert rsd.gather_objects("x") == ["x"] and rsd.broadcast_object("x") == "x"
    t = torch.tensor([1.0, 2.0])
    assert rsd.all_reduce_sum([t])[0] is t and t.tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError):
        rsd.rank_episodes(4, rank=2, world_size=2)


def test_distributed_true_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        RuleSearch("bio", distributed=True, progress=False).fit()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_discover_follows_single_process_trajectory(tmp_path):
    result = CliRunner().invoke(app, ["discover", *ARGS, "--out", str(tmp_path / "single")])
    assert result.exit_code == 0, result.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "rulesearch.cli", "discover", *ARGS, "--name", "multi"]  # fmt: skip
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish in time on this machine")
    if run.returncode != 0 and ("errno" in run.stderr.lower() or "address" in run.stderr.lower()):
        pytest.skip(f"torchrun could not start here: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Discovered rule") == 1  # rank 0 prints
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["multi"]  # rank 0 writes
    single, multi = tmp_path / "single", tmp_path / "runs" / "multi"
    a, b = pd.read_csv(single / "metrics.csv"), pd.read_csv(multi / "metrics.csv")
    assert len(b) == 5 * 3 and list(b.columns) == list(a.columns)
    theta = [c for c in a.columns if c.startswith("theta.")]
    assert not (a[theta].iloc[0] == a[theta].iloc[-1]).all()
    cols = [c for c in a.columns if c != "seconds"]  # the trajectory, and the metrics gathered from both ranks
    torch.testing.assert_close(torch.tensor(b[cols].to_numpy()), torch.tensor(a[cols].to_numpy()), rtol=1e-8, atol=0,
                               equal_nan=True)  # fmt: skip
    world = [json.loads((d / "manifest.json").read_text())["world_size"] for d in (single, multi)]
    assert world == [1, 2]

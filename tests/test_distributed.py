"""Data-parallel meta-training: rank shares of the meta-batch, and a 2-process torchrun run that follows the
single-process parameter trajectory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rulesearch import distributed as rsd
from rulesearch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "distributed_meta.py"
ARGS = ["--steps", "5", "--B", "5", "--rule", "bio", "--dtype", "float64", "--lr", "1e-2"]


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
    assert rsd.rank0_only(lambda: 7)() == 7
    assert rsd.gather_objects("x") == ["x"]
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = rsd.data_parallel_backward(lambda ks: (p * torch.tensor(ks, dtype=p.dtype).sum()).sum(), [p], 4)
    assert loss == pytest.approx(6 * 3 / 4)
    torch.testing.assert_close(p.grad, torch.tensor([1.5, 1.5]))
    with pytest.raises(ConfigError):
        rsd.rank_episodes(4, rank=2, world_size=2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_processes_follow_single_process_trajectory(tmp_path):
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--out", str(single)], env=_env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(SCRIPT),
           *ARGS, "--out", str(multi)]  # fmt: skip
    try:
        run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish in time on this machine")
    if run.returncode != 0 and ("errno" in run.stderr.lower() or "address" in run.stderr.lower()):
        pytest.skip(f"torchrun could not start here: {run.stderr[-500:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    ta, tb = torch.tensor(a["theta"], dtype=torch.float64), torch.tensor(b["theta"], dtype=torch.float64)
    assert ta.shape == (6, 3) and not torch.equal(ta[0], ta[-1])
    torch.testing.assert_close(tb, ta, rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), rtol=1e-8, atol=0)
    for shares in b["ranks_ks"]:  # every meta-step: the ranks' episode indices are disjoint and cover 0..B-1
        flat = [k for s in shares for k in s]
        assert len(shares) == 2 and all(shares) and sorted(flat) == list(range(5)) and len(set(flat)) == 5

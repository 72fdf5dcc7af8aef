"""Data-parallel meta-training of a rule's coefficients with torch.distributed: a small standalone example.

Each meta-step ``t`` draws the meta-batch of episodes ``(seed, t, k)``, ``k = 0..B-1``; every rank runs its own
indices (:func:`rulesearch.distributed.rank_episodes`) with :func:`rulesearch.inner.run_episodes`, the
meta-gradients are all-reduced, and every rank takes the same Adam step. Rank 0 writes the trajectory.

    python experiments/distributed_meta.py --out traj.json                        # one process
    python -m torch.distributed.run --nproc_per_node=2 experiments/distributed_meta.py --out traj.json
    python -m torch.distributed.run --nproc_per_node=4 experiments/distributed_meta.py --device cuda ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from rulesearch import distributed as rsd
from rulesearch.compile import compile_rule
from rulesearch.data import load_dataset
from rulesearch.episodes import TaskSampler
from rulesearch.inner import run_episodes
from rulesearch.networks import Network
from rulesearch.pools import named_rule


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="bio")
    p.add_argument("--steps", type=int, default=5, help="meta-steps")
    p.add_argument("--B", type=int, default=4, help="episodes per meta-batch (all ranks together)")
    p.add_argument("--sizes", default="64,16,10")
    p.add_argument("--M", type=int, default=3)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--Q", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    args = p.parse_args(argv)

    device = rsd.init_distributed(device=args.device)
    rank, world_size = rsd.world()
    dtype = getattr(torch, args.dtype)
    net = Network(sizes=tuple(int(s) for s in args.sizes.split(",")), feedback="fa")
    rule = named_rule(args.rule)
    update = compile_rule(rule)
    sampler = TaskSampler(load_dataset("digits"), M=args.M, K=args.K, Q=args.Q)
    theta = torch.zeros(rule.n_params, dtype=dtype, device=device)
    theta[0] = 1e-3
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=args.lr)

    def meta_loss(t):
        def loss_fn(ks):
            batch = sampler.sample(seed=args.seed, t=t, ks=ks).to(device=device, dtype=dtype)
            return run_episodes(net, batch, update, theta, metrics=False).loss.sum()

        return loss_fn

    trajectory, losses, shares = [theta.detach().cpu().tolist()], [], []
    for t in range(args.steps):
        opt.zero_grad()
        losses.append(rsd.data_parallel_backward(meta_loss(t), [theta], args.B))
        shares.append(rsd.gather_objects(rsd.rank_episodes(args.B)))
        opt.step()
        trajectory.append(theta.detach().cpu().tolist())

    if rsd.is_rank0():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"world_size": world_size, "theta": trajectory, "loss": losses, "ranks_ks": shares}, fh)
        os.replace(tmp, args.out)
    rsd.barrier()
    rsd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

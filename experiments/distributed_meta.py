"""Data-parallel meta-training from Python: :meth:`RuleSearch.fit` joins the torchrun process group by itself.

Every rank runs its share of each meta-step's episodes, the meta-gradients are summed across ranks and every rank
takes the same Adam step (the parameters follow the single-process trajectory); rank 0 writes the run directory.

    python experiments/distributed_meta.py --out runs/dp-1                          # one process
    torchrun --nproc_per_node=2 experiments/distributed_meta.py --out runs/dp-2     # two, same trajectory
    torchrun --nproc_per_node=4 experiments/distributed_meta.py --device cuda --out runs/dp-cuda

The command line does the same: ``torchrun --nproc_per_node=2 -m rulesearch.cli discover ...``.
"""

from __future__ import annotations

import argparse
import sys

from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", default="bio")
    p.add_argument("--steps", type=int, default=5, help="meta-steps")
    p.add_argument("--B", type=int, default=4, help="episodes per meta-step and run (all ranks together)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--sizes", default="64,16,10")
    p.add_argument("--M", type=int, default=3)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--Q", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="run directory (written by rank 0)")
    args = p.parse_args(argv)
    search = RuleSearch(
        rule=args.rule,
        network=NetworkConfig(sizes=tuple(int(s) for s in args.sizes.split(","))),
        task=TaskConfig(dataset="digits", M=args.M, K=args.K, Q=args.Q),
        meta=MetaConfig(
            episodes=args.steps,
            meta_batch=args.B,
            runs=args.runs,
            lr=args.lr,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            compare=False,
        ),
        out=args.out,
        progress=False,
    ).fit()
    if search.world_[0] == 0:
        print(f"world size {search.world_[1]}\n{search}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

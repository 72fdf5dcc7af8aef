"""Benchmark: one batched dW3 step versus a plain forward fixed-point solve of the same batch.

A dW3 step is the solve, the signals at the fixed point (gain, delta) and the compiled rule's batch mean; the issue's
target is a step within 2x of the solve alone. dW1 (one N x N solve per sample for the implicit error) for
comparison. Prints median seconds over ``--repeats`` batches; not a timed test.

    python experiments/bench_fixed_point.py [--N 300] [--batch 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rulesearch.compile import compile_rule
from rulesearch.fixedpoint import dW1, dW3, dW4, fixed_point_step
from rulesearch.networks import FixedPointNetwork


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=300)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = FixedPointNetwork(n_in=784, n_hidden=args.N, tol=1e-4, max_iter=200)
    params = net.init_params(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 784, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    for rule in (dW1, dW3, dW4):
        compile_rule(rule)  # compile outside the timings

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    sol = net.solve(params, x)
    t_solve = timed(lambda: net.solve(params, x))
    print(f"N={args.N} batch={args.batch} threads={args.threads} float32; solver iterations {sol.iterations}")
    print(f"forward fixed-point solve: {t_solve:.3f} s")
    for rule in (dW3, dW4, dW1):
        t = timed(lambda rule=rule: fixed_point_step(net, params, params.W, x, y, rule, 0.1))
        print(f"{rule.name} step (solve + signals + update): {t:.3f} s = {t / t_solve:.2f}x the solve")


if __name__ == "__main__":
    main()

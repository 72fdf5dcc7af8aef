"""Interleaved A/B timing of the native inner-loop kernel: ``kernel.c`` at a git revision (``--base``) against the
working tree's (or ``--head REV``), in one process, on the same episodes.

A machine whose speed drifts (a shared VM: up to 1.5x within an hour) makes separate runs hard to compare, and
even runs interleaved process by process vary by 20%. Here both libraries are loaded into one process and each round
times a batch of ``--B`` episodes (online steps, query loss and meta-gradient; then the online steps alone, the
forward-only floor) with the base, then with the head, the order alternating by round: the per-round ratio
head / base cancels most of the drift. Paper configuration (784-170-130-100-70-47, M=5 K=50 Q=10, feedback
alignment, float32, synthetic data as ``bench_meta.py``), one thread. Both revisions must share the kernel's
entry points (``rs_forward``, ``rs_adjoint``, ``rs_sizes``); ``experiments/native_bits.py`` checks that they give
the same bits. A figure to read, not a timed test.

    python experiments/bench_native_ab.py --base 8df00a1
    python experiments/bench_native_ab.py --base 8df00a1 --head eb34169 --rules pool --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from bench_meta import _make_batch, _theta

import rulesearch.inner.native as native_inner
from rulesearch.compile.compiler import compile_rule
from rulesearch.inner import run_episodes
from rulesearch.lang.pools import named_rule
from rulesearch.networks import Network

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "rulesearch/inner/kernel.c"
SIZES = [784, 170, 130, 100, 70, 47]


def kernel_source(rev: str | None) -> str:
    """``kernel.c`` at ``rev`` (None: the working tree's)."""
    if rev is None:
        return (ROOT / KERNEL).read_text()
    res = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"git show {rev}:{KERNEL} failed: {res.stderr.strip()}. Name a commit of this repository.")
    return res.stdout


def time_episodes(lib, net, batch, upd, theta, B: int, grad: bool) -> float:
    """Seconds per episode of one batch with the kernel ``lib``: the meta-gradient (``grad``) or the online steps."""
    with mock.patch.object(native_inner, "_kernel", lambda real: lib):
        leaf = theta.clone().requires_grad_(grad)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            res = run_episodes(net, batch, upd, leaf, seed=0, metrics=False, method="native")
            if grad:
                res.loss.mean().backward()
        return (time.perf_counter() - t0) / B


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the base kernel")
    ap.add_argument("--head", default=None, help="git revision of the head kernel (default: the working tree)")
    ap.add_argument("--rules", default="bio,pool")
    ap.add_argument("--B", type=int, default=4, help="episodes per timed batch")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    head_name = args.head or "working tree"
    revisions = {args.base: args.base, head_name: args.head}
    libs = {v: native_inner.build_kernel(kernel_source(rev), "float") for v, rev in revisions.items()}
    cfg = {"M": 5, "K": 50, "Q": 10, "data": "synthetic", "sizes": SIZES}
    batch = _make_batch(cfg, torch, torch.float32, "cpu", args.B)
    net = Network(sizes=tuple(SIZES), feedback="fa")
    print(f"# bench_native_ab: kernel.c at {args.base} (base) and {head_name} (head), {args.B} episodes per batch, "
          f"{args.rounds} rounds (order alternating), {'-'.join(map(str, SIZES))}, M=5 K=50 Q=10, fa, float32, "
          f"synthetic data, 1 thread; s/episode: min and median over rounds; ratio: head/base per round, median "
          f"(range)")  # fmt: skip
    for name in args.rules.split(","):
        rule = named_rule(name)
        upd, theta = compile_rule(rule), _theta(torch, rule, torch.float32, "cpu")
        times = {(v, g): [] for v in libs for g in (True, False)}
        for lib in libs.values():  # warm-up: first calls, page faults
            time_episodes(lib, net, batch, upd, theta, args.B, True)
        for r in range(args.rounds):
            order = list(libs) if r % 2 == 0 else list(libs)[::-1]
            for v in order:
                for g in (True, False):
                    times[v, g].append(time_episodes(libs[v], net, batch, upd, theta, args.B, g))
        for g, label in ((True, "meta-gradient"), (False, "online steps alone")):
            base, head = times[args.base, g], times[head_name, g]
            ratios = sorted(h / b for h, b in zip(head, base))
            print(f"{name:<5} {label:<19} base {min(base):.4f} / {statistics.median(base):.4f}  "
                  f"head {min(head):.4f} / {statistics.median(head):.4f}  "
                  f"head/base {statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

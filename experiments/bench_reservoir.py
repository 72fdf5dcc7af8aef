"""Per-step cost of one SUPER-TREX training trial on the N = 1000 reservoir (Task 1): a straightforward numpy loop of
the equations (one network, dense J, float64, as the authors' MATLAB scripts) against ``run_reservoir`` (torch, the
compiled exploratory rule, block-diagonal sparse J, batched over B networks). Prints milliseconds of CPU time
(``time.process_time``) per network-step; not a timed test. One thread each (BLAS threads pinned to 1 before numpy
loads).

On a shared machine the timings drift with the other jobs, so the loops are measured interleaved: each of
``--rounds`` rounds runs the numpy loop and then every configuration once; a row gives the fastest and the median
time over the rounds and the median over rounds of (numpy loop / row) measured in the same round.

The first steps of a trial have the mastery gate shut (the running error is far above the threshold), and
``run_reservoir`` skips an RLS update whose gates are all exactly 0 (it would change nothing); the numpy loop, as the
scripts, always updates. Rows marked ``gate open`` hold the gate open (threshold raised, mastery step 0.05) so that
RLS runs every 10 steps, as it does once the exploratory pathway has learned: the cost of a trial's later part.
Rows marked ``symmetric RLS`` run those updates with ``symmetric_rls=True`` (one packed triangle of ``P`` through
BLAS, rounded differently from the default, whose results are bitwise those of the straightforward loop). Rows marked
``native`` run the training steps in the C kernel (``backend="native"``, built before the first round; skipped when
no C compiler is found).

    python experiments/bench_reservoir.py --steps 500 --batch 1 8 16 --rounds 5

``--out FILE`` also writes the printed lines to FILE (results/bench_reservoir.txt comes from such a run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rulesearch import native  # noqa: E402
from rulesearch.reservoir import Reservoir, butterfly, paper_learning, run_reservoir  # noqa: E402


def numpy_trial(n: int, steps: int, seed: int = 0) -> float:
    """CPU seconds for ``steps`` SUPER-TREX steps in plain numpy (Task 1 settings), the equations of the module."""
    rng = np.random.default_rng(seed)
    dt, tau, alpha, p, lam, d = 0.2, 10.0, 0.025, 0.1, 1.5, 2
    J = (rng.random((n, n)) < p) * rng.standard_normal((n, n)) * lam / np.sqrt(p * n)
    Q = rng.uniform(-1, 1, (n, d))
    x = rng.uniform(-0.5, 0.5, n)
    r = np.tanh(x)
    f = butterfly(steps).numpy()
    W_exp, W_mst, P = np.zeros((d, n)), np.zeros((d, n)), np.eye(n) / 10.0
    z, zbar, ebar, rbar, beta = np.zeros(d), np.zeros(d), 0.0, 0.0, 0.01
    t0 = time.process_time()
    for t in range(steps):
        x = x + dt / tau * (-x + J @ r + Q @ z)
        r = np.tanh(x) + rng.uniform(-alpha, alpha, n)
        z_exp = W_exp @ r + rng.uniform(-beta, beta, d)
        z = z_exp + W_mst @ r
        zbar = 0.8 * zbar + 0.2 * z_exp
        e = float(((z - f[t]) ** 2).sum())
        ebar = 0.8 * ebar + 0.2 * e
        rbar = 0.8 * rbar - 0.2 * e
        beta = 0.025 * (10 * ebar) ** 0.25
        u = -e - rbar
        if u > 0:
            W_exp += 5e-4 * 5 * u**0.25 * np.outer(z_exp - zbar, r)
        if (t + 1) % 10 == 0:
            gate = 0.5 - 0.5 * np.tanh(5e5 * (ebar - 1.5e-3))
            k = P @ r
            c = 1.0 / (1.0 + r @ k)
            P -= gate * c * np.outer(k, k)
            W_mst += 0.5 * gate * c * np.outer(z_exp, k)
    return time.process_time() - t0


def run_trial(n: int, steps: int, B: int, dtype, learning, symmetric_rls: bool = False, backend="torch") -> float:
    """CPU seconds per network-step of ``run_reservoir``'s second training trial of ``steps`` steps (timed between the
    trials' log lines: the networks' draw, the rule's compilation and the first trial's warm-up are not steps)."""
    marks = []
    run_reservoir(Reservoir(n=n, sparse=True), "butterfly", learning, list(range(B)), n_train=2, n_test=0,
                  trial_steps=steps, dtype=dtype, symmetric_rls=symmetric_rls, backend=backend,
                  log=lambda _: marks.append(time.process_time()))  # fmt: skip
    return (marks[1] - marks[0]) / steps / B


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", choices=("float64", "float32"), nargs="+", default=["float64", "float32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    shut = paper_learning("supertrex", "butterfly")
    # the gate held open from the start: threshold raised, and the mastery step scaled down (0.5 -> 0.05) so that the
    # untrained networks stay finite (with 0.5 they diverge within the first trial)
    gate_open = replace(shut, mastery=replace(shut.mastery, threshold=1e3, scale=0.05))
    configs = [(name, B, "gate shut", shut) for name in a.dtype for B in a.batch]
    configs += [("float64", B, "gate open", gate_open) for B in a.batch if "float64" in a.dtype]
    configs += [("float64", B, "gate open, symmetric RLS", gate_open) for B in a.batch if "float64" in a.dtype]
    if native.available():
        configs += [(name, B, "gate shut, native", shut) for name in a.dtype for B in a.batch]
        configs += [("float64", B, "gate open, native", gate_open) for B in a.batch if "float64" in a.dtype]
    else:
        print("no C compiler found: the native backend's rows are left out")
    base, times = [], {c[:3]: [] for c in configs}
    for name, _, gate, learning in configs:  # build the native kernels before timing
        if gate.endswith("native"):
            run_trial(a.n, 20, 1, getattr(torch, name), learning, backend="native")
    for k in range(a.rounds):
        base.append(numpy_trial(a.n, a.steps) / a.steps)
        for name, B, gate, learning in configs:
            sym, backend = gate.endswith("symmetric RLS"), "native" if gate.endswith("native") else "torch"
            times[name, B, gate].append(run_trial(a.n, a.steps, B, getattr(torch, name), learning, sym, backend))
        print(f"round {k + 1}/{a.rounds}: numpy loop {base[-1] * 1e3:.3f} ms/step", flush=True)
    ms = lambda v: f"{min(v) * 1e3:.3f} ms (median {statistics.median(v) * 1e3:.3f})"  # noqa: E731
    lines = [
        f"N = {a.n}, {a.steps} steps of a SUPER-TREX training trial (Task 1, the second trial for run_reservoir): CPU "
        f"time per network-step, one thread, "
        f"on a 2-core machine; fastest (median) of {a.rounds} interleaved rounds",
        f"numpy loop, 1 network, float64, dense J: {ms(base)}",
    ]
    for key, v in times.items():
        name, B, gate = key
        ratio = statistics.median(b / t for b, t in zip(base, v))
        lines.append(f"run_reservoir, B={B}, {name}, sparse J, {gate}: {ms(v)} per network-step = "
                     f"{ratio:.2f}x the numpy loop")  # fmt: skip
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Per-step cost of one SUPER-TREX training trial on the N = 1000 reservoir (Task 1): a straightforward numpy loop of
the equations (one network, dense J, float64, as the authors' MATLAB scripts) against ``run_reservoir`` (torch, the
compiled exploratory rule, block-diagonal sparse J, batched over B networks). Prints milliseconds per step and per
network-step of CPU time (``time.process_time``, robust to other jobs on a shared machine); not a timed test. One
thread each (BLAS threads pinned to 1 before numpy loads).

    python experiments/bench_reservoir.py --steps 1000 --batch 1 8

``--out FILE`` also writes the printed lines to FILE (results/bench_reservoir.txt comes from such a run).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", choices=("float64", "float32"), nargs="+", default=["float64", "float32"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sec = numpy_trial(a.n, a.steps)
    base = sec / a.steps * 1e3
    lines = [f"N = {a.n}, {a.steps} steps of a SUPER-TREX training trial (Task 1), CPU time per step, one thread",
             f"numpy loop, 1 network, float64, dense J: {base:.3f} ms/step"]  # fmt: skip
    print(lines[-1])
    learning = paper_learning("supertrex", "butterfly")
    for name in a.dtype:
        dtype = getattr(torch, name)
        for B in a.batch:
            t0 = time.process_time()
            Reservoir(n=a.n, sparse=True).init(list(range(B)), 2, dtype)
            t_init = time.process_time() - t0
            t0 = time.process_time()
            run_reservoir(Reservoir(n=a.n, sparse=True), "butterfly", learning, list(range(B)), n_train=1, n_test=0,
                          trial_steps=a.steps, dtype=dtype)  # fmt: skip
            per = (time.process_time() - t0 - t_init) / a.steps * 1e3  # the network draw is not a step
            lines.append(f"run_reservoir, B={B}, {name}, sparse J: {per:.3f} ms/step = {per / B:.3f} ms per "
                         f"network-step ({base / (per / B):.2f}x the numpy loop per network)")  # fmt: skip
            print(lines[-1])
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

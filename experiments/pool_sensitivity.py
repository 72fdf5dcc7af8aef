"""Forward-only probe: how much one Adam-sized step on each pool coefficient changes the query loss.

Starts from f0 (theta_0 = THETA0, the others 0), sets one coefficient theta_r = +-STEP at a time, runs E fresh
episodes online (no autograd) and prints the mean query accuracy and loss per setting. On EMNIST a step of 3e-4 on
theta_5 (F5 = -(sum y) e x^T) alone blows the network up; this is why the pool needs per-term step sizes
(``meta.term_scale='capped'``) there.

    python experiments/pool_sensitivity.py                         # EMNIST, theta_0 = 1e-3, steps +-3e-4
    python experiments/pool_sensitivity.py --dataset digits --step 1e-3
"""

from __future__ import annotations

import argparse

import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.inner import run_episodes
from rulesearch.lang.pools import pool
from rulesearch.networks.feedforward import DIGITS, PAPER, Network, init_params
from rulesearch.tasks.data import load_dataset
from rulesearch.tasks.episodes import TaskSampler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="emnist", choices=("emnist", "digits"))
    p.add_argument("--data-dir", default=None, help="EMNIST folder (default $RULESEARCH_DATA or ../shared/data)")
    p.add_argument("--theta0", type=float, default=1e-3)
    p.add_argument("--step", type=float, default=3e-4)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    if a.dataset == "digits":
        data, sizes = load_dataset("digits"), DIGITS
    else:
        data, sizes = load_dataset("emnist", a.data_dir, per_class=400), PAPER
    net = Network(sizes=sizes, feedback="fa")
    E = a.episodes
    b = TaskSampler(data, 5, 50, 10).sample(seed=a.seed, t=0, ks=range(E))
    w, f = init_params(net, a.seed, 0, range(E))
    settings = [("f0 only", None, 0.0)] + [(f"F{r}={v:+g}", r, v) for r in range(1, 10) for v in (-a.step, a.step)]
    thetas = torch.zeros(len(settings), pool.n_params)
    thetas[:, 0] = a.theta0
    for i, (_, r, v) in enumerate(settings):
        if r is not None:
            thetas[i, r] = v
    n = len(settings)
    rep = lambda x: x.repeat((n,) + (1,) * (x.dim() - 1))  # noqa: E731
    batch = tuple(rep(getattr(b, k)) for k in ("x_train", "y_train", "x_query", "y_query"))
    with torch.no_grad():
        res = run_episodes(
            net, batch, compile_rule(pool), thetas.repeat_interleave(E, 0), [rep(x) for x in w], [rep(x) for x in f],
            metrics=False, raise_on_divergence=False,
        )  # fmt: skip
    acc = torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy).reshape(n, E).mean(1)
    loss = res.loss.reshape(n, E).mean(1)
    print(f"{a.dataset}, theta_0 = {a.theta0:g}, {E} episodes per setting")
    for (label, _, _), ac, lo in zip(settings, acc.tolist(), loss.tolist()):
        print(f"{label:14s} accuracy {ac:.3f}  query loss {lo:.4g}")


if __name__ == "__main__":
    main()

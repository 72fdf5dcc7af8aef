"""The Oja follow-up (Shervani-Tabar, Mirhoseini & Rosenbaum, arXiv 2408.08408) on digits: backprop vs backprop plus
Oja's term under online learning, in deeper networks and from poor initializations.

.. math::

    \\Delta W_{ij} = -\\eta\\, e_i x_j \\quad\\text{(bp)}, \\qquad
    \\Delta W_{ij} = -\\eta\\, e_i x_j + \\eta_{Oja}\\, y_i (x_j - (W^\\top y)_j) \\quad\\text{(bp + Oja)},

with symmetric feedback (``bp``), 5-way K=50 Q=10 digits tasks, one online pass (250 steps, batch size 1). No
meta-learning: eta (bp) and (eta, eta_Oja) (bp + Oja) are tuned on a grid on separate tuning episodes (seed 10000),
then both rules run on the same fresh episodes and initial weights: ``--seeds`` seeds x ``--episodes`` episodes,
95% bootstrap intervals over per-seed means. Settings: depth 5 / 8 / 12 weight layers at Xavier gain 1, and the
5-layer network from small and large initial gains. The paper's numbers were not found: its column is n/a.

    python experiments/reproduce_paper.py oja --seeds 20      # writes results/paper/oja.md, .csv, .png
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.evaluate import seed_episodes
from rulesearch.inner import run_episodes
from rulesearch.io.stats import bootstrap_ci
from rulesearch.lang.pools import oja
from rulesearch.networks.feedforward import DIGITS, Network
from rulesearch.tasks.data import load_dataset
from rulesearch.tasks.episodes import TaskSampler

ETAS = (0.003, 0.01, 0.03, 0.1, 0.3)
OJA_ETAS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
TUNE_SEED = 10_000
SETTINGS = {  # name -> (sizes, gain)
    "depth 5": (DIGITS, 1.0),
    "depth 8": ((64, *[100] * 7, 10), 1.0),
    "depth 12": ((64, *[100] * 11, 10), 1.0),
    "depth 5, small init (gain 0.2)": (DIGITS, 0.2),
    "depth 5, large init (gain 3)": (DIGITS, 3.0),
}
UPDATE = compile_rule(oja)  # theta = (eta, eta_Oja); eta_Oja = 0 is plain backprop


def accuracy(net, sampler, thetas, seeds, episodes):
    """Query accuracy (diverged = 0) of every theta row on the same episodes: ``(len(thetas), len(seeds))``."""
    one, w0, _ = seed_episodes(sampler, net, seeds, episodes)
    rep = len(thetas)
    params = torch.tensor(thetas, dtype=torch.float32).repeat_interleave(len(seeds) * episodes, dim=0)
    batch = tuple(t.repeat((rep,) + (1,) * (t.dim() - 1)) for t in one)
    weights = [w.repeat(rep, 1, 1) for w in w0]
    with torch.no_grad():
        res = run_episodes(net, batch, UPDATE, params, weights, [], metrics=False, raise_on_divergence=False)
    acc = torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy)
    return acc.reshape(rep, len(seeds), episodes).mean(-1).double().numpy()


def main(a):
    torch.set_num_threads(a.threads)
    sampler = TaskSampler(load_dataset("digits"), M=5, K=50, Q=10)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name, (sizes, gain) in SETTINGS.items():
        net = Network(sizes=sizes, feedback="bp", gain=gain)
        grid = [(eta, 0.0) for eta in ETAS] + list(itertools.product(ETAS, OJA_ETAS))
        tune = accuracy(net, sampler, grid, [TUNE_SEED], a.tune_episodes)[:, 0]
        bp = max(range(len(ETAS)), key=lambda i: tune[i])
        both = max(range(len(ETAS), len(grid)), key=lambda i: tune[i])
        acc = accuracy(net, sampler, [grid[bp], grid[both]], list(range(a.seeds)), a.eval_episodes)
        (m0, lo0, hi0), (m1, lo1, hi1) = bootstrap_ci(acc[0]), bootstrap_ci(acc[1])
        diff = bootstrap_ci(acc[1] - acc[0])
        rows.append({
            "setting": name, "sizes": "-".join(map(str, sizes)), "gain": gain,
            "bp eta": grid[bp][0], "bp accuracy": m0, "bp lo": lo0, "bp hi": hi0,
            "bp+oja eta": grid[both][0], "bp+oja eta_oja": grid[both][1],
            "bp+oja accuracy": m1, "bp+oja lo": lo1, "bp+oja hi": hi1,
            "difference": diff[0], "difference lo": diff[1], "difference hi": diff[2],
        })  # fmt: skip
        print(f"{name}: bp {m0:.3f} [{lo0:.3f}, {hi0:.3f}] (eta {grid[bp][0]:g}); bp+oja {m1:.3f} [{lo1:.3f}, "
              f"{hi1:.3f}] (eta {grid[both][0]:g}, eta_oja {grid[both][1]:g})", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(out / "oja.csv", index=False)
    _plot(df, out / "oja.png")
    lines = [
        "# Oja follow-up: backprop vs backprop + Oja's term (digits, online)",
        "",
        __doc__.split("\n\n")[0].replace("\n", " "),
        "",
        f"5-way K=50 Q=10 digits, softplus beta=10, one online pass, symmetric feedback. Grid: eta in {list(ETAS)}, "
        f"eta_Oja in {list(OJA_ETAS)}, tuned on {a.tune_episodes} episodes of seed {TUNE_SEED}; evaluation "
        f"{a.seeds} seeds x {a.eval_episodes} episodes (the same episodes and initial weights for both rules), 95% "
        "percentile bootstrap over per-seed means; diverged episodes count as accuracy 0. Hidden width 100 for "
        "depths 8 and 12.",
        "",
        "| setting | bp (eta) | bp + Oja (eta, eta_Oja) | difference | paper |",
        "|---|---|---|---|---|",
        *[
            f"| {r['setting']} | {r['bp accuracy']:.3f} [{r['bp lo']:.3f}, {r['bp hi']:.3f}] ({r['bp eta']:g}) | "
            f"{r['bp+oja accuracy']:.3f} [{r['bp+oja lo']:.3f}, {r['bp+oja hi']:.3f}] ({r['bp+oja eta']:g}, "
            f"{r['bp+oja eta_oja']:g}) | {r['difference']:+.3f} [{r['difference lo']:+.3f}, "
            f"{r['difference hi']:+.3f}] | n/a |"
            for r in rows
        ],
        "",
        f"Regenerate: `python experiments/reproduce_paper.py oja --seeds {a.seeds}` ({time.time() - t0:.0f} s, "
        f"{a.threads} thread(s)).",
    ]
    (out / "oja.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    x = np.arange(len(df))
    for off, key, label in ((-0.2, "bp", "bp"), (0.2, "bp+oja", "bp + Oja")):
        m = df[f"{key} accuracy"].to_numpy()
        err = np.stack([m - df[f"{key} lo"], df[f"{key} hi"] - m])
        ax.bar(x + off, m, 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, df["setting"], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("query accuracy (95% CI)")
    ax.set_title("Online backprop with and without Oja's term (digits)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

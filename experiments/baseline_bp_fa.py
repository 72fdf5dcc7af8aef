"""Fixed-learning-rate baseline: query accuracy of f0 under backprop (bp) vs feedback alignment (fa).

5-way K=50 Q=10 online tasks (batch size 1, one pass), the 5-layer softplus network, the learning rate of
f0 = -lr e x^T tuned per mode on separate tuning episodes, then 20 seeds (20 independent sets of episodes) with
95% bootstrap intervals. This is NOT the paper's Fig. 3: there theta_0 is meta-learned (70% vs 25%).

    python experiments/baseline_bp_fa.py --dataset digits
    python experiments/baseline_bp_fa.py --dataset emnist --data-dir ../shared/data

Writes results/baseline_bp_fa_<dataset>.csv and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.evaluate import seed_episodes
from rulesearch.inner import run_episodes
from rulesearch.io.stats import bootstrap_ci
from rulesearch.lang.pools import f0
from rulesearch.networks.feedforward import DIGITS, PAPER, Network
from rulesearch.tasks.data import default_data_dir, load_dataset
from rulesearch.tasks.episodes import TaskSampler

LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
TUNE_SEED = 10_000
F0_UPDATE = compile_rule(f0)  # dW = -lr e x^T


def mean_accuracy(net, sampler, lr, seeds, episodes):
    """Per-seed mean query accuracy of f0 at a fixed learning rate; all seeds' episodes run as one batch."""
    batch, weights, feedback = seed_episodes(sampler, net, seeds, episodes)
    with torch.no_grad():
        res = run_episodes(
            net, batch, F0_UPDATE, torch.tensor([lr]), weights, feedback, metrics=False, raise_on_divergence=False
        )
    acc = torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy)
    return acc.reshape(len(seeds), episodes).mean(1).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=("digits", "emnist"))
    p.add_argument("--data-dir", default=None, help="folder with EMNIST (default: $RULESEARCH_DATA or ../shared/data)")
    p.add_argument("--seeds", type=int, default=20, help="independent sets of episodes")
    p.add_argument("--episodes", type=int, default=5, help="episodes per seed")
    p.add_argument("--tune-episodes", type=int, default=20, help="episodes used to pick each mode's learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.dataset == "digits":
        data, sizes = load_dataset("digits"), DIGITS
    else:
        data, sizes = load_dataset("emnist", a.data_dir or default_data_dir(), per_class=400), PAPER
    sampler = TaskSampler(data, M=5, K=50, Q=10)
    t0 = time.time()
    rows = []
    for mode in ("bp", "fa"):
        net = Network(sizes=sizes, feedback=mode)
        tuning = {lr: mean_accuracy(net, sampler, lr, [TUNE_SEED], a.tune_episodes)[0] for lr in LRS}
        best = max(tuning, key=tuning.get)
        accs = mean_accuracy(net, sampler, best, range(a.seeds), a.episodes)
        mean, lo, hi = bootstrap_ci(accs)
        rows.append({"dataset": a.dataset, "mode": mode, "lr": best, "seeds": a.seeds, "episodes_per_seed": a.episodes,
                     "accuracy": mean, "ci_lo": lo, "ci_hi": hi,
                     "tuning": " ".join(f"{k:g}:{v:.3f}" for k, v in tuning.items())})  # fmt: skip
        print(f"{a.dataset} {mode}: lr={best:g} accuracy={mean:.3f} [{lo:.3f}, {hi:.3f}] (tuning {rows[-1]['tuning']})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / f"baseline_bp_fa_{a.dataset}.csv", index=False)
    cmd = f"python experiments/baseline_bp_fa.py --dataset {a.dataset}" + (
        " --data-dir ../shared/data" if a.dataset == "emnist" else ""
    )
    md = [
        f"# Fixed-learning-rate baseline: f0 under bp vs fa ({a.dataset})",
        "",
        "5-way, K=50, Q=10, online (batch size 1, one pass), network "
        f"{'-'.join(map(str, sizes))} softplus beta=10, Xavier init of W and feedback per episode. The learning "
        f"rate of f0 is tuned per mode over {list(LRS)} on {a.tune_episodes} separate episodes. "
        f"{a.seeds} seeds x {a.episodes} episodes; 95% percentile bootstrap interval over per-seed means. "
        "Diverged episodes count as accuracy 0. Not the paper's Fig. 3 (there theta_0 is meta-learned).",
        "",
        "| mode | lr | query accuracy | 95% CI |",
        "|---|---|---|---|",
        *[f"| {r['mode']} | {r['lr']:g} | {r['accuracy']:.3f} | [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}] |" for r in rows],
        "",
        f"Regenerate: `{cmd}` ({time.time() - t0:.0f} s on 2 cores).",
    ]
    (out / f"baseline_bp_fa_{a.dataset}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

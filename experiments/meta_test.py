"""Meta-generalization: rules meta-learned on some EMNIST classes, frozen, then meta-tested on held-out classes.

1. bio (F0 + F2 + F9) and eHebb (F0 + F2) are meta-learned under feedback alignment on the meta-train side of a
   class split (``--split 0.8``: 38 of the 47 EMNIST classes; the other 9 are never seen), the paper's inner loop
   (5-way K=50 Q=10 online, 784-170-130-100-70-47), Adam lr 1e-3, lambda = 0, a short budget (``--episodes`` x
   ``--runs``, runs batched). The frozen rule is the mean of the runs that did not stop.
2. Baselines: f0 = -lr e x^T under fa and under bp, the learning rate tuned per mode over the same 6-point grid on
   meta-train classes only (separate tuning seeds), the same number of tuning episodes per mode.
3. All four are evaluated with ``rulesearch.evaluate`` on the same fresh episodes (evaluation seeds 10000+) from
   the meta-train classes, from the held-out classes and from another dataset (the bundled 8x8 digits, all 10
   classes, on the 64-170-130-100-70-10 network; the f0 learning rates stay those tuned on EMNIST). Intervals:
   95% Student-t over per-seed means (each seed = ``--eval-episodes`` episodes). Diverged episodes score 0 and
   are counted.

    python experiments/meta_test.py --data-dir ../shared/data

Writes results/meta_test.md and results/meta_test.csv (per method, class side and seed); run directories go to
runs/meta_test/ (not committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from rulesearch.errors import DivergenceError
from rulesearch.evaluate import EvalConfig, evaluate
from rulesearch.io.runs import RunDir
from rulesearch.lang.pools import f0
from rulesearch.networks.feedforward import DIGITS
from rulesearch.tasks.data import default_data_dir
from rulesearch.train import NetworkConfig, RuleSearch, TaskConfig

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
TUNE_SEED = 30_000
SIDES = ("train", "held-out", "digits")  # meta-train classes, held-out classes, another dataset (8x8 digits)
FIT_SECONDS = {}


def t_ci(x, ci=0.95):
    x = np.asarray(x, float)
    m = float(x.mean())
    h = float(stats.t.ppf((1 + ci) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else np.nan
    return m, m - h, m + h


def f0_at(lr):
    return dataclasses.replace(f0, values=(lr,))


def meta_learn(rule, task, a):
    path = Path(a.runs_dir) / rule
    if path.exists() and RunDir.open(path).is_finished:
        return RuleSearch.from_run(path)
    cfg = {"rule": rule, "task": task, "network": {"feedback": "fa"},
           "meta": {"l1": 0.0, "episodes": a.episodes, "runs": a.runs, "compare": False, "threads": 1}}  # fmt: skip
    t0 = time.time()
    try:
        s = RuleSearch.from_config(cfg, out=path, resume=path.exists(), progress=False).fit()
    except DivergenceError as err:
        print(f"{rule}: {err}", flush=True)
        s = RuleSearch.from_run(path)
    FIT_SECONDS[rule] = time.time() - t0
    print(f"{rule}: meta-learned {a.episodes} x {a.runs} in {time.time() - t0:.0f} s; theta {s.rule_.values}; "
          f"stopped runs {s.stopped_runs_}", flush=True)  # fmt: skip
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="0.8")
    p.add_argument("--episodes", type=int, default=100, help="meta-steps per run (one episode each)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=20, help="evaluation seeds per class side")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation seed")
    p.add_argument("--tune-seeds", type=int, default=2, help="tuning seeds per lr (x eval-episodes episodes)")
    p.add_argument("--runs-dir", default="runs/meta_test")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    task = {"dataset": "emnist", "data_dir": a.data_dir or str(default_data_dir()), "options": {"per_class": 400},
            "split": a.split}  # fmt: skip
    tcfg = TaskConfig(**task)
    searches = {r: meta_learn(r, task, a) for r in ("bio", "ehebb")}

    def run(rules, mode, side, seed, seeds):
        other = side == "digits"  # the frozen rules on another dataset: all 10 classes, the 64-input network
        cfg = EvalConfig(seeds=seeds, episodes=a.eval_episodes, seed=seed, classes="train" if other else side,
                         baselines=False, threads=1)  # fmt: skip
        net = NetworkConfig(feedback=mode, sizes=DIGITS) if other else NetworkConfig(feedback=mode)
        return evaluate(rules, network=net, task=TaskConfig(dataset="digits") if other else tcfg, config=cfg).per_seed

    best, tuning = {}, {}
    for mode in ("fa", "bp"):
        acc = {}
        for lr in LRS:
            d = run({"f0": f0_at(lr)}, mode, "train", TUNE_SEED, a.tune_seeds)
            acc[lr] = (float(d["accuracy"].mean()), float(d["diverged"].mean()))
        best[mode] = max(acc, key=lambda k: acc[k][0])
        tuning[mode] = " ".join(f"{k:g}:{v:.3f}" + (f" ({v2:.0%} div.)" if v2 else "") for k, (v, v2) in acc.items())
        print(f"f0 ({mode}) tuning: {tuning[mode]} -> {best[mode]:g} ({time.time() - t0:.0f} s)", flush=True)
    frames = []
    for classes in SIDES:
        fa_rules = {"bio": searches["bio"].rule_, "ehebb": searches["ehebb"].rule_, "f0": f0_at(best["fa"])}
        for mode, rules in (("fa", fa_rules), ("bp", {"f0": f0_at(best["bp"])})):
            d = run(rules, mode, classes, 10_000, a.seeds)
            d["classes"] = classes
            frames.append(d)
        print(f"evaluated on {classes} classes ({time.time() - t0:.0f} s)", flush=True)
    df = pd.concat(frames, ignore_index=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["method", "classes", "seed", "accuracy", "loss", "diverged"] + [c for c in df if c.startswith("angle.")]
    df[cols].to_csv(out / "meta_test.csv", index=False, float_format="%.4f")
    order = ["bio (fa)", "ehebb (fa)", "f0 (fa)", "f0 (bp)"]
    table = []
    for m in order:
        cells = []
        for classes in SIDES:
            d = df[(df.method == m) & (df.classes == classes)]
            mean, lo, hi = t_ci(d["accuracy"])
            n_div = int(round(d["diverged"].sum() * a.eval_episodes))
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | {n_div}/{len(d) * a.eval_episodes}")
        tr = df[(df.method == m) & (df.classes == "train")].set_index("seed")["accuracy"]
        ho = df[(df.method == m) & (df.classes == "held-out")].set_index("seed")["accuracy"]
        g, glo, ghi = t_ci(ho - tr)
        table.append(f"| {m} | {' | '.join(cells)} | {g:+.3f} [{glo:+.3f}, {ghi:+.3f}] |")
    diffs = []
    for x in ("bio (fa)", "ehebb (fa)"):
        for y in ("f0 (fa)", "f0 (bp)"):
            cells = []
            for side in ("held-out", "digits"):
                d = df[df.classes == side].pivot(index="seed", columns="method", values="accuracy")
                m, lo, hi = t_ci(d[x] - d[y])
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            acc = df.pivot_table(index="seed", columns=["classes", "method"], values="accuracy")
            gap = {k: acc[("held-out", k)] - acc[("train", k)] for k in (x, y)}
            m, lo, hi = t_ci(gap[x] - gap[y])
            diffs.append(f"| {x} - {y} | {' | '.join(cells)} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    coef = []
    for r, s in searches.items():
        th = s.theta_.double().numpy()[s.reported_runs_]
        names = [t.name for t in s.rule_.terms]
        cs = "; ".join(f"{n}={th[:, j].mean():.4f}" for j, n in enumerate(names))
        coef.append(f"| {r} | {a.episodes} x {a.runs} | {len(s.stopped_runs_)} | {cs} |")
    dataset = tcfg.load()
    split, held = tcfg.classes(dataset, side="train"), tcfg.classes(dataset, side="test")
    cmd = "python experiments/meta_test.py --data-dir ../shared/data"
    md = [
        "# Meta-generalization: frozen learned rules on held-out EMNIST classes",
        "",
        f"Split `{a.split}` of the 47 EMNIST classes (first 400 images per class of the ByMerge test split, a "
        f"stand-in for the paper's Balanced split): {len(split)} meta-train classes, "
        f"held-out classes {list(held)}. bio and eHebb meta-learned under fa on "
        f"the meta-train classes only ({a.episodes} meta-steps x {a.runs} runs, one episode per meta-step, Adam lr "
        "1e-3, lambda = 0, theta_0 = 1e-3 at start; a short budget, the paper runs 600 x 20), then frozen. "
        f"f0 baselines: learning rate tuned per mode over {list(LRS)} on meta-train classes "
        f"({a.tune_seeds} x {a.eval_episodes} tuning episodes per lr and mode). Evaluation with "
        f"`rulesearch.evaluate`: {a.seeds} seeds x {a.eval_episodes} episodes (5-way K=50 Q=10, online) per class "
        "side, the same episodes for every method; 95% Student-t intervals over per-seed means. Diverged episodes "
        "score 0 and are counted.",
        "",
        "Learned coefficients (mean over the runs that did not stop):",
        "",
        "| rule | meta-steps x runs | stopped runs | coefficients |",
        "|---|---|---|---|",
        *coef,
        "",
        f"f0 learning-rate tuning (lr: accuracy): fa {tuning['fa']} -> {best['fa']:g}; bp {tuning['bp']} -> "
        f"{best['bp']:g}.",
        "",
        "| method | meta-train classes: accuracy (95% t) | diverged | held-out classes: accuracy (95% t) | diverged "
        "| 8x8 digits (other dataset): accuracy (95% t) | diverged | held-out - train (paired, 95% t) |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        "Paired differences (same episodes; 95% t): accuracy on held-out classes and on 8x8 digits, and the "
        "difference of the held-out - train drops (negative: the first method loses more on held-out classes):",
        "",
        "| difference | held-out classes | 8x8 digits | drop on held-out classes |",
        "|---|---|---|---|",
        *diffs,
        "",
        "Per method, class side and seed: [`meta_test.csv`](meta_test.csv).",
        "",
        f"Regenerate: `{cmd}` ({time.time() - t0:.0f} s on a 2-core machine, 1 thread; meta-training "
        + (", ".join(f"{r} {v:.0f} s" for r, v in FIT_SECONDS.items()) or "reused from the run directories")
        + ").",
    ]
    (out / "meta_test.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

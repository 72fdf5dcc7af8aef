"""Meta-generalization: rules meta-learned on some EMNIST classes, frozen, then meta-tested on held-out classes.

1. Five rules are meta-learned under feedback alignment on the meta-train side of a class split (``--split 0.8``:
   38 of the 47 EMNIST classes; the other 9 are never seen), the paper's inner loop (5-way K=50 Q=10 online,
   784-170-130-100-70-47), one episode per meta-step, a short budget (runs batched):

   - bio (F0 + F2 + F9), eHebb (F0 + F2) and Oja (F0 + F9): Adam lr 1e-3, lambda = 0, ``--episodes`` x ``--runs``;
   - the 10-term pool (F0..F9) with the settings that keep it stable (results/README.md, item 2b): proximal L1 in
     Adam's metric with lambda = 3, per-term capped Adam steps (``term_scale: capped``), the meta-gradient
     clipped to norm 10, Adam lr 3e-4, ``--episodes`` x ``--runs``;
   - a neural rule (:class:`rulesearch.neural.NeuralRule`, MLP 9-16-1 over each synapse's signals plus a linear
     skip part, starting as F0), configured as in experiments/neural_digits.py: Adam lr 1e-3, ``term_scale:
     capped``, clip 10, ``--neural-episodes`` x 1 run (one run: MLP parameters of several runs cannot be averaged).

   The frozen linear rule is the mean of the runs that did not stop; the frozen neural rule is its first run that
   did not stop.
2. Baselines: f0 = -lr e x^T under fa and under bp, the learning rate tuned per mode over the same 6-point grid on
   meta-train classes only (separate tuning seeds), the same number of tuning episodes per mode.
3. All are evaluated with ``rulesearch.evaluate`` on the same fresh episodes (evaluation seeds 10000+) from the
   meta-train classes, from the held-out classes and from another dataset (the bundled 8x8 digits, all 10 classes,
   on the 64-170-130-100-70-10 network; the f0 learning rates stay those tuned on EMNIST). The neural rule, whose
   inner loop is ~100x slower than a linear rule's, is evaluated on the first ``--neural-seeds`` of those seeds
   (the same episodes); its paired differences use those seeds. Intervals: 95% Student-t over per-seed means
   (each seed = ``--eval-episodes`` episodes). Diverged episodes score 0 and are counted.

    python experiments/meta_test.py --data-dir ../shared/data

Writes results/meta_test.md and results/meta_test.csv (per method, class side and seed); run directories go to
runs/meta_test/ (not committed; a finished run directory is reused, its meta-training time read from its metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch

from rulesearch.errors import DatasetError, DivergenceError
from rulesearch.evaluate import EvalConfig, evaluate
from rulesearch.io.runs import RunDir
from rulesearch.io.stats import t_interval
from rulesearch.lang.pools import f0
from rulesearch.tasks.data import default_data_dir, load_dataset
from rulesearch.train import NetworkConfig, RuleSearch, TaskConfig

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
TUNE_SEED = 30_000
RULES = ("bio", "ehebb", "oja", "pool", "neural")
#: Per rule, the meta-settings that differ from the defaults below (lr 1e-3, lambda = 0, no clipping).
SETTINGS = {
    "pool": {"l1": 3.0, "l1_mode": "proximal", "term_scale": "capped", "clip": 10.0, "lr": 3e-4},
    "neural": {"term_scale": "capped", "clip": 10.0, "lr": 1e-3},
}
NEURAL = {"hidden": [16]}


def f0_at(lr):
    return dataclasses.replace(f0, values=(lr,))


def budget(rule, a):
    return (a.neural_episodes, 1) if rule == "neural" else (a.episodes, a.runs)


def meta_learn(rule, task, a):
    """Meta-learn ``rule`` on the meta-train classes (or reuse its finished run directory)."""
    path = Path(a.runs_dir) / rule
    if path.exists() and RunDir.open(path).is_finished:
        s = RuleSearch.from_run(path)
    else:
        episodes, runs = budget(rule, a)
        meta = {"l1": 0.0, "episodes": episodes, "runs": runs, "compare": False, "threads": 1, **SETTINGS.get(rule, {})}
        cfg = {"rule": rule, "task": task, "network": {"feedback": "fa"}, "meta": meta}
        if rule == "neural":
            cfg["neural"] = NEURAL
        try:
            s = RuleSearch.from_config(cfg, out=path, resume=path.exists(), progress=False).fit()
        except DivergenceError as err:  # every run stopped: keep the last parameters, reported as stopped
            print(f"{rule}: {err}", flush=True)
            s = RuleSearch.from_run(path)
    s.fit_seconds_ = float(s.history_.groupby("step")["seconds"].first().sum())
    print(f"{rule}: meta-learned {s.n_steps_} x {s.n_runs_} in {s.fit_seconds_:.0f} s; stopped runs "
          f"{s.stopped_runs_}", flush=True)  # fmt: skip
    return s


def describe(rule, s):
    """The frozen rule's coefficients (linear rules: mean over the reported runs; neural: the skip part)."""
    if rule == "neural":
        p = s.rule_.params
        skip = "; ".join(f"{n}={v:+.4f}" for n, v in zip(s.rule_.features, p["skip"].tolist()))
        psi = float(torch.cat([v.flatten() for k, v in p.items() if k != "skip"]).norm())
        return f"skip a: {skip}; MLP 9-16-1 |psi| = {psi:.3f}"
    th = s.theta_.double().numpy()[s.reported_runs_]
    return "; ".join(f"{t.name}={th[:, j].mean():+.4f}" for j, t in enumerate(s.rule_.terms))


def other_datasets(data_dir):
    """The other datasets for transfer: the bundled 8x8 digits, and Fashion-MNIST where its files are found."""
    out = {"digits": TaskConfig(dataset="digits")}
    try:
        load_dataset("fashion-mnist", data_dir)
        out["fashion-mnist"] = TaskConfig(dataset="fashion-mnist", data_dir=data_dir)
    except DatasetError as err:
        print(f"no Fashion-MNIST: {err}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="0.8")
    p.add_argument("--episodes", type=int, default=100, help="meta-steps per run of the linear rules")
    p.add_argument("--runs", type=int, default=4, help="runs per linear rule")
    p.add_argument("--neural-episodes", type=int, default=30, help="meta-steps of the neural rule (one run)")
    p.add_argument("--seeds", type=int, default=20, help="evaluation seeds per class side")
    p.add_argument("--neural-seeds", type=int, default=10, help="evaluation seeds of the neural rule (the first)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation seed")
    p.add_argument("--tune-seeds", type=int, default=2, help="tuning seeds per lr (x eval-episodes episodes)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of " + ",".join(RULES))
    p.add_argument("--runs-dir", default="runs/meta_test")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data_dir = a.data_dir or str(default_data_dir())
    task = {"dataset": "emnist", "data_dir": data_dir, "options": {"per_class": 400}, "split": a.split}
    tcfg = TaskConfig(**task)
    others = other_datasets(data_dir)
    sides = ("train", "held-out", *others)
    rules = [r for r in a.rules.split(",") if r]
    searches = {r: meta_learn(r, task, a) for r in rules}
    fit_s = time.time() - t0

    def run(rules, mode, side, seed, seeds):
        other = side in others  # another dataset: all its classes, the network sized for it
        cfg = EvalConfig(seeds=seeds, episodes=a.eval_episodes, seed=seed, classes="train" if other else side,
                         baselines=False, threads=1)  # fmt: skip
        return evaluate(rules, network=NetworkConfig(feedback=mode), task=others[side] if other else tcfg,
                        config=cfg).per_seed  # fmt: skip

    best, tuning = {}, {}
    for mode in ("fa", "bp"):
        acc = {}
        for lr in LRS:
            d = run({"f0": f0_at(lr)}, mode, "train", TUNE_SEED, a.tune_seeds)
            acc[lr] = (float(d["accuracy"].mean()), float(d["diverged"].mean()))
        best[mode] = max(acc, key=lambda k: acc[k][0])
        tuning[mode] = " ".join(f"{k:g}:{v:.3f}" + (f" ({v2:.0%} div.)" if v2 else "") for k, (v, v2) in acc.items())
        print(f"f0 ({mode}) tuning: {tuning[mode]} -> {best[mode]:g} ({time.time() - t0:.0f} s)", flush=True)
    tune_s = time.time() - t0 - fit_s
    frames, eval_s = [], {}
    for side in sides:
        linear = {r: s.rule_ for r, s in searches.items() if r != "neural"}
        calls = [("fa", {**linear, "f0": f0_at(best["fa"])}, a.seeds), ("bp", {"f0": f0_at(best["bp"])}, a.seeds)]
        if "neural" in searches:
            calls.append(("fa", {"neural": searches["neural"].rule_}, a.neural_seeds))
        for mode, group, n in calls:
            t1 = time.time()
            d = run(group, mode, side, 10_000, n)
            key = "neural" if "neural" in group else "others"
            eval_s[key] = eval_s.get(key, 0.0) + time.time() - t1
            d["classes"] = side
            frames.append(d)
        print(f"evaluated on {side} ({time.time() - t0:.0f} s)", flush=True)
    df = pd.concat(frames, ignore_index=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["method", "classes", "seed", "accuracy", "loss", "diverged"] + [c for c in df if c.startswith("angle.")]
    df[cols].to_csv(out / "meta_test.csv", index=False, float_format="%.4f")

    learned = [f"{r} (fa)" for r in rules]
    order = [*learned, "f0 (fa)", "f0 (bp)"]
    acc = df.pivot_table(index="seed", columns=["classes", "method"], values="accuracy")
    table = []
    for m in order:
        cells = []
        for side in sides:
            d = df[(df.method == m) & (df.classes == side)]
            mean, lo, hi = t_interval(d["accuracy"])
            n_div = int(round(d["diverged"].sum() * a.eval_episodes))
            cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | {n_div}/{len(d) * a.eval_episodes}")
        g, glo, ghi = t_interval((acc[("held-out", m)] - acc[("train", m)]).dropna())
        table.append(f"| {m} | {' | '.join(cells)} | {g:+.3f} [{glo:+.3f}, {ghi:+.3f}] |")
    diffs = []
    for x in learned:
        for y in ("f0 (fa)", "f0 (bp)"):
            cells = []
            for side in sides[1:]:
                m, lo, hi = t_interval((acc[(side, x)] - acc[(side, y)]).dropna())
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            gap = {k: acc[("held-out", k)] - acc[("train", k)] for k in (x, y)}
            m, lo, hi = t_interval((gap[x] - gap[y]).dropna())
            n = int((gap[x] - gap[y]).notna().sum())
            diffs.append(f"| {x} - {y} | {n} | {' | '.join(cells)} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    coef = []
    for r, s in searches.items():
        settings = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in SETTINGS.get(r, {}).items()
        )
        coef.append(f"| {r} | {s.n_steps_} x {s.n_runs_} | {settings or 'lr 0.001, l1 0'} | {len(s.stopped_runs_)} "
                    f"| {s.fit_seconds_:.0f} | {describe(r, s)} |")  # fmt: skip
    dataset = tcfg.load()
    split, held = tcfg.classes(dataset, side="train"), tcfg.classes(dataset, side="test")
    cmd = "python experiments/meta_test.py --data-dir ../shared/data"
    other_cols = " | ".join(f"{o} (other dataset): accuracy (95% t) | diverged" for o in others)
    fashion = (
        "Fashion-MNIST: evaluated (its files were found in the data folder)."
        if "fashion-mnist" in others
        else f"Fashion-MNIST: not evaluated, its files are not in the data folder (`{data_dir}` holds only the EMNIST "
        "ByMerge test split); the other dataset is the bundled 8x8 digits."
    )
    step_s = {r: s.fit_seconds_ / max(s.n_steps_, 1) for r, s in searches.items()}
    lin = [v for r, v in step_s.items() if r != "neural"]
    step_cost = (
        f" ({step_s['neural']:.0f} s per meta-step of one run, against {min(lin):.1f}-{max(lin):.1f} s for a "
        f"meta-step of {a.runs} runs of a linear rule, as logged)"
        if "neural" in step_s and lin
        else ""
    )
    md = [
        "# Meta-generalization: frozen learned rules on held-out EMNIST classes and another dataset",
        "",
        f"Split `{a.split}` of the 47 EMNIST classes (first 400 images per class of the ByMerge test split, a "
        f"stand-in for the paper's Balanced split): {len(split)} meta-train classes, "
        f"held-out classes {list(held)}. Each rule is meta-learned under fa on the meta-train classes only (one "
        "episode per meta-step, theta_0 = 1e-3 at start, the other coefficients 0; short budgets, the paper runs "
        "600 x 20), then frozen: a linear rule as the mean of its runs that did not stop, the neural rule as its "
        "one run. bio, eHebb, Oja: Adam lr 1e-3, lambda = 0 (the paper's optimizer). Pool (F0..F9): the settings "
        "under which it stays stable (results/README.md item 2b): proximal L1 with lambda = 3, per-term capped "
        "Adam steps, meta-gradient clipped to norm 10, Adam lr 3e-4. Neural: MLP 9-16-1 over each synapse's "
        "signals plus a linear skip part (as experiments/neural_digits.py), Adam lr 1e-3, capped steps on the "
        f"skip part, clip 10; one run, fewer meta-steps{step_cost}. f0 baselines: learning rate tuned per mode "
        f"over {list(LRS)} on meta-train classes "
        f"({a.tune_seeds} x {a.eval_episodes} tuning episodes per lr and mode). Evaluation with "
        f"`rulesearch.evaluate`: {a.seeds} seeds x {a.eval_episodes} episodes (5-way K=50 Q=10, online) per side "
        f"(the neural rule: the first {a.neural_seeds} of these seeds, the same episodes), the same episodes for "
        "every method; 95% Student-t intervals over per-seed means. Diverged episodes score 0 and are counted. "
        "On another dataset the network has that dataset's input and output sizes (8x8 digits: "
        "64-170-130-100-70-10), all its classes, and the f0 learning rates stay those tuned on EMNIST.",
        "",
        fashion,
        "",
        "Meta-training (per rule: budget, settings besides lr 1e-3 / lambda 0, stopped runs, seconds; the frozen "
        "coefficients):",
        "",
        "| rule | meta-steps x runs | settings | stopped runs | meta-training s | frozen rule |",
        "|---|---|---|---|---|---|",
        *coef,
        "",
        f"f0 learning-rate tuning (lr: accuracy): fa {tuning['fa']} -> {best['fa']:g}; bp {tuning['bp']} -> "
        f"{best['bp']:g}.",
        "",
        "| method | meta-train classes: accuracy (95% t) | diverged | held-out classes: accuracy (95% t) | diverged "
        f"| {other_cols} | held-out - train (paired, 95% t) |",
        "|---|" + "---|" * (2 * len(sides) + 1),
        *table,
        "",
        "Paired differences (same episodes; 95% t; n: seeds paired): accuracy on held-out classes and on the other "
        "dataset, and the difference of the held-out - train drops (negative: the first method loses more on "
        "held-out classes):",
        "",
        f"| difference | n | held-out classes | {' | '.join(others)} | drop on held-out classes |",
        "|---|---|---|" + "---|" * len(others) + "---|",
        *diffs,
        "",
        "Per method, class side and seed: [`meta_test.csv`](meta_test.csv).",
        "",
        f"Regenerate: `{cmd}` ({time.time() - t0:.0f} s on a 2-core machine shared with another job, 1 thread: "
        f"meta-training {fit_s:.0f} s in this call ("
        + ", ".join(f"{r} {s.fit_seconds_:.0f} s" for r, s in searches.items())
        + f", as logged in the run directories), f0 tuning {tune_s:.0f} s, evaluation "
        + ", ".join(f"{k} {v:.0f} s" for k, v in eval_s.items())
        + ").",
    ]
    (out / "meta_test.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

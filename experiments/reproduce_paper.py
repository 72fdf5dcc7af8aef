"""Reproduce the seed paper (Shervani-Tabar & Rosenbaum 2023) and the Oja follow-up: runs, then summaries.

Each item meta-trains its variants as resumable run directories under ``runs/paper/<item>/<variant>`` (git-ignored;
rerunning a command continues an unfinished run and reuses a finished one), then writes its summary to
``results/paper/``: ``<item>.md`` (table), ``<item>_runs.csv`` (per run and tenth of the episodes: meta-accuracy,
skipped episodes, angle, E_W, coefficients; every interval of the table recomputes from it), ``<item>.csv`` (per-step
means and 95% Student-t intervals across runs),
``<item>_*.png`` (figures) and ``<item>.tex`` (coefficient tables, mean and 95% interval across runs).

Items (defaults: the full protocol, 600 episodes x 20 runs; EMNIST = the first 400 images per class of the ByMerge
test split in ../shared/data, a ByMerge-derived subset, not the official Balanced split):

    fig3    theta_0 only (rule f0), lambda = 0, under bp and under fa            (EMNIST)
    lambda  the 10-term pool with L1 under fa, one run set per lambda            (digits)
    fig4    the 10-term pool with L1 under fa, at --l1 (best of the sweep)      (EMNIST)
            (--rule pool_f5mean: the pool with F5 width-normalized, for the ablation of the stabilizing changes)
    rules   bio, ehebb and oja under fa                                        (EMNIST)
    oja     the Oja follow-up: bp and plastic (Kolen-Pollack) feedback, each with and without Oja's term, online,
            deeper nets and poor initialization (digits; coefficients tuned on separate episodes, no meta-learning)

    python experiments/reproduce_paper.py fig3 --episodes 300 --runs 5
    python experiments/reproduce_paper.py lambda --episodes 150 --runs 2 --l1 0 0.1 0.5 2
    python experiments/reproduce_paper.py fig4 --episodes 300 --runs 5 --l1 0.5
    python experiments/reproduce_paper.py rules --episodes 300 --runs 3
    python experiments/reproduce_paper.py oja --seeds 20 --tune-episodes 6
    python experiments/reproduce_paper.py fig3 --summarize-only    # rewrite the summary from the run directories

Meta-accuracy is the query accuracy of each meta-training episode (the paper's definition); intervals are 95%
Student-t intervals across runs of per-run means (the paper: 98% bootstrap, 500 resamples). Skipped (diverged)
episodes are counted and left out of the means, and scored 0 in a second column; runs that stopped are counted
and left out of the last window and the coefficients.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rulesearch.errors import DivergenceError
from rulesearch.io.runs import RunDir
from rulesearch.io.stats import moving_average, t_interval
from rulesearch.io.summary import run_windows
from rulesearch.tasks.data import default_data_dir
from rulesearch.train import RuleSearch


def emnist_task(data_dir: str | None, paper_sampling: bool = False) -> dict:
    """EMNIST, the first 400 per class; ``paper_sampling``: the paper code's episodes (classes with replacement,
    the first K / next Q images of each class)."""
    task = {"dataset": "emnist", "data_dir": data_dir or str(default_data_dir()), "options": {"per_class": 400}}
    return {**task, "replacement": True, "fixed_images": True} if paper_sampling else task


def variants(item: str, a) -> list[tuple[str, dict]]:
    """(variant name, config dict) for an item."""
    steps = (f" {a.term_scale}-scaled" if a.term_scale != "none" else "") + (f" clip={a.clip:g}" if a.clip else "")
    if item == "lambda":
        task = {"dataset": "digits"}
        tag = f" lr={a.lr:g}{steps}" if steps else ""  # the first sweep (lr 3e-4, plain Adam) carries no tag
        meta = {"l1_mode": a.l1_mode}
        return [(f"{a.l1_mode} l1={l1:g}{tag}", {"rule": "pool", "task": task, "meta": {**meta, "l1": l1}})
                for l1 in a.l1]  # fmt: skip
    task = emnist_task(a.data_dir, a.paper_sampling)
    if item == "fig3":
        return [(fb, {"rule": "f0", "task": task, "network": {"feedback": fb}, "meta": {"l1": 0.0}})
                for fb in ("bp", "fa")]  # fmt: skip
    if item == "fig4":
        meta = {"l1_mode": a.l1_mode}
        tag = f"lr={a.lr:g}{steps}" + (" paper-sampling" if a.paper_sampling else "")
        return [(f"{a.rule} {a.l1_mode} l1={l1:g} {tag}", {"rule": a.rule, "task": task, "meta": {**meta, "l1": l1}})
                for l1 in a.l1]  # fmt: skip
    if item == "rules":
        return [(r, {"rule": r, "task": task, "meta": {"l1": 0.0}}) for r in ("bio", "ehebb", "oja")]
    raise ValueError(item)


def run_variant(item: str, name: str, cfg: dict, a) -> RuleSearch:
    """Meta-train one variant (or continue / reuse its run directory)."""
    path = Path(a.runs_dir) / item / name.replace(" ", "_")
    common = {"episodes": a.episodes, "runs": a.runs, "compare": False, "threads": a.threads, "device": a.device,
              "lr": a.lr, "term_scale": a.term_scale, "clip": a.clip}  # fmt: skip
    cfg = {**cfg, "meta": {**cfg.get("meta", {}), **common}}
    if path.exists() and RunDir.open(path).is_finished:
        return RuleSearch.from_run(path)
    if a.summarize_only:
        return RuleSearch.from_run(path) if path.exists() else None
    t0 = time.time()
    try:
        search = RuleSearch.from_config(cfg, out=path, resume=path.exists(), progress=a.progress).fit()
    except DivergenceError as err:  # every run stopped: summarise what it reached, go on with the next variant
        print(f"{item}/{name}: {err}", flush=True)
        return RuleSearch.from_run(path)
    print(f"{item}/{name}: {a.episodes} episodes x {a.runs} runs in {time.time() - t0:.0f} s", flush=True)
    return search


def window_means(h: pd.DataFrame, column: str, frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-run means of ``column`` over the first and last ``frac`` of meta-steps."""
    n = int(h["step"].max())
    k = max(1, round(frac * n))
    first = h[h["step"] <= k].groupby("run")[column].mean().to_numpy()
    last = h[h["step"] > n - k].groupby("run")[column].mean().to_numpy()
    return first, last


def ci(values) -> str:
    """``mean [lo, hi]``: a 95% Student-t interval across runs (NaN values, e.g. a stopped run's empty window, left
    out)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "n/a"
    if values.size == 1:
        return f"{values[0]:.3f}"
    m, lo, hi = t_interval(values)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def variant_row(name: str, windows: pd.DataFrame, episodes: int) -> dict:
    """The counts and interval columns of one variant's table row, from its per-run windows (``run_windows``):
    runs, stopped runs (and where), skipped episodes, meta-accuracy over the first and last window with skipped
    episodes left out and scored 0, mean angle and E_W, the largest E_W of any episode."""
    runs = windows.groupby("run")
    stopped = runs["stopped_at"].first().dropna().astype(int)
    first, last = windows[windows["window"] == 1], windows[windows["window"] == windows["window"].max()]
    where = f" ({', '.join(map(str, stopped))})" if len(stopped) else ""
    row = {"variant": name, "episodes": episodes, "runs": runs.ngroups,
           "runs stopped (at episode)": f"{len(stopped)}{where}",
           "skipped / episodes run": f"{int(windows['skipped'].sum())} of {int(windows['episodes'].sum())}",
           "skipped, last 10%": int(last["skipped"].sum())}  # fmt: skip
    for col, label in (("meta_accuracy", "meta-acc"), ("angle", "angle"), ("ew", "E_W")):
        row[f"{label} first 10%"] = ci(first[col])
        row[f"{label} last 10%"] = ci(last[col])
        if col == "meta_accuracy":
            row["meta-acc last 10%, skipped = 0"] = ci(last["meta_accuracy_skips_failed"])
    row["E_W max"] = f"{windows['ew_max'].max():.3g}"
    return row


def per_step(h: pd.DataFrame, column: str, window: int = 10) -> pd.DataFrame:
    """Mean across runs of the moving average of ``column`` per step, with a 95% Student-t interval."""
    wide = h.pivot_table(index="step", columns="run", values=column)
    smooth = np.stack([moving_average(wide[c].to_numpy(), window) for c in wide.columns], axis=1)
    if smooth.shape[1] > 1:
        m, lo, hi = t_interval(smooth, axis=1)
    else:
        m = lo = hi = smooth[:, 0]
    return pd.DataFrame({"step": wide.index, f"{column}": m, f"{column}_lo": lo, f"{column}_hi": hi})


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]

    def cell(v) -> str:  # n/a: a column added after a kept row was summarised; a count with such a gap is float
        if isinstance(v, float) and (np.isnan(v) or v.is_integer()):
            return "n/a" if np.isnan(v) else str(int(v))
        return str(v)

    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def plot_band(curves: dict[str, pd.DataFrame], column: str, ylabel: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 4  # a sweep's legend goes beside the axes
    fig, ax = plt.subplots(figsize=(11.0 if many else 6.4, 4.0))
    for label, df in curves.items():
        ax.plot(df["step"], df[column], label=label)
        ax.fill_between(df["step"], df[f"{column}_lo"], df[f"{column}_hi"], alpha=0.25)
    ax.set_xlabel("episode (meta-step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**({"fontsize": 8, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(item: str, searches: dict[str, RuleSearch], a) -> None:
    """Tables, per-step CSV, figures and LaTeX of one item."""
    RESULTS = Path(a.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, curves, tex, per_run = [], {}, [], []
    for name, s in searches.items():
        full = s.history_  # a stopped run has no rows after its stop
        windows = run_windows(full, planned=s.config().meta.episodes)
        per_run.append(windows.assign(variant=name))
        row = variant_row(name, windows, int(full["step"].max()))
        h = full[full["skipped"] == 0]
        angles = [c for c in h.columns if c.startswith("angle.")]
        ews = [c for c in h.columns if c.startswith("ew.")]
        h = h.assign(angle_mean=h[angles].mean(axis=1), ew_mean=h[ews].mean(axis=1) if ews else np.nan)
        for layer in angles:
            row[f"angle {layer[6:]} last 10%"] = ci(window_means(h, layer)[1])
        if s.theta_ is not None and torch.is_tensor(s.theta_):
            theta = s.theta_[s.reported_runs_].double().numpy()
            names = [c[6:] for c in h.columns if c.startswith("theta.")]
            row["coefficients (mean [95% CI] across runs not stopped)"] = "; ".join(
                f"{n}={ci(theta[:, j])}" for j, n in enumerate(names)
            )
            if item in ("fig4", "lambda") and s.theta_.dim() == 2:
                shares = s.term_shares().numpy()
                row["share of the update (mean [95% CI] across runs)"] = "; ".join(
                    f"{n}={ci(shares[:, j])}" for j, n in enumerate(names)
                )
            tex.append(f"% {item}: {name}\n" + s.to_latex())
        row["intervals"] = "t"
        rows.append(row)
        curve = per_step(h, "meta_accuracy")
        for col in ("query_loss", "angle_mean", "ew_mean"):
            if h[col].notna().any():
                curve = curve.merge(per_step(h, col), on="step")
        curves[name] = curve
    if item in ("fig4", "lambda"):  # variants summarised before whose run directories are not here: kept
        kept_rows, kept_curves, kept_tex = _earlier_variants(item, RESULTS, set(searches))
        rows, tex = rows + kept_rows, tex + kept_tex
        curves.update(kept_curves)
    table = pd.DataFrame(rows)
    pd.concat(per_run).to_csv(RESULTS / f"{item}_runs.csv", index=False, float_format="%.6g")
    long = pd.concat([c.assign(variant=n) for n, c in curves.items()])
    long.to_csv(RESULTS / f"{item}.csv", index=False)
    titles = {"fig3": "theta_0 only (Fig. 3)", "fig4": "10-term pool with L1 (Fig. 4)",
              "rules": "bio / eHebb / Oja (Figs. 5, 7, 8)", "lambda": "L1 sweep, pool, digits"}  # fmt: skip
    plot_band(curves, "meta_accuracy", "meta-accuracy (moving avg. 10)", RESULTS / f"{item}_accuracy.png", titles[item])
    if all("angle_mean" in c for c in curves.values()):
        plot_band(curves, "angle_mean", "mean alignment angle (deg)", RESULTS / f"{item}_angles.png", titles[item])
    if item == "rules" and all("ew_mean" in c for c in curves.values()):
        plot_band(curves, "ew_mean", "mean E_W (orthonormality error)", RESULTS / f"{item}_ew.png", titles[item])
    if item in ("fig4", "lambda"):
        for name, s in searches.items():
            cols = [c for c in s.history_.columns if c.startswith("theta.")]
            _plot_coefficients(s.history_, cols, RESULTS / f"{item}_{name.replace(' ', '_')}_coefficients.png", name)
    if tex:
        (RESULTS / f"{item}.tex").write_text("\n\n".join(tex) + "\n")
    md = [f"# {titles[item]}", "", _protocol(item, a), "", markdown_table(table), ""]
    (RESULTS / f"{item}.md").write_text("\n".join(md))
    print("\n".join(md))


def _earlier_variants(item: str, results: Path, names: set[str]) -> tuple[list[dict], dict, list[str]]:
    """The rows (``<item>.md``), per-step curves (``<item>.csv``) and LaTeX blocks (``<item>.tex``) of variants in
    an earlier summary that are not in ``names``: a sweep's variants run in separate invocations (or on other
    machines) stay in the summary without their run directories."""
    md, csv, tex = (results / f"{item}.{ext}" for ext in ("md", "csv", "tex"))
    if not (md.exists() and csv.exists()):
        return [], {}, []
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("| ")]
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    rows = [dict(zip(split[0], r)) for r in split[1:] if r[0] not in names]
    for r in rows:
        r["episodes"], r["runs"] = int(r["episodes"]), int(r["runs"])
        r.setdefault("intervals", "bootstrap (earlier summary)")
    keep = {r["variant"] for r in rows}
    long = pd.read_csv(csv)
    curves = {n: g.drop(columns="variant").reset_index(drop=True) for n, g in long.groupby("variant") if n in keep}
    head = f"% {item}: "
    blocks = re.split(f"(?m)^(?={re.escape(head)})", tex.read_text()) if tex.exists() else []
    kept_tex = [b.rstrip() for b in blocks if b.startswith(head) and b[len(head) :].split("\n", 1)[0] in keep]
    return rows, curves, kept_tex


def _plot_coefficients(h: pd.DataFrame, cols: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    mean = h.groupby("step")[cols].mean()
    for c in cols:
        ax.plot(mean.index, mean[c], label=c[6:])
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("episode (meta-step)")
    ax.set_ylabel("coefficient (mean over runs)")
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _protocol(item: str, a) -> str:
    data = (
        "digits (scikit-learn, 8x8, 64-170-130-100-70-10)"
        if item in ("lambda", "oja")
        else "EMNIST 47 classes, first 400 per class of the ByMerge test split (a ByMerge-derived subset, not the "
        "official Balanced split), 784-170-130-100-70-47"
    )
    return (
        f"Data: {data}; softplus beta=10, 5-way K=50 Q=10 (250 online steps), Xavier W and B redrawn every episode, "
        "B = 1 episode per meta-step, "
        + (
            "Adam lr as in the variant's name (untagged lambda variants: lr 3e-4, plain Adam)"
            if item in ("fig4", "lambda")
            else f"Adam lr {a.lr:g}"
        )
        + ", theta_0 = 1e-3 and the other coefficients 0; runs batched. "
        "Classes without replacement, images drawn at random per episode (the paper's code: with replacement, "
        "fixed first-K / next-Q images). Intervals: 95% Student-t across runs of per-run means (rows kept from an "
        "earlier summary say 'bootstrap': 95% percentile bootstrap, 1000 resamples). 'first/last 10%': per-run mean "
        f"over the first/last 10% of episodes; per-run data: `{item}_runs.csv`. Skipped episodes (max |W| > 1e3 or "
        "a non-finite loss) are counted, left out of the means and scored 0 in 'skipped = 0'; stopped runs (5 "
        "consecutive skipped meta-steps) are counted and left out of the last 10% and the coefficients. Regenerate"
        + (
            f" (one invocation per variant: its --lr, --term-scale, --clip, --episodes and --runs; every variant "
            f"under {a.runs_dir}/{item} is summarised)"
            if item in ("fig4", "lambda")
            else ""
        )
        + ": "
        f"`python experiments/reproduce_paper.py {item} --episodes {a.episodes} --runs {a.runs} --lr {a.lr:g}"
        + (f" --term-scale {a.term_scale}" if a.term_scale != "none" else "")
        + (f" --clip {a.clip:g}" if a.clip else "")
        + (" --paper-sampling" if a.paper_sampling else "")
        + (f" --rule {a.rule}" if a.rule != "pool" else "")
        + (f" --l1 {' '.join(f'{x:g}' for x in a.l1)} --l1-mode {a.l1_mode}" if item in ("fig4", "lambda") else "")
        + (f" --runs-dir {a.runs_dir}" if a.runs_dir != "runs/paper" else "")
        + (f" --results {a.results}" if a.results != "results/paper" else "")
        + "`."
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("item", choices=("fig3", "lambda", "fig4", "rules", "oja"))
    p.add_argument("--episodes", type=int, default=600, help="meta-steps per run (the paper: 600)")
    p.add_argument("--runs", type=int, default=20, help="independent runs, trained as one batch (the paper: 20)")
    p.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.1, 0.5, 2.0], help="L1 strengths (fig4, lambda)")
    p.add_argument(
        "--l1-mode",
        default="subgradient",
        choices=("subgradient", "proximal"),
        help="L1 in the meta-loss (the paper) or a proximal soft-threshold step (fig4, lambda)",
    )
    p.add_argument("--rule", default="pool", choices=("pool", "pool_f5mean"), help="fig4: the paper's pool, or the "
                   "pool with F5 width-normalized (-(mean y) e x^T instead of -(sum y) e x^T)")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper: 1e-3)")
    p.add_argument("--term-scale", default="none", choices=("none", "rms", "capped"), help="per-term Adam step sizes")
    p.add_argument("--clip", type=float, default=None, help="clip each run's meta-gradient to this norm")
    p.add_argument("--paper-sampling", action="store_true", help="fig4: EMNIST episodes as the paper's code draws "
                   "them (classes with replacement, the first K / next Q images per class)")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="EMNIST folder (default $RULESEARCH_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=20, help="oja: evaluation seeds")
    p.add_argument("--eval-episodes", type=int, default=5, help="oja: episodes per evaluation seed")
    p.add_argument("--tune-episodes", type=int, default=10, help="oja: episodes that tune the learning rates")
    p.add_argument("--results", default="results/paper", help="where summaries go (default results/paper)")
    p.add_argument("--runs-dir", default="runs/paper", help="where run directories go (default runs/paper)")
    p.add_argument("--summarize-only", action="store_true", help="only rewrite the summary from the runs")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    a = p.parse_args(argv)
    if a.rule != "pool" and a.item != "fig4":
        p.error("--rule is a fig4 option (its variants are named by the rule; other items' rules are fixed)")
    if a.paper_sampling and a.item != "fig4":
        p.error("--paper-sampling is a fig4 option (its variants are tagged; other items' names are fixed)")
    if a.item == "oja":
        from oja_followup import main as oja_main

        return oja_main(a)
    searches = {}
    for name, cfg in variants(a.item, a):
        s = run_variant(a.item, name, cfg, a)
        if s is not None:
            searches[name] = s
    done = {n.replace(" ", "_") for n in searches}
    item_dir = Path(a.runs_dir) / a.item
    for d in sorted(item_dir.iterdir()) if item_dir.is_dir() else []:  # variants of earlier invocations too
        if d.name not in done and RunDir.open(d).load_checkpoint(map_location="cpu") is not None:
            searches[d.name.replace("_", " ")] = RuleSearch.from_run(d)
    if searches:
        summarize(a.item, searches, a)


if __name__ == "__main__":
    main()

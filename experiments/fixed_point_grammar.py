"""Search the preconditioned-gradient family P_L delta r^T P_R of a recurrent network at its fixed points.

Grammar: P_L a product of at most two factors from {G, I-WG, I-GW} (13 choices), P_R one of {I, G, I-WG, I-GW,
(I-WG)^T (I-WG), (I-GW)^T (I-GW)} (6); 78 rules, each a compiled rule (``rulesearch.fixedpoint.preconditioned``).
It contains dW3 (P_L = (I-WG) G, P_R = (I-GW)^T (I-GW)) and dW4 (P_L = I-WG, P_R = (I-WG)^T (I-WG)).

Score of a rule at a learning rate: held-out accuracy after ``--steps`` steps minus a stability penalty
``max(0, max Re lambda(GW) - 0.9)`` (over the run), minus the fraction of failed fixed-point solves; a diverged run
scores 0. Each rule takes its best learning rate of ``--lrs``. Stage 1 screens every rule on a small network;
stage 2 reruns the best ``--top`` rules and dW3 / dW4 on a larger network.

    python experiments/fixed_point_grammar.py            # -> results/fixed_point_grammar.md, .csv
    python experiments/fixed_point_grammar.py --resume   # keep the runs already in the CSV (written after each run)

Data: digits 0-9 of the bundled EMNIST bymerge test split (MNIST stand-in), as in fixed_point_rnn.py.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import pandas as pd
import sympy as sp
import torch
from fixed_point_rnn import DATA, OUT, batches, load_digits

from rulesearch.fixedpoint import dW3, dW4, fixed_point_step, heldout_metrics, preconditioned, preconditioned_vectors
from rulesearch.lang.export import expr_latex
from rulesearch.lang.signals import Contract
from rulesearch.networks import FixedPointNetwork

LEFT_FACTORS = ("G", "I-WG", "I-GW")
RIGHT = {"I": (), "G": ("G",), "I-WG": ("I-WG",), "I-GW": ("I-GW",),
         "(I-WG)^T(I-WG)": ("I-GWt", "I-WG"), "(I-GW)^T(I-GW)": ("I-WtG", "I-GW")}  # fmt: skip


def candidates():
    """The grammar's rules (named ``L[left factors] R[right]``), without rules whose update is the same expression;
    ``SHAPES[name]`` holds their ``(left, right)`` factor names."""
    seen, out = set(), []
    lefts = [()] + [(f,) for f in LEFT_FACTORS] + list(itertools.product(LEFT_FACTORS, repeat=2))
    for left, (rname, right) in itertools.product(lefts, RIGHT.items()):
        rule = preconditioned(left, right, name=f"L[{' '.join(left) or 'I'}] R[{rname}]")
        key = sp.expand(rule.terms[0].expr)
        if key in seen:
            continue
        seen.add(key)
        out.append(rule)
        SHAPES[rule.name] = (left, right)
    return out


SHAPES: dict[str, tuple] = {}


def n_products(rule) -> int:
    """Distinct products with W or W^T per sample (the rule's cost beyond the outer products)."""
    return len({a for a in sp.preorder_traversal(rule.terms[0].expr) if isinstance(a, Contract)})


def score_run(rule, lr, N, batch, steps, train, test, seed=1) -> dict:
    net = FixedPointNetwork(n_in=784, n_hidden=N, tol=1e-4, max_iter=200)
    params = net.init_params(seed)
    it = batches(*train, batch, seed)
    W, max_gw, failed, solves, t0 = params.W, 0.0, 0, 0, time.perf_counter()
    x_s, y_s = test[0][:64], test[1][:64]
    diverged = False
    for step in range(steps):
        x, y = next(it)
        W, rec, gain = fixed_point_step(net, params, W, x, y, rule, lr)
        failed, solves = failed + rec.n_failed, solves + len(y)
        if not bool(torch.isfinite(W).all()) or not math.isfinite(rec.loss):
            diverged = True
            break
        if step % 10 == 9:
            max_gw = max(max_gw, heldout_metrics(net, params, W, x_s, y_s)["max_re_GW"])
    base = {"rule": rule.name, "lr": lr, "N": N, "steps": steps, "diverged": diverged}
    if diverged:
        nan = float("nan")
        return {**base, "accuracy": nan, "max_re_GW": nan, "failed_frac": nan, "score": 0.0,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    ev = heldout_metrics(net, params, W, *test)
    max_gw = max(max_gw, ev["max_re_GW"])
    fail = (failed + ev["n_failed"]) / (solves + len(test[1]))
    score = ev["accuracy"] - max(0.0, max_gw - 0.9) - fail
    return {**base, "accuracy": ev["accuracy"], "max_re_GW": max_gw, "failed_frac": fail, "score": score,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="0.25,1.0,4.0")
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--full-N", type=int, default=150)
    ap.add_argument("--full-batch", type=int, default=256)
    ap.add_argument("--full-steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in the CSV")
    ap.add_argument("--report-only", action="store_true", help="results/fixed_point_grammar.md from the CSV")
    args = ap.parse_args()
    torch.set_num_threads(1)
    csv = args.out / "fixed_point_grammar.csv"
    if args.report_only:
        by_name = {r.name: r for r in candidates()}
        df = pd.read_csv(csv)
        return report(df, by_name, args, df["seconds"].sum())
    train, test = load_digits(DATA)
    test = (test[0][: args.n_test], test[1][: args.n_test])
    rules = candidates()
    by_name = {r.name: r for r in rules}
    lrs = [float(v) for v in args.lrs.split(",")]
    rows = pd.read_csv(csv).to_dict("records") if args.resume and csv.exists() else []
    done = {(r["stage"], r["rule"], r["lr"]) for r in rows}

    def record(stage, rule, lr, N, batch, steps):
        if (stage, rule.name, lr) not in done:  # --resume: runs already in the CSV are kept
            rows.append({"stage": stage, **score_run(rule, lr, N, batch, steps, train, test)})
            df = pd.DataFrame(rows)
            df["products"] = [n_products(by_name[r]) for r in df["rule"]]
            df.to_csv(csv, index=False)  # after every run
        return next(r for r in rows if (r["stage"], r["rule"], r["lr"]) == (stage, rule.name, lr))

    for rule in rules:
        best = max((record(1, rule, lr, args.N, args.batch, args.steps) for lr in lrs), key=lambda r: r["score"])
        print(f"{rule.name}: best lr {best['lr']} acc {best['accuracy']:.3f} max Re GW {best['max_re_GW']:.3f} "
              f"score {best['score']:.3f}", flush=True)  # fmt: skip
    s1 = pd.DataFrame(rows)
    best1 = s1[s1.stage == 1].sort_values("score", ascending=False).drop_duplicates("rule")
    finalists = list(best1["rule"][: args.top])
    for ref in (dW3, dW4):
        name = next(r.name for r in rules if _is(r, ref))
        if name not in finalists:
            finalists.append(name)
    for name in finalists:
        lr = float(best1.set_index("rule").loc[name, "lr"])
        row = record(2, by_name[name], lr, args.full_N, args.full_batch, args.full_steps)
        print(f"stage 2 {name} lr {lr}: acc {row['accuracy']:.3f} max Re GW {row['max_re_GW']:.3f}", flush=True)
    df = pd.read_csv(csv)
    report(df, by_name, args, df["seconds"].sum())


def _is(rule, ref) -> bool:
    return sp.expand(rule.terms[0].expr) == sp.expand(ref.terms[0].expr)


def report(df, by_name, args, seconds) -> None:
    s1 = df[df.stage == 1].sort_values("score", ascending=False).drop_duplicates("rule")
    s2 = df[df.stage == 2].sort_values("score", ascending=False)
    tag = {n: " (= dW3)" if _is(r, dW3) else " (= dW4)" if _is(r, dW4) else "" for n, r in by_name.items()}

    def table(d):
        lines = [
            "| rule | best lr | accuracy | max Re λ(GW) | failed solves | W products | score |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in d.iterrows():
            lines.append(f"| {r['rule']}{tag[r['rule']]} | {r['lr']:g} | {r['accuracy']:.3f} | {r['max_re_GW']:.3f} | "
                         f"{r['failed_frac']:.3f} | {r['products']} | {r['score']:.3f} |")  # fmt: skip
        return "\n".join(lines)

    rank = {n: i + 1 for i, n in enumerate(s1["rule"])}
    winner = s2.iloc[0] if len(s2) else s1.iloc[0]
    w_rule = by_name[winner["rule"]]

    def latex(n):
        u, v = preconditioned_vectors(*SHAPES[n])
        return rf"$\Delta W_{{ij}} = -\theta\,\left[{expr_latex(u)}\right]\left[{expr_latex(v)}\right]$"

    latex = "\n".join(f"- {n}{tag[n]}: {latex(n)}" for n in s2["rule"])
    is_gram = s1["rule"].str.contains(r"\^T", regex=True)
    gram, no_gram = int(is_gram.head(10).sum()), s1[~is_gram].iloc[0]
    unstable = ", ".join(f"{r['rule']}{tag[r['rule']]} ({r['max_re_GW']:.2f})" for _, r in s2.iterrows()
                         if not r["max_re_GW"] < 1) or "none"  # fmt: skip
    versus = ""
    if len(s2) > 1:  # the runner-up, and whether the gap exceeds twice the binomial standard error of the two
        second = s2.iloc[1]
        se = math.sqrt(sum(a * (1 - a) / args.n_test for a in (winner["accuracy"], second["accuracy"])))
        gap = winner["accuracy"] - second["accuracy"]
        versus = (
            f"Runner-up: {second['rule']}{tag[second['rule']]} (accuracy {second['accuracy']:.3f}, max Re λ(GW) "
            f"{second['max_re_GW']:.3f}); the accuracy gap {gap:.3f} is {'within' if abs(gap) < 2 * se else 'beyond'} "
            f"two standard errors ({2 * se:.3f}; {args.n_test} held-out images, one seed)."
        )
    d3 = next(n for n, r in by_name.items() if _is(r, dW3))
    d4 = next(n for n, r in by_name.items() if _is(r, dW4))
    text = f"""# Searching the preconditioned-gradient family of fixed-point rules

`experiments/fixed_point_grammar.py` (rerun: `python experiments/fixed_point_grammar.py`); per-run data:
`results/fixed_point_grammar.csv`. {seconds / 60:.0f} min of runs in all, one thread on a 2-core machine shared with
other jobs.

**Grammar.** ΔW = −θ (P_L δ)(r*ᵀ P_R) with P_L a product of at most two factors from {{G, I−WG, I−GW}} and
P_R ∈ {{I, G, I−WG, I−GW, (I−WG)ᵀ(I−WG), (I−GW)ᵀ(I−GW)}}: {len(by_name)} distinct rules (after removing identical
expressions), each compiled from the rule language. dW3 and dW4 are members. Score = held-out accuracy −
max(0, max Re λ(GW) − 0.9) − fraction of failed fixed-point solves (0 for a diverged run); each rule at its best
learning rate of {{{args.lrs}}}.

**Budget.** Stage 1 (search): N = {args.N}, batch {args.batch}, {args.steps} steps, held-out accuracy on
{args.n_test} images (EMNIST digits, MNIST stand-in), max Re λ(GW) on 64 held-out fixed points every 10 steps.
Stage 2: the top {args.top} of stage 1 plus dW3 and dW4 at N = {args.full_N}, batch {args.full_batch},
{args.full_steps} steps, at their stage-1 learning rates. One seed. This is far below the paper's budget (354
steps), so the issue's bar (≥ 85% at 3 epochs) is not tested here.

## Stage 1: top 10 of {len(s1)} (dW3 ranks {rank[d3]}, dW4 ranks {rank[d4]})

{gram} of the top 10 use a Gram right preconditioner P_R = QᵀQ; without one the best is
{no_gram["rule"]} (rank {rank[no_gram["rule"]]}, accuracy {no_gram["accuracy"]:.3f}).

{table(s1.head(10))}

## Stage 2: finalists at N = {args.full_N}

{table(s2)}

**Top of stage 2:** {winner["rule"]}{tag[winner["rule"]]}, accuracy {winner["accuracy"]:.3f}, max Re λ(GW)
{winner["max_re_GW"]:.3f}, {n_products(w_rule)} products with W or Wᵀ per sample (dW3: {n_products(dW3)}, dW4:
{n_products(dW4)}). {versus}

Stage-2 runs that left the stable region (max Re λ(GW) ≥ 1) at their stage-1 learning rate: {unstable}. The
learning rate is chosen on the small network and not re-tuned at N = {args.full_N}.

## LaTeX of the finalists

{latex}
"""
    (args.out / "fixed_point_grammar.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Meta-learn a neural plasticity rule on digits, then distill it into a formula.

The neural rule is a small MLP over each synapse's signals plus a linear skip part over the paper's F0, F2 and F9
(:class:`rulesearch.neural.NeuralRule`):

.. math::

    \\Delta W_{ij} = a^\\top \\phi_{ij} + s\\,\\mathrm{MLP}_\\psi(\\phi_{ij}),
    \\qquad \\phi_{ij} = (x_j, y_i, e_i, e'_j, W_{ij}, (W^\\top y)_j, e_i x_j, e_i e'_j, y_i (x_j - (W^\\top y)_j)),

starting as F0 (:math:`a = -\\theta_0` on :math:`e_i x_j`, MLP output zero). It is meta-learned with the same
trainer as the pool, under feedback alignment, on the main job's digits setting (64-170-130-100-70-10, 5-way,
K=50, Q=10), with checkpointed MLP activations. Adam lr 1e-3 (the paper's), ``term_scale='capped'`` (skip
coefficients of features larger than :math:`e_i x_j` get proportionally smaller steps: a 3e-4 step on a Hebbian
feature alone makes the network diverge within one episode) and the meta-gradient clipped to norm 10.

The learned rule is then distilled (:func:`rulesearch.distill.distill_run`, sparse backend): a formula is fitted to
its weight changes on fresh episodes and re-run in the loop.

    python experiments/neural_digits.py                          # 30 meta-steps x 1 run (~5 min on 2 cores)
    python experiments/neural_digits.py --episodes 100 --runs 5

Writes results/neural_digits.md (meta-accuracy beside f0 under fa and bp on the same tasks, the skip part, the
distilled formula and its closed-loop check) and results/neural_digits_accuracy.png; the run directory goes to
./runs/neural-digits (resumable).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import sympy as sp

from rulesearch.distill import distill_run
from rulesearch.io.runs import RunDir
from rulesearch.train import MetaConfig, NetworkConfig, NeuralConfig, RuleSearch, TaskConfig


def _coef(term: sp.Expr) -> float:
    """Minus the magnitude of a term's numeric coefficient (sort key: largest first)."""
    return -abs(float(term.as_coeff_Mul()[0]))


def main(argv=None) -> RuleSearch:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=30, help="meta-steps per run")
    p.add_argument("--runs", type=int, default=1, help="independent runs (seeds), trained as one batch")
    p.add_argument("--hidden", type=int, default=16, help="hidden width of the MLP")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/neural-digits", help="run directory (resumed if unfinished)")
    p.add_argument("--results", default="results", help="folder for neural_digits.md and the figure")
    p.add_argument("--no-distill", action="store_true", help="skip the distillation")
    a = p.parse_args(argv)

    out = Path(a.out)
    if out.exists() and RunDir.open(out).is_finished:
        search = RuleSearch.from_run(out)
    else:
        search = RuleSearch(
            rule="neural",
            neural=NeuralConfig(hidden=(a.hidden,)),
            network=NetworkConfig(feedback="fa"),
            task=TaskConfig(dataset="digits"),
            meta=MetaConfig(
                episodes=a.episodes,
                runs=a.runs,
                lr=a.lr,
                term_scale="capped",
                clip=10.0,
                threads=a.threads,
                device=a.device,
            ),  # fmt: skip
            out=out,
            resume=out.exists(),
        ).fit()
    train_s = float(search.history_.groupby("step")["seconds"].first().sum())
    report = search.report()
    print(report)

    lines = [
        "# Neural plasticity rule on digits",
        "",
        f"Regenerate: `python experiments/neural_digits.py --episodes {search.n_steps_} --runs {search.n_runs_}`"
        f" (meta-training took {train_s:.0f} s, as logged in the run's metrics).",
        "",
        f"Rule: {search.rule_.describe()}.",
        "Network 64-170-130-100-70-10, softplus beta=10, feedback alignment (B redrawn every episode), 5-way K=50 "
        "Q=10 online, B = 1 episode per meta-step; Adam lr "
        f"{a.lr:g}, term_scale='capped', meta-gradient clipped to norm 10.",
        "",
        "```",
        report.rstrip(),
        "```",
    ]
    if not a.no_distill:
        t1 = time.time()
        res = distill_run(out, seed=1)
        cl = res.closed_loop
        print(res)
        lines += [
            "",
            "## Distilled (sparse backend, classic grammar; first run's rule)",
            "",
            f"$${res.latex()}$$",
            "",
            "- largest coefficients: "
            + ", ".join(f"`{sp.sstr(t.evalf(3))}`" for t in sorted(sp.Add.make_args(res.formula), key=_coef)[:4]),
            f"- held-out relative error of the formula against the neural rule's weight changes: "
            f"{res.heldout_error:.3f}",
            f"- closed loop (the formula re-run in the inner loop on fresh episodes): {cl}",
            f"- {time.time() - t1:.0f} s; full report in `{out}/distill/report.md`",
        ]
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "neural_digits.md").write_text("\n".join(lines) + "\n")
    fig = out / "figures" / "meta_accuracy.png"
    if fig.is_file():
        shutil.copyfile(fig, results / "neural_digits_accuracy.png")
    print(f"wrote {results / 'neural_digits.md'}")
    return search


if __name__ == "__main__":
    main()

"""Discover a plasticity rule from a grammar with the Python API, and export it as LaTeX.

The whole job is a few lines: declare candidate terms (a grammar, or the paper's pool), say which network, tasks
and outer loop to use, fit, export::

    grammar = Grammar(atoms=(pre, post, err, pre_err, wT(post)), max_degree=2)
    search = RuleSearch(rule=grammar.rule("grammar"),
                        network=NetworkConfig(feedback="fa"),
                        task=TaskConfig(dataset="digits"),
                        meta=MetaConfig(episodes=300, runs=5, l1=0.5)).fit()
    print(search)                # the coefficient table (mean and 95% interval over the 5 runs)
    search.to_latex()            # equation and booktabs table

The paper's EMNIST setting is the same call with ``task=TaskConfig(dataset="emnist",
options={"per_class": 400})`` (784-170-130-100-70-47 follows from the dataset) and ``rule="pool"``.

    python experiments/discover_grammar.py                       # digits, 100 meta-steps, 1 run
    python experiments/discover_grammar.py --episodes 300 --runs 5 --pool
    python experiments/discover_grammar.py --dataset emnist --episodes 300 --runs 5 --pool --device cuda

Writes results/discover_grammar.tex and results/discover_grammar.md (the run directory goes to ./runs/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rulesearch.lang.grammar import Grammar
from rulesearch.lang.signals import err, post, pre, pre_err, wT
from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig


def main(argv=None) -> RuleSearch:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits (bundled) or emnist (first 400 images per class)")
    p.add_argument("--pool", action="store_true", help="use the paper's 10-term pool instead of the grammar")
    p.add_argument("--episodes", type=int, default=100, help="meta-steps per run")
    p.add_argument("--runs", type=int, default=1, help="independent runs (seeds), trained as one batch")
    p.add_argument("--l1", type=float, default=0.5, help="L1 strength lambda")
    p.add_argument("--feedback", default="fa", help="bp, fa, sign, dfa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="run directory (default ./runs/discover-grammar-<dataset>)")
    p.add_argument("--results", default="results", help="folder for the LaTeX and Markdown exports")
    a = p.parse_args(argv)

    # 1. candidate terms: every monomial of degree <= 2 over activities, errors and (W^T y)_j
    grammar = Grammar(
        atoms=(pre, post, err, pre_err, wT(post)),
        max_degree=2,
        degree_per_signal={"Contract(w,post)": 1},
        name="grammar",
    )
    rule = "pool" if a.pool else grammar.rule()
    print(grammar.describe() if not a.pool else "the paper's 10-term pool")

    # 2. network, tasks, outer loop
    options = {"per_class": 400} if a.dataset == "emnist" else {}
    search = RuleSearch(
        rule=rule,
        network=NetworkConfig(feedback=a.feedback),  # softplus beta=10, 170-130-100-70 hidden
        task=TaskConfig(dataset=a.dataset, options=options),  # 5-way, K=50, Q=10
        meta=MetaConfig(episodes=a.episodes, runs=a.runs, l1=a.l1, device=a.device),  # Adam 1e-3, theta0 1e-3
        out=a.out,
        name=None if a.out else f"discover-{'pool' if a.pool else 'grammar'}-{a.dataset}",
    )

    # 3. fit and export
    search.fit()
    print(search.report())
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / "discover_grammar"
    stem.with_suffix(".tex").write_text(search.to_latex() + "\n")
    stem.with_suffix(".md").write_text(search.report(markdown=True) + "\n\n" + search.to_markdown() + "\n")
    print(f"wrote {stem}.tex and {stem}.md")
    return search


if __name__ == "__main__":
    main()

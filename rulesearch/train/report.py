"""Text reports of trained rules: LaTeX and Markdown formulas with intervals, coefficient and term tables,
and the export of a finished run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sympy as sp

from ..errors import ConfigError, InvalidRuleError, RunDirectoryError
from ..lang.export import latex_fragment, latex_table, markdown_table, round_floats
from ..lang.rule import NetworkRule, Rule
from .rules import _is_neural, _rule_data, load_feedback_rule, load_rule, resolve_rule

if TYPE_CHECKING:
    from ..neural import NeuralRule

__all__ = ["coefficient_table", "export_run", "rule_latex", "rule_markdown", "terms_table"]


def _groups(rule) -> list[tuple[tuple[int, ...], Rule]]:
    return list(rule.groups) if isinstance(rule, NetworkRule) else [((), rule)]


def _group_intervals(rule, intervals, g: int):
    if intervals is None:
        return None
    iv = intervals[g] if isinstance(rule, NetworkRule) else intervals
    return np.asarray(iv, dtype=float)


def _layers_label(layers) -> str:
    return f"layers {', '.join(str(i + 1) for i in layers)}" if len(layers) > 1 else f"layer {layers[0] + 1}"


def rule_latex(rule, intervals=None, precision: int = 3, table_precision: int | None = None, header: bool = True):
    """A trained rule as a LaTeX fragment to ``\\input`` (:func:`~rulesearch.lang.export.latex_fragment`): a comment
    naming the packages it needs (``header``), the update in an ``equation`` (``gather`` per layer group) to
    ``precision`` significant digits, and a booktabs coefficient table to ``table_precision`` digits (default
    ``precision + 1``: the console's formula and table).

    ``intervals``: ``(R, 2)`` for a Rule, one ``(R_g, 2)`` per group of a NetworkRule; shown as ``mean [lo, hi]``.
    """
    if _is_neural(rule):
        return f"% {rule.describe()}\n% A neural rule has no closed form; distill it to get one."
    tp = precision + 1 if table_precision is None else table_precision
    groups = _groups(rule)
    if not isinstance(rule, NetworkRule):
        ivs = (
            [intervals.tolist() if isinstance(intervals, np.ndarray) else intervals] if intervals is not None else None
        )
        table = latex_table([rule], precision=tp, intervals=ivs)
        return latex_fragment([rule.latex(precision)], [table], header)
    eqs = [rf"\text{{{_layers_label(layers)}}}:\quad " + r.latex(precision) for layers, r in groups]
    rules = [Rule(r.terms, _layers_label(layers), values=r.values) for layers, r in groups]
    if not all(r.terms == rules[0].terms for r in rules):
        tables = [
            latex_table(
                [r],
                precision=tp,
                intervals=None if intervals is None else [_group_intervals(rule, intervals, g).tolist()],
            )
            for g, r in enumerate(rules)
        ]
        return latex_fragment(eqs, tables, header)
    ivs = None if intervals is None else [_group_intervals(rule, intervals, g).tolist() for g in range(len(rules))]
    return latex_fragment(eqs, [latex_table(rules, precision=tp, intervals=ivs)], header)


def rule_markdown(rule, intervals=None, precision: int = 4) -> str:
    """Markdown coefficient table(s) of a trained rule, with a 95% interval column when ``intervals`` is given."""
    if _is_neural(rule):
        return _neural_table(rule, precision)
    blocks = []
    for g, (layers, r) in enumerate(_groups(rule)):
        table = markdown_table(r, precision=precision)
        iv = _group_intervals(rule, intervals, g)
        if iv is not None:
            lines = table.split("\n")
            lines[0] += " 95% interval |"
            lines[1] += "---|"
            for i, (lo, hi) in enumerate(iv):
                lines[2 + i] += f" [{lo:.{precision}g}, {hi:.{precision}g}] |"
            table = "\n".join(lines)
        blocks.append((f"**{_layers_label(layers)}**\n\n" if layers else "") + table)
    return "\n\n".join(blocks)


def _neural_table(rule: NeuralRule, precision: int) -> str:
    """A neural rule's skip coefficients a_f (one line per feature) and the norm of its MLP parameters."""
    if rule.params is None:
        return rule.describe()
    width = max(8, *(len(f) for f in rule.features))
    lines = [f"{'feature':<{width}} {'a (skip)':>12}"]
    if rule.skip:
        lines += [f"{f:<{width}} {a:>12.{precision}g}" for f, a in zip(rule.features, rule.params["skip"].tolist())]
    norm = rule.mlp_norm()
    if norm is not None:
        lines.append(f"MLP {'-'.join(map(str, (rule.n_features, *rule.hidden, 1)))}: |psi| = {norm:.{precision}g}")
    return "\n".join(lines)


def coefficient_table(rule, intervals=None, precision: int = 4) -> str:
    """Plain-text coefficient table: term, locality, value (and 95% interval) per term and layer group."""
    if _is_neural(rule):
        return _neural_table(rule, precision)
    blocks = []
    for g, (layers, r) in enumerate(_groups(rule)):
        iv = _group_intervals(rule, intervals, g)
        width = max([8, *(len(n) for n in r.term_names())])
        lines = [
            f"{'term':<{width}} {'locality':<16} {'theta':>12}" + (f" {'95% interval':>26}" if iv is not None else "")
        ]
        values = r.values if r.values is not None else [float("nan")] * r.n_terms
        for i, (term, loc) in enumerate(zip(r.term_names(), r.locality())):
            line = f"{term:<{width}} {loc:<16} {values[i]:>12.{precision}g}"
            if iv is not None:
                line += f" {f'[{iv[i][0]:.{precision}g}, {iv[i][1]:.{precision}g}]':>26}"
            lines.append(line)
        blocks.append((_layers_label(layers) + "\n" if layers else "") + "\n".join(lines))
    return "\n\n".join(blocks)


def terms_table(rule) -> str:
    """The terms of a rule, pool or grammar: index, name, locality and LaTeX (``rulesearch terms``)."""
    rule = resolve_rule(rule)
    if _is_neural(rule):
        return rule.describe()
    from ..lang.export import expr_latex

    lines = []
    for layers, r in _groups(rule):
        width = max([4, *(len(n) for n in r.term_names())])
        if layers:
            lines.append(_layers_label(layers))
        lines.append(f"{'#':>3}  {'name':<{width}}  {'locality':<16}  LaTeX")
        for i, (t, loc) in enumerate(zip(r.terms, r.locality())):
            lines.append(f"{i:>3}  {t.name:<{width}}  {loc:<16}  {expr_latex(t.expr)}")
    return "\n".join(lines)


def export_run(source, fmt: str = "latex", precision: int = 3) -> str:
    """A trained rule as ``latex``, ``json`` or ``markdown`` text, from a run directory (its ``rule.json``, or its
    newest checkpoint if the run is unfinished) or a rule JSON file."""
    fmts = ("latex", "json", "markdown")
    if fmt not in fmts:
        raise ConfigError(f"Unknown export format {fmt!r}; allowed: {', '.join(fmts)}.")
    path = Path(source)
    if path.is_dir() and not (path / "rule.json").is_file():
        from .estimator import RuleSearch  # the estimator reports through this module

        search = RuleSearch.from_run(path)
        data = search.to_json()
    else:
        if not path.exists():
            raise RunDirectoryError(f"{str(path)!r} does not exist; expected a run directory or a rule JSON file.")
        data = _rule_data(path)
    rule = load_rule(data)  # validated (finite values, known nodes) before any format is printed
    fb_rule = load_feedback_rule(data)
    intervals = _intervals_of(data, rule)
    if fmt == "json":
        try:
            return json.dumps(data, indent=2, allow_nan=False)
        except ValueError:
            raise InvalidRuleError(
                "The rule file holds NaN or infinite numbers (in 'runs' or elsewhere); export it again from its run."
            ) from None
    if fmt == "latex":
        return _with_feedback(rule_latex(rule, intervals, precision), fb_rule, "latex", precision)
    return _with_feedback(rule_markdown(rule, intervals, precision + 1), fb_rule, "markdown", precision + 1)


def _intervals_of(data, rule):
    """The ``intervals`` of a rule file as arrays (``(R, 2)`` for a Rule, one per group otherwise), checked finite."""
    raw = data.get("intervals")
    if raw is None:
        return None
    try:
        out = np.asarray(raw, dtype=float) if isinstance(rule, Rule) else [np.asarray(iv, dtype=float) for iv in raw]
        finite = all(
            np.isfinite(iv).all() and iv.shape[-1:] == (2,) for iv in ([out] if isinstance(rule, Rule) else out)
        )
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise InvalidRuleError(
            f"'intervals' of the rule file must be finite [low, high] pairs, one per coefficient; received "
            f"{str(raw)[:80]}. Export the rule again from its run (rulesearch export RUN -f json)."
        )
    return out


def _with_feedback(text: str, feedback_rule: Rule | None, fmt: str, precision: int) -> str:
    """``text`` followed by the plastic feedback rule (``dB_ji``, W's layout) as ``latex``, ``markdown``, ``table``
    or ``formula``; ``text`` itself without one."""
    if feedback_rule is None:
        return text
    if fmt == "formula":
        return f"{text}\nfeedback: dB_ji = {sp.sstr(round_floats(feedback_rule.sympy(), precision))}"
    if fmt == "latex":
        block = "% plastic feedback rule\n" + rule_latex(feedback_rule, None, precision, header=False).replace(
            r"\Delta W_{ij}", r"\Delta B_{ji}", 1
        )
    elif fmt == "markdown":
        block = "**feedback rule (plastic)**\n\n" + rule_markdown(feedback_rule, None, precision)
    else:
        block = "feedback rule (plastic)\n" + coefficient_table(feedback_rule, None, precision)
    return f"{text}\n\n{block}"

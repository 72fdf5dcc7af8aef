"""Rules as the trainer sees them: resolve a spec to a rule object, read and write trained rules as JSON.

A spec is a named rule (``pool``, ``f0``, ...), ``'neural'``, ``'grammar:<name>'``, a rule JSON file or a rule object;
a trained rule's JSON (``rule.json`` of a run directory) carries the per-run values and intervals beside the rule, so
reading it needs no data files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sympy as sp

from ..errors import ConfigError, InvalidRuleError
from ..io.files import read_json
from ..lang.export import FORMAT as RULE_FORMAT
from ..lang.rule import NetworkRule, Pool, Rule

if TYPE_CHECKING:
    from .configs import NeuralConfig

# torch, the neural rule and the configs are imported where a neural rule is built or read: the linear rules' files
# and reports (rulesearch terms, rulesearch export) need neither.

__all__ = [
    "NETWORK_RULE_FORMAT",
    "load_feedback_rule",
    "load_rule",
    "pseudo_gradient_lr",
    "resolve_feedback_rule",
    "resolve_rule",
    "trained_rule_json",
]


NETWORK_RULE_FORMAT = "rulesearch.network_rule/1"

_NEURAL_MODULE = __name__.rsplit(".", 2)[0] + ".neural"


def _is_neural(rule) -> bool:
    """Whether ``rule`` is a :class:`~rulesearch.neural.NeuralRule`, without importing torch: there is none before
    its module is imported."""
    neural = sys.modules.get(_NEURAL_MODULE)
    return neural is not None and isinstance(rule, neural.NeuralRule)


def resolve_rule(spec, terms: Sequence[str] | None = None, neural: NeuralConfig | None = None):
    """A rule object from a spec: a :class:`Rule`, :class:`NetworkRule`, :class:`NeuralRule`, :class:`Pool`,
    :class:`~rulesearch.lang.grammar.Grammar`, a named rule, ``'neural'``, ``'grammar:<name>'`` or a JSON file path.

    ``terms`` keeps only the named terms of a linear rule.
    """
    from ..lang.grammar import BUILTIN_GRAMMARS, Grammar
    from ..lang.pools import NAMED_RULES

    rule = spec
    if isinstance(spec, str):
        if spec == "neural":
            from .configs import NeuralConfig

            rule = (neural or NeuralConfig()).build()
        elif spec.startswith("grammar:"):
            kind = spec.split(":", 1)[1]
            if kind not in BUILTIN_GRAMMARS:
                raise ConfigError(
                    f"Config key 'rule': unknown grammar {kind!r} in {spec!r}; allowed: "
                    f"{', '.join('grammar:' + k for k in BUILTIN_GRAMMARS)}."
                )
            rule = BUILTIN_GRAMMARS[kind]().rule(f"grammar-{kind}")
        elif spec in NAMED_RULES:
            rule = NAMED_RULES[spec]
        elif _is_rule_file(spec):
            rule = load_rule(spec)
        else:
            allowed = ", ".join([*NAMED_RULES, "neural", "grammar:default", "grammar:classic", "<file>.json"])
            import difflib

            close = difflib.get_close_matches(spec, [*NAMED_RULES, "neural"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Config key 'rule': received {spec!r}, expected one of {allowed}.{hint}")
    elif isinstance(spec, Grammar):
        rule = spec.rule()
    elif isinstance(spec, Pool):
        rule = spec.rule()
    if not (isinstance(rule, (Rule, NetworkRule)) or _is_neural(rule)):
        raise ConfigError(
            f"rule must be a Rule, NetworkRule, NeuralRule, Pool, Grammar or a name; received {type(spec).__name__}."
        )
    if terms:
        if not isinstance(rule, Rule):
            raise ConfigError("terms= selects terms of a linear Rule; this rule is a " + type(rule).__name__ + ".")
        rule = rule.select(list(terms))
    if isinstance(rule, Rule) and not rule.is_linear:
        raise ConfigError(
            f"Rule {rule.name!r} is a general expression with free constants; the meta-trainer learns linear rules "
            f"(named terms) and neural rules."
        )
    return rule


def trained_rule_json(rule, runs=None, intervals=None) -> dict:
    """JSON of a trained rule object: a :class:`Rule` (``rulesearch.rule/1``), a :class:`NetworkRule` or a
    :class:`NeuralRule`; ``runs`` (per-run values) and ``intervals`` are stored alongside."""
    if _is_neural(rule):
        return rule.to_json(runs=runs)
    if isinstance(rule, NetworkRule):
        out = {
            "format": NETWORK_RULE_FORMAT,
            "groups": [{"layers": list(layers), "rule": r.to_json()} for layers, r in rule.groups],
        }
    else:
        out = rule.to_json()
    if runs is not None:
        out["runs"] = _plain(runs)
    if intervals is not None:
        out["intervals"] = _plain(intervals)
    return out


def _plain(x):
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and torch.is_tensor(x):
        return x.detach().cpu().double().tolist()
    if isinstance(x, np.ndarray):
        return x.astype(float).tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_rule(source, run: int | None = None):
    """A rule from a JSON file, a dict, or a run directory (its ``rule.json``).

    ``run`` picks the parameters of one run of a multi-run result (default: the mean for linear rules, the first
    run for neural rules).
    """
    data = _rule_data(source)
    fmt = data.get("format")
    runs = data.get("runs")
    if fmt == NETWORK_RULE_FORMAT:
        groups = []
        for g, item in enumerate(_network_groups(data)):
            r = Rule.from_json(item["rule"])
            if run is not None:
                r = r.with_values(_run_values(runs, run)[g])
            groups.append((tuple(item["layers"]), r))
        return NetworkRule(groups)
    if fmt == RULE_FORMAT:
        rule = Rule.from_json(data)
        if run is not None:
            rule = rule.with_values(_run_values(runs, run))
        return rule
    from ..neural import FORMAT as NEURAL_FORMAT
    from ..neural import NeuralRule

    if fmt == NEURAL_FORMAT:
        return NeuralRule.from_json(data, run=run if run is not None else (0 if runs else None))
    raise InvalidRuleError(
        f"Unknown rule file format {fmt!r}; expected {RULE_FORMAT!r}, {NETWORK_RULE_FORMAT!r} or a neural rule."
    )


def _rule_data(source) -> Mapping:
    """The JSON object of a rule file, a run directory's ``rule.json``, or a dict."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "rule.json"
        fix = "Pass a rule JSON file (as written by Rule.to_json or rulesearch export -f json) or a finished run."
        data = read_json(path, "Rule file", InvalidRuleError, fix)
    if not isinstance(data, Mapping):
        raise InvalidRuleError(f"A rule file holds a JSON object; received {type(data).__name__}.")
    return data


def _network_groups(data: Mapping) -> list[Mapping]:
    """The ``groups`` of a network rule file, each checked to be ``{"layers": [int, ...], "rule": {...}}``."""
    groups = data.get("groups")
    example = '[{"layers": [0], "rule": {...}}, {"layers": [1, 2], "rule": {...}}]'
    if not isinstance(groups, list) or not groups:
        raise InvalidRuleError(
            f"A network rule file ({NETWORK_RULE_FORMAT}) needs 'groups', a non-empty list of layer groups and their "
            f"rules, e.g. {example}; received {str(groups)[:80]}."
        )
    for g, item in enumerate(groups):
        layers = item.get("layers") if isinstance(item, Mapping) else None
        ok = isinstance(layers, list) and layers and all(type(i) is int and 0 <= i < 1000 for i in layers)
        if not ok or not isinstance(item.get("rule"), Mapping):
            raise InvalidRuleError(
                f"Group {g} of the network rule file must be an object with 'layers' (layer indices 0, 1, ...) and "
                f"'rule' (a rule object), e.g. {example}; received {str(item)[:80]}."
            )
    return groups


def _run_values(runs, run):
    if not isinstance(runs, list) or not 0 <= run < len(runs):
        held = len(runs) if isinstance(runs, list) else "no list of"
        raise InvalidRuleError(f"The rule file holds {held} runs; run {run} does not exist.")
    return runs[run]


def resolve_feedback_rule(spec=None) -> Rule:
    """The linear rule that updates the feedback matrices under plastic feedback (``dfb`` in W's layout).

    ``spec``: a :class:`Rule`, a rule JSON dict, a named feedback rule (``kp``, Kolen-Pollack, the default), a named
    rule of :func:`resolve_rule` (``f0``, ...) or a rule JSON file. One coefficient vector serves all layers.
    """
    from ..lang.pools import FEEDBACK_RULES, NAMED_RULES

    spec = "kp" if spec is None else spec
    if isinstance(spec, str) and spec in FEEDBACK_RULES:
        return FEEDBACK_RULES[spec]
    if isinstance(spec, Mapping):
        rule = load_rule(spec)
    elif isinstance(spec, str) and not (spec in NAMED_RULES or _is_rule_file(spec)):
        names = ", ".join([*FEEDBACK_RULES, *NAMED_RULES])
        raise ConfigError(
            f"Config key 'network.feedback_rule': received {spec!r}, expected one of {names} or a rule JSON file."
        )
    else:
        rule = resolve_rule(spec)
    if not isinstance(rule, Rule):
        raise ConfigError(
            f"The feedback rule must be a linear Rule (one coefficient vector shared by all layers); received a "
            f"{type(rule).__name__}. Use a named rule such as 'kp' or a rule JSON file of format {RULE_FORMAT!r}."
        )
    return rule


def load_feedback_rule(source, run: int | None = None) -> Rule | None:
    """The plastic feedback rule trained with a rule (``feedback_rule`` of a ``rule.json``), or None if it has none.

    ``source`` as for :func:`load_rule`; ``run`` picks one run's coefficients (default: the mean over runs).
    """
    data = _rule_data(source).get("feedback_rule")
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise InvalidRuleError(f"'feedback_rule' of a rule file must be a rule object; received {str(data)[:80]}.")
    rule = Rule.from_json(data)
    return rule if run is None else rule.with_values(_run_values(data.get("runs"), run))


def _is_rule_file(spec: str) -> bool:
    return spec.endswith(".json") or os.path.sep in spec or Path(spec).is_file()


def _strip_values(data: dict) -> dict:
    data = dict(data)
    if "values" in data:
        data["values"] = None
    data.pop("runs", None)
    data.pop("intervals", None)
    if data.get("format") == NETWORK_RULE_FORMAT:
        data["groups"] = [{**g, "rule": {**g["rule"], "values": None}} for g in data["groups"]]
    return data


def _pseudo_gradient_term(rule: Rule) -> tuple[int, float] | None:
    """``(r, c)`` for the first term ``T^r = c * (-e_i x_j)`` of a linear rule, or None."""
    from ..lang.signals import err, pre

    for r, term in enumerate(rule.terms):
        ratio = sp.cancel(term.expr / (-err * pre))
        if ratio.is_number and ratio != 0:
            return r, float(ratio)
    return None


def pseudo_gradient_lr(rule) -> float | None:
    """The learning rate ``c * theta_r`` of the rule's ``-e_i x_j`` term (mean over layer groups), if it has one; for
    a neural rule, minus its skip coefficient of the feature ``err*pre``."""
    if _is_neural(rule):
        ids = [i for i, f in enumerate(rule.features) if sorted(f.split("*")) == ["err", "pre"]]
        if not (rule.skip and ids and rule.params is not None):
            return None
        return -float(rule.params["skip"][..., ids[0]].double().mean())
    groups = [r for _, r in rule.groups] if isinstance(rule, NetworkRule) else [rule]
    vals = []
    for r in groups:
        found = _pseudo_gradient_term(r)
        if r.values is not None and found is not None:
            vals.append(found[1] * r.values[found[0]])
    return float(np.mean(vals)) if vals else None

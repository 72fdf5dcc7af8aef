"""Bounds on the numbers and nesting of rules (rulesearch.lang.bounds): crafted rule files with nested numeric powers
or huge exponents are refused at once with an InvalidRuleError, at load time, in Rule and in the compiler, and from
the command line; a property test fuzzes expression trees of numbers, powers, sums and products."""

from __future__ import annotations

import json
import time

import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.errors import InvalidRuleError, UnsupportedNodeError
from rulesearch.lang.bounds import MAX_DEPTH
from rulesearch.lang.export import rule_from_json, rule_to_json
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import derived, err, pre

SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PRE = {"type": "Signal", "name": "pre", "role": "pre"}
ERR = {"type": "Signal", "name": "err", "role": "post"}


def integer(v: int) -> dict:
    return {"type": "Integer", "value": v}


def rule_file(expr: dict) -> dict:
    """A one-term rule file whose term is ``expr * err * pre`` (so it stays synapse-typed)."""
    data = rule_to_json(Rule([Term("T", -err * pre)]))
    data["terms"][0]["expr"] = {"type": "Mul", "args": [expr, ERR, PRE]}
    return data


def nested_powers(levels: int) -> dict:
    node = integer(2)
    for _ in range(levels):
        node = {"type": "Pow", "args": [node, integer(1024)]}
    return node


def test_nested_numeric_powers_are_refused_at_once(tmp_path):
    start = time.perf_counter()
    with pytest.raises(InvalidRuleError, match=r"Rule file: power .*\*\*1024 would be a number of about \d+ bits"):
        rule_from_json(rule_file(nested_powers(4)))
    assert time.perf_counter() - start < 2
    assert rule_from_json(rule_file({"type": "Pow", "args": [integer(2), integer(512)]})).n_terms == 1
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(rule_file(nested_powers(4))))
    for args in (["terms", "--rule", path], ["export", path], ["evaluate", path, "--seeds", "1"]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and "limited to 4096 bits" in result.output, result.output


def test_huge_exponent_of_a_signal_is_refused_everywhere(tmp_path):
    with pytest.raises(InvalidRuleError, match=r"pre\*\*1000000000\S*\(101 characters\); numeric exponents are"):
        rule_from_json(rule_file({"type": "Pow", "args": [PRE, integer(10**100)]}))
    with pytest.raises(InvalidRuleError, match="term 'x': power pre.*limited to \\+-1024"):
        Rule([Term("x", pre ** (10**100) * err)])
    hidden = derived("hidden_power", pre ** sp.Integer(10**100))  # a derived signal's definition is not a term
    with pytest.raises(InvalidRuleError, match="limited to \\+-1024"):
        Rule([Term("x", hidden * err)]).compile()
    path = tmp_path / "power.json"
    path.write_text(json.dumps(rule_file({"type": "Pow", "args": [PRE, integer(10**100)]})))
    result = CliRunner().invoke(app, ["terms", "--rule", str(path)])
    assert result.exit_code == 2 and "numeric exponents are limited" in result.output, result.output


def test_nesting_depth_is_bounded():
    deep = PRE
    for _ in range(MAX_DEPTH + 5):
        deep = {"type": "Add", "args": [deep, integer(1)]}
    with pytest.raises(InvalidRuleError, match=f"nests deeper than {MAX_DEPTH} levels"):
        rule_from_json(rule_file(deep))
    expr = pre
    for k in range(MAX_DEPTH + 5):
        expr = sp.sin(expr + k)  # nested functions do not flatten
    with pytest.raises(InvalidRuleError, match=f"nests deeper than {MAX_DEPTH} levels"):
        Rule([Term("deep", expr * err)])


numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(integer),
    st.builds(lambda p, q: {"type": "Rational", "p": p, "q": q}, st.integers(-(2**40), 2**40), st.integers(1, 2**40)),
    st.sampled_from(["1e300", "-2.5", "1e-300", "3.0", "1e400"]).map(lambda v: {"type": "Float", "value": v}),
)
exponents = st.one_of(st.integers(-(10**6), 10**6), st.sampled_from([0, 1, 2, 3, 1024, 1025, 10**100])).map(integer)


def _tree(children):
    return st.one_of(
        st.builds(lambda b, e: {"type": "Pow", "args": [b, e]}, children, exponents),
        st.builds(lambda a, b: {"type": "Add", "args": [a, b]}, children, children),
        st.builds(lambda a, b: {"type": "Mul", "args": [a, b]}, children, children),
    )


trees = st.recursive(st.one_of(numbers, st.just(PRE)), _tree, max_leaves=12)


@SETTINGS
@given(trees)
def test_fuzzed_rule_files_load_fast_or_fail_with_invalid_rule_error(tree):
    start = time.perf_counter()
    try:
        rule = rule_from_json(rule_file(tree))
    except InvalidRuleError:
        pass
    else:
        try:
            rule.compile()
        except (InvalidRuleError, UnsupportedNodeError):
            pass
    assert time.perf_counter() - start < 5

"""Terms, rules, pools, network rules and locality (rulesearch.lang.rule, rulesearch.lang.pools)."""

from __future__ import annotations

import pytest
import sympy as sp
import torch

from rulesearch.errors import InvalidRuleError
from rulesearch.lang.pools import NAMED_RULES, PAPER_POOL, bio, ehebb, f0, named_rule, oja, pool
from rulesearch.lang.rule import LOCALITY_CLASSES, NetworkRule, Pool, Rule, Term, locality_of, theta_symbols
from rulesearch.lang.signals import (
    Constant,
    Signal,
    bilinear,
    derived,
    err,
    fb,
    layer_sum,
    mod,
    post,
    pre,
    pre_err,
    sanger,
    state,
    trace,
    w,
    wT,
    wv,
)

# ---------------------------------------------------------------------------------------------------------------
# Term


def test_term_holds_a_checked_expression():
    t = Term("F0", -err * pre, "pseudo-gradient")
    assert t.expr == -err * pre and t.role == "synapse" and t.locality == "synapse-local"
    assert Term("c", 1).expr == sp.Integer(1)  # numbers are sympified


@pytest.mark.parametrize(
    "name, expr, match",
    [
        ("", pre, "non-empty string"),
        (3, pre, "non-empty string"),
        ("t", "pre*post", "expected a SymPy expression"),
        ("t", None, "expected a SymPy expression"),
        ("t", sp.Gt(pre, 0), "scalar SymPy expression"),
        ("t", sp.Symbol("x") * pre, "term 't': Unknown symbol x"),
        ("t", wT(w), "term 't': Ill-typed contraction"),
        ("t", Constant("a") * pre, "free constants"),
        ("t", Signal("dopamine", "global") * pre, "'dopamine' .* no definition"),
        ("t", Signal("pre", "post") * post, "'pre' \\(post\\) has no definition"),
        ("x", sp.Float("1e400") * err * pre, r"term 'x': Non-finite number 1\.000E\+400 in a rule: .*float64"),
    ],
    ids=[
        "empty", "int-name", "string", "none", "relation", "symbol", "ill-typed", "constant", "undefined", "shadow",
        "huge-float",
    ],
)  # fmt: skip
def test_term_rejects(name, expr, match):
    with pytest.raises(InvalidRuleError, match=match):
        Term(name, expr)


def test_numbers_beyond_float64_are_refused_in_general_rules_and_derived_signals():
    with pytest.raises(InvalidRuleError, match="rule 'g': Non-finite number 1.000E"):
        Rule.general(Constant("a") * err * pre + sp.Float("1e400") * post, ["a"], name="g")
    with pytest.raises(InvalidRuleError, match="Non-finite number -1.000E"):
        derived("big", sp.Float("-1e400") * err)


# ---------------------------------------------------------------------------------------------------------------
# Rule


def test_linear_rule_structure():
    r = Rule([Term("a", err * pre), Term("b", -w)], name="r")
    assert r.is_linear and r.n_terms == r.n_params == 2
    assert r.term_names() == r.param_names() == ("a", "b")
    t0, t1 = theta_symbols(2)
    assert r.structure() == t0 * err * pre - t1 * w
    assert r.locality() == ("synapse-local", "synapse-local")
    assert repr(r) == "Rule('r', terms=[a, b])"


def test_rule_values_and_equality():
    r = Rule([Term("a", err * pre), Term("b", -w)])
    rv = r.with_values([1, 2])
    assert rv.values == (1.0, 2.0) and r.values is None
    assert rv != r and rv == r.with_values(torch.tensor([1.0, 2.0]))
    assert rv.with_values(None) == r
    with pytest.raises(InvalidRuleError, match="values has 1 entries, expected 2"):
        r.with_values([1.0])


def test_rule_construction_errors():
    with pytest.raises(InvalidRuleError, match="at least one term"):
        Rule([])
    with pytest.raises(InvalidRuleError, match="Term objects"):
        Rule([pre])
    with pytest.raises(InvalidRuleError, match=r"Duplicate term names \['a'\]"):
        Rule([Term("a", pre), Term("a", post)])
    with pytest.raises(InvalidRuleError, match="not both"):
        Rule([Term("a", pre)], expr=post)
    with pytest.raises(InvalidRuleError, match="Two different signals are named 'same'"):
        Rule([Term("a", derived("same", pre)), Term("b", derived("same", pre_err))])


def test_select_and_add():
    r = pool.with_values(list(range(10)))
    s = r.select(["F9", "F0"])
    assert s.term_names() == ("F9", "F0") and s.values == (9.0, 0.0)
    with pytest.raises(InvalidRuleError, match=r"Unknown terms \['F10'\]"):
        pool.select(["F10"])
    both = f0 + Pool((Term("dec", -w),))
    assert both.term_names() == ("F0", "dec")
    assert (f0 + oja.select(["F9"])).term_names() == ("F0", "F9")


def test_general_rule():
    a, b = Constant("a"), Constant("b")
    r = Rule.general(a * err * pre + sp.exp(b * w), ["b", a], name="g")
    assert not r.is_linear and r.n_terms == 0 and r.n_params == 2
    assert r.param_names() == ("a", "b")  # sorted by name
    assert r.structure() == a * err * pre + sp.exp(b * w)
    assert r.locality() == ("synapse-local",)
    rv = r.with_values({"b": 2, "a": 1.5})
    assert rv.values == (("a", 1.5), ("b", 2.0))
    assert rv.sympy() == 1.5 * err * pre + sp.exp(2.0 * w)
    with pytest.raises(InvalidRuleError, match=r"Free constants \['b'\] are not declared"):
        Rule.general(a * pre + b * w, ["a"])
    with pytest.raises(InvalidRuleError, match=r"values misses constants \['b'\]"):
        r.with_values({"a": 1.0})
    assert "Rule('g', expr=" in repr(r)


# ---------------------------------------------------------------------------------------------------------------
# Pool


def test_pool_composition():
    a = Pool((Term("x", pre), Term("e", pre_err)))
    b = Pool((Term("y", post),))
    assert (a + b).term_names() == ("x", "e", "y") and len(a + b) == 3
    prod = b * a
    assert prod.term_names() == ("y*x", "y*e")
    assert [t.expr for t in prod] == [post * pre, post * pre_err]
    assert prod.rule("hebb").name == "hebb" and prod.rule().n_terms == 2


# ---------------------------------------------------------------------------------------------------------------
# The paper pool and named rules


def test_paper_pool_terms():
    assert PAPER_POOL.term_names() == tuple(f"F{r}" for r in range(10))
    assert pool.n_terms == 10 and pool.name == "pool"
    expected = {
        "F0": -err * pre,
        "F1": -post * pre_err,
        "F2": -err * pre_err,
        "F3": -w,
        "F4": -pre_err,
        "F5": -layer_sum(post) * err * pre,
        "F6": -bilinear(post, pre_err) * post * pre_err,
        "F7": -bilinear(post, pre_err) * err * pre,
        "F8": -bilinear(err, pre) * post * pre_err,
        "F9": post * pre - post * wT(post),
    }
    for t in pool.terms:
        assert sp.expand(t.expr - expected[t.name]) == 0, t.name


@pytest.mark.parametrize(
    "rule, names",
    [(f0, ["F0"]), (ehebb, ["F0", "F2"]), (oja, ["F0", "F9"]), (bio, ["F0", "F2", "F9"])],
    ids=["f0", "ehebb", "oja", "bio"],
)
def test_named_rules_are_sub_rules_of_the_pool(rule, names):
    assert rule.term_names() == tuple(names)
    by_name = {t.name: t for t in pool.terms}
    assert all(t == by_name[t.name] for t in rule.terms)
    assert named_rule(rule.name) is rule and NAMED_RULES[rule.name] is rule


def test_named_rule_unknown():
    with pytest.raises(InvalidRuleError, match="Unknown rule 'hebb'"):
        named_rule("hebb")


# ---------------------------------------------------------------------------------------------------------------
# Locality


@pytest.mark.parametrize("r", range(10), ids=[f"F{r}" for r in range(10)])
def test_paper_pool_locality(r):
    assert pool.terms[r].locality == ("synapse-local" if r < 5 else "layer-nonlocal")


@pytest.mark.parametrize(
    "expr, cls",
    [
        (post * wT(err), "weight-transport"),
        (-post * wT(2 * err + post), "weight-transport"),
        (layer_sum(wT(err)) * post * pre, "weight-transport"),
        (derived("bp_err", wT(err)) * post, "weight-transport"),
        (post * wT(err, fb), "layer-nonlocal"),  # through the feedback pathway: allowed and local to it
        (post * wT(post), "layer-nonlocal"),
        (pre * wv(pre_err), "layer-nonlocal"),  # (W e')_i moves errors forward, not backward
        (sanger(), "layer-nonlocal"),
        (sp.tanh(w) * err * pre + mod, "synapse-local"),
        (trace(pre, 4) * post, "synapse-local"),
        (wT(trace(err)) * pre, "weight-transport"),  # the error reaches W^T through a state
        (wT(trace(derived("ey", err * post))) * pre, "weight-transport"),
        (wT(trace(post)) * pre, "layer-nonlocal"),
        (state("carried", lambda s: s / 2 + wT(err) / 2) * post, "weight-transport"),  # W^T e inside a state
        (state("nonlocal", lambda s: s / 2 + wT(post) / 2) * post, "layer-nonlocal"),
        (state("chain", lambda s: s / 2 + state("inner", lambda q: q / 2 + wT(err) / 2)) * post, "weight-transport"),
    ],
    ids=[
        "post*wT(err)", "mixed", "inside-sum", "derived", "fb", "activity", "forward", "sanger", "local", "trace",
        "wT(trace(err))", "wT(trace(derived))", "wT(trace(post))", "state-of-wT(err)", "state-of-wT(post)",
        "state-of-state",
    ],
)  # fmt: skip
def test_locality_classes(expr, cls):
    assert locality_of(expr) == cls and cls in LOCALITY_CLASSES
    assert Rule([Term("t", expr)]).locality() == (cls,)


# ---------------------------------------------------------------------------------------------------------------
# NetworkRule


def test_network_rule_grouping():
    nr = NetworkRule({(0,): ehebb, (1, 2): f0})
    assert nr.rules_per_layer(3) == [ehebb, f0, f0]
    assert [nr.group_of(i) for i in range(3)] == [0, 1, 1]
    assert nr.params_per_layer(["p0", "p1"], 3) == ["p0", "p1", "p1"]
    assert NetworkRule([(0, bio), (1, oja)]).rules_per_layer(2) == [bio, oja]


def test_network_rule_errors():
    nr = NetworkRule({0: ehebb, (1, 2): f0})
    with pytest.raises(InvalidRuleError, match=r"Layer 3 has no rule; this NetworkRule covers layers \[0, 1, 2\]"):
        nr.rules_per_layer(4)
    with pytest.raises(InvalidRuleError, match="Expected 2 parameter entries .* got 1"):
        nr.params_per_layer(["p0"], 3)
    with pytest.raises(InvalidRuleError, match="a layer appears in two groups"):
        NetworkRule({0: ehebb, (0, 1): f0})
    with pytest.raises(InvalidRuleError, match="expected a Rule"):
        NetworkRule({0: "f0"})

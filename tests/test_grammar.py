"""Grammars (rulesearch.lang.grammar): enumeration, each constraint, deduplication, stable order, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sympy as sp
import torch

from rulesearch.errors import InvalidRuleError
from rulesearch.lang.grammar import Grammar, canonical
from rulesearch.lang.rule import LOCALITY_CLASSES, Pool, Rule
from rulesearch.lang.signals import err, layer_sum, mod, post, pre, pre_err, trace, w, wT, wv
from rulesearch.reference.naive import naive_update


def test_monomials_by_degree_then_atom_order():
    g = Grammar(atoms=(pre, post), max_degree=3)
    assert g.term_names() == (
        "pre",
        "post",
        "pre^2",
        "post*pre",
        "post^2",
        "pre^3",
        "pre^2*post",
        "post^2*pre",
        "post^3",
    )
    assert [sp.expand(t.expr - e) for t, e in zip(g.terms(), (pre, post, pre**2, pre * post))] == [0] * 4


@pytest.mark.parametrize("max_degree, size", [(1, 3), (2, 9), (3, 19)])
def test_max_degree(max_degree, size):
    assert Grammar(atoms=(pre, post, err), max_degree=max_degree).size == size


def test_min_degree():
    g = Grammar(atoms=(pre, post), min_degree=2, max_degree=2)
    assert g.term_names() == ("pre^2", "post*pre", "post^2")


def test_degree_per_signal_limits_the_power_of_an_atom_not_signals_inside_other_atoms():
    g = Grammar(atoms=(pre, w, wT(post)), max_degree=2, degree_per_signal={"w": 1})
    names = g.term_names()
    assert "w^2" not in names and "pre*w" in names and "pre^2" in names
    assert "Contract(w,post)*w" in names  # documented: the key counts the atom w, not w inside Contract(w, post)
    limited = Grammar(atoms=(pre, w, wT(post)), max_degree=2, degree_per_signal={"w": 1, "Contract(w,post)": 1})
    assert "Contract(w,post)^2" not in limited.term_names() and "Contract(w,post)^2" in names
    assert Grammar(atoms=(pre, w), max_degree=3, degree_per_signal={"w": 0}).term_names() == ("pre", "pre^2", "pre^3")


def test_required_by_signal_matches_inside_operators_and_by_atom_inside_powers():
    g = Grammar(atoms=(pre, post, wT(err)), max_degree=2, required=("err",))
    assert g.term_names() == ("Contract(w,err)", "Contract(w,err)*pre", "Contract(w,err)*post", "Contract(w,err)^2")
    t = sp.tanh(pre)
    g = Grammar(atoms=(pre, post, t), max_degree=2, required=("tanh(pre)",))
    assert g.term_names() == ("tanh(pre)", "pre*tanh(pre)", "post*tanh(pre)", "tanh(pre)^2")
    g = Grammar(atoms=(pre, post, err), max_degree=2, required=("err", "pre"))
    assert g.term_names() == ("err*pre",)


def test_forbidden_by_signal_and_by_atom():
    atoms = (post, sp.tanh(pre), wv(pre), err)
    g = Grammar(atoms=atoms, max_degree=2, forbidden=("pre",))
    assert g.term_names() == ("post", "err", "post^2", "err*post", "err^2")
    g = Grammar(atoms=atoms, max_degree=2, forbidden=("tanh(pre)", "err"))
    assert g.term_names() == ("post", "Contract(w,pre)", "post^2", "Contract(w,pre)*post", "Contract(w,pre)^2")


@pytest.mark.parametrize("allowed", [(c,) for c in LOCALITY_CLASSES] + [("synapse-local", "weight-transport")])
def test_locality_filter(allowed):
    atoms = (pre, post, err, wT(err), wT(post), layer_sum(post))
    every = Grammar(atoms=atoms, max_degree=2).terms()
    kept = Grammar(atoms=atoms, max_degree=2, locality=allowed).terms()
    assert kept and all(t.locality in allowed for t in kept)
    assert kept == tuple(t for t in every if t.locality in allowed)


def test_weight_transport_class_of_the_filter():
    g = Grammar(atoms=(pre, post, err, wT(err), wT(post)), max_degree=2, locality=("weight-transport",))
    assert g.term_names() == (
        "Contract(w,err)", "Contract(w,err)*pre", "Contract(w,err)*post", "Contract(w,err)*err", "Contract(w,err)^2",
        "Contract(w,err)*Contract(w,post)",
    )  # fmt: skip


def test_deduplication_by_canonical_form():
    g = Grammar(atoms=(pre, 2 * pre, -pre, post), max_degree=2)
    assert g.term_names() == ("pre", "post", "pre^2", "post*pre", "post^2")
    g = Grammar(atoms=(pre, post * (1 + pre), post + post * pre), max_degree=1)
    assert g.term_names() == ("pre", "(1+pre)*post")
    assert canonical(-3 * post * (pre + 1)) == post * pre + post
    assert canonical(pre - pre) == 0


def test_canonical_forms_of_the_default_grammar_are_distinct():
    terms = Grammar.default(max_degree=2).terms()
    keys = [canonical(t.expr) for t in terms]
    assert len(set(keys)) == len(keys) == len(terms)


def test_order_is_stable_across_calls_instances_and_hash_seeds():
    g = Grammar.default(max_degree=2)
    names = g.term_names()
    assert g.term_names() == names == Grammar.default(max_degree=2).term_names()
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # a hash seed other than this process's
    code = "from rulesearch.lang.grammar import Grammar; print('|'.join(Grammar.default(max_degree=2).term_names()))"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "|".join(names)


def test_size_len_and_describe():
    g = Grammar(atoms=(pre, post, wT(post)), max_degree=2, name="small")
    assert g.size == len(g) == len(g.terms()) == 9
    assert g.describe().splitlines() == [
        "Grammar 'small': 9 terms over 3 atoms, degree 1..2",
        "  by degree: 1: 3, 2: 6",
        "  by locality: layer-nonlocal: 4, synapse-local: 5",
    ]


def test_pool_and_rule():
    g = Grammar(atoms=(pre, err), max_degree=2, name="g")
    assert isinstance(g.pool(), Pool) and g.pool().term_names() == g.term_names()
    r = g.rule()
    assert isinstance(r, Rule) and r.name == "g" and r.term_names() == g.term_names()
    assert g.rule("other").name == "other"


def test_builtin_grammars():
    default, classic = Grammar.default(), Grammar.classic()
    assert default.size == 274 and classic.size == 545  # results/recovery.md records the classic library's size
    assert default.degree_per_signal == {"w": 1} and "w^2" not in default.term_names()
    assert {t.locality for t in default.terms()} == set(LOCALITY_CLASSES) - {"weight-transport"}
    assert Grammar.default(reward_signals=False, max_degree=1).term_names() == (
        "pre", "post", "err", "pre_err", "w", "Contract(w,post)", "Contract(w,pre)", "OrderedContract(post,w)",
    )  # fmt: skip


def test_user_factors_and_operators_compile_to_the_naive_update(gen):
    xbar = trace(pre, 5)
    atoms = (err, sp.tanh(pre), wT(post), layer_sum(pre_err), mod, xbar)
    g = Grammar(atoms=atoms, max_degree=2, required=("err",))
    assert g.term_names()[:4] == ("err", "err^2", "err*tanh(pre)", "Contract(w,post)*err")
    rule = g.rule()
    update = rule.compile()
    B, n_post, n_pre = 2, 3, 4
    f64 = torch.float64
    sig = {
        "err": torch.randn(B, n_post, generator=gen, dtype=f64),
        "pre": torch.rand(B, n_pre, generator=gen, dtype=f64),
        "post": torch.rand(B, n_post, generator=gen, dtype=f64),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=f64),
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=f64),
        "mod": torch.rand(B, generator=gen, dtype=f64),
        xbar.name: torch.rand(B, n_pre, generator=gen, dtype=f64),
    }
    theta = torch.randn(rule.n_terms, generator=gen, dtype=f64)
    dW = update(sig, theta)
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, naive_update(rule, sig, theta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"atoms": ()}, "needs at least one atom"),
        ({"atoms": (pre, post, pre)}, "atoms contain duplicates"),
        ({"atoms": (pre, sp.Symbol("z"))}, "Unknown symbol z"),
        ({"atoms": (pre, layer_sum(w))}, "Ill-typed layer sum"),
        ({"max_degree": 0}, r"1 <= min_degree <= max_degree; got min_degree=1, max_degree=0"),
        ({"min_degree": 0}, r"got min_degree=0, max_degree=2"),
        ({"min_degree": 3}, r"got min_degree=3, max_degree=2"),
        ({"degree_per_signal": {"post": 1}}, r"degree_per_signal names \['post'\], which are not atom names"),
        ({"atoms": (pre, wT(post)), "degree_per_signal": {"w": 1}}, r"not atom names: \['pre', 'Contract\(w,post\)'\]"),
        ({"required": ("mod",)}, r"required names \['mod'\], which are not atoms or signals"),
        ({"forbidden": ("tanh(pre)",)}, r"forbidden names \['tanh\(pre\)'\]"),
        ({"locality": ("local",)}, r"Unknown locality classes \['local'\]; allowed"),
    ],
    ids=[
        "no-atoms", "duplicate", "unknown-symbol", "ill-typed", "max0", "min0", "min>max", "degree-key",
        "degree-key-inside-operator", "required", "forbidden", "locality",
    ],
)  # fmt: skip
def test_constructor_errors(kwargs, match):
    kwargs = {"atoms": (pre, err), **kwargs}
    with pytest.raises(InvalidRuleError, match=match):
        Grammar(**kwargs)


def test_rule_of_an_empty_grammar_says_how_to_fix():
    g = Grammar(atoms=(pre, err), max_degree=1, required=("pre", "err"), name="empty")
    assert g.size == 0 and g.terms() == ()
    with pytest.raises(InvalidRuleError, match="Grammar 'empty' produces no terms; relax its constraints"):
        g.rule()

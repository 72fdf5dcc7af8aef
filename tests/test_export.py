"""Exports (rulesearch.lang.export): LaTeX in index notation, booktabs tables, JSON trees, hostile JSON.

Golden files live in ``tests/golden/``; refresh them with ``pytest tests/test_export.py --update-golden`` and review
the diff.
"""

from __future__ import annotations

import builtins
import copy
import json
from pathlib import Path

import pytest
import sympy as sp
import sympy.parsing.sympy_parser as sympy_parser
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from texcheck import latex_errors

import rulesearch as rs
from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import InvalidRuleError, UnsupportedNodeError
from rulesearch.lang.export import (
    FORMAT,
    expr_from_json,
    expr_latex,
    expr_to_json,
    latex_table,
    markdown_table,
    round_floats,
    rule_from_json,
    rule_to_json,
    rule_to_latex,
    significant,
)
from rulesearch.lang.grammar import BUILTIN_GRAMMARS
from rulesearch.lang.pools import NAMED_RULES, bio, ehebb, pool
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import (
    BASE_SIGNALS,
    Constant,
    bcm_threshold,
    bilinear,
    derived,
    err,
    fb,
    layer_mean,
    layer_sum,
    loss,
    mod,
    post,
    pre,
    pre_err,
    reward,
    reward_baseline,
    sanger,
    state,
    trace,
    w,
    wT,
    wv,
)
from rulesearch.reference.naive import naive_update

GOLDEN = Path(__file__).parent / "golden"
BIO_VALUES = [1e-3, -0.0421, 0.137]
POOL_VALUES = [1e-3, 2.5e-5, -0.0421, 0.0, -1.25e-4, 3e-6, 0.01, -0.002, 7.5e-4, 0.137]


def check_golden(name: str, text: str, update_golden: bool) -> None:
    path = GOLDEN / name
    if update_golden:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; create it with `pytest --update-golden`"
    assert text == path.read_text(), f"{name} differs from the golden file; if intended, run pytest --update-golden"


def _json_text(rule) -> str:
    return json.dumps(rule.to_json(), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Golden files


def test_golden_pool_latex(update_golden):
    text = pool.latex(table=True) + "\n"
    check_golden("pool.tex", text, update_golden)


def test_golden_pool_latex_with_values_and_intervals(update_golden):
    intervals = [[(v - 1e-3, v + 1e-3) for v in POOL_VALUES]]
    text = pool.latex(values=POOL_VALUES) + "\n\n" + latex_table([pool], [POOL_VALUES], intervals=intervals) + "\n"
    check_golden("pool_values.tex", text, update_golden)


@pytest.mark.parametrize("name", ["f0", "ehebb", "oja", "bio"])
def test_golden_named_rules_latex(name, update_golden):
    rule = NAMED_RULES[name]
    vals = [BIO_VALUES[[0, 2, 9].index(int(t[1:]))] for t in rule.term_names()]
    text = rule.latex() + "\n\n" + rule.latex(values=vals, table=True) + "\n"
    check_golden(f"{name}.tex", text, update_golden)


@pytest.mark.parametrize("name", ["pool", "bio"])
def test_golden_json(name, update_golden):
    rule = pool if name == "pool" else bio.with_values(BIO_VALUES)
    check_golden(f"{name}.json", _json_text(rule), update_golden)
    if not update_golden:  # the stored files still load (format stability)
        assert Rule.from_json((GOLDEN / f"{name}.json").read_text()) == rule


def test_golden_bio_latex_is_the_papers_equation():
    text = bio.latex(values=BIO_VALUES)
    assert text == (
        r"\Delta W_{ij} = - 0.001 e_{i} x_{j} + 0.0421 e_{i} e'_{j} "
        r"+ 0.137 y_{i} \left(x_{j} - \left(W^\top y\right)_{j}\right)"
    )


# ---------------------------------------------------------------------------------------------------------------
# LaTeX


@pytest.mark.parametrize(
    "expr, tex",
    [
        (pre, "x_{j}"),
        (post, "y_{i}"),
        (err, "e_{i}"),
        (pre_err, "e'_{j}"),
        (w, "W_{ij}"),
        (fb, "B_{ji}"),
        (mod, "m"),
        (reward, "r"),
        (loss, r"\ell"),
        (wT(post), r"\left(W^\top y\right)_{j}"),
        (wv(pre), r"\left(W x\right)_{i}"),
        (wT(err, fb), r"\left(B^\top e\right)_{j}"),
        (wT(post * err), r"\left(W^\top \left(e y\right)\right)_{j}"),
        (layer_sum(post), r"{\textstyle\sum_k y_k}"),
        (bilinear(pre_err, post), r"y^\top W e'"),
        (sanger(), r"{\textstyle\sum_{k \le i} y_k W_{kj}}"),
        (derived("hebb_tex", post * pre), r"\mathrm{hebb\_tex}_{ij}"),
        (derived("hebb_tex2", post * pre, latex="H"), "H_{ij}"),
        (trace(pre, 5), r"\bar{x}^{(5)}_{j}"),
        (Constant("c_a") * pre, r"\mathrm{c\_a} x_{j}"),
    ],
)
def test_latex_glyphs_in_index_notation(expr, tex):
    assert expr_latex(expr) == tex


@pytest.mark.parametrize(
    "value, precision, tex",
    [
        (0.123456, 3, "0.123 W_{ij}"),
        (0.123456, 5, "0.12346 W_{ij}"),
        (1.23456e-5, 3, r"1.23 \cdot 10^{-5} W_{ij}"),
        (-2.5e-4, 3, r"- 2.5 \cdot 10^{-4} W_{ij}"),
        (1500.0, 3, "1500 W_{ij}"),
    ],
)
def test_latex_float_precision(value, precision, tex):
    assert expr_latex(sp.Float(value) * w, precision=precision) == tex


@pytest.mark.parametrize("value", [0.1235, 0.00015049, 1500.0, -2.5e-5, 0.0017664, 123456.0, 1.0, 0.00099996])
def test_console_and_latex_round_alike(value):
    # correctly rounded as format(v, '.3g') (sympy's evalf(3) rounded twice: 0.1235 -> 0.124), in both the plain-text
    # formula of the console and the LaTeX
    mant, exp = significant(value, 3)
    assert float(f"{mant}e{exp}") == float(f"{value:.3g}")
    assert float(sp.sstr(round_floats(sp.Float(value) * w, 3)).split("*")[0]) == float(f"{value:.3g}")
    tex = expr_latex(sp.Float(value), 3).replace(r" \cdot 10^{", "e").replace("}", "")
    assert float(tex) == float(f"{value:.3g}")


def test_latex_symbolic_rule_and_general_rule():
    assert rule_to_latex(bio) == bio.latex()
    assert bio.latex().startswith(r"\Delta W_{ij} = ")
    assert r"\theta_{9}" in pool.latex() and r"\theta_{0}" in pool.latex()
    g = Rule.general(Constant("a") * err * pre + sp.exp(Constant("b") * w), ["a", "b"])
    assert g.latex(values={"a": 1.5, "b": -2.0}) == r"\Delta W_{ij} = 1.5 e_{i} x_{j} + e^{- 2 W_{ij}}"


def test_booktabs_table():
    tab = latex_table([pool, pool], [None, POOL_VALUES], precision=2)
    lines = tab.splitlines()
    assert lines[0] == r"\begin{tabular}{llrr}"
    assert lines[1:4] == [r"\toprule", r"term & $T_{ij}$ & $\theta$ (pool) & $\theta$ (pool) \\", r"\midrule"]
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    rows = lines[4:-2]
    assert len(rows) == 10 and all(r.endswith(r" \\") for r in rows)
    assert rows[0] == r"F0 & $- e_{i} x_{j}$ & $\theta_{0}$ & $1 \cdot 10^{-3}$ \\"  # below 10^-precision
    assert rows[9].split(" & ")[-1] == r"$0.14$ \\"
    with pytest.raises(InvalidRuleError, match="linear rules"):
        latex_table([Rule.general(Constant("a") * w, ["a"])])


def test_markdown_table():
    md = markdown_table(ehebb, [1e-3, -0.5])
    assert md.splitlines() == [
        "| term | expression | locality | value |",
        "|---|---|---|---|",
        "| F0 | `-err*pre` | synapse-local | 0.001 |",
        "| F2 | `-err*pre_err` | synapse-local | -0.5 |",
    ]


def test_exports_never_mutate_and_accept_tensors():
    before = (pool.to_json(), pool.values)
    pool.latex(values=torch.tensor(POOL_VALUES), table=True)
    pool.sympy(values=POOL_VALUES)
    latex_table([pool], [POOL_VALUES])
    assert (pool.to_json(), pool.values) == before
    with pytest.raises(InvalidRuleError, match="Got 2 values for a rule with 3 terms"):
        bio.latex(values=[1.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# JSON round trips

XB = trace(pre, tau=4)
ROUND_TRIP = {
    "pool": pool,
    "bio with values": bio.with_values(BIO_VALUES),
    "general": Rule.general(
        Constant("a") * err * pre + sp.exp(Constant("b") * w) * layer_sum(post),
        ["a", "b"],
        name="g",
        values={"a": 0.1, "b": -3.0},
    ),  # fmt: skip
    "derived": Rule([Term("h", derived("hebb_rt", post * pre, "Hebbian", "H") * mod), Term("d", -w)]),
    "nested derived": Rule([Term("n", derived("outer_rt", derived("inner_rt", post * pre_err) * 2) - w)]),
    "states": Rule(
        [
            Term("x", post * XB),
            Term("bcm", post * (post - bcm_threshold(7)) * pre),
            Term("rb", (reward - reward_baseline(3)) * err * pre),
            Term("chain", post * state("s_rt", lambda s: s / 2 + sp.tanh(XB), init=1)),
        ]
    ),
    "elementwise": Rule(
        [
            Term("pw", sp.Piecewise((post, err > 0), (-pre, pre <= sp.Rational(1, 2)), (w, True))),
            Term("fn", sp.tanh(w) * sp.Abs(err) * sp.sqrt(pre) + sp.Max(post, pre) * sp.Heaviside(err)),
            Term("num", sp.pi * sp.E * w * sp.Float("0.12345678901234567890123", 25) + sp.Float(0.1) * pre),
        ]
    ),
    "operators": Rule(
        [Term("s", sanger(err, fb)), Term("b", bilinear(pre, err, fb) * wv(pre_err)), Term("m", layer_mean(post) * w)]
    ),
}


@pytest.mark.parametrize("rule", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_json_round_trip(rule, gen):
    data = rule.to_json()
    assert data["format"] == FORMAT
    text = json.dumps(data)
    for back in (Rule.from_json(json.loads(text)), rule_from_json(text)):
        assert back == rule
        assert back.values == rule.values and back.name == rule.name
        assert rule_to_json(back) == data
    back = Rule.from_json(text)
    update = compile_rule(back)
    assert update is compile_rule(rule)
    B, n_post, n_pre = 2, 3, 4
    sig = {
        "pre": torch.rand(B, n_pre, generator=gen, dtype=torch.float64) + 0.1,
        "post": torch.rand(B, n_post, generator=gen, dtype=torch.float64) + 0.1,
        "err": torch.randn(B, n_post, generator=gen, dtype=torch.float64),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=torch.float64),
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=torch.float64),
        "fb": torch.randn(B, n_post, n_pre, generator=gen, dtype=torch.float64),
        "mod": torch.rand(B, generator=gen, dtype=torch.float64),
        "reward": torch.rand(B, generator=gen, dtype=torch.float64),
    }
    sig = {k: v for k, v in sig.items() if k in update.needs}
    for spec in update.states:
        sig[spec.name] = spec.step(spec.init(sig), sig)
    params = (
        torch.linspace(-1, 1, rule.n_terms, dtype=torch.float64)
        if rule.is_linear
        else {c: torch.tensor(0.5, dtype=torch.float64) for c in rule.param_names()}
    )
    dW = update(sig, params)
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, naive_update(rule, sig, params), rtol=1e-12, atol=1e-12)


def test_float_round_trip_is_exact():
    for f in (sp.Float(0.1), sp.Float("1e-30"), sp.Float(1 / 3), sp.Float("0.12345678901234567890123", 25)):
        back = expr_from_json(json.loads(json.dumps(expr_to_json(f))), BASE_SIGNALS)
        assert back == f and back._prec == f._prec


def test_json_refuses_unsupported_nodes():
    with pytest.raises(UnsupportedNodeError, match="Cannot export node Integral"):
        expr_to_json(sp.Integral(pre, (pre, 0, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Hostile or malformed JSON: InvalidRuleError, and nothing is ever evaluated

_BASE = bio.with_values(BIO_VALUES).to_json()


def _mutate(path, value):
    data = copy.deepcopy(_BASE)
    *head, last = path
    target = data
    for key in head:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return data


_DELETE = object()
_I = {"type": "Integer", "value": 1}
_EXPR = ("terms", 0, "expr")
_deep = _I
for _ in range(5000):
    _deep = {"type": "tanh", "args": [_deep]}

HOSTILE = {
    "unknown node": _mutate(_EXPR, {"type": "Import", "args": []}),
    "unknown node without args": _mutate(_EXPR, {"type": "Import"}),
    "call node": _mutate(_EXPR, {"type": "__import__", "args": [{"type": "Integer", "value": 0}]}),
    "python in Float": _mutate(_EXPR, {"type": "Float", "value": "__import__('os')"}),
    "Float number not string": _mutate(_EXPR, {"type": "Float", "value": 0.5}),
    "Float malformed": _mutate(_EXPR, {"type": "Float", "value": "1e5e5"}),
    "Float huge precision": _mutate(_EXPR, {"type": "Float", "value": "1.0", "precision": 10**9}),
    "Float beyond float64": _mutate(_EXPR, {"type": "Float", "value": "1e400"}),
    "Integer beyond float64": _mutate(_EXPR, {"type": "Integer", "value": 10**400}),
    "Integer as string": _mutate(_EXPR, {"type": "Integer", "value": "1"}),
    "Integer as bool": _mutate(_EXPR, {"type": "Integer", "value": True}),
    "Rational as string": _mutate(_EXPR, {"type": "Rational", "p": 1, "q": "2"}),
    "Rational by zero": _mutate(_EXPR, {"type": "Rational", "p": 1, "q": 0}),
    "huge numeric power": _mutate(
        _EXPR, {"type": "Pow", "args": [{"type": "Integer", "value": 10}, {"type": "Integer", "value": 10**12}]}
    ),  # fmt: skip
    "unknown NumberSymbol": _mutate(_EXPR, {"type": "NumberSymbol", "name": "oo"}),
    "wrong format": _mutate(("format",), "rulesearch.rule/99"),
    "no format": _mutate(("format",), _DELETE),
    "unknown signal": _mutate(_EXPR, {"type": "Signal", "name": "os", "role": "post"}),
    "wrong role": _mutate(_EXPR, {"type": "Signal", "name": "pre", "role": "post"}),
    "bad constant name": _mutate(_EXPR, {"type": "Constant", "name": "a b"}),
    "expr is a list": _mutate(_EXPR, [1, 2]),
    "args is a dict": _mutate(_EXPR, {"type": "Add", "args": {"a": 1}}),
    "args hold strings": _mutate(_EXPR, {"type": "Mul", "args": ["pre"]}),
    "wrong arity": _mutate(_EXPR, {"type": "Pow", "args": []}),
    "wrong function arity": _mutate(_EXPR, {"type": "tanh", "args": [_I, _I]}),
    "Piecewise malformed": _mutate(_EXPR, {"type": "Piecewise", "args": [1]}),
    "boolean expression": _mutate(_EXPR, {"type": "true"}),
    "ill-typed": _mutate(_EXPR, {"type": "Contract", "args": [{"type": "Signal", "name": "pre", "role": "pre"}, _I]}),
    "too deep": _mutate(_EXPR, _deep),
    "terms a string": _mutate(("terms",), "abc"),
    "terms null": _mutate(("terms",), None),
    "term a list": _mutate(("terms",), [[1, 2]]),
    "term name int": _mutate(("terms", 0, "name"), 3),
    "term description int": _mutate(("terms", 0, "description"), 5),
    "kind": _mutate(("kind",), "exec"),
    "values strings": _mutate(("values",), ["a", "b", "c"]),
    "values wrong length": _mutate(("values",), [1.0]),
    "values dict for linear": _mutate(("values",), {"F0": 1.0}),
    "name int": _mutate(("name",), 3),
    "signals a list": _mutate(("signals",), [1]),
    "signal not an object": _mutate(("signals",), {"x": 5}),
    "signal bad node": _mutate(("signals",), {"x": {"kind": "derived", "role": "post", "expr": {"type": "Import"}}}),
    "signal shadows builtin": _mutate(("signals",), {"pre": {"kind": "derived", "role": "pre", "expr": _I}}),
    "signal name is code": _mutate(
        ("signals",), {"__import__('os')": {"kind": "derived", "role": "global", "expr": _I}}
    ),  # fmt: skip
    "signal bad role": _mutate(("signals",), {"x": {"kind": "derived", "role": "root", "expr": _I}}),
    "signal bad kind": _mutate(("signals",), {"x": {"kind": "eval", "role": "post", "expr": _I}}),
    "signal latex int": _mutate(("signals",), {"x": {"kind": "derived", "role": "global", "expr": _I, "latex": 1}}),
    "signal cycle": _mutate(
        ("signals",),
        {
            "x": {"kind": "derived", "role": "post", "expr": {"type": "Signal", "name": "y", "role": "post"}},
            "y": {"kind": "derived", "role": "post", "expr": {"type": "Signal", "name": "x", "role": "post"}},
        },
    ),
    "not JSON": '{"format": ',
    "top-level list": [1, 2],
    "top-level string of code": "__import__('os').system('true')",
}


@pytest.fixture
def forbid_evaluation(monkeypatch):
    """Loading a rule file must never evaluate text: eval, exec and SymPy's parser raise if called."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"evaluated {args[:1]!r} while loading a rule file")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(sympy_parser, "parse_expr", refuse)


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_or_malformed_json_raises_invalid_rule_error(data, forbid_evaluation):
    with pytest.raises(InvalidRuleError):
        Rule.from_json(data)


def test_valid_files_load_without_evaluating_anything(forbid_evaluation):
    for rule in ROUND_TRIP.values():
        assert Rule.from_json(json.dumps(rule.to_json())) == rule


def test_hostile_error_messages_say_what_was_wrong():
    with pytest.raises(InvalidRuleError, match="Node type 'Import' is not allowed"):
        Rule.from_json(HOSTILE["unknown node"])
    with pytest.raises(InvalidRuleError, match="Float value must be a decimal string"):
        Rule.from_json(HOSTILE["python in Float"])
    with pytest.raises(InvalidRuleError, match="expected format 'rulesearch.rule/1', got 'rulesearch.rule/99'"):
        Rule.from_json(HOSTILE["wrong format"])
    with pytest.raises(InvalidRuleError, match="Unknown signal 'os'"):
        Rule.from_json(HOSTILE["unknown signal"])
    with pytest.raises(InvalidRuleError, match="Expected an integer, got '1'"):
        Rule.from_json(HOSTILE["Integer as string"])
    for key in ("Float beyond float64", "Integer beyond float64"):
        with pytest.raises(InvalidRuleError, match=r"term 'F0': Non-finite number 1\.000E\+400 in a rule"):
            Rule.from_json(HOSTILE[key])


# ---------------------------------------------------------------------------------------------------------------
# Every node a grammar or a rule file can hold prints as valid LaTeX


@pytest.mark.parametrize("name", [*BUILTIN_GRAMMARS, *NAMED_RULES])
def test_every_term_of_every_builtin_grammar_and_named_rule_prints_valid_latex(name):
    terms = BUILTIN_GRAMMARS[name]().terms() if name in BUILTIN_GRAMMARS else NAMED_RULES[name].terms
    bad = {t.name: (expr_latex(t.expr), latex_errors(expr_latex(t.expr))) for t in terms}
    bad = {k: v for k, v in bad.items() if v[1]}
    assert not bad, f"{len(bad)} of {len(terms)} terms print invalid LaTeX, e.g. {next(iter(bad.items()))}"
    assert name not in BUILTIN_GRAMMARS or len(terms) > 150


def test_powers_of_operators_print():
    # the reproduction: SymPy hands f(...)**n to the operator's printer as exp=n
    assert rs.Rule([rs.Term("sq", rs.err * rs.wT(rs.pre) ** 2)]).latex() == (
        r"\Delta W_{ij} = e_{i} \theta_{0} \left(W x\right)_{i}^{2}"
    )
    assert expr_latex(layer_sum(post) ** 2) == r"\left({\textstyle\sum_k y_k}\right)^{2}"
    assert expr_latex(bilinear(post, pre) ** 3) == r"\left(y^\top W x\right)^{3}"
    assert expr_latex(sanger() ** -2) == r"\frac{1}{\left({\textstyle\sum_{k \le i} y_k W_{kj}}\right)^{2}}"
    assert expr_latex(pre_err**2) == r"{e'_{j}}^{2}"  # e'_{j}^{2} is a double superscript in TeX


def test_latex_checker_catches_what_tex_rejects():
    for tex in (r"e'_{j}^{2}", r"x_{j}_{i}", r"x^{2}^{3}", r"{\textstyle\sum_k y_k", r"Contract(w, pre)**2"):
        assert latex_errors(tex), tex
    for tex in (r"{e'_{j}}^{2}", r"e'^{2}", r"\left(W^\top y\right)_{j}^{2}", r"\frac{1}{\bar{x}^{(3)}_{j}}"):
        assert not latex_errors(tex), tex


_VECTORS_POST = (post, err, post * err, post**2, trace(post, 3), bcm_threshold(3))
_VECTORS_PRE = (pre, pre_err, pre * pre_err, trace(pre, 3))
_FUNCTIONS = (
    sp.tanh,
    sp.exp,
    sp.log,
    sp.sinh,
    sp.cosh,
    sp.sin,
    sp.cos,
    sp.Abs,
    sp.sign,
    sp.Heaviside,
    sp.atan,
    sp.erf,
    lambda x: sp.Max(x, 0),
    lambda x: sp.Min(x, 1),
    lambda x: sp.Piecewise((x, x > 0), (-x / 2, True)),
)  # every elementwise function of the rule language (ELEMENTWISE_FUNCTIONS; sqrt is a power)
_EXPONENTS = (1, 2, 3, -1, -2, sp.Rational(1, 2), sp.Rational(3, 2), sp.Rational(-1, 2))


@st.composite
def _factor(draw):
    kind = draw(st.sampled_from(["signal", "contract", "sum", "bilinear", "sanger", "function"]))
    mat = draw(st.sampled_from([w, fb]))
    if kind == "signal":
        base = draw(st.sampled_from([pre, post, err, pre_err, w, fb, mod, reward, loss, reward_baseline(4)]))
    elif kind == "contract":
        base = wT(draw(st.sampled_from(_VECTORS_POST)), mat) if draw(st.booleans()) else wv(
            draw(st.sampled_from(_VECTORS_PRE)), mat)  # fmt: skip
    elif kind == "sum":
        base = layer_sum(draw(st.sampled_from(_VECTORS_POST + _VECTORS_PRE)))
    elif kind == "bilinear":
        base = bilinear(draw(st.sampled_from(_VECTORS_POST)), draw(st.sampled_from(_VECTORS_PRE)), mat)
    elif kind == "sanger":
        base = sanger(draw(st.sampled_from(_VECTORS_POST)), mat)
    else:
        base = draw(st.sampled_from(_FUNCTIONS))(draw(_factor()))
    return base ** draw(st.sampled_from(_EXPONENTS))


@given(
    terms=st.lists(st.lists(_factor(), min_size=1, max_size=4), min_size=1, max_size=3),
    coef=st.floats(-1e3, 1e3, allow_nan=False).filter(lambda c: c != 0),
)
@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
def test_random_products_and_powers_of_signals_and_operators_print_valid_latex(terms, coef):
    expr = sp.Float(coef) * sp.Add(*(sp.Mul(*factors) for factors in terms))
    tex = expr_latex(expr)
    assert not latex_errors(tex), (expr, tex, latex_errors(tex))
    assert not latex_errors(rule_to_latex(Rule.general(expr * Constant("a"), ["a"], values={"a": 0.5})))

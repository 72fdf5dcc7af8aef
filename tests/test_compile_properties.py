"""Property-based tests of the rule compiler: exact invariants only (STYLE.md point 12).

Rules are drawn from a small grammar over the signals ``pre, post, err, pre_err, w, fb, mod, reward, loss`` (plus a
trace and a derived signal), small exact constants, the operators ``wT, wv, layer_sum, layer_mean, bilinear, sanger``
and the elementwise functions. One strategy per compile path (``outer``, ``synapse``, ``contraction``, ``bilinear``,
``elementwise``) guarantees that every path is drawn; the paths actually used are collected in :data:`SEEN_PATHS`
and checked by the last test of the module.

Properties: compiled == naive (values and gradients w.r.t. theta and every input signal; float64 and float32;
B = 1 and single-neuron layers; theta (R,) and (B, R)), linearity in theta, theta = 0 gives dW = 0, term order
is irrelevant, JSON and torch-export round trips.
"""

from __future__ import annotations

import json

import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesearch.compile.compiler import compile_rule
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import (
    Constant,
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
    sanger,
    trace,
    w,
    wT,
    wv,
)
from rulesearch.reference.naive import naive_update

PATHS = ("outer", "synapse", "contraction", "bilinear", "elementwise")
SEEN_PATHS: set[str] = set()

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # reproducible: the examples follow from the test, like the seeded tensors
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

XBAR = trace(pre, tau=3)  # a pre-role state
HEBB = derived("hebb_p", post * pre)  # a synapse-role derived signal

POST_ATOMS = (post, err)
PRE_ATOMS = (pre, pre_err, XBAR)
SYN_ATOMS = (w, fb, HEBB)
GLOBAL_ATOMS = (mod, reward, loss)
POSITIVE_ATOMS = (post, pre, mod, loss, XBAR)  # fractional powers only of positive things
CONSTS = st.sampled_from([sp.Integer(1), sp.Integer(-1), sp.Integer(2), sp.Rational(1, 2), sp.Rational(-3, 4)])
MATRICES = st.sampled_from((w, fb))


@st.composite
def vector(draw, role: str):
    """A post- or pre-role polynomial of degree <= 2."""
    atoms = POST_ATOMS if role == "post" else PRE_ATOMS
    a = draw(st.sampled_from(atoms))
    b = draw(st.sampled_from([x for x in atoms if x != a]))  # a - a would vanish
    kind = draw(st.sampled_from(("atom", "scaled", "product", "sum")))
    return {"atom": a, "scaled": draw(CONSTS) * a, "product": a * b, "sum": a + draw(CONSTS) * b}[kind]


@st.composite
def vectors(draw):
    """Optional post and pre vectors and a global factor multiplying a path's core factor."""
    out = sp.Integer(1)
    if draw(st.booleans()):
        out *= draw(vector("post"))
    if draw(st.booleans()):
        out *= draw(vector("pre"))
    if draw(st.booleans()):
        out *= draw(st.sampled_from(GLOBAL_ATOMS))
    return out


@st.composite
def outer_factor(draw):
    """No synapse factor: fused into the one outer-product matmul."""
    kind = draw(st.sampled_from(("uv", "u", "v", "global", "hebb")))
    u, v, g = draw(vector("post")), draw(vector("pre")), draw(st.sampled_from(GLOBAL_ATOMS))
    return draw(CONSTS) * {"uv": u * v, "u": u, "v": v, "global": g, "hebb": g * u * v}[kind]


@st.composite
def synapse_factor(draw):
    """A synapse factor times vectors: grouped by that factor."""
    s = draw(st.sampled_from((w, fb, w * fb, w**2, HEBB * w, sp.Rational(1, 2) * w + fb)))
    return s * draw(vectors())


@st.composite
def contraction_factor(draw):
    M = draw(MATRICES)
    kind = draw(st.sampled_from(("wT", "wv", "layer_sum", "layer_mean", "sanger")))
    if kind == "wT":
        core = wT(draw(vector("post")), M) * draw(st.sampled_from(POST_ATOMS))
    elif kind == "wv":
        core = wv(draw(vector("pre")), M) * draw(st.sampled_from(PRE_ATOMS))
    elif kind in ("layer_sum", "layer_mean"):
        reduce = layer_sum if kind == "layer_sum" else layer_mean
        core = reduce(draw(vector(draw(st.sampled_from(("post", "pre"))))))
    else:
        core = sanger(draw(vector("post")), M)
    return core * draw(vectors())


@st.composite
def bilinear_factor(draw):
    u, v = draw(vector("post")), draw(vector("pre"))
    if draw(st.booleans()):
        u, v = v, u  # either order: stored canonically
    return bilinear(u, v, draw(MATRICES)) * draw(vectors())


@st.composite
def any_atom(draw):
    return draw(st.sampled_from(POST_ATOMS + PRE_ATOMS + SYN_ATOMS + GLOBAL_ATOMS))


@st.composite
def elementwise_factor(draw):
    x, y = draw(any_atom()), draw(any_atom())
    pos = draw(st.sampled_from(POSITIVE_ATOMS))
    kind = draw(st.sampled_from(("tanh", "exp", "abs", "piecewise", "power", "sqrt", "max", "nested", "sign")))
    # shaped so that SymPy cannot simplify the function away (tanh(x - x), Piecewise((x, c), (x, True)), x**-1 * x)
    core = {
        "tanh": lambda: sp.tanh(x + draw(st.sampled_from((1, 2, sp.Rational(1, 2)))) * y),
        "exp": lambda: sp.exp(draw(CONSTS) * x),
        "abs": lambda: sp.Abs(x - y / 2),
        "piecewise": lambda: sp.Piecewise((x, y > sp.Rational(1, 4)), (x / 2 + draw(any_atom()), True)),
        "power": lambda: (pos + 1) ** draw(st.sampled_from((sp.Rational(1, 2), sp.Rational(3, 2), sp.Rational(-1, 3)))),
        "sqrt": lambda: sp.sqrt(pos + 1) * x,
        "max": lambda: sp.Max(pos, draw(st.sampled_from(POSITIVE_ATOMS)) / 2 + sp.Rational(1, 5)),
        "nested": lambda: sp.tanh(draw(st.sampled_from((wT(post), wv(pre), layer_sum(err), bilinear(post, pre))))),
        "sign": lambda: sp.sign(x) * y,
    }[kind]()
    return core * draw(vectors())


FACTORS = {
    "outer": outer_factor,
    "synapse": synapse_factor,
    "contraction": contraction_factor,
    "bilinear": bilinear_factor,
    "elementwise": elementwise_factor,
}


@st.composite
def term_expr(draw, path: str | None = None):
    first = FACTORS[path] if path else draw(st.sampled_from(list(FACTORS.values())))
    expr = draw(first())
    if draw(st.booleans()):
        expr = expr + draw(draw(st.sampled_from(list(FACTORS.values())))())
    return expr


@st.composite
def rules(draw, path: str | None = None, max_terms: int = 3):
    """A linear rule; with ``path``, its first term is drawn from that path's strategy."""
    n = draw(st.integers(1, max_terms))
    exprs = [draw(term_expr(path if r == 0 else None)) for r in range(n)]
    return Rule([Term(f"T{r}", e) for r, e in enumerate(exprs)], name="drawn")


@st.composite
def problems(draw, path: str | None = None, dtypes=(torch.float64, torch.float32)):
    """A rule, shapes (B = 1 and single-neuron layers included), dtype, theta shape and a seed."""
    return dict(
        rule=draw(rules(path)),
        B=draw(st.sampled_from((1, 3))),
        n_post=draw(st.sampled_from((1, 4))),
        n_pre=draw(st.sampled_from((1, 3))),
        dtype=draw(st.sampled_from(dtypes)),
        batched_theta=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(update, B, n_post, n_pre, dtype, seed, n_params=None, batched_theta=False):
    """Seeded signals for ``update.needs`` plus the values of its states (one online step from init)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    full = {
        "pre": torch.rand(B, n_pre, generator=gen, dtype=f64) + 0.1,
        "post": torch.rand(B, n_post, generator=gen, dtype=f64) + 0.1,
        "err": torch.randn(B, n_post, generator=gen, dtype=f64),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=f64),
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=f64) / 2,
        "fb": torch.randn(B, n_post, n_pre, generator=gen, dtype=f64) / 2,
        "mod": torch.rand(B, generator=gen, dtype=f64) + 0.5,
        "reward": torch.rand(B, generator=gen, dtype=f64),
        "loss": torch.rand(B, generator=gen, dtype=f64) + 0.1,
    }
    sig = {k: v.to(dtype) for k, v in full.items() if k in update.needs}
    for spec in update.states:
        sig[spec.name] = spec.step(spec.init(sig) + 0.5, sig)  # a nonzero state
    theta = None
    if n_params is not None:
        shape = (B, n_params) if batched_theta else (n_params,)
        theta = torch.randn(shape, generator=gen, dtype=f64).to(dtype)
    return sig, theta


def assert_close(a, b, dtype, what=""):
    """Relative comparison scaled by the reference's magnitude (cancellations make elementwise rtol too strict)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = max(1.0, float(b.detach().abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def check_against_naive(p):
    rule = p["rule"]
    update = compile_rule(rule)
    SEEN_PATHS.update(update.paths)
    sig, theta = make_inputs(update, p["B"], p["n_post"], p["n_pre"], p["dtype"], p["seed"], rule.n_terms,
                             p["batched_theta"])  # fmt: skip
    inputs = {k: v.requires_grad_() for k, v in sig.items()}
    theta.requires_grad_()
    dW, ref = update(inputs, theta), naive_update(rule, inputs, theta)
    shape = (p["B"], p["n_post"], p["n_pre"])
    assert dW.shape == ref.shape == shape and dW.dtype == p["dtype"]
    assert torch.isfinite(ref).all()
    assert_close(dW, ref, p["dtype"], "dW")
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    cot = cot.to(p["dtype"])
    names = ["theta", *inputs]
    leaves = [theta, *inputs.values()]
    g_c, g_n = (
        torch.autograd.grad((out * cot).sum(), leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
        for out in (dW, ref)
    )  # a rule that simplified to 0 may return a constant
    for name, leaf, a, b in zip(names, leaves, g_c, g_n):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        assert_close(a, b, p["dtype"], f"d/d{name}")
    return update


# ---------------------------------------------------------------------------------------------------------------
# compiled == naive, per compile path (each example must use its path) and mixed


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(data=st.data())
def test_compiled_equals_naive_per_path(path, data):
    update = check_against_naive(data.draw(problems(path)))
    assert path in update.paths


@SETTINGS
@given(p=problems())
def test_compiled_equals_naive_mixed_rules(p):
    check_against_naive(p)


# ---------------------------------------------------------------------------------------------------------------
# Exact invariants (float64)


@SETTINGS
@given(p=problems(dtypes=(torch.float64,)), a=CONSTS, b=CONSTS)
def test_update_is_linear_in_theta(p, a, b):
    rule = p["rule"]
    update = compile_rule(rule)
    sig, t1 = make_inputs(update, p["B"], p["n_post"], p["n_pre"], torch.float64, p["seed"], rule.n_terms,
                          p["batched_theta"])  # fmt: skip
    t2 = torch.randn(t1.shape, generator=torch.Generator().manual_seed(p["seed"] + 7), dtype=torch.float64)
    a, b = float(a), float(b)
    lhs = update(sig, a * t1 + b * t2)
    rhs = a * update(sig, t1) + b * update(sig, t2)
    assert_close(lhs, rhs, torch.float64, "linearity")


@SETTINGS
@given(p=problems(dtypes=(torch.float64,)))
def test_zero_theta_gives_zero_update(p):
    rule = p["rule"]
    update = compile_rule(rule)
    sig, theta = make_inputs(update, p["B"], p["n_post"], p["n_pre"], torch.float64, p["seed"], rule.n_terms,
                             p["batched_theta"])  # fmt: skip
    dW = update(sig, torch.zeros_like(theta))
    assert dW.shape == (p["B"], p["n_post"], p["n_pre"])
    assert torch.equal(dW, torch.zeros_like(dW))


@SETTINGS
@given(p=problems(dtypes=(torch.float64,)), data=st.data())
def test_term_order_is_irrelevant(p, data):
    rule = p["rule"]
    perm = data.draw(st.permutations(range(rule.n_terms)))
    permuted = Rule([rule.terms[i] for i in perm], name=rule.name)
    update = compile_rule(rule)
    sig, theta = make_inputs(update, p["B"], p["n_post"], p["n_pre"], torch.float64, p["seed"], rule.n_terms,
                             p["batched_theta"])  # fmt: skip
    dW = update(sig, theta)
    dW_perm = compile_rule(permuted)(sig, theta[..., list(perm)])
    torch.testing.assert_close(dW_perm, dW, rtol=1e-12, atol=1e-12 * max(1.0, float(dW.abs().max())))


@SETTINGS
@given(p=problems(dtypes=(torch.float64,)), values=st.lists(st.floats(-10, 10), min_size=3, max_size=3))
def test_json_round_trip(p, values):
    rule = p["rule"]
    back = Rule.from_json(json.loads(json.dumps(rule.to_json())))
    assert back == rule and back.term_names() == rule.term_names()
    trained = rule.with_values(values[: rule.n_terms])
    assert Rule.from_json(json.dumps(trained.to_json())) == trained
    update = compile_rule(rule)
    assert compile_rule(back) is update
    sig, theta = make_inputs(update, p["B"], p["n_post"], p["n_pre"], torch.float64, p["seed"], rule.n_terms,
                             p["batched_theta"])  # fmt: skip
    torch.testing.assert_close(naive_update(back, sig, theta), naive_update(rule, sig, theta), rtol=0, atol=0)


@SETTINGS
@given(rule=rules(max_terms=2), values=st.lists(st.floats(-10, 10, width=32), min_size=2, max_size=2))
def test_torch_export_sympy_round_trip(rule, values):  # width=32: exact in a float32 Parameter
    vals = values[: rule.n_terms]
    module = rule.torch(vals)
    assert module.theta.shape == (rule.n_terms,)
    assert module.sympy() == rule.with_values(vals).sympy()
    assert module.trained_rule() == rule.with_values(vals)


# ---------------------------------------------------------------------------------------------------------------
# General rules with free constants


@st.composite
def general_problems(draw):
    c0, c1 = Constant("c0"), Constant("c1")
    f0 = draw(draw(st.sampled_from(list(FACTORS.values())))())
    f1 = draw(draw(st.sampled_from(list(FACTORS.values())))())
    how = draw(st.sampled_from(("linear", "inside")))
    expr = c0 * f0 + c1 * f1 if how == "linear" else c0 * f0 + sp.tanh(c1 * draw(any_atom())) * f1
    return dict(
        rule=Rule.general(expr, [c0, c1], name="drawn_general"),
        B=draw(st.sampled_from((1, 3))),
        n_post=draw(st.sampled_from((1, 4))),
        n_pre=draw(st.sampled_from((1, 3))),
        batched=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@SETTINGS
@given(p=general_problems())
def test_general_rule_compiled_equals_naive(p):
    rule = p["rule"]
    update = compile_rule(rule)
    SEEN_PATHS.update(update.paths)
    sig, _ = make_inputs(update, p["B"], p["n_post"], p["n_pre"], torch.float64, p["seed"])
    gen = torch.Generator().manual_seed(p["seed"] + 3)
    shape = (p["B"],) if p["batched"] else ()
    params = {c: torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_() for c in ("c0", "c1")}
    dW, ref = update(sig, params), naive_update(rule, sig, params)
    assert dW.shape == (p["B"], p["n_post"], p["n_pre"])
    assert_close(dW, ref, torch.float64, "dW")
    g_c = torch.autograd.grad(dW.sum(), list(params.values()), allow_unused=True)
    g_n = torch.autograd.grad(ref.sum(), list(params.values()), allow_unused=True)
    for name, leaf, a, b in zip(params, params.values(), g_c, g_n):
        assert_close(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if b is None else b,
                     torch.float64, f"d/d{name}")  # fmt: skip
    assert Rule.from_json(rule.to_json()) == rule


# ---------------------------------------------------------------------------------------------------------------


def test_every_compile_path_was_exercised():
    """Runs last in this module: the drawn examples above used every compile path."""
    if not SEEN_PATHS:
        pytest.skip("run together with the property tests of this module")
    assert SEEN_PATHS >= set(PATHS), f"paths never drawn: {set(PATHS) - SEEN_PATHS}"

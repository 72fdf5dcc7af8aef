"""The rule compiler (rulesearch.compile) against hand-written formulas, a per-synapse loop and the naive evaluator.

Numerics in float64 on seeded ``torch.Generator`` inputs; every output shape is asserted.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp
import torch

from rulesearch.compile import LowRank, WeightRef, low_rank_of
from rulesearch.compile import compiler as compile_mod
from rulesearch.compile.compiler import TORCH_FUNCTIONS, CompiledRule, RuleModule, TorchCompiler, compile_rule, lift
from rulesearch.errors import InvalidRuleError, ShapeError, SignalError, UnsupportedNodeError
from rulesearch.lang.pools import bio, ehebb, f0, oja, pool
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import (
    ELEMENTWISE_FUNCTIONS,
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

F64 = torch.float64


def make_signals(gen, B, n_post, n_pre, dtype=F64, names=None):
    """Seeded random signals in the shapes CompiledRule expects (activities positive, errors signed)."""
    sig = {
        "pre": torch.rand(B, n_pre, generator=gen, dtype=F64) + 0.1,
        "post": torch.rand(B, n_post, generator=gen, dtype=F64) + 0.1,
        "err": torch.randn(B, n_post, generator=gen, dtype=F64),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=F64),
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=F64) / 2,
        "fb": torch.randn(B, n_post, n_pre, generator=gen, dtype=F64) / 2,
        "mod": torch.rand(B, generator=gen, dtype=F64) + 0.5,
        "reward": torch.rand(B, generator=gen, dtype=F64),
        "loss": torch.rand(B, generator=gen, dtype=F64) + 0.1,
    }
    return {k: v.to(dtype) for k, v in sig.items() if names is None or k in names}


# ---------------------------------------------------------------------------------------------------------------
# The paper pool against the formulas of seed-papers.md section 1.2 (column vectors, one episode at a time)


def paper_term(r: int, x, y, e, ep, W) -> np.ndarray:
    """F^r for one episode, literally as in Methods Eqs. 14-23 (x = y_{l-1}, y = y_l, e = e_l, ep = e_{l-1})."""
    one = np.ones_like(y)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    return [
        lambda: -col(e) @ col(x).T,  # F0 = -e x^T
        lambda: -col(y) @ col(ep).T,  # F1 = -y e'^T
        lambda: -col(e) @ col(ep).T,  # F2 = -e e'^T
        lambda: -W,  # F3 = -W
        lambda: -col(one) @ col(ep).T,  # F4 = -1 e'^T
        lambda: -col(e) @ col(one).T @ col(y) @ col(x).T,  # F5 = -e 1^T y x^T
        lambda: -col(y) @ col(y).T @ W @ col(ep) @ col(ep).T,  # F6 = -y y^T W e' e'^T
        lambda: -col(e) @ col(y).T @ W @ col(ep) @ col(x).T,  # F7 = -e y^T W e' x^T
        lambda: -col(y) @ col(x).T @ W.T @ col(e) @ col(ep).T,  # F8 = -y x^T W^T e e'^T
        lambda: col(y) @ col(x).T - col(y) @ col(y).T @ W,  # F9 = y x^T - y y^T W
    ][r]()


def paper_update(theta: np.ndarray, sig: dict) -> np.ndarray:
    """sum_r theta_r F^r per episode; theta (R,) or (B, R), R = 10."""
    B = sig["w"].shape[0]
    th = np.broadcast_to(theta, (B, 10))
    arr = {k: v.numpy() for k, v in sig.items()}
    return np.stack(
        [
            sum(
                th[b, r] * paper_term(r, arr["pre"][b], arr["post"][b], arr["err"][b], arr["pre_err"][b], arr["w"][b])
                for r in range(10)
            )  # fmt: skip
            for b in range(B)
        ]
    )


@pytest.mark.parametrize("r", range(10), ids=[f"F{r}" for r in range(10)])
def test_pool_term_matches_paper_formula(r, gen):
    B, n_post, n_pre = 3, 4, 5
    sig = make_signals(gen, B, n_post, n_pre, names=pool.compile().needs)
    theta = torch.zeros(10, dtype=F64)
    theta[r] = 1.0
    dW = compile_rule(pool)(sig, theta)
    assert dW.shape == (B, n_post, n_pre) and dW.dtype == F64
    expected = torch.from_numpy(paper_update(theta.numpy(), sig))
    torch.testing.assert_close(dW, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(naive_update(pool, sig, theta), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("theta_shape", ["(R,)", "(B, R)"])
@pytest.mark.parametrize("B, n_post, n_pre", [(1, 1, 1), (1, 7, 1), (2, 1, 6), (3, 5, 4)])
def test_pool_matches_paper_formula_with_random_theta(B, n_post, n_pre, theta_shape, gen):
    sig = make_signals(gen, B, n_post, n_pre, names=pool.compile().needs)
    theta = torch.randn(10, dtype=F64, generator=gen) if theta_shape == "(R,)" else torch.randn(B, 10, generator=gen)
    dW = compile_rule(pool)(sig, theta.to(F64))
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, torch.from_numpy(paper_update(theta.to(F64).numpy(), sig)), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("rule", [f0, ehebb, oja, bio], ids=lambda r: r.name)
def test_named_rules_equal_the_pool_restricted_to_their_terms(rule, gen):
    sig = make_signals(gen, 2, 3, 4, names=pool.compile().needs)
    theta = torch.randn(rule.n_terms, generator=gen, dtype=F64)
    full = torch.zeros(10, dtype=F64)
    full[[int(n[1:]) for n in rule.term_names()]] = theta
    dW = compile_rule(rule)(sig, theta)
    assert dW.shape == (2, 3, 4)
    torch.testing.assert_close(dW, compile_rule(pool)(sig, full), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Synapse-local terms against a per-synapse loop over (b, i, j) with lambdify

LOCAL = {
    "F0-F4": sum((t.expr for t in pool.terms[:5]), sp.Integer(0)),
    "tanh(W) x y": sp.tanh(w) * pre * post,
    "exp(-e^2) e'": sp.exp(-(err**2)) * pre_err,
    "|e| sqrt(x)": sp.Abs(err) * sp.sqrt(pre),
    "piecewise": sp.Piecewise((post, err > 0), (-pre, True)),
    "Max(y, x) W": sp.Max(post, pre) * w,
    "mod y x - B W": mod * post * pre - fb * w,
    "x^(3/2) / y": pre ** sp.Rational(3, 2) / post,
}


@pytest.mark.parametrize("expr", LOCAL.values(), ids=LOCAL.keys())
def test_synapse_local_terms_match_per_synapse_loop(expr, gen):
    B, n_post, n_pre = 2, 3, 4
    rule = Rule([Term("t", expr)])
    sig = make_signals(gen, B, n_post, n_pre)
    theta = torch.tensor([0.7], dtype=F64)
    f = sp.lambdify([pre, post, err, pre_err, w, fb, mod], expr, "math")
    a = {k: v.tolist() for k, v in sig.items()}
    ref = torch.tensor(
        [
            [
                [
                    0.7
                    * f(
                        a["pre"][b][j],
                        a["post"][b][i],
                        a["err"][b][i],
                        a["pre_err"][b][j],
                        a["w"][b][i][j],
                        a["fb"][b][i][j],
                        a["mod"][b],
                    )
                    for j in range(n_pre)
                ]  # fmt: skip
                for i in range(n_post)
            ]
            for b in range(B)
        ],
        dtype=F64,
    )
    dW = compile_rule(rule)(sig, theta)
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(naive_update(rule, sig, theta), ref, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# Operators against explicit loops


def test_operators_against_loops(gen):
    B, n_post, n_pre = 2, 3, 4
    sig = make_signals(gen, B, n_post, n_pre)
    y, x, e, W, Bf = sig["post"], sig["pre"], sig["err"], sig["w"], sig["fb"]
    cases = {
        "wT(y)": (post * wT(post), lambda b, i, j: y[b, i] * sum(W[b, k, j] * y[b, k] for k in range(n_post))),
        "wv(x)": (wv(pre) * pre, lambda b, i, j: x[b, j] * sum(W[b, i, k] * x[b, k] for k in range(n_pre))),
        "fb^T e": (post * wT(err, fb), lambda b, i, j: y[b, i] * sum(Bf[b, k, j] * e[b, k] for k in range(n_post))),
        "sum y": (layer_sum(post) * w, lambda b, i, j: W[b, i, j] * y[b].sum()),
        "mean x": (layer_mean(pre) * err, lambda b, i, j: e[b, i] * x[b].sum() / n_pre),
        "y^T W x": (
            bilinear(pre, post),
            lambda b, i, j: sum(y[b, k] * W[b, k, m] * x[b, m] for k in range(n_post) for m in range(n_pre)),
        ),
        "sanger": (sanger(), lambda b, i, j: sum(y[b, k] * W[b, k, j] for k in range(i + 1))),
    }
    for name, (expr, ref) in cases.items():
        dW = compile_rule(Rule([Term("t", expr)]))(sig, torch.ones(1, dtype=F64))
        assert dW.shape == (B, n_post, n_pre)
        expected = torch.tensor(
            [[[float(ref(b, i, j)) for j in range(n_pre)] for i in range(n_post)] for b in range(B)], dtype=F64
        )
        torch.testing.assert_close(dW, expected, rtol=1e-12, atol=1e-13, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Compile paths and needs

PATHS = [
    ("f0", f0, {"outer"}),
    ("pool", pool, {"outer", "synapse", "contraction", "bilinear"}),
    ("decay", Rule([Term("d", -w)]), {"synapse"}),
    ("global only", Rule([Term("m", mod)]), {"outer"}),
    ("oja", oja, {"outer", "contraction"}),
    ("sanger", Rule([Term("s", post * (pre - sanger()))]), {"outer", "synapse", "contraction"}),
    ("tanh", Rule([Term("t", sp.tanh(err) * pre)]), {"outer", "elementwise"}),
    ("sqrt", Rule([Term("t", sp.sqrt(post) * pre)]), {"outer", "elementwise"}),
    ("tanh(W)", Rule([Term("t", sp.tanh(w))]), {"synapse", "elementwise"}),
]


@pytest.mark.parametrize("rule, paths", [(r, p) for _, r, p in PATHS], ids=[i for i, _, _ in PATHS])
def test_compile_paths(rule, paths):
    assert compile_rule(rule).paths == frozenset(paths)


def test_pool_compiles_to_one_fused_outer_product_group_and_one_weight_decay_group():
    """The structure the benchmark's speed and memory rest on: ten terms, six shared (u, v) columns in ONE batched
    product, and F3 = -W as a scale of the weights (no vectors)."""
    update = compile_rule(pool)
    (outer, decay) = update._groups  # FactorGroup(synapse, cols, us, vs, consts)
    assert outer.synapse is None and len(outer.cols) == len(outer.us) == len(outer.vs) == 6 and outer.consts is None
    assert update._comp.role(decay.synapse) == "synapse" and len(decay.cols) == 1 and decay.consts is not None
    s_ref, cols, us, vs, consts = decay  # still a tuple
    assert s_ref == decay.synapse and consts is decay.consts


GLOBAL_FACTORS = [
    Term("ls", layer_sum(post) * err * pre),
    Term("lm", layer_mean(pre_err) * err * pre),
    Term("bl", bilinear(err, pre) * post * pre_err),
    Term("m", mod * err * pre),
    Term("d", -loss * w),
]
LOW_RANK = [
    ("pool", pool),
    ("global factors", Rule(GLOBAL_FACTORS)),
    ("general", Rule.general(Constant("a") * err * pre + Constant("b") * sp.tanh(layer_sum(post)) * w, ["a", "b"])),
]


@pytest.mark.parametrize("per_episode", [False, True], ids=["shared", "per-episode"])
@pytest.mark.parametrize("rule", [r for _, r in LOW_RANK], ids=[i for i, _ in LOW_RANK])
def test_low_rank_form_reproduces_the_compiled_update(rule, per_episode, gen):
    """``low_rank_of``'s factors give the compiled rule's ``dW = a W + U Vt`` (the fast path's view of a rule)."""
    B, n_post, n_pre = 3, 5, 4
    update = compile_rule(rule)
    sig = make_signals(gen, B, n_post, n_pre, names=update.needs)
    if rule.is_linear:
        params = torch.randn((B, rule.n_params) if per_episode else (rule.n_params,), generator=gen, dtype=F64)
    else:
        shape = (B,) if per_episode else ()
        params = {n: torch.randn(shape, generator=gen, dtype=F64) for n in ("a", "b")}
    expected = update(sig, params)
    lr, why = low_rank_of(update)
    assert isinstance(lr, LowRank) and why == ""
    like = sig["pre"]
    params = lr.check_params(params, B, like)
    wref = WeightRef(sig["w"])
    f = lr.factors({**sig, "w": wref}, params, lr.coefficients(params, B, like), wref, B, n_post, n_pre, like)
    assert f.U.shape[:2] == (B, n_post) and f.Vt.shape == (B, f.U.shape[2], n_pre)
    dW = f.U @ f.Vt
    if f.a is not None:
        dW = dW + (f.a if f.a.dim() == 0 else f.a.reshape(-1, 1, 1)) * sig["w"]
    assert dW.shape == expected.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError):
        lr.check_params(params[..., :-1] if rule.is_linear else {n: p.to(torch.float32) for n, p in params.items()},
                        B, like)  # fmt: skip


def test_low_rank_of_explains_why_not():
    """Stateful derived signals, a synapse factor times outer products and non-compiled updates have no low-rank
    form; the reason says why (the weights used other than by a matrix-vector product raise NotLowRank)."""
    lr, why = low_rank_of(compile_rule(Rule([Term("t", trace(pre, tau=5) * err)])))
    assert lr is None and "states" in why
    lr, why = low_rank_of(compile_rule(Rule([Term("t", w * err * pre)])))
    assert lr is None and "NotLowRank" in why and "synapse factor" in why
    lr, why = low_rank_of(compile_rule(Rule([Term("t", sp.tanh(w))])))
    assert lr is None and "NotLowRank" in why
    assert low_rank_of(lambda s, p: None) == (None, "update function is not a CompiledRule")


NEEDS = [
    ("f0", f0, {"err", "pre"}),
    ("ehebb", ehebb, {"err", "pre", "pre_err"}),
    ("oja", oja, {"err", "pre", "post", "w"}),
    ("pool", pool, {"err", "pre", "post", "pre_err", "w"}),
    ("decay", Rule([Term("d", -w)]), {"w"}),
    ("fb", Rule([Term("t", post * wT(err, fb))]), {"post", "err", "fb"}),
    ("global only", Rule([Term("m", mod * reward)]), {"mod", "reward", "post", "pre"}),  # post, pre give the shape
    ("post only", Rule([Term("e", err * loss)]), {"err", "loss", "pre"}),
    ("derived", Rule([Term("h", derived("hebb_d", post * pre) * mod)]), {"post", "pre", "mod"}),
    ("trace", Rule([Term("t", post * trace(pre_err, 3))]), {"post", "pre_err"}),
    ("bcm", Rule([Term("t", pre * (post - bcm_threshold(5)))]), {"post", "pre"}),
    ("baseline", Rule([Term("t", (reward - reward_baseline(4)) * err * pre)]), {"reward", "err", "pre"}),
    ("general", Rule.general(Constant("a") * err * pre + Constant("b") * w, ["a", "b"]), {"err", "pre", "w"}),
]


@pytest.mark.parametrize("rule, needs", [(r, n) for _, r, n in NEEDS], ids=[i for i, _, _ in NEEDS])
def test_needs_lists_exactly_the_base_signals(rule, needs):
    assert compile_rule(rule).needs == frozenset(needs)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_compile_cache_same_structure_same_object():
    r = Rule([Term("a", err * pre), Term("b", sp.tanh(w))], name="cache_probe")
    c = compile_rule(r)
    assert compile_rule(r) is c
    assert compile_rule(r.with_values([1.0, 2.0])) is c
    assert compile_rule(Rule.from_json(r.to_json())) is c
    assert r.compile() is c
    assert compile_rule(Rule([Term("a", err * pre)], name="cache_probe")) is not c
    assert compile_rule(r, functions={"tanh": torch.tanh}) is not c  # user functions bypass the cache


def test_with_values_does_not_recompile(monkeypatch):
    calls = []
    original = CompiledRule.__init__

    def counting(self, *a, **k):
        calls.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(CompiledRule, "__init__", counting)
    r = Rule([Term("a", err * pre), Term("b", mod * w * post)], name="recompile_probe")
    c = compile_rule(r)
    for v in ([1.0, 2.0], [3.0, -1.0], torch.tensor([0.5, 0.25])):
        assert compile_rule(r.with_values(v)) is c
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# TorchCompiler settings, function table, unsupported nodes


def test_torch_compiler_unknown_setting():
    with pytest.raises(TypeError, match=r"Unknown setting\(s\) \['precision'\]"):
        TorchCompiler({"precision": 3})


def test_user_functions_are_consulted_before_builtins(gen):
    sig = make_signals(gen, 2, 3, 4)
    r = Rule([Term("t", sp.tanh(err) * pre)], name="override")
    dW = compile_rule(r, functions={"tanh": lambda x: 2 * x})(sig, torch.ones(1, dtype=F64))
    assert dW.shape == (2, 3, 4)
    torch.testing.assert_close(dW, 2 * sig["err"].unsqueeze(-1) * sig["pre"].unsqueeze(-2))


def test_unsupported_node_names_the_node_and_the_method():
    with pytest.raises(UnsupportedNodeError, match="node Derivative .*`_compile_Derivative`"):
        TorchCompiler().slot(sp.Derivative(sp.tanh(pre), pre))
    with pytest.raises(UnsupportedNodeError, match="No torch function for asinh"):
        TorchCompiler().slot(sp.asinh(pre))


def _elementwise_example(name):
    f = getattr(sp, name)
    if name in ("Max", "Min"):
        return f(post, pre, sp.Rational(1, 2)) * mod
    if name == "Piecewise":
        return sp.Piecewise((post, err > 0), (pre_err, pre < sp.Rational(1, 2)), (w, True))
    if name == "Heaviside":
        return f(err) * pre + f(pre_err, sp.Rational(1, 3)) * post
    if name in ("log", "sqrt"):  # positive arguments
        return f(post) * pre + f(mod) * w
    return f(err / 2) * pre + f(w / 2)


@pytest.mark.parametrize("name", ELEMENTWISE_FUNCTIONS)
def test_every_elementwise_function_compiles_and_matches_naive(name, gen):
    assert name in TORCH_FUNCTIONS or name in ("Piecewise", "sqrt")
    rule = Rule([Term("t", _elementwise_example(name))], name=f"fn_{name}")
    update = compile_rule(rule)
    assert "elementwise" in update.paths
    sig = make_signals(gen, 2, 3, 4, names=update.needs)
    sig = {k: v.requires_grad_() for k, v in sig.items()}
    theta = torch.tensor([0.5], dtype=F64, requires_grad=True)
    dW, ref = update(sig, theta), naive_update(rule, sig, theta)
    assert dW.shape == (2, 3, 4)
    torch.testing.assert_close(dW, ref, rtol=1e-12, atol=1e-13)
    (g,) = torch.autograd.grad(dW.sum(), theta)  # differentiable (Heaviside and sign: zero a.e.)
    assert torch.isfinite(g).all()


def test_lift():
    g, u, v, s = torch.ones(2), torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3, 4)
    assert lift(g, "global", "post").shape == (2, 1)
    assert lift(g, "global", "synapse").shape == (2, 1, 1)
    assert lift(u, "post", "synapse").shape == (2, 3, 1)
    assert lift(v, "pre", "synapse").shape == (2, 1, 4)
    assert lift(s, "synapse", "synapse") is s
    assert lift(2.0, "global", "synapse") == 2.0


# ---------------------------------------------------------------------------------------------------------------
# Call-time errors


def test_missing_signal_is_named(gen):
    sig = make_signals(gen, 2, 3, 4, names={"pre", "post", "w"})
    with pytest.raises(SignalError, match=r"needs signals \['err'\], which were not given"):
        compile_rule(oja)(sig, torch.ones(2, dtype=F64))


@pytest.mark.parametrize(
    "name, shape, fragments",
    [
        ("err", (2, 3, 1), ["'err' (post) has shape (2, 3, 1)", "expected (B, n_post)"]),
        ("w", (2, 12), ["'w' (synapse) has shape (2, 12)", "expected (B, n_post, n_pre)"]),
        ("err", (2, 5), ["'err' (post) has shape (2, 5)", "(2, 3)", "n_post=3 from signal 'w'"]),
        ("pre", (2, 5), ["'pre' (pre) has shape (2, 5)", "(2, 4)", "n_pre=4 from signal 'w'"]),
        ("post", (3, 3), ["'post' (post) has shape (3, 3)", "B=2 from signal 'w'"]),
    ],
    ids=["ndim-post", "ndim-synapse", "n_post", "n_pre", "B"],
)
def test_wrong_shape_names_signal_got_and_expected(name, shape, fragments, gen):
    sig = make_signals(gen, 2, 3, 4, names=oja.compile().needs)
    sig[name] = torch.zeros(shape, dtype=F64)
    with pytest.raises(ShapeError) as info:
        compile_rule(oja)(sig, torch.ones(2, dtype=F64))
    for frag in fragments:
        assert frag in str(info.value)


def test_inconsistent_n_post_between_vector_signals(gen):
    sig = make_signals(gen, 2, 3, 4, names={"err", "pre"})
    sig["post"] = torch.zeros(2, 5, dtype=F64)
    rule = Rule([Term("t", (err + post) * pre)])
    with pytest.raises(ShapeError, match="'post' .* has shape \\(2, 5\\).*n_post=3 from signal 'err'"):
        compile_rule(rule)(sig, torch.ones(1, dtype=F64))


def test_non_tensor_signal(gen):
    sig = make_signals(gen, 2, 3, 4, names=f0.compile().needs)
    sig["pre"] = [[1.0] * 4] * 2
    with pytest.raises(ShapeError, match="'pre' must be a torch.Tensor, got list"):
        compile_rule(f0)(sig, torch.ones(1, dtype=F64))


@pytest.mark.parametrize("shape", [(3,), (1,), (2, 1), (3, 2), (1, 2), (2, 2, 1), ()])
def test_theta_wrong_shape(shape, gen):
    sig = make_signals(gen, 2, 3, 4, names=oja.compile().needs)
    with pytest.raises(ShapeError, match=r"theta has shape .*; expected \(2,\) or \(2, 2\) for rule 'oja'"):
        compile_rule(oja)(sig, torch.ones(shape, dtype=F64))


def test_theta_not_a_tensor(gen):
    sig = make_signals(gen, 2, 3, 4, names=oja.compile().needs)
    with pytest.raises(ShapeError, match=r"theta must be a tensor of shape \(R,\) or \(B, R\) with R=2"):
        compile_rule(oja)(sig, [1.0, 2.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("batched", [False, True])
def test_non_finite_theta_is_a_clear_error(bad, batched, gen):
    sig = make_signals(gen, 2, 3, 4, names=oja.compile().needs)
    theta = torch.ones(2, 2, dtype=F64) if batched else torch.ones(2, dtype=F64)
    theta[..., 1] = bad
    with pytest.raises(InvalidRuleError, match="theta contains NaN or inf"):
        compile_rule(oja)(sig, theta)


SCALAR_MOD = Rule([Term("m", mod * err * pre), Term("g", mod**2), Term("s", mod * w)])  # factor, scale, synapse


def test_scalar_global_is_broadcast_to_every_episode(gen):
    B = 3
    update = compile_rule(SCALAR_MOD)
    sig = make_signals(gen, B, 2, 4)
    theta = torch.randn(3, generator=gen, dtype=F64)
    m0 = torch.tensor(0.7, dtype=F64, requires_grad=True)
    dW = update({**sig, "mod": m0}, theta)
    assert dW.shape == (B, 2, 4)
    ref = naive_update(SCALAR_MOD, {**sig, "mod": m0.expand(B)}, theta)
    torch.testing.assert_close(dW, ref, rtol=1e-12, atol=1e-13)
    (g,) = torch.autograd.grad(dW.sum(), m0)
    (g_ref,) = torch.autograd.grad(ref.sum(), m0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)
    (spec,) = compile_rule(Rule([Term("rb", reward_baseline() * pre)])).states  # B from the other signals
    scalar = {**sig, "reward": torch.tensor(0.5, dtype=F64)}
    assert spec.init(scalar).shape == (B,)
    torch.testing.assert_close(spec.step(spec.init(scalar), scalar), torch.full((B,), 0.05, dtype=F64))


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("mod", (1,), r"'mod' \(global\) has shape \(1,\); expected \(B,\) = \(3,\) \(B=3 from signal 'w'\)"),
        ("mod", (3, 1), r"'mod' \(global\) has shape \(3, 1\); expected \(B,\) or \(\) \(one value"),
        ("err", (), r"'err' \(post\) has shape \(\); expected \(B, n_post\)\.$"),
    ],
    ids=["global-(1,)", "global-2d", "post-0d"],
)
def test_other_global_shapes_and_0d_non_globals_are_refused(name, shape, match, gen):
    update = compile_rule(SCALAR_MOD)
    sig = make_signals(gen, 3, 2, 4, names=update.needs)
    sig[name] = torch.ones(shape, dtype=F64)
    with pytest.raises(ShapeError, match=match):
        update(sig, torch.ones(3, dtype=F64))


@pytest.mark.parametrize(
    "sig_dtype, theta",
    [
        (torch.float32, torch.ones(2, dtype=F64)),
        (F64, torch.ones(2, dtype=torch.float32)),
        (F64, torch.ones(2, 2, dtype=torch.long)),
        (F64, torch.ones(2, dtype=F64, device="meta")),
    ],
    ids=["f64-theta-f32-signals", "f32-theta-f64-signals", "int-theta", "theta-on-another-device"],
)
def test_theta_dtype_and_device_must_match_the_signals(sig_dtype, theta, gen):
    sig = make_signals(gen, 2, 3, 4, dtype=sig_dtype, names=pool.compile().needs)
    match = rf"theta has dtype {theta.dtype} on {theta.device}; expected the signals' {sig_dtype} on cpu\."
    for rule in (oja, pool.select(["F0", "F5"])):  # plain outer products, and a global factor (index put)
        with pytest.raises(ShapeError, match=match):
            compile_rule(rule)(sig, theta)


def test_signals_must_share_one_floating_dtype_and_device(gen):
    sig = make_signals(gen, 2, 3, 4, names=oja.compile().needs)
    theta = torch.ones(2, dtype=F64)
    with pytest.raises(ShapeError, match="'pre' has dtype torch.float32 on cpu; expected torch.float64 on cpu like"):
        compile_rule(oja)({**sig, "pre": sig["pre"].float()}, theta)
    with pytest.raises(ShapeError, match="'post' has dtype torch.float64 on meta; expected torch.float64 on cpu"):
        compile_rule(oja)({**sig, "post": sig["post"].to("meta")}, theta)
    with pytest.raises(ShapeError, match="'w' has dtype torch.int64; expected a floating-point dtype"):
        compile_rule(oja)({k: v.long() for k, v in sig.items()}, theta.long())


def test_compile_rule_rejects_non_rules():
    with pytest.raises(InvalidRuleError, match="expects a Rule, got Term"):
        compile_rule(Term("t", pre))


# ---------------------------------------------------------------------------------------------------------------
# General rules (free constants)

A, Bc = Constant("a"), Constant("b")
GENERAL = Rule.general(A * err * pre + sp.exp(Bc * w) * post - A**2 * layer_sum(pre_err) * mod, [A, Bc], name="gen")


@pytest.mark.parametrize("batched", [False, True], ids=["scalar", "per-episode"])
def test_general_rule_matches_naive(batched, gen):
    B, n_post, n_pre = 3, 2, 5
    update = compile_rule(GENERAL)
    assert update.needs == frozenset({"err", "pre", "w", "post", "pre_err", "mod"})
    sig = make_signals(gen, B, n_post, n_pre, names=update.needs)
    shape = (B,) if batched else ()
    params = {"a": torch.randn(shape, generator=gen, dtype=F64), "b": torch.randn(shape, generator=gen, dtype=F64)}
    dW = update(sig, params)
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, naive_update(GENERAL, sig, params), rtol=1e-12, atol=1e-13)


def test_general_rule_python_float_constants_and_gradients(gen):
    update = compile_rule(GENERAL)
    sig = make_signals(gen, 2, 3, 4, names=update.needs)
    dW = update(sig, {"a": 0.5, "b": -1})
    ref = naive_update(GENERAL, sig, {"a": torch.tensor(0.5, dtype=F64), "b": torch.tensor(-1.0, dtype=F64)})
    torch.testing.assert_close(dW, ref, rtol=1e-12, atol=1e-13)
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.2, dtype=F64, requires_grad=True)
    ga = torch.autograd.grad(update(sig, {"a": a, "b": b}).sum(), (a, b))
    gb = torch.autograd.grad(naive_update(GENERAL, sig, {"a": a, "b": b}).sum(), (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)


def test_general_rule_errors(gen):
    update = compile_rule(GENERAL)
    sig = make_signals(gen, 2, 3, 4, names=update.needs)
    with pytest.raises(SignalError, match=r"needs constants \['b'\]; got \['a'\]"):
        update(sig, {"a": 1.0})
    with pytest.raises(ShapeError, match=r"takes a dict of constants \['a', 'b'\], got Tensor"):
        update(sig, torch.ones(2, dtype=F64))
    with pytest.raises(InvalidRuleError, match="constant 'b' contains NaN or inf"):
        update(sig, {"a": 1.0, "b": float("nan")})


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 2), (4, 1)], ids=["(1,)", "(3,)", "(2,2)", "(B,1)"])
def test_general_rule_constants_are_shared_or_per_episode_never_broadcast(shape, gen):
    update = compile_rule(GENERAL)
    sig = make_signals(gen, 4, 3, 2, names=update.needs)
    match = rf"Constant 'a' of general rule 'gen' has shape {re.escape(str(shape))}; expected \(\) \(shared\) or \(4,\)"
    with pytest.raises(ShapeError, match=match):
        update(sig, {"a": torch.ones(shape, dtype=F64), "b": 1.0})


def test_general_rule_constants_dtype_and_python_numbers(gen):
    update = compile_rule(GENERAL)
    sig32 = make_signals(gen, 2, 3, 4, dtype=torch.float32, names=update.needs)
    assert update(sig32, {"a": 0.5, "b": -1}).dtype == torch.float32  # numbers take the signals' dtype
    for bad in (torch.tensor(0.5, dtype=F64), torch.ones(2, dtype=torch.long)):
        with pytest.raises(ShapeError, match=rf"constant 'b' has dtype {bad.dtype} on cpu; expected the signals' "):
            update(sig32, {"a": 0.5, "b": bad})


# ---------------------------------------------------------------------------------------------------------------
# Stateful signals


def test_trace_state_init_and_steps(gen):
    xb = trace(pre, tau=4)
    update = compile_rule(Rule([Term("t", post * xb)], name="trace_rule"))
    (spec,) = update.states
    assert (spec.name, spec.role, spec.needs) == ("pre_trace4", "pre", frozenset({"pre"}))
    B, n_post, n_pre = 2, 3, 5
    xs = [make_signals(gen, B, n_post, n_pre, names={"pre", "post"}) for _ in range(3)]
    s = spec.init(xs[0])
    assert s.shape == (B, n_pre) and torch.equal(s, torch.zeros(B, n_pre, dtype=F64))
    expected = torch.zeros(B, n_pre, dtype=F64)
    for sig in xs:
        s = spec.step(s, sig)
        expected = 0.75 * expected + 0.25 * sig["pre"]
        assert s.shape == (B, n_pre)
        torch.testing.assert_close(s, expected, rtol=1e-14, atol=0)
    sig = {**xs[-1], "pre_trace4": s}
    dW = update(sig, torch.tensor([2.0], dtype=F64))
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, 2 * sig["post"].unsqueeze(-1) * s.unsqueeze(-2))
    torch.testing.assert_close(dW, naive_update(update.rule, sig, torch.tensor([2.0], dtype=F64)))


def test_bcm_threshold_and_reward_baseline_states(gen):
    th, rb = bcm_threshold(tau=5), reward_baseline(tau=2)
    update = compile_rule(Rule([Term("bcm", post * (post - th) * pre), Term("r", (reward - rb) * err * pre)]))
    specs = {s.name: s for s in update.states}
    assert set(specs) == {"theta_bcm", "reward_bar"}
    assert (specs["theta_bcm"].role, specs["reward_bar"].role) == ("post", "global")
    sig = make_signals(gen, 2, 3, 4, names=update.needs)
    t0 = specs["theta_bcm"].init(sig)
    r0 = specs["reward_bar"].init(sig)
    assert t0.shape == (2, 3) and r0.shape == (2,) and not t0.any() and not r0.any()
    t1 = specs["theta_bcm"].step(torch.ones(2, 3, dtype=F64), sig)
    torch.testing.assert_close(t1, 0.8 + 0.2 * sig["post"] ** 2)
    r1 = specs["reward_bar"].step(torch.full((2,), 0.5, dtype=F64), sig)
    torch.testing.assert_close(r1, 0.25 + 0.5 * sig["reward"])
    full = {**sig, "theta_bcm": t1, "reward_bar": r1}
    theta = torch.tensor([0.3, -0.7], dtype=F64)
    torch.testing.assert_close(update(full, theta), naive_update(update.rule, full, theta), rtol=1e-12, atol=1e-13)
    with pytest.raises(SignalError, match="theta_bcm"):
        update(sig, theta)  # the inner loop passes state values under their names


def test_state_with_nonzero_init_and_dependencies(gen):
    xb = trace(pre, tau=2)
    s2 = state("s2_chain", lambda s: s / 2 + sp.tanh(xb), init=1)
    update = compile_rule(Rule([Term("t", post * s2)], name="chain"))
    assert [s.name for s in update.states] == ["pre_trace2", "s2_chain"]  # dependencies first
    assert "elementwise" in update.paths  # tanh inside a state's update
    sig = make_signals(gen, 2, 3, 4, names={"pre", "post"})
    x1 = update.states[0].step(update.states[0].init(sig), sig)
    init = update.states[1].init(sig)
    assert init.shape == (2, 4) and torch.equal(init, torch.ones(2, 4, dtype=F64))
    s = update.states[1].step(init, {**sig, "pre_trace2": x1})
    torch.testing.assert_close(s, 0.5 + torch.tanh(x1))


def _bound_rules():
    a, p = Constant("a"), Constant("p")
    u = reward - reward_baseline(3)
    return [
        (pool, lambda B: torch.linspace(-1, 1, 10, dtype=F64)),
        (
            Rule(
                [
                    Term("np", sp.Heaviside(u) * sp.Abs(u) ** sp.Rational(1, 4) * (post - trace(post, 5)) * pre),
                    Term("bcm", post * (post - bcm_threshold(4)) * pre),
                ]
            ),
            lambda B: torch.tensor([[0.3, -0.7], [1.1, 0.4]], dtype=F64)[:B],
        ),
        (
            Rule.general(
                5 * (a * sp.sign(u) + (1 - a) * sp.Heaviside(u)) * sp.Abs(u) ** p * (post - trace(post, 5)) * pre,
                [a, p],
            ),
            lambda B: {"a": torch.tensor([1.0, 0.0], dtype=F64)[:B], "p": 0.25},
        ),
        (  # one global factor times outer products: the bound call's shortcuts (one factor column, no product with
            # the identity A, one bmm)
            Rule([Term("np", sp.Heaviside(u) * sp.Abs(u) ** sp.Rational(1, 4) * (post - trace(post, 5)) * pre)]),
            lambda B: torch.tensor([[0.3], [-0.7]], dtype=F64)[:B],
        ),
    ]


@pytest.mark.parametrize("k", range(4), ids=["pool", "states", "general", "modulated"])
@pytest.mark.parametrize("scalar_reward", [False, True])
def test_bound_rule_equals_the_checked_call_bitwise(k, scalar_reward, gen):
    rule, params = _bound_rules()[k]
    update = compile_rule(rule)
    B, n_post, n_pre = 2, 3, 4
    steps = [make_signals(gen, B, n_post, n_pre, names=update.needs) for _ in range(4)]
    if scalar_reward and "reward" in update.needs:
        steps = [{**sig, "reward": sig["reward"][0]} for sig in steps]
    params = params(B)
    bound = update.bind(steps[0], params)
    if k == 3:
        assert bound._g1 is not None and bound._eye and bound._outer is not None
    states_a, states_b = {}, {}
    for sig in steps:
        sig_a = dict(sig)
        for spec in update.states:  # the inner loop's protocol
            prev = states_a.get(spec.name)
            states_a[spec.name] = sig_a[spec.name] = spec.step(spec.init(sig_a) if prev is None else prev, sig_a)
        sig_b = dict(sig)
        bound.advance(states_b, sig_b)
        assert states_a.keys() == states_b.keys()
        assert all(torch.equal(states_a[n], states_b[n]) for n in states_a)
        want, got = update(sig_a, params), bound(sig_b)
        assert got.shape == (B, n_post, n_pre) and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, degenerate rules


@pytest.mark.parametrize("B, n_post, n_pre", [(1, 1, 1), (1, 1, 4), (2, 5, 1)])
def test_single_neuron_layers_and_single_episode(B, n_post, n_pre, gen):
    sig = make_signals(gen, B, n_post, n_pre, names=pool.compile().needs)
    theta = torch.randn(B, 10, generator=gen, dtype=F64)
    dW = compile_rule(pool)(sig, theta)
    assert dW.shape == (B, n_post, n_pre)
    torch.testing.assert_close(dW, naive_update(pool, sig, theta), rtol=1e-12, atol=1e-13)


def test_float32_in_float32_out(gen):
    sig = make_signals(gen, 2, 3, 4, dtype=torch.float32, names=pool.compile().needs)
    theta = torch.randn(10, generator=gen, dtype=F64).float()
    dW = compile_rule(pool)(sig, theta)
    assert dW.dtype == torch.float32 and dW.shape == (2, 3, 4)
    torch.testing.assert_close(dW, naive_update(pool, sig, theta), rtol=1e-5, atol=1e-5)
    r = Rule([Term("p", sp.Piecewise((1, err > 0), (0, True)) * pre)], name="pw32")
    assert compile_rule(r)(sig, theta[:1]).dtype == torch.float32


def test_global_only_and_zero_rules(gen):
    sig = make_signals(gen, 3, 2, 4, names={"mod", "post", "pre"})
    dW = compile_rule(Rule([Term("m", 2 * mod), Term("c", sp.Integer(1))]))(sig, torch.tensor([1.0, 0.5], dtype=F64))
    assert dW.shape == (3, 2, 4)
    torch.testing.assert_close(dW, (2 * sig["mod"] + 0.5).reshape(3, 1, 1).expand(3, 2, 4))
    zero = compile_rule(Rule([Term("z", pre - pre)]))(sig, torch.ones(1, dtype=F64))
    assert zero.shape == (3, 2, 4) and zero.dtype == F64 and not zero.any()


def test_meta_gradient_through_two_online_steps_matches_finite_differences(gen):
    """theta.grad through W <- W + dW(theta) twice, checked by torch.autograd.gradcheck (float64)."""
    B, n_post, n_pre = 2, 3, 4
    sig = make_signals(gen, B, n_post, n_pre, names=pool.compile().needs)
    update = compile_rule(pool)

    def episode(theta):
        W = sig["w"]
        for _ in range(2):
            y = torch.tanh(torch.einsum("bij,bj->bi", W, sig["pre"]))
            W = W + update({**sig, "w": W, "post": y}, theta)
        return (W**2).sum()

    theta = (torch.randn(10, generator=gen, dtype=F64) * 0.1).requires_grad_()
    assert torch.autograd.gradcheck(episode, (theta,))
    (g,) = torch.autograd.grad(episode(theta), theta)
    assert torch.isfinite(g).all() and (g != 0).all()


# ---------------------------------------------------------------------------------------------------------------
# RuleModule


def test_rule_module_parameters_receive_gradients_and_sympy_returns_trained_values(gen):
    m = bio.torch([1e-3, -0.1, 0.2]).double()  # the signals' dtype: Parameters are made in the default dtype
    assert isinstance(m, RuleModule) and m.needs == compile_rule(bio).needs and m.states == ()
    (p,) = list(m.parameters())
    assert p is m.theta and p.shape == (3,)
    sig = make_signals(gen, 2, 3, 4, names=m.needs)
    m(sig).pow(2).sum().backward()
    assert m.theta.grad is not None and torch.isfinite(m.theta.grad).all() and (m.theta.grad != 0).all()
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.5, 0.25, -2.0]))
    assert m.trained_rule() == bio.with_values([0.5, 0.25, -2.0])
    assert m.sympy() == bio.with_values([0.5, 0.25, -2.0]).sympy()
    assert sp.expand(m.sympy() - (-0.5 * err * pre - 0.25 * err * pre_err - 2.0 * post * (pre - wT(post)))) == 0
    assert torch.equal(RuleModule(bio).theta.detach(), torch.zeros(3))


def test_general_rule_module(gen):
    m = GENERAL.torch({"a": 0.5, "b": -1.0}).double()
    sig = make_signals(gen, 2, 3, 4, names=m.needs)
    m(sig).sum().backward()
    assert set(m.constants) == {"a", "b"}
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in m.constants.values())
    with torch.no_grad():
        m.constants["a"].fill_(2.0)
    assert m.sympy() == GENERAL.with_values({"a": 2.0, "b": -1.0}).sympy()


@pytest.mark.parametrize(
    "module",
    ["lang.signals", "lang.rule", "lang.export", "compile.compiler", "lang.pools", "lang.grammar", "train.estimator"],
)
def test_module_docstring_examples_run(module):
    """The tutorials in the module docstrings are doctests (STYLE.md point 10)."""
    import doctest
    import importlib

    mod = importlib.import_module(f"rulesearch.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module == "compile.compiler":
        assert result.attempted > 0 and mod is compile_mod


@pytest.mark.parametrize("with_cots", [False, True])
def test_hand_vjps_equal_autograd(with_cots):
    """Every tape instruction with a hand VJP (layer sums, bilinear forms of the pool) accumulates exactly autograd's
    vector-Jacobian product into the given cotangents (None: zero)."""
    g = torch.Generator().manual_seed(0)
    b, n_post, n_pre = 3, 4, 5
    shapes = {"pre": (b, n_pre), "pre_err": (b, n_pre), "post": (b, n_post), "err": (b, n_post),
              "w": (b, n_post, n_pre)}  # fmt: skip
    signals = {k: torch.rand(s, generator=g, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    comp = compile_rule(pool)._comp
    vals = comp.run({"signals": signals, "params": torch.ones(pool.n_params, dtype=torch.float64)})
    checked = 0
    for k, vjp in enumerate(comp.vjps):
        if vjp is None:
            continue
        args = [vals[a] for a in comp.tape[k][1]]
        dout = torch.rand(b, 1, generator=g, dtype=torch.float64)
        cots = [torch.rand(a.shape, generator=g, dtype=torch.float64) if with_cots else None for a in args]
        want = torch.autograd.grad(vals[k], args, dout.squeeze(-1), retain_graph=True)
        got = vjp(dout, args, cots)
        for w_, c, g_ in zip(want, cots, got):
            torch.testing.assert_close(g_, w_ if c is None else c + w_, rtol=1e-12, atol=0)
        checked += 1
    assert checked == 3  # LayerSum(post), Bilinear(post, w, pre_err), Bilinear(err, w, pre)

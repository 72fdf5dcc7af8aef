"""Recurrent networks at fixed points: solver, implicit error, stability, the dW1/dW3/dW4 rules in the rule language,
batch-mean compiled updates, and training (float64, small N)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rulesearch.compile import compile_rule
from rulesearch.errors import ConfigError, InvalidRuleError, ShapeError, SignalError
from rulesearch.fixedpoint import dW1, dW3, dW4, fixed_point_step, preconditioned, train_fixed_point
from rulesearch.inner.plan import _needs
from rulesearch.lang.export import expr_latex
from rulesearch.lang.pools import pool
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import as_post, as_pre, delta, gain, post, pre, role_of, w, wv
from rulesearch.networks import FixedPointNetwork, solve_fixed_point, stability
from rulesearch.reference.naive import naive_update

D = torch.float64


def _case(seed: int, N: int = 10, B: int = 4, n_in: int = 6, rho: float = 0.5):
    net = FixedPointNetwork(n_in=n_in, n_hidden=N, n_out=3, rho=rho, tol=1e-13, max_iter=400)
    params = net.init_params(seed, D)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, n_in, generator=gen, dtype=D)
    y = torch.randint(0, 3, (B,), generator=gen)
    return net, params, x, y


def _signals(net, params, x, y, names=("pre", "post", "w", "gain", "delta", "err")):
    sol = net.solve(params, x)
    assert bool(sol.converged.all())
    return net.signals(params, params.W, sol.r, y, frozenset(names))


# ---- the solver -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["anderson", "picard", "newton"])
def test_solver_residual_below_tolerance(method):
    net, params, x, _ = _case(0, N=16, rho=0.9)
    sol = solve_fixed_point(params.W, x @ params.W_x.T, tol=1e-10, max_iter=2000, method=method)
    r = sol.r
    res = torch.linalg.vector_norm(r - torch.tanh(r @ params.W.T + x @ params.W_x.T), dim=-1)
    assert bool(sol.converged.all()) and sol.n_failed == 0
    assert float(res.max()) <= 1e-10
    torch.testing.assert_close(res, sol.residual)


def test_solver_flags_non_convergence():
    net, params, x, _ = _case(1, N=12)
    sol = solve_fixed_point(params.W, x @ params.W_x.T, tol=1e-12, max_iter=3, method="picard", damping=0.1)
    assert sol.n_failed == x.shape[0] and not bool(sol.converged.any()) and sol.iterations == 3
    assert bool((sol.residual > 1e-12).all())


def test_anderson_survives_a_degenerate_history():
    """A zero input (fixed point r = 0 from the start: zero residual differences) beside ordinary samples, float32."""
    net, params, x, _ = _case(7, N=16, rho=0.9)
    u = (x @ params.W_x.T).float()
    u[0] = 0
    sol = solve_fixed_point(params.W.float(), u, tol=1e-5, max_iter=300, method="anderson")
    assert bool(sol.converged.all()) and bool((sol.r[0] == 0).all())


def test_paper_simulation_is_damped_picard():
    """Euler steps r <- r + eta(-r + f(W r + u)) for 500 steps (eta = 0.01) are picard(damping=eta, tol=0)."""
    net, params, x, _ = _case(2)
    u = x @ params.W_x.T
    r = torch.zeros_like(u)
    for _ in range(500):
        r = r + 0.01 * (-r + torch.tanh(r @ params.W.T + u))
    sol = solve_fixed_point(params.W, u, tol=0.0, max_iter=500, method="picard", damping=0.01)
    assert sol.iterations == 500
    torch.testing.assert_close(sol.r, r, atol=1e-14, rtol=0)


def test_solver_rejects_bad_input():
    W = torch.zeros(3, 3, dtype=D)
    with pytest.raises(ShapeError, match="square"):
        solve_fixed_point(torch.zeros(3, 4, dtype=D), torch.zeros(2, 3, dtype=D))
    with pytest.raises(ShapeError, match=r"\(B, 3\)"):
        solve_fixed_point(W, torch.zeros(2, 4, dtype=D))
    with pytest.raises(ConfigError, match="solver"):
        solve_fixed_point(W, torch.zeros(2, 3, dtype=D), method="broyden")
    with pytest.raises(ConfigError, match="damping"):
        solve_fixed_point(W, torch.zeros(2, 3, dtype=D), damping=0.0)


# ---- dW1: the implicit gradient ------------------------------------------------------------------------------


def test_dW1_equals_autograd_through_unrolled_fixed_point():
    net, params, x, y = _case(3, N=12, B=5)
    W = params.W.clone().requires_grad_()
    u = x @ params.W_x.T
    r = torch.zeros_like(u)
    for _ in range(300):  # contractive here (rho = 0.5): converged to rounding
        r = torch.tanh(r @ W.T + u)
    assert float(torch.linalg.vector_norm(r - torch.tanh(r @ W.T + u), dim=-1).max().detach()) < 1e-14
    torch.nn.functional.cross_entropy(net.readout(params, r), y).backward()
    sig = _signals(net, params, x, y, compile_rule(dW1).needs)
    dW = compile_rule(dW1).batch_mean(sig, torch.ones(1, dtype=D))
    torch.testing.assert_close(-dW, W.grad, atol=1e-8, rtol=1e-8)


def test_dW1_is_A_transpose_delta_r():
    """Per sample: err r^T = A^T delta r^T with A = (G^-1 - W)^-1."""
    net, params, x, y = _case(4, N=8, B=3)
    sig = _signals(net, params, x, y)
    per = compile_rule(dW1)({k: sig[k] for k in compile_rule(dW1).needs}, torch.ones(1, dtype=D))
    for b in range(3):
        A = torch.linalg.inv(torch.diag(1 / sig["gain"][b]) - params.W)
        torch.testing.assert_close(-per[b], torch.outer(A.T @ sig["delta"][b], sig["pre"][b]))


# ---- dW3 / dW4: the matrix formulas --------------------------------------------------------------------------


def _formula(name, W, g, d, r):
    I, G = torch.eye(len(g), dtype=D), torch.diag(g)
    if name == "dW3":
        return (I - W @ G) @ G @ torch.outer(d, r) @ (I - G @ W).T @ (I - G @ W)
    return (I - W @ G) @ torch.outer(d, r) @ (I - W @ G).T @ (I - W @ G)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), N=st.integers(2, 9), B=st.integers(1, 4))
def test_dW3_dW4_equal_their_matrix_formulas(seed, N, B):
    net, params, x, y = _case(seed, N=N, B=B, rho=1.5)  # beyond contraction: the formulas hold at any state
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(B, N, generator=gen, dtype=D) * 2 - 1
    sig = net.signals(params, params.W, r, y, frozenset({"pre", "post", "w", "gain", "delta"}))
    for rule in (dW3, dW4):
        upd = compile_rule(rule)
        s = {k: sig[k] for k in upd.needs}
        theta = torch.full((1,), 0.3, dtype=D)
        per = upd(s, theta)
        want = torch.stack([_formula(rule.name, params.W, sig["gain"][b], sig["delta"][b], r[b]) for b in range(B)])
        torch.testing.assert_close(per, -0.3 * want)
        torch.testing.assert_close(upd.batch_mean(s, theta), per.mean(0))
        full = {**s, "w": params.W.expand(B, N, N).contiguous()}
        torch.testing.assert_close(naive_update(rule, full, theta), per)


def test_preconditioned_family_contains_the_gradient_and_dW3_is_a_preconditioned_gradient():
    """dW3 = P_L grad P_R with P_L = (G^-1 - W) G^2 (G^-1 - W)^T, P_R = (G^-1 - W)^T G^2 (G^-1 - W)."""
    net, params, x, y = _case(5, N=7, B=1)
    sig = _signals(net, params, x, y)
    g, d, r, W = sig["gain"][0], sig["delta"][0], sig["pre"][0], params.W
    M = torch.diag(1 / g) - W
    G2 = torch.diag(g * g)
    grad = torch.outer(torch.linalg.solve(M.T, d), r)
    one = torch.ones(1, dtype=D)
    dw3 = compile_rule(dW3).batch_mean({k: sig[k] for k in compile_rule(dW3).needs}, one)
    torch.testing.assert_close(-dw3, M @ G2 @ M.T @ grad @ M.T @ G2 @ M)
    plain = preconditioned((), ())  # P_L = P_R = I: the direct term delta r^T
    torch.testing.assert_close(
        compile_rule(plain).batch_mean({k: sig[k] for k in ("delta", "pre")}, one), -torch.outer(d, r)
    )


# ---- the rule language ---------------------------------------------------------------------------------------


def test_reindex_roles_json_latex_and_locality():
    assert role_of(as_pre(gain)) == "pre" and role_of(as_post(pre)) == "post"
    assert as_pre(as_post(pre)) == pre and as_pre(pre) == pre
    assert as_pre(gain * delta) == as_pre(gain) * as_pre(delta)
    with pytest.raises(InvalidRuleError, match="both indices"):
        as_pre(w)
    for rule in (dW1, dW3, dW4):
        back = Rule.from_json(json.loads(json.dumps(rule.to_json())))
        assert back == rule
    assert "g_{j}" in expr_latex(gain * as_pre(gain))
    # (W G delta)_i sends the error forward through W (no W^T of an error): layer-nonlocal, not weight transport
    assert dW3.terms[0].locality == "layer-nonlocal"


def test_bad_factors_and_settings_are_refused():
    with pytest.raises(InvalidRuleError, match="Unknown preconditioner factor 'I-W'"):
        preconditioned(("I-W",), ())
    with pytest.raises(InvalidRuleError, match="Unknown preconditioner factor 'X'"):
        preconditioned((), ("X",))
    with pytest.raises(ConfigError, match="solver"):
        FixedPointNetwork(n_in=3, method="jacobi")
    net, params, x, _ = _case(8)
    with pytest.raises(ShapeError, match=r"x must have shape \(B, 6\)"):
        net.solve(params, x[:, :5])


def test_reindex_needs_a_square_layer():
    rule = Rule((Term("t", post * as_pre(post)),), "t")
    upd = compile_rule(rule)
    with pytest.raises(ShapeError, match="n_post == n_pre"):
        upd({"post": torch.ones(2, 3, dtype=D), "pre": torch.ones(2, 4, dtype=D)}, torch.ones(1, dtype=D))
    out = upd(
        {"post": torch.arange(3.0, dtype=D).expand(2, 3), "pre": torch.ones(2, 3, dtype=D)}, torch.ones(1, dtype=D)
    )
    torch.testing.assert_close(out[0], torch.outer(torch.arange(3.0, dtype=D), torch.arange(3.0, dtype=D)))


def test_feedforward_loop_refuses_recurrent_signals_clearly():
    with pytest.raises(SignalError, match="FixedPointNetwork"):
        _needs(compile_rule(Rule((Term("t", -gain * delta * pre),), "t")), "update of layer 0")
    with pytest.raises(ConfigError, match="as_pre/as_post.*recurrent"):
        _needs(compile_rule(Rule((Term("t", post * as_pre(post)),), "t")), "update of layer 0")


def test_fixed_point_network_refuses_missing_signals():
    net, params, x, y = _case(6)
    rule = Rule((Term("t", -post * wv(pre)),), "t")  # provided: fine
    fixed_point_step(net, params, params.W, x, y, rule, 0.1)
    with pytest.raises(ConfigError, match=r"pre_err.*as_pre\(err\)"):
        fixed_point_step(net, params, params.W, x, y, pool, 0.1)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4))
def test_batch_mean_equals_mean_of_per_sample_updates(seed, B):
    """For the paper's pool (outer products, decay W, layer sums, bilinear forms) with shared weights."""
    gen = torch.Generator().manual_seed(seed)
    n_post, n_pre = 3, 5
    W = torch.randn(n_post, n_pre, generator=gen, dtype=D)
    sig = {
        "pre": torch.randn(B, n_pre, generator=gen, dtype=D),
        "post": torch.randn(B, n_post, generator=gen, dtype=D),
        "err": torch.randn(B, n_post, generator=gen, dtype=D),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=D),
        "w": W.expand(B, n_post, n_pre),
    }
    theta = torch.randn(B, pool.n_params, generator=gen, dtype=D)
    upd = compile_rule(pool)
    torch.testing.assert_close(upd.batch_mean(sig, theta), upd(sig, theta).mean(0))
    per_w = {**sig, "w": W + torch.randn(B, n_post, n_pre, generator=gen, dtype=D)}  # per-sample weights
    torch.testing.assert_close(upd.batch_mean(per_w, theta), upd(per_w, theta).mean(0))


# ---- stability and training ----------------------------------------------------------------------------------


def test_stability_is_max_real_eigenvalue_of_W_and_GW():
    W = torch.tensor([[0.5, -2.0], [2.0, 0.5]], dtype=D)  # eigenvalues 0.5 +- 2i
    g = torch.tensor([[1.0, 1.0], [0.2, 0.2]], dtype=D)
    s = stability(W, g)
    assert s["max_re_W"] == pytest.approx(0.5) and s["radius_W"] == pytest.approx(4.25**0.5)
    assert s["max_re_GW"] == pytest.approx(0.5) and s["unstable"] == 0.0
    s2 = stability(torch.diag(torch.tensor([3.0, 0.1], dtype=D)), g)
    assert s2["max_re_GW"] == pytest.approx(3.0) and s2["unstable"] == 0.5  # only the high-gain sample


def test_dW3_training_reduces_the_loss_and_logs_the_solver():
    torch.manual_seed(0)
    net = FixedPointNetwork(n_in=8, n_hidden=20, n_out=3, tol=1e-8)
    params = net.init_params(0, D)
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 8, generator=gen, dtype=D) * 2

    def batches():
        while True:
            y = torch.randint(0, 3, (32,), generator=gen)
            yield centers[y] + 0.3 * torch.randn(32, 8, generator=gen, dtype=D), y

    it = batches()
    test = next(it)
    W, rows = train_fixed_point(net, params, dW3, 0.5, it, steps=40, eval_data=test, eval_every=20)
    assert rows[-1]["test_loss"] < 0.7 * rows[0]["test_loss"]
    assert rows[-1]["test_max_re_GW"] < 1 and rows[-1]["test_n_failed"] == 0
    assert all(r["n_failed"] == 0 and r["residual"] <= 1e-8 for r in rows if "residual" in r)
    assert not W.equal(params.W)

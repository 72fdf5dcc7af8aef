"""Reward-modulated reservoir learning (rulesearch.reservoir): RLS against the closed-form least-squares solution,
node perturbation's expected update against the reward gradient (Monte Carlo), arm kinematics, determinism per
seed, and the errors bad input raises. Small reservoirs and short trials: the whole file runs in seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import ConfigError, ShapeError, SignalError
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import err, pre
from rulesearch.reservoir import (
    Arm,
    Exploration,
    Reservoir,
    butterfly,
    get_task,
    hoerzer_rmhl,
    modulator_family,
    node_perturbation,
    paper_learning,
    recurrent_input,
    rls_delta,
    rls_gain_,
    rls_init,
    rls_solve,
    run_reservoir,
)

D = torch.float64


def test_rls_equals_closed_form_least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 40, 8, generator=g, dtype=D)
    Y = torch.randn(2, 40, 3, generator=g, dtype=D)
    gamma = 10.0
    W = rls_solve(X, Y, gamma)
    eye = torch.eye(8, dtype=D)
    closed = Y.transpose(1, 2) @ X @ torch.linalg.inv(gamma * eye + X.transpose(1, 2) @ X)
    assert torch.allclose(W, closed, atol=1e-12, rtol=1e-10)
    # and P ends as the inverse regularised correlation matrix
    P = rls_init(2, 8, gamma)
    for t in range(40):
        rls_gain_(P, X[:, t])
    assert torch.allclose(P, torch.linalg.inv(gamma * eye + X.transpose(1, 2) @ X), atol=1e-12)


def test_rls_gate_closed_changes_nothing():
    P = rls_init(3, 5)
    P0 = P.clone()
    r = torch.randn(3, 5, dtype=D)
    k, c = rls_gain_(P, r, torch.zeros(3, dtype=D))
    assert torch.equal(P, P0)
    assert torch.count_nonzero(rls_delta(k, c, torch.ones(3, 2, dtype=D), torch.zeros(3, dtype=D))) == 0
    with pytest.raises(ShapeError, match="expected"):
        rls_gain_(P, torch.randn(3, 4, dtype=D))
    with pytest.raises(ConfigError, match="gamma"):
        rls_init(1, 3, gamma=0.0)


def test_node_perturbation_expectation_is_the_reward_gradient():
    """Linear readout z = W r + xi, xi ~ U(-beta, beta)^d, reward R = -||z - y||^2, baselines at their means
    (Rbar = R(W r), zbar = W r). Then E[(R - Rbar)(z - zbar) r^T] = (beta^2 / 3) dR/dW exactly (the cubic
    noise term has mean zero). M = 200000 samples; tolerance: 3% relative (about 5 standard errors) and cosine
    > 0.999."""
    rule = node_perturbation(modulator="linear")
    upd = compile_rule(rule)
    names = {s.name for s in upd.states}
    g = torch.Generator().manual_seed(1)
    d, n, M, beta = 3, 6, 200_000, 0.1
    W = torch.randn(d, n, generator=g, dtype=D)
    r = torch.randn(n, generator=g, dtype=D)
    y = torch.randn(d, generator=g, dtype=D)
    xi = beta * (2 * torch.rand(M, d, generator=g, dtype=D) - 1)
    z0 = W @ r
    z = z0 + xi
    R = -((z - y) ** 2).sum(-1)
    sig = {"pre": r.expand(M, n), "post": z, "reward": R}
    baselines = {"reward_bar5": -((z0 - y) ** 2).sum().expand(M), "post_trace5": z0.expand(M, d)}
    assert set(baselines) == names
    dW = upd({**sig, **baselines}, torch.ones(1, dtype=D)).mean(0)
    grad = -2 * torch.outer(z0 - y, r)
    expected = beta**2 / 3 * grad
    cos = float((dW * grad).sum() / (dW.norm() * grad.norm()))
    assert cos > 0.999
    assert float((dW - expected).norm() / expected.norm()) < 0.03


def test_power_modulator_update_follows_the_gradient():
    """The published modulator 5 sign(u)|u|^{1/4} is odd and increasing, so the expected update is positively
    aligned with the reward gradient (not exactly parallel: the noise is uniform, not Gaussian); cosine > 0.9."""
    upd = compile_rule(node_perturbation())
    g = torch.Generator().manual_seed(2)
    d, n, M, beta = 2, 5, 100_000, 0.05
    W, r, y = torch.randn(d, n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D), torch.zeros(d, dtype=D)
    z0 = W @ r
    z = z0 + beta * (2 * torch.rand(M, d, generator=g, dtype=D) - 1)
    sig = {"pre": r.expand(M, n), "post": z, "reward": -((z - y) ** 2).sum(-1),
           "reward_bar5": -((z0 - y) ** 2).sum().expand(M), "post_trace5": z0.expand(M, d)}  # fmt: skip
    dW = upd(sig, torch.ones(1, dtype=D)).mean(0)
    grad = -2 * torch.outer(z0 - y, r)
    assert float((dW * grad).sum() / (dW.norm() * grad.norm())) > 0.9


def test_rules_are_toolkit_rules_over_reward_and_traces():
    for rule in (node_perturbation(), node_perturbation(one_sided=True, tau_z=10), hoerzer_rmhl()):
        assert isinstance(rule, Rule) and rule.locality() == ("synapse-local",)
        upd = compile_rule(rule)
        assert upd.needs == frozenset({"pre", "post", "reward"})
        assert {s.role for s in upd.states} == {"global", "post"}
    with pytest.raises(ConfigError, match="modulator"):
        node_perturbation(modulator="cubic")
    with pytest.raises(SignalError, match="does not provide"):
        Exploration(Rule([Term("f0", -err * pre)]))


def test_butterfly_and_arm_kinematics():
    f = butterfly(2001)
    assert f.shape == (2001, 2)
    assert abs(float(f.norm(dim=-1).max()) - 1) < 5e-3  # the scripts divide by 14.4734; max rho is 0.3% larger
    assert torch.allclose(f[0], torch.tensor([10 / 14.4734, 0.0], dtype=D))
    arm = Arm((1.8, 1.2, 0.6))
    z = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=D)
    expected = torch.tensor([[0.0, 1.6], [3.6, -2.0], [0.0, -2 + 1.8 - 1.2 - 0.6]], dtype=D)
    assert torch.allclose(arm.end_effector(z), expected, atol=1e-12)
    task = get_task("arm3")
    zbar = torch.zeros(3, 3, dtype=D)
    cost = task.error(z, arm.end_effector(z), zbar)  # on target: only the joint costs remain
    assert torch.allclose(cost, torch.tensor([0.0, 0.05, 0.05], dtype=D))
    with pytest.raises(ConfigError, match="Unknown motor task"):
        get_task("spiral")


def test_sparse_and_dense_recurrent_input_agree():
    a = Reservoir(n=40, sparse=True).init([0, 1], 2)
    b = Reservoir(n=40, sparse=False).init([0, 1], 2)
    r = torch.randn(2, 40, dtype=D)
    assert torch.allclose(recurrent_input(a.J, r), recurrent_input(b.J, r), atol=1e-13)
    J = b.J[0]
    assert 0.05 < float((J != 0).double().mean()) < 0.15  # p = 0.1
    assert torch.equal(a.x0, b.x0)


@pytest.mark.parametrize("alg", ["supertrex", "force"])
def test_determinism_per_seed(alg):
    kw = dict(n_train=2, n_test=1, trial_steps=100)
    res = Reservoir(n=30)
    L = paper_learning(alg, "butterfly")
    a = run_reservoir(res, "butterfly", L, [3, 5], **kw)
    b = run_reservoir(res, "butterfly", L, [3, 5], **kw)
    c = run_reservoir(res, "butterfly", L, [5], **kw)
    np.testing.assert_array_equal(a.trial_error, b.trial_error)
    np.testing.assert_array_equal(a.deviation, b.deviation)
    np.testing.assert_allclose(a.trial_error[1], c.trial_error[0], rtol=1e-12)  # a row depends on its seed only
    assert not (a.trial_error[0] == a.trial_error[1]).all()


def test_force_and_supertrex_learn_on_a_small_reservoir():
    """Task 1 with N = 60 and short trials: FORCE's training error falls by 40%; RMHL and SUPER-TREX rows (one batch)
    change the exploratory weights, and a closed mastery gate leaves the mastery readout at zero."""
    res = Reservoir(n=60)
    f = run_reservoir(res, "butterfly", paper_learning("force", "butterfly"), [0], n_train=3, n_test=1,
                      trial_steps=1000)  # fmt: skip
    assert f.trial_error[0, 2] < 0.6 * f.trial_error[0, 0]
    s = run_reservoir(res, "butterfly", paper_learning("supertrex", "butterfly"), [0, 0], n_train=2, n_test=1,
                      trial_steps=500, mastery_on=[False, True], dopamine=[1.0, 0.5])  # fmt: skip
    assert (s.w_exp_norm[:, 1] > 0).all() and s.w_mst_norm[0].max() == 0
    assert math.isfinite(s.deviation[0]) and s.deviation[0] == s.deviation_full[0]
    assert s.deviation[1] == s.deviation_mastery[1]


def test_bad_input_raises_clear_errors():
    res = Reservoir(n=20)
    L = paper_learning("supertrex", "butterfly")
    with pytest.raises(ConfigError, match="one per seed"):
        run_reservoir(res, "butterfly", L, [0, 1], dopamine=[1.0], trial_steps=20)
    with pytest.raises(ConfigError, match="seeds"):
        run_reservoir(res, "butterfly", L, [], trial_steps=20)
    with pytest.raises(ConfigError, match="butterfly"):
        paper_learning("force", "arm2")
    with pytest.raises(ConfigError, match="n_test <= n_train"):
        run_reservoir(res, "arm2", paper_learning("supertrex", "arm2"), [0], n_train=2, n_test=3, trial_steps=20)
    with pytest.raises(ConfigError, match="n=1"):
        Reservoir(n=1)


def test_rule_family_in_one_batch_matches_the_single_rules():
    """modulator_family with per-row constants (a, p) reproduces node_perturbation (signed and one-sided, p = 1/4)
    row by row; a general rule without its constants is refused."""
    kw = dict(n_train=1, n_test=1, trial_steps=150)
    res = Reservoir(n=20)
    fam = run_reservoir(res, "arm3", paper_learning("supertrex", "arm3", rule=modulator_family()), [0, 0],
                        rule_constants={"a": [1.0, 0.0], "p": 0.25}, **kw)  # fmt: skip
    for row, one_sided in ((0, False), (1, True)):
        rule = node_perturbation(one_sided=one_sided)
        single = run_reservoir(res, "arm3", paper_learning("supertrex", "arm3", rule=rule), [0], **kw)
        np.testing.assert_allclose(fam.trial_error[row], single.trial_error[0], rtol=1e-10)
    with pytest.raises(ConfigError, match="needs rule_constants"):
        run_reservoir(res, "arm3", paper_learning("supertrex", "arm3", rule=modulator_family()), [0], **kw)


@pytest.mark.parametrize("alg", ["supertrex", "rmhl"])
@pytest.mark.parametrize("task", ["butterfly", "arm2", "arm3"])
def test_replication_fixes_change_exactly_their_factor(alg, task):
    """replication_fixes=True (default off: the authors' settings) changes only the Task 3 exploratory learning rate
    (times 0.5/n_segs instead of 0.5, n_segs = 3) and Task 2's mastery gate threshold (1.5e-3 -> 1.5e-2)."""
    from dataclasses import replace

    base = paper_learning(alg, task)
    assert paper_learning(alg, task, rule=base.exploration.rule, replication_fixes=False) == base
    fixed = paper_learning(alg, task, rule=base.exploration.rule, replication_fixes=True)
    expected = base
    if task == "arm3":
        assert base.exploration.lr == pytest.approx(5e-4 * 0.5)
        expected = replace(base, exploration=replace(base.exploration, lr=5e-4 * 0.5 / 3))
    if task == "arm2" and alg == "supertrex":
        assert base.mastery.threshold == 1.5e-3
        expected = replace(base, mastery=replace(base.mastery, threshold=1.5e-2))
    assert fixed == expected


def test_replication_fixes_on_task3_equal_a_third_of_the_exploratory_update():
    """A run with the fixes equals the original settings with the exploratory update scaled by 1/3 (dopamine), the
    way experiments/reservoir_motor.py runs both in one batch; and it differs from the original."""
    kw = dict(n_train=2, n_test=1, trial_steps=200)
    res = Reservoir(n=20)
    base = paper_learning("supertrex", "arm3")
    fixed = run_reservoir(res, "arm3", paper_learning("supertrex", "arm3", replication_fixes=True), [0], **kw)
    scaled = run_reservoir(res, "arm3", base, [0, 0], dopamine=[1 / 3, 1.0], **kw)
    np.testing.assert_allclose(fixed.trial_error[0], scaled.trial_error[0], rtol=1e-9)
    np.testing.assert_allclose(fixed.w_exp_norm[0], scaled.w_exp_norm[0], rtol=1e-9)
    assert not np.allclose(fixed.w_exp_norm[0], scaled.w_exp_norm[1], rtol=1e-3)


def _reference_training(reservoir, learning, seeds, n_train, trial_steps, mastery_on, dtype):
    """The training trials of run_reservoir on the butterfly task written plainly, as the module docstring states
    them (torch's sparse product, the checked rule call, a fresh tensor per operation, RLS at every update): the
    per-trial errors and weight norms."""
    from rulesearch.batched import matvec
    from rulesearch.reservoir import NoiseStream, reservoir_step

    task, B, N = get_task("butterfly"), len(seeds), reservoir.n
    ex, ms = learning.exploration, learning.mastery
    params = reservoir.init(seeds, 2, dtype)
    noise = NoiseStream(seeds, N + 2, dtype)
    f = butterfly(trial_steps, dtype)
    update = compile_rule(ex.rule)
    theta = torch.full((B, ex.rule.n_params), ex.lr, dtype=torch.float64).to(dtype)
    P = rls_init(B, N, ms.gamma, dtype)
    gate_on = torch.tensor(mastery_on, dtype=torch.float64).to(dtype)
    x = params.x0.clone()
    r, z = torch.tanh(x), x.new_zeros(B, 2)
    W_exp, W_mst, zbar = x.new_zeros(B, 2, N), x.new_zeros(B, 2, N), x.new_zeros(B, 2)
    ebar, beta, states = None, x.new_full((B,), ex.beta0), {}
    kz, ke = 1 / learning.zbar_tau, 1 / learning.ebar_tau
    out = {k: np.zeros((B, n_train)) for k in ("trial_error", "trial_error_mastery", "w_exp_norm", "w_mst_norm")}
    for trial in range(n_train):
        e_sum, em_sum = x.new_zeros(B), x.new_zeros(B)
        for t in range(trial_steps):
            x = reservoir_step(x, r, z, params, reservoir.leak)
            xi = noise.next()
            r = torch.tanh(x) + reservoir.alpha * xi[:, :N]
            z_mst = matvec(W_mst, r)
            z_exp = matvec(W_exp, r) + beta.unsqueeze(-1) * xi[:, N:]
            z = z_exp + z_mst
            zbar = zbar + kz * (z_exp - zbar)
            e = task.error(z, f[t], zbar)
            ebar = e if ebar is None else ebar + ke * (e - ebar)
            e_sum = e_sum + e
            em_sum = em_sum + task.error(z_mst, f[t], zbar)
            beta = ex.beta_gain * (10 * ebar).clamp_min(0) ** ex.beta_power
            sig = {"pre": r, "post": z_exp, "reward": -e}
            for spec in update.states:
                prev = states.get(spec.name)
                states[spec.name] = sig[spec.name] = spec.step(spec.init(sig) if prev is None else prev, sig)
            W_exp = W_exp + update(sig, theta)
            if (trial * trial_steps + t + 1) % ms.every == 0:
                gate = (0.5 - 0.5 * torch.tanh(ms.sharpness * (ebar - ms.threshold))) * gate_on
                k, c = rls_gain_(P, r, gate)
                W_mst = W_mst + ms.scale * rls_delta(k, c, -z_exp, gate)
        out["trial_error"][:, trial] = (e_sum / trial_steps).numpy()
        out["trial_error_mastery"][:, trial] = (em_sum / trial_steps).numpy()
        out["w_exp_norm"][:, trial] = torch.linalg.matrix_norm(W_exp).numpy()
        out["w_mst_norm"][:, trial] = torch.linalg.matrix_norm(W_mst).numpy()
    return out


def _gate_open(learning):
    from dataclasses import replace

    return replace(learning, mastery=replace(learning.mastery, threshold=1e3, scale=0.05))


@pytest.mark.parametrize("gate, dtype", [("shut", D), ("open", D), ("open", torch.float32)])
def test_run_reservoir_is_bitwise_the_straightforward_loop(gate, dtype, monkeypatch):
    """The optimised training loop (hoisted views, in-place private values, SciPy's CSR kernel, noise scaled per
    chunk, the mastery readout skipped while W_mst = 0, the bound rule's shortcuts) gives bitwise the values of the
    plain loop above, with the mastery gate shut (the paper's threshold: W_mst stays 0) and held open (RLS every 10
    steps, one row gated off)."""
    import rulesearch.reservoir.loop as loop

    monkeypatch.setattr(loop, "_STACK_EVERY", 64)  # the per-step values stacked in several parts
    res = Reservoir(n=40, sparse=True)
    learning = paper_learning("supertrex", "butterfly")
    learning = _gate_open(learning) if gate == "open" else learning
    kw = dict(n_train=2, trial_steps=150)
    got = run_reservoir(res, "butterfly", learning, [0, 1], n_test=0, mastery_on=[True, False], dtype=dtype, **kw)
    want = _reference_training(res, learning, [0, 1], mastery_on=[True, False], dtype=dtype, **kw)
    for name, value in want.items():
        np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
    assert (got.w_mst_norm[0] > 0).all() == (gate == "open") and (got.w_mst_norm[1] == 0).all()


@pytest.mark.parametrize("dtype", [D, torch.float32])
@pytest.mark.parametrize("B", [1, 3])
def test_recurrent_matvec_is_bitwise_the_sparse_product(B, dtype):
    from rulesearch.reservoir import recurrent_matvec

    p = Reservoir(n=200, sparse=True).init(list(range(B)), 2, dtype)
    jr = recurrent_matvec(p.J)
    g = torch.Generator().manual_seed(B)
    rs = [torch.tanh(3 * torch.randn(B, 200, generator=g, dtype=torch.float64)).to(dtype) for _ in range(3)]
    outs = [jr(r) for r in rs[:2]]  # two buffers in turn: both results valid until the third call
    for r, y in zip(rs, outs):
        assert y.dtype == dtype and y.shape == (B, 200)
        assert torch.equal(y, recurrent_input(p.J, r))
    assert torch.equal(jr(rs[2]), recurrent_input(p.J, rs[2]))
    dense = Reservoir(n=30, sparse=False).init(list(range(B)), 2, dtype)
    assert torch.equal(recurrent_matvec(dense.J)(rs[0][:, :30]), recurrent_input(dense.J, rs[0][:, :30]))


def test_noise_split_equals_the_scaled_draws():
    from rulesearch.reservoir import NoiseStream

    a, b = NoiseStream([0, 4], 12, chunk=5), NoiseStream([0, 4], 12, chunk=5)
    for _ in range(12):  # across chunk boundaries
        xi = a.next()
        xa, xb = b.next_split(10, 0.025)
        assert torch.equal(xa, 0.025 * xi[:, :10]) and torch.equal(xb, xi[:, 10:])


def test_the_reservoir_rule_takes_the_bound_shortcuts():
    """The paper's exploratory rule is one global factor times outer products: its bound call takes the shortcuts
    (tests/test_compile.py checks the shortcuts bitwise against the checked call)."""
    update = compile_rule(node_perturbation(one_sided=True))
    sig = {"pre": torch.randn(2, 7, dtype=D), "post": torch.randn(2, 2, dtype=D), "reward": torch.randn(2, dtype=D)}
    bound = update.bind(sig, torch.full((2, 1), 5e-4, dtype=D))
    assert bound._g1 is not None and bound._eye and bound._outer is not None


def test_symmetric_rls_matches_rls_to_rounding():
    """SymmetricRLS (one triangle, BLAS symv / syr) against rls_gain_: the same k, c and P to rounding (1e-12
    relative) over 200 updates with partial and zero gates; its P is exactly symmetric; a zero gate leaves P."""
    from rulesearch.reservoir import SymmetricRLS

    g = torch.Generator().manual_seed(0)
    B, N = 2, 30
    sym, P = SymmetricRLS(B, N), rls_init(B, N)
    for t in range(200):
        r = torch.randn(B, N, generator=g, dtype=D)
        gate = torch.tensor([1.0, 0.0 if t % 3 == 0 else 0.7], dtype=D)
        before = sym.matrix()
        k1, c1 = rls_gain_(P, r, gate)
        k2, c2 = sym.gain_(r, gate)
        assert torch.allclose(k1, k2, rtol=1e-12, atol=1e-15) and torch.allclose(c1, c2, rtol=1e-12)
        if t % 3 == 0:
            assert torch.equal(sym.matrix()[1], before[1])
    M = sym.matrix()
    assert torch.equal(M, M.transpose(1, 2))
    assert torch.allclose(M, P, rtol=1e-12, atol=1e-15)
    X = torch.randn(1, 40, 8, generator=g, dtype=D)
    one = SymmetricRLS(1, 8, gamma=10.0)
    for t in range(40):
        one.gain_(X[:, t])
    closed = torch.linalg.inv(10.0 * torch.eye(8, dtype=D) + X[0].T @ X[0])
    assert torch.allclose(one.matrix()[0], closed, atol=1e-12)
    with pytest.raises(ShapeError, match="expected"):
        one.gain_(torch.randn(2, 8, dtype=D))
    with pytest.raises(ConfigError, match="gamma"):
        SymmetricRLS(1, 3, gamma=0.0)


@pytest.mark.parametrize("alg", ["supertrex", "force"])
def test_symmetric_rls_run_stays_close_to_the_default(alg):
    """symmetric_rls=True rounds the RLS updates differently; the chaotic reservoir amplifies that, but over a short
    run (N = 60, 2 trials of 300 steps, RLS every 10 steps, float64) the per-trial errors and weight norms stay
    within 1e-6 relative of the default's (they differ by less than 1e-14 here)."""
    learning = paper_learning(alg, "butterfly")
    learning = _gate_open(learning) if alg == "supertrex" else learning
    kw = dict(n_train=2, n_test=1, trial_steps=300)
    res = Reservoir(n=60, sparse=True)
    a = run_reservoir(res, "butterfly", learning, [0, 1], **kw)
    b = run_reservoir(res, "butterfly", learning, [0, 1], symmetric_rls=True, **kw)
    for name in ("trial_error", "trial_error_mastery", "w_exp_norm", "w_mst_norm", "deviation"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-6, err_msg=name)
    assert (a.w_mst_norm > 0).all()


@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_trial_end_recursions_equal_the_per_step_updates(dtype):
    """The running values formed at a trial's end from its step values (the loop's _running_mse, _trace_rows,
    _sequential_sum) equal bitwise the per-step tensor updates they replace."""
    from rulesearch.reservoir.loop import _running_mse, _sequential_sum, _trace_rows

    g = torch.Generator().manual_seed(3)
    E = torch.rand(300, 3, generator=g, dtype=torch.float64).to(dtype)
    Z = torch.randn(300, 3, 2, generator=g, dtype=torch.float64).to(dtype)
    m, total, zbar = E[0].clone(), torch.zeros(3, dtype=dtype), torch.randn(3, 2, generator=g, dtype=dtype)
    start = zbar.clone()
    for t in range(300):
        if t:
            m = 0.9998 * m + 0.0002 * E[t]
        total += E[t]
        zbar = zbar + 0.2 * (Z[t] - zbar)
    first = _running_mse(None, E[:100].numpy())
    assert torch.equal(_running_mse(first, E[100:].numpy()), m)
    assert torch.equal(_sequential_sum(E.numpy()), total)
    assert torch.equal(_trace_rows(start, Z.numpy(), 0.2), zbar)

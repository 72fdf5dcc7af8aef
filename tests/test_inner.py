"""Tests of rulesearch.inner: the online inner loop against autograd, batching, meta-gradients, protocol."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import ConfigError, DivergenceError, ShapeError, SignalError
from rulesearch.inner import (
    F0,
    InnerResult,
    baselines,
    f0,
    kolen_pollack,
    run_baseline,
    run_episodes,
)
from rulesearch.lang.pools import bio
from rulesearch.networks.feedforward import FEEDBACK_MODES, Network, alignment_angles, init_params
from rulesearch.tasks.data import load_dataset
from rulesearch.tasks.episodes import TaskSampler

F64 = torch.float64
SMALL = (6, 5, 4, 3)


# ---- tiny update objects implementing the protocol ---------------------------------------------------------


class Trace:
    """A pre-synaptic trace xbar <- decay * xbar + (1 - decay) * pre (a derived, stateful signal)."""

    role = "pre"

    def __init__(self, name="xbar", decay=0.5):
        self.name, self.decay = name, decay

    def init(self, s):
        return torch.zeros_like(s["pre"])

    def step(self, prev, s):
        return self.decay * prev + (1 - self.decay) * s["pre"]


class TraceRule:
    """dW = -p0 err pre^T - p1 err xbar^T with params p = (p0, p1)."""

    needs = frozenset({"pre", "err"})
    states = (Trace(),)

    def __call__(self, s, p):
        err = s["err"]
        return -(p[0] * err)[:, :, None] * s["pre"][:, None, :] - (p[1] * err)[:, :, None] * s["xbar"][:, None, :]


class EHebb:
    """dW = -theta err pre_err^T (needs e_{l-1})."""

    needs = frozenset({"err", "pre_err"})

    def __call__(self, s, theta):
        return -theta * s["err"][:, :, None] * s["pre_err"][:, None, :]


class FbRule:
    """dW = -theta fb (reads the feedback matrix)."""

    needs = frozenset({"fb"})

    def __call__(self, s, theta):
        return -theta * s["fb"]


class Zero:
    needs = frozenset({"w"})

    def __call__(self, s, theta):
        return torch.zeros_like(s["w"])


class Recorder:
    """An observer that records copies of the signals and dW, and whether autograd was on."""

    def __init__(self, needs=()):
        self.needs = frozenset(needs)
        self.calls = []

    def __call__(self, step, layer, signals, dw):
        self.calls.append((step, layer, dict(signals), dw, torch.is_grad_enabled()))

    def at(self, step, layer):
        return next(c for c in self.calls if c[0] == step and c[1] == layer)


def make_batch(gen, b=3, n=10, nq=8, sizes=SMALL, regression=False):
    x = 0.5 * torch.rand(b, n, sizes[0], generator=gen, dtype=F64)
    xq = 0.5 * torch.rand(b, nq, sizes[0], generator=gen, dtype=F64)
    if regression:
        y = torch.randn(b, n, sizes[-1], generator=gen, dtype=F64)
        yq = torch.randn(b, nq, sizes[-1], generator=gen, dtype=F64)
    else:
        y = torch.randint(sizes[-1], (b, n), generator=gen)
        yq = torch.randint(sizes[-1], (b, nq), generator=gen)
    return SimpleNamespace(x_train=x, y_train=y, x_query=xq, y_query=yq)


def sub_batch(batch, j):
    return SimpleNamespace(**{k: v[j : j + 1] for k, v in vars(batch).items()})


def _act(net, z):
    return F.softplus(z, beta=net.beta)


def _autograd_grads(net, weights, x, y):
    """Per-sample gradients of the loss w.r.t. every W (episodes batched by summing independent losses)."""
    leaves = [w.detach().requires_grad_() for w in weights]
    h = x
    for i, w in enumerate(leaves):
        z = torch.einsum("bij,bj->bi", w, h)
        h = _act(net, z) if i < len(leaves) - 1 else z
    if net.loss == "ce":
        loss = F.cross_entropy(h, y, reduction="sum")
    else:
        target = y if y.is_floating_point() else F.one_hot(y, net.n_out).to(h.dtype)
        loss = 0.5 * ((h - target) ** 2).sum()
    return torch.autograd.grad(loss, leaves)


# ---- bp + f0 is online SGD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_f0_bp_first_step_equals_autograd(gen, loss):
    net = Network(sizes=SMALL, feedback="bp", loss=loss)
    batch = make_batch(gen)
    lr = 0.3
    rec = Recorder()
    res = run_episodes(net, batch, f0, torch.tensor(lr, dtype=F64), seed=5, observe=rec)
    w0, _ = init_params(net, 5, 0, range(3), dtype=F64)
    grads = _autograd_grads(net, w0, batch.x_train[:, 0], batch.y_train[:, 0])
    for layer in range(3):
        dw = rec.at(0, layer)[3]
        torch.testing.assert_close(dw, -lr * grads[layer], rtol=1e-10, atol=1e-15)
    assert isinstance(res, InnerResult) and res.loss.shape == (3,)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_f0_bp_trajectory_equals_autograd_sgd(gen, loss):
    net = Network(sizes=SMALL, feedback="bp", loss=loss)
    batch = make_batch(gen, n=12, regression=(loss == "mse"))
    lr = 0.2
    res = run_episodes(net, batch, f0, lr, seed=1)
    ws, _ = init_params(net, 1, 0, range(3), dtype=F64)
    for s in range(12):
        grads = _autograd_grads(net, ws, batch.x_train[:, s], batch.y_train[:, s])
        ws = [w - lr * g for w, g in zip(ws, grads)]
    for got, want in zip(res.weights, ws):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    if loss == "mse":
        assert torch.isnan(res.accuracy).all()


# ---- batching ----------------------------------------------------------------------------------------------


# a compiled rule on the fast adjoint path under every mode that has one (plastic feedback has none)
_BATCHED_CASES = [(m, "protocol") for m in FEEDBACK_MODES] + [(m, "compiled-adjoint") for m in FEEDBACK_MODES[:4]]


@pytest.mark.parametrize(("mode", "kind"), _BATCHED_CASES, ids=[f"{m}-{k}" for m, k in _BATCHED_CASES])
def test_batched_equals_separate(gen, mode, kind):
    """B episodes in one call equal B single-episode calls: values, curves, weights and (compiled rule on the
    fast adjoint path) the meta-gradient."""
    net = Network(sizes=SMALL, feedback=mode)
    batch = make_batch(gen)
    ks = [3, 0, 7]
    kw = {"feedback_update": kolen_pollack, "feedback_params": torch.tensor([0.1, 0.01], dtype=F64)}
    kw = kw if mode == "plastic" else {}
    if kind == "compiled-adjoint":  # bio: F0, F2 (eHebb), F9 (Oja)
        update, params = compile_rule(bio), torch.tensor([0.2, -0.05, 0.05], dtype=F64, requires_grad=True)
        kw = {"method": "adjoint"}
    else:
        update = EHebb() if mode == "dfa" else TraceRule()
        params = 0.1 if mode == "dfa" else torch.tensor([0.2, 0.1], dtype=F64)
    res = run_episodes(net, batch, update, params, seed=11, t=4, ks=ks, curves=True, **kw)
    grads = []
    for j, k in enumerate(ks):
        one = run_episodes(net, sub_batch(batch, j), update, params, seed=11, t=4, ks=[k], curves=True, **kw)
        if kind == "compiled-adjoint":
            grads.append(torch.autograd.grad(one.loss.sum(), params)[0])
        for field in (
            "loss",
            "accuracy",
            "angles",
            "angles_per_sample",
            "ew",
            "train_loss",
            "train_accuracy",
        ):
            torch.testing.assert_close(getattr(res, field)[j : j + 1], getattr(one, field), rtol=1e-10, atol=1e-12)
        for a, b in zip(res.weights + res.feedback, one.weights + one.feedback):
            torch.testing.assert_close(a[j : j + 1], b, rtol=1e-10, atol=1e-14)
    if kind == "compiled-adjoint":
        (g,) = torch.autograd.grad(res.loss.sum(), params)
        assert g.shape == (3,) and bool(g.abs().sum() > 0)
        torch.testing.assert_close(g, sum(grads), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", FEEDBACK_MODES)
def test_angles_equal_alignment_angles_on_final_weights(gen, mode):
    net = Network(sizes=SMALL, feedback=mode)
    batch = make_batch(gen)
    kw = {"feedback_update": kolen_pollack, "feedback_params": torch.tensor([0.1, 0.01], dtype=F64)}
    res = run_episodes(net, batch, f0, 0.3, seed=2, **(kw if mode == "plastic" else {}))
    angles, per_sample = alignment_angles(net, res.weights, res.feedback, batch.x_query, batch.y_query)
    assert res.angles.shape == res.angles_per_sample.shape == (3, len(SMALL) - 2)
    torch.testing.assert_close(res.angles, angles, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(res.angles_per_sample, per_sample, rtol=1e-12, atol=1e-10)


def test_fa_f0_reduces_lowrank_loss():
    """Low-rank regression Y ~ Z W (rank 2, inner width 4 >= rank): online f0 under fa lowers the query MSE."""
    ds = load_dataset("lowrank", n_in=8, n_out=6, rank=2, n_samples=400, seed=0)
    batch = TaskSampler(ds, M=2, K=50, Q=10).sample(0, 0, range(4)).to(dtype=F64)
    net = Network(sizes=(8, 4, 6), feedback="fa", loss="mse", activation="linear")
    before = run_baseline(net, batch, 0.0).loss
    after = run_baseline(net, batch, 0.03).loss
    assert before.shape == after.shape == (4,)
    assert (after < 0.5 * before).all(), (before, after)


def test_per_episode_params_equal_separate_runs(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen)
    lrs = torch.tensor([0.05, 0.2, 0.4], dtype=F64)
    res = run_episodes(net, batch, f0, lrs, seed=2)
    for j in range(3):
        one = run_episodes(net, sub_batch(batch, j), f0, lrs[j], seed=2, ks=[j])
        torch.testing.assert_close(res.loss[j : j + 1], one.loss, rtol=1e-10, atol=0)


# ---- meta-gradients ----------------------------------------------------------------------------------------


def _fd_check(fn, theta, h=1e-6, rtol=1e-6):
    theta = theta.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(theta), theta)
    assert torch.isfinite(grad).all() and (grad != 0).all()
    for i in range(theta.numel()):
        e = torch.zeros_like(theta).view(-1)
        e[i] = h
        e = e.view_as(theta)
        with torch.no_grad():
            fd = (fn(theta + e) - fn(theta - e)) / (2 * h)
        torch.testing.assert_close(grad.view(-1)[i], fd, rtol=rtol, atol=1e-10)


def test_meta_gradient_matches_finite_differences_f0(gen):
    net = Network(sizes=(5, 4, 3), feedback="fa")
    batch = make_batch(gen, b=2, n=6, sizes=(5, 4, 3))
    _fd_check(lambda th: run_episodes(net, batch, f0, th, seed=0).loss.sum(), torch.tensor(0.5, dtype=F64))


def test_meta_gradient_matches_finite_differences_stateful(gen):
    net = Network(sizes=(5, 4, 3), feedback="fa")
    batch = make_batch(gen, b=2, n=6, sizes=(5, 4, 3))
    _fd_check(
        lambda th: run_episodes(net, batch, TraceRule(), th, seed=0).loss.sum(),
        torch.tensor([0.4, 0.3], dtype=F64),
    )


def test_meta_gradient_plastic_feedback(gen):
    net = Network(sizes=(5, 4, 3), feedback="plastic")
    batch = make_batch(gen, b=2, n=6, sizes=(5, 4, 3))

    def fn(p):
        return run_episodes(net, batch, f0, 0.5, seed=0, feedback_update=kolen_pollack, feedback_params=p).loss.sum()

    _fd_check(fn, torch.tensor([0.3, 0.05], dtype=F64))


def test_meta_gradient_per_layer_params(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen, b=2, n=5)
    thetas = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.3, 0.2, 0.1)]
    res = run_episodes(net, batch, [f0, EHebb(), f0], thetas, seed=0)
    grads = torch.autograd.grad(res.loss.sum(), thetas)
    assert all(torch.isfinite(g) and g != 0 for g in grads)


# ---- feedback modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", FEEDBACK_MODES)
def test_every_mode_runs(gen, mode):
    net = Network(sizes=SMALL, feedback=mode)
    kw = {"feedback_update": kolen_pollack, "feedback_params": torch.tensor([0.1, 0.0])} if mode == "plastic" else {}
    res = run_episodes(net, make_batch(gen), f0, 0.1, seed=0, **kw)
    assert res.loss.shape == res.accuracy.shape == (3,)
    assert res.angles.shape == res.angles_per_sample.shape == (3, 2)
    assert res.ew.shape == (3, 3)
    assert torch.isfinite(res.loss).all() and not res.diverged.any()
    if mode == "bp":
        assert res.angles.abs().max() < 1e-5


def test_dfa_with_fb_rule_raises(gen):
    net = Network(sizes=SMALL, feedback="dfa")
    with pytest.raises(SignalError, match="feedback mode 'dfa'.*Use feedback='fa'"):
        run_episodes(net, make_batch(gen), FbRule(), 0.1, seed=0)
    with pytest.raises(SignalError, match="'dfa'"):
        run_episodes(net, make_batch(gen), f0, 0.1, seed=0, observe=Recorder(needs={"fb"}))


def test_sign_mode_recomputes_from_current_weights(gen):
    net = Network(sizes=SMALL, feedback="sign")
    rec = Recorder(needs={"w", "fb"})
    run_episodes(net, make_batch(gen, n=4), f0, 0.5, seed=0, observe=rec)
    changed = False
    for step in range(4):
        for layer in range(3):
            s = rec.at(step, layer)[2]
            torch.testing.assert_close(s["fb"], torch.sign(s["w"]) * net.feedback_bounds[layer])
            if step > 0:
                changed |= not torch.equal(s["w"], rec.at(0, layer)[2]["w"])
    assert changed


def test_plastic_mode_updates_feedback(gen):
    net = Network(sizes=SMALL, feedback="plastic")
    rec = Recorder(needs={"fb"})
    p = torch.tensor([0.1, 0.05], dtype=F64)
    res = run_episodes(
        net,
        make_batch(gen, n=5),
        f0,
        0.1,
        seed=0,
        observe=rec,
        feedback_update=kolen_pollack,
        feedback_params=p,
    )
    _, fb0 = init_params(net, 0, 0, range(3), dtype=F64)
    for layer in range(3):
        s = rec.at(0, layer)[2]
        torch.testing.assert_close(s["fb"], fb0[layer])
        want = -0.1 * s["err"][:, :, None] * s["pre"][:, None, :] - 0.05 * s["fb"]
        torch.testing.assert_close(s["dfb"], want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(rec.at(1, layer)[2]["fb"], fb0[layer] + want, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(res.feedback[layer], fb0[layer])
    # the backward pass uses the plastic matrix
    s1, s0 = rec.at(0, 1)[2], rec.at(0, 0)[2]
    e1 = torch.einsum("bi,bij->bj", s1["err"], s1["fb"]) * (1 - torch.exp(-10 * s1["pre"]))
    torch.testing.assert_close(s0["err"], e1, rtol=1e-12, atol=1e-15)


def test_plastic_needs_feedback_update_and_others_refuse_it(gen):
    with pytest.raises(ConfigError, match="feedback_update=kolen_pollack"):
        run_episodes(Network(sizes=SMALL, feedback="plastic"), make_batch(gen), f0, 0.1, seed=0)
    with pytest.raises(ConfigError, match="only used with Network\\(feedback='plastic'\\)"):
        run_episodes(
            Network(sizes=SMALL),
            make_batch(gen),
            f0,
            0.1,
            seed=0,
            feedback_update=kolen_pollack,
            feedback_params=torch.tensor([0.1, 0.0]),
        )


# ---- signals, states, observer -----------------------------------------------------------------------------


def test_stateful_signal_carried_across_steps(gen):
    net = Network(sizes=SMALL, feedback="fa")
    rec = Recorder()
    res = run_episodes(net, make_batch(gen, n=5), TraceRule(), torch.tensor([0.1, 0.1], dtype=F64), seed=0, observe=rec)
    for layer in range(3):
        trace = torch.zeros_like(rec.at(0, layer)[2]["pre"])
        for step in range(5):
            s = rec.at(step, layer)[2]
            trace = 0.5 * trace + 0.5 * s["pre"]
            torch.testing.assert_close(s["xbar"], trace, rtol=1e-12, atol=0)
        torch.testing.assert_close(res.states[layer]["xbar"], trace, rtol=1e-12, atol=0)


def test_observe_called_per_step_and_layer_without_grad(gen):
    net = Network(sizes=SMALL, feedback="fa")
    rec = Recorder()
    theta = torch.tensor(0.1, dtype=F64, requires_grad=True)
    run_episodes(net, make_batch(gen, n=7), f0, theta, seed=0, observe=rec)
    assert len(rec.calls) == 3 * 7
    assert [(c[0], c[1]) for c in rec.calls] == [(s, i) for s in range(7) for i in range(3)]
    for _, _, sig, dw, grad_on in rec.calls:
        assert not grad_on and not dw.requires_grad
        assert all(not v.requires_grad for v in sig.values())


def test_only_needed_signals_are_computed(gen):
    net = Network(sizes=SMALL, feedback="fa")
    rec = Recorder()
    run_episodes(net, make_batch(gen, n=2), f0, 0.1, seed=0, observe=rec)
    assert set(rec.at(0, 0)[2]) == {"pre", "err"}
    # e_0 appears only when some update reads pre_err; then it follows the paper's formula
    rec = Recorder(needs={"pre", "fb"})
    _, fb = init_params(net, 0, 0, range(3), dtype=F64)
    run_episodes(net, make_batch(gen, n=2), EHebb(), 0.1, seed=0, observe=rec)
    s = rec.at(0, 0)[2]
    e0 = torch.einsum("bi,bij->bj", s["err"], fb[0]) * (1 - torch.exp(-10 * s["pre"]))
    torch.testing.assert_close(s["pre_err"], e0, rtol=1e-12, atol=1e-15)


def test_undeclared_signal_raises(gen):
    class Liar:
        needs = frozenset({"pre", "err"})

        def __call__(self, s, theta):
            return -theta * s["post"][:, :, None] * s["pre"][:, None, :]

    with pytest.raises(SignalError, match="add 'post' to the `needs`"):
        run_episodes(Network(sizes=SMALL), make_batch(gen), Liar(), 0.1, seed=0)


def test_global_signals_reward_loss_mod(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen, n=3)
    rec = Recorder(needs={"reward", "loss", "mod", "post"})
    res = run_episodes(net, batch, f0, 0.0, seed=0, observe=rec, curves=True)
    for step in range(3):
        s = rec.at(step, 2)[2]
        correct = (s["post"].argmax(-1) == batch.y_train[:, step]).to(F64)
        torch.testing.assert_close(s["reward"], correct)
        torch.testing.assert_close(s["mod"], correct)
        torch.testing.assert_close(s["loss"], -torch.log(s["post"][torch.arange(3), batch.y_train[:, step]]))
        torch.testing.assert_close(res.train_loss[:, step], s["loss"])
        torch.testing.assert_close(res.train_accuracy[:, step], correct)
    assert res.train_loss.shape == (3, 3)
    rec = Recorder(needs={"reward", "loss", "mod"})
    run_episodes(net, batch, f0, 0.0, seed=0, observe=rec, reward="neg_loss", modulator=lambda t, r, lo: 2 * r + t)
    s = rec.at(1, 0)[2]
    torch.testing.assert_close(s["reward"], -s["loss"])
    torch.testing.assert_close(s["mod"], 2 * s["reward"] + 1)


def test_per_layer_updates(gen):
    net = Network(sizes=SMALL, feedback="fa")
    res = run_episodes(net, make_batch(gen), [f0, Zero(), f0], [0.1, 0.0, 0.1], seed=0)
    w0, _ = init_params(net, 0, 0, range(3), dtype=F64)
    assert torch.equal(res.weights[1], w0[1])
    assert not torch.equal(res.weights[0], w0[0])


# ---- divergence --------------------------------------------------------------------------------------------


def test_divergence_detected_and_reported(gen):
    net = Network(sizes=SMALL, feedback="bp")
    batch = make_batch(gen, n=30)
    res = run_episodes(net, batch, f0, 1e5, seed=0, check_every=10, raise_on_divergence=False)
    assert res.diverged.all()
    assert ((res.diverged_step == 9) | (res.diverged_step == 19) | (res.diverged_step == 29)).all()
    assert ((res.diverged_layer >= 0) & (res.diverged_layer < 3)).all()
    ok = run_episodes(net, batch, f0, 0.01, seed=0)
    assert not ok.diverged.any() and (ok.diverged_step == -1).all() and (ok.diverged_layer == -1).all()
    with pytest.raises(DivergenceError, match=r"Episode 0 \(k = 0\) diverged by step 0, layer \d"):
        run_episodes(net, batch, f0, 1e5, seed=0, check_every=1)  # standalone use raises by default


def test_divergence_bound_and_last_step(gen):
    net = Network(sizes=SMALL, feedback="fa")
    res = run_episodes(
        net, make_batch(gen, n=7), f0, 0.1, seed=0, divergence_bound=0.01, check_every=25, raise_on_divergence=False
    )
    assert res.diverged.all() and (res.diverged_step == 6).all() and (res.diverged_layer == 0).all()


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_inputs(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen)

    def replaced(**kw):
        return SimpleNamespace(**{**vars(batch), **kw})

    with pytest.raises(ShapeError, match="n_in = 6"):
        run_episodes(net, replaced(x_train=torch.rand(3, 10, 7, dtype=F64)), f0, 0.1, seed=0)
    with pytest.raises(ShapeError, match="x_query"):
        run_episodes(net, replaced(x_query=torch.rand(2, 8, 6, dtype=F64)), f0, 0.1, seed=0)
    with pytest.raises(ShapeError, match=r"labels have shape \(3, 9\)"):
        run_episodes(net, replaced(y_train=torch.zeros(3, 9, dtype=torch.long)), f0, 0.1, seed=0)
    with pytest.raises(ConfigError, match=r"labels range over \[9, 9\].*n_out = 3"):
        run_episodes(net, replaced(y_train=torch.full((3, 10), 9)), f0, 0.1, seed=0)
    with pytest.raises(ShapeError, match="loss 'ce' needs integer class labels"):
        run_episodes(net, replaced(y_train=torch.rand(3, 10, 3, dtype=F64)), f0, 0.1, seed=0)
    with pytest.raises(ConfigError, match="Allowed values: 'bp', 'fa'"):
        run_episodes(Network(sizes=SMALL, feedback="random"), batch, f0, 0.1, seed=0)
    with pytest.raises(ConfigError, match="one entry per layer"):
        run_episodes(net, batch, f0, [0.1, 0.1], seed=0)
    with pytest.raises(ConfigError, match="has no `needs`"):
        run_episodes(net, batch, lambda s, p: 0, 0.1, seed=0)
    with pytest.raises(SignalError, match="unknown signal"):
        run_episodes(net, batch, [f0, f0, Recorder(needs={"spike"})], 0.1, seed=0)
    with pytest.raises(ConfigError, match="pass seed="):
        run_episodes(net, batch, f0, 0.1)
    with pytest.raises(ConfigError, match="ks has 2"):
        run_episodes(net, batch, f0, 0.1, seed=0, ks=[0, 1])
    with pytest.raises(ConfigError, match="Unknown reward"):
        run_episodes(net, batch, f0, 0.1, seed=0, reward="bonus")
    with pytest.raises(ConfigError, match="batch must have attributes"):
        run_episodes(net, object(), f0, 0.1, seed=0)

    class Wrong:
        needs = frozenset({"pre"})

        def __call__(self, s, p):
            return s["pre"]

    with pytest.raises(ShapeError, match="returned dW of shape"):
        run_episodes(net, batch, Wrong(), 0.1, seed=0)
    reg = Network(sizes=SMALL, loss="mse")
    with pytest.raises(ConfigError, match="reward='neg_loss'"):
        run_episodes(reg, make_batch(gen, regression=True), f0, 0.1, seed=0, observe=Recorder(needs={"reward"}))
    res = run_episodes(
        reg,
        make_batch(gen, regression=True),
        f0,
        0.1,
        seed=0,
        observe=Recorder(needs={"reward"}),
        reward="neg_loss",
    )
    assert torch.isnan(res.accuracy).all() and torch.isfinite(res.loss).all()


def test_explicit_weights_and_feedback(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen)
    ws, fbs = init_params(net, 9, 0, range(3), dtype=F64)
    a = run_episodes(net, batch, f0, 0.1, ws, fbs)
    b = run_episodes(net, batch, f0, 0.1, seed=9)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    with pytest.raises(ShapeError, match="dtype"):
        run_episodes(net, batch, f0, 0.1, [w.float() for w in ws], fbs)
    with pytest.raises(ShapeError, match="feedback"):
        run_episodes(net, batch, f0, 0.1, ws, fbs[:2])


# ---- baselines ---------------------------------------------------------------------------------------------


def test_baselines(gen):
    net = Network(sizes=SMALL, feedback="fa")
    batch = make_batch(gen, n=20)
    out = baselines(net, batch, 0.1, seed=3, curves=True)
    assert set(out) == {"bp", "fa"}
    direct = run_episodes(dataclasses.replace(net, feedback="bp"), batch, F0(), 0.1, seed=3)
    torch.testing.assert_close(out["bp"].loss, direct.loss, rtol=0, atol=0)
    assert out["bp"].angles.abs().max() < 1e-5 and out["fa"].angles.min() > 1
    assert out["fa"].train_loss.shape == (3, 20)
    same = run_baseline(net, batch, 0.1, seed=3)
    torch.testing.assert_close(same.loss, out["fa"].loss, rtol=0, atol=0)
    # zero learning rate leaves the weights at their initial values
    w0, _ = init_params(net, 3, 0, range(3), dtype=F64)
    frozen = run_baseline(net, batch, 0.0, seed=3)
    for a, b in zip(frozen.weights, w0):
        assert torch.equal(a, b)


# ---- with the real episode sampler -----------------------------------------------------------------------


def test_episode_batch_from_sampler_supplies_seed_t_ks():
    from rulesearch.tasks.data import load_dataset
    from rulesearch.tasks.episodes import TaskSampler

    sampler = TaskSampler(load_dataset("digits"), M=3, K=4, Q=2)
    batch = sampler.sample(seed=5, t=2, ks=[4, 1])
    net = Network(sizes=(64, 20, 10), feedback="fa")
    res = run_episodes(net, batch, f0, 0.05)
    explicit = run_episodes(net, batch, f0, 0.05, *init_params(net, 5, 2, [4, 1], dtype=batch.x_train.dtype))
    torch.testing.assert_close(res.loss, explicit.loss, rtol=0, atol=0)
    assert res.loss.shape == (2,) and torch.isfinite(res.loss).all()
    no_query = TaskSampler(load_dataset("digits"), M=3, K=4, Q=0).sample(seed=5, t=2, ks=[4, 1])
    empty = run_episodes(net, no_query, f0, 0.05, curves=True)
    assert torch.isnan(empty.loss).all() and empty.train_loss.shape == (2, 12)

"""The fast path of run_episodes (in-place steps, hand-written adjoint) and segment checkpointing."""

from types import SimpleNamespace

import pytest
import torch

from rulesearch.compile import compile_rule, low_rank_of
from rulesearch.errors import ConfigError, DivergenceError
from rulesearch.inner import adjoint, matrices, run_episodes
from rulesearch.lang.pools import bio, f0, oja, pool, pool_f5mean
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import Bilinear, Constant, Contract, err, fb, layer_sum, loss, mod, post, pre, pre_err, w
from rulesearch.networks.feedforward import Network, init_params

F64 = torch.float64
SIZES = (9, 7, 6, 4)


def _batch(b=3, n=14, nq=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        x_train=torch.rand(b, n, SIZES[0], generator=g, dtype=dtype),
        y_train=torch.randint(SIZES[-1], (b, n), generator=g),
        x_query=torch.rand(b, nq, SIZES[0], generator=g, dtype=dtype),
        y_query=torch.randint(SIZES[-1], (b, nq), generator=g),
    )


def _theta(rule, seed=1, shape=None):
    g = torch.Generator().manual_seed(seed)
    theta = 0.02 * torch.randn(shape or (rule.n_params,), generator=g, dtype=F64)
    theta[..., 0] = 0.1
    return theta


def _grad(net, batch, rule, theta, **kw):
    leaf = theta.clone().requires_grad_(True)
    res = run_episodes(net, batch, compile_rule(rule), leaf, seed=0, curves=True, raise_on_divergence=False, **kw)
    (g,) = torch.autograd.grad(res.loss.sum(), leaf)
    return res, g


@pytest.mark.parametrize("feedback", ["fa", "bp", "sign", "dfa"])
@pytest.mark.parametrize("rule", [bio, pool, oja, f0], ids=["bio", "pool", "oja", "f0"])
def test_adjoint_equals_autograd(rule, feedback):
    net, batch, theta = Network(sizes=SIZES, feedback=feedback), _batch(), _theta(rule)
    ref, g_ref = _grad(net, batch, rule, theta, method="autograd")
    res, g = _grad(net, batch, rule, theta, method="adjoint")
    # pool under sign feedback diverges in one episode: NaN in both paths, identically
    torch.testing.assert_close(res.loss, ref.loss, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15, equal_nan=True)
    for a, b in zip(res.weights, ref.weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(res.train_loss, ref.train_loss, equal_nan=True)
    torch.testing.assert_close(res.angles, ref.angles, equal_nan=True)
    assert torch.equal(res.diverged, ref.diverged) and torch.equal(res.diverged_step, ref.diverged_step)


@pytest.mark.parametrize("feedback", ["fa", "bp"])
def test_adjoint_equals_autograd_width_normalized_pool(feedback):
    """The pool with F5 = -(mean y) e x^T (a LayerMean factor): the hand adjoint's meta-gradient is autograd's."""
    net, batch, theta = Network(sizes=SIZES, feedback=feedback), _batch(), _theta(pool_f5mean)
    ref, g_ref = _grad(net, batch, pool_f5mean, theta, method="autograd")
    res, g = _grad(net, batch, pool_f5mean, theta, method="adjoint")
    assert bool(torch.isfinite(ref.loss).all()) and not bool(ref.diverged.any())
    torch.testing.assert_close(res.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("feedback", ["fa", "bp"])
@pytest.mark.parametrize("loss_fn", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["softplus", "tanh", "sigmoid", "silu", "linear"])
def test_adjoint_network_vjp_equals_autograd(activation, loss_fn, feedback):
    """The adjoint carries the signals' gradients back through the errors and the forward pass by hand: the same
    meta-gradient as autograd for every activation and loss, with the loss, reward (-loss) and fb signals, and a
    product of the weights with an expression."""
    extra = (Term("L", -loss * err * pre), Term("M", mod * post * pre_err), Term("B", -err * Contract(fb, err)),
             Term("P", -err * Contract(w, post * err)))  # fmt: skip
    rule = Rule((*pool.terms, *extra), "pool_extra")
    net, batch = Network(sizes=SIZES, feedback=feedback, activation=activation, loss=loss_fn), _batch()
    theta = 0.3 * _theta(rule)
    ref, g_ref = _grad(net, batch, rule, theta, method="autograd", reward="neg_loss")
    res, g = _grad(net, batch, rule, theta, method="adjoint", reward="neg_loss")
    assert bool(torch.isfinite(ref.loss).all())
    torch.testing.assert_close(res.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("per_episode", [False, True], ids=["shared", "per_episode"])
def test_adjoint_global_decay_and_general_rule(per_episode):
    """A decay with a global factor (one per step) and a general rule whose constants enter as global factors."""
    net, batch = Network(sizes=SIZES), _batch()
    shape = (3, pool.n_params + 1) if per_episode else None
    decayed = Rule((*pool.terms, Term("D", -layer_sum(post) * w)), "pool_d")
    _, g_ref = _grad(net, batch, decayed, _theta(decayed, shape=shape), method="autograd")
    _, g = _grad(net, batch, decayed, _theta(decayed, shape=shape), method="adjoint")
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)
    k, c = Constant("k"), Constant("c")
    general = Rule.general(-k * err * pre + c * k * post * pre_err - c**2 * w, [k, c], name="general")
    out = {}
    for method in ("autograd", "adjoint"):
        params = {"k": torch.full((3,) if per_episode else (), 0.1, dtype=F64, requires_grad=True),
                  "c": torch.tensor(0.05, dtype=F64, requires_grad=True)}  # fmt: skip
        res = run_episodes(net, batch, compile_rule(general), params, seed=0, method=method)
        out[method] = torch.autograd.grad(res.loss.sum(), list(params.values()))
    for a, b in zip(out["adjoint"], out["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("every", [4, 50])
@pytest.mark.parametrize(
    ("rule", "feedback"),  # the pool's theta diverges under sign feedback (autograd too)
    [(r, f) for r in ("bio", "pool", "global", "per_episode", "bilinear", "decay_only")
     for f in ("fa", "bp", "dfa", "sign") if not (f == "sign" and r in ("pool", "global"))],
)  # fmt: skip
def test_adjoint_large_layer_paths(monkeypatch, rule, feedback, every):
    """The sweep for layers of >= _BIG_LAYER weights (forced here for these small ones): the factors' cotangents by
    segments of 3 steps (cut at snapshots: every 4, or only at the first step), the decay's <G, W_s> by its
    recursion and the weights reversed lazily (3 steps pending at most; bp and sign feedback read them too) equal
    autograd, for bio, the pool's constant decay, a decay with a global factor (one per step), per-episode
    coefficients and a decay by ``e^T W x`` (the step's pre-activation), with and without outer products."""
    monkeypatch.setattr(adjoint, "_BIG_LAYER", 0)
    monkeypatch.setattr(adjoint, "_SEGMENT", 3)
    net, batch = Network(sizes=SIZES, feedback=feedback), _batch()
    shape = (3, pool.n_params) if rule == "per_episode" else None
    rule = {
        "bio": bio,
        "global": Rule((*pool.terms, Term("D", -layer_sum(post) * w)), "pool_d"),
        "bilinear": Rule((Term("F0", -err * pre), Term("B", -Bilinear(err, w, pre) * w)), "bilinear"),
        "decay_only": Rule((Term("B", -Bilinear(err, w, pre) * w),), "decay_only"),
    }.get(rule, pool)
    _, g_ref = _grad(net, batch, rule, _theta(rule, shape=shape), method="autograd")
    _, g = _grad(net, batch, rule, _theta(rule, shape=shape), method="adjoint", checkpoint_every=every)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("buffer", [0, 300])
@pytest.mark.parametrize("rule", ["bio", "post", "per_episode", "pool", "pool_per_episode"])
def test_adjoint_coefficient_gradient_buffer(monkeypatch, rule, buffer):
    """dL/dM of a constant coefficient matrix, summed by _CoefGrad every step (buffer 0) or over a few steps (300
    numbers), equals autograd: bio folds M into Vt; ``post`` (as many post as pre vectors, layers with more inputs
    than outputs) into U; per-episode coefficients (B, J, D); the pool's M = g M_j (global factors: outer products
    g^T dM summed over steps and episodes, or per episode) and its constant decay (da summed after the sweep)."""
    monkeypatch.setattr(matrices, "_COEF_BUFFER", buffer)
    net, batch = Network(sizes=SIZES), _batch()
    post_rule = Rule((Term("F0", -err * pre), Term("F1", -post * pre_err), Term("F2", -err * pre_err)), "post")
    rule, shape = {"bio": (bio, None), "post": (post_rule, None), "per_episode": (bio, (3, bio.n_params)),
                   "pool": (pool, None), "pool_per_episode": (pool, (3, pool.n_params))}[rule]  # fmt: skip
    _, g_ref = _grad(net, batch, rule, _theta(rule, shape=shape), method="autograd")
    _, g = _grad(net, batch, rule, _theta(rule, shape=shape), method="adjoint")
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)


def test_adjoint_hand_vjps_beside_autograd():
    """Global factors by their hand VJPs (a layer sum, bilinear forms of signals and of W^T y, e^T W x) beside global
    factors autograd carries (of expressions: tanh of a layer sum, the sum of y^2, a bilinear form of e * e) equal
    autograd; the hand VJPs are really used (the pool's layer sum and forms have leaf arguments)."""
    import sympy as sp

    rule = Rule(
        (
            Term("A", -layer_sum(post) * err * pre),
            Term("B", -sp.tanh(layer_sum(post)) * post * pre_err),
            Term("C", -Bilinear(err * err, w, pre) * err * pre),
            Term("D", -Bilinear(post, w, pre_err) * post * pre_err),
            Term("E", -layer_sum(post**2) * err * pre_err),
            Term("F", -Bilinear(err, w, pre) * post * pre),
        ),
        "mixed",
    )
    lr, why = low_rank_of(compile_rule(rule))
    assert lr is not None, why
    vjps = lr.global_vjps
    assert sum(v is not None for v in vjps) >= 4 and None in vjps
    for feedback in ("fa", "bp"):
        net, batch = Network(sizes=SIZES, feedback=feedback), _batch()
        _, g_ref = _grad(net, batch, rule, _theta(rule), method="autograd")
        _, g = _grad(net, batch, rule, _theta(rule), method="adjoint")
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("every", [1, 4, 50])
def test_checkpointed_equals_plain(every):
    """Segment checkpointing (autograd path) and snapshot intervals (adjoint) give the same meta-gradient."""
    net, batch, theta = Network(sizes=SIZES), _batch(), _theta(pool)
    ref, g_ref = _grad(net, batch, pool, theta, method="autograd")
    for method in ("autograd", "adjoint"):
        res, g = _grad(net, batch, pool, theta, method=method, checkpoint_every=every)
        torch.testing.assert_close(res.loss, ref.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(res.train_loss, ref.train_loss)
        assert torch.equal(res.diverged, ref.diverged)


def test_checkpointed_autograd_with_states_and_observer():
    """The general path (derived states, observer) under checkpointing: same values, observer called once."""

    class Trace:
        role, name = "pre", "xbar"

        def init(self, s):
            return torch.zeros_like(s["pre"])

        def step(self, prev, s):
            return 0.5 * prev + 0.5 * s["pre"]

    class TraceRule:
        needs = frozenset({"pre", "err"})
        states = (Trace(),)

        def __call__(self, s, p):
            return -(p[0] * s["err"])[:, :, None] * s["xbar"][:, None, :]

    calls = []
    net, batch = Network(sizes=SIZES), _batch()
    grads = []
    for every in (None, 3):
        calls.clear()
        p = torch.tensor([0.3], dtype=F64, requires_grad=True)
        res = run_episodes(net, batch, TraceRule(), p, seed=0, checkpoint_every=every,
                           observe=lambda s, i, sig, dw: calls.append((s, i)))  # fmt: skip
        grads.append(torch.autograd.grad(res.loss.sum(), p)[0])
        assert len(calls) == batch.x_train.shape[1] * net.n_layers
        assert "xbar" in res.states[0]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("rule", [bio, pool], ids=["bio", "pool"])
def test_per_episode_theta_and_weight_gradients(rule):
    """theta of shape (B, R) (per-episode decay for the pool) and gradients w.r.t. the initial weights."""
    net, batch = Network(sizes=SIZES), _batch()
    theta = _theta(rule, shape=(3, rule.n_params))
    w0, fb0 = init_params(net, 0, 0, range(3), dtype=F64)
    out = {}
    for method in ("autograd", "adjoint"):
        leaf = theta.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in w0]
        res = run_episodes(net, batch, compile_rule(rule), leaf, ws, fb0, method=method)
        out[method] = torch.autograd.grad(res.loss.sum(), [leaf, *ws])
    for a, b in zip(out["adjoint"], out["autograd"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_no_grad_path_runs_in_place_and_matches():
    net, batch, theta = Network(sizes=SIZES), _batch(), _theta(pool)
    ref = run_episodes(net, batch, compile_rule(pool), theta, seed=0, method="autograd")
    w0, fb0 = init_params(net, 0, 0, range(3), dtype=F64)
    keep = [w.clone() for w in w0]
    with torch.no_grad():
        res = run_episodes(net, batch, compile_rule(pool), theta, w0, fb0)
    torch.testing.assert_close(res.loss, ref.loss, rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(w0, keep))  # the caller's weights are untouched
    assert res.loss.grad_fn is None


def test_float32_adjoint_close_to_autograd():
    net, batch = Network(sizes=SIZES), _batch(n=60, dtype=torch.float32)
    theta = _theta(bio).float()
    _, g_ref = _grad(net, batch, bio, theta, method="autograd")
    _, g = _grad(net, batch, bio, theta, method="adjoint", checkpoint_every=30)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_auto_falls_back_and_adjoint_explains():
    class Plain:
        needs = frozenset({"pre", "err"})

        def __call__(self, s, p):
            return -p * s["err"][:, :, None] * s["pre"][:, None, :]

    lr, why = low_rank_of(Plain())
    assert lr is None and "CompiledRule" in why
    assert low_rank_of(compile_rule(pool))[0] is not None
    net, batch = Network(sizes=SIZES), _batch()
    p = torch.tensor(0.1, dtype=F64, requires_grad=True)
    res = run_episodes(net, batch, Plain(), p, seed=0)  # auto: autograd path
    assert res.loss.requires_grad
    with pytest.raises(ConfigError, match="adjoint"):
        run_episodes(net, batch, Plain(), p, seed=0, method="adjoint")
    with pytest.raises(ConfigError, match="observer"):
        run_episodes(net, batch, compile_rule(bio), _theta(bio), seed=0, method="adjoint",
                     observe=lambda *a: None)  # fmt: skip
    with pytest.raises(ConfigError, match="method"):
        run_episodes(net, batch, compile_rule(bio), _theta(bio), seed=0, method="fast")
    with pytest.raises(ConfigError, match="checkpoint_every"):
        run_episodes(net, batch, compile_rule(bio), _theta(bio), seed=0, checkpoint_every=0)


def test_adjoint_validates_theta_once_and_backward_once():
    net, batch = Network(sizes=SIZES), _batch()
    with pytest.raises(Exception, match="theta"):
        run_episodes(net, batch, compile_rule(bio), torch.zeros(4, dtype=F64), seed=0)
    leaf = _theta(bio).requires_grad_(True)
    res = run_episodes(net, batch, compile_rule(bio), leaf, seed=0)
    res.loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        res.loss.sum().backward()
    res = run_episodes(net, batch, compile_rule(bio), leaf, seed=0)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(res.loss.sum(), leaf, create_graph=True)


def test_adjoint_divergence_reported():
    net, batch = Network(sizes=SIZES), _batch()
    theta = torch.tensor([50.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    kw = dict(seed=0, divergence_bound=1.0, check_every=2, raise_on_divergence=False)
    res = run_episodes(net, batch, compile_rule(bio), theta, **kw)
    ref = run_episodes(net, batch, compile_rule(bio), theta, **kw, method="autograd")
    assert torch.equal(res.diverged, ref.diverged) and torch.equal(res.diverged_step, ref.diverged_step)
    with pytest.raises(DivergenceError):
        run_episodes(net, batch, compile_rule(bio), theta, seed=0, divergence_bound=1.0)  # raises by default


def test_device_and_dtype_follow_the_batch():
    """Everything the fast path allocates lives on the batch's device and dtype (CPU here; CUDA the same)."""
    net, batch = Network(sizes=SIZES), _batch(dtype=torch.float32)
    theta = _theta(pool).float().requires_grad_(True)
    res = run_episodes(net, batch, compile_rule(pool), theta, seed=0, method="adjoint")
    (g,) = torch.autograd.grad(res.loss.sum(), theta)
    assert g.dtype == torch.float32 and g.device == theta.device
    assert all(w.dtype == torch.float32 and w.device == batch.x_train.device for w in res.weights)
    assert res.loss.device == batch.x_train.device and res.loss.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_adjoint_equals_cpu():
    net, batch, theta = Network(sizes=SIZES), _batch(), _theta(pool)
    _, g_cpu = _grad(net, batch, pool, theta)
    cuda = SimpleNamespace(**{k: v.cuda() for k, v in vars(batch).items()})
    _, g_cuda = _grad(net, cuda, pool, theta.cuda())
    torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-9, atol=1e-15)

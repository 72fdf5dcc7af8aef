"""run_episodes(method="native"): the inner loop and its adjoint in one C kernel (rulesearch/inner/kernel.c) against
plain autograd through the unrolled loop, in float64 to 1e-10 relative: the query loss, the meta-gradient w.r.t.
theta and w.r.t. the initial weights, on random linear rules of the kernel's vocabulary (hypothesis), F^bio with
per-episode coefficients and curves, the divergence flags, the no-grad path, float32, the errors of what the kernel
does not cover, term_tables, and one meta-step of the Trainer. Skipped where no C compiler is found."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesearch import native
from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import BackendUnavailableError, ConfigError, DivergenceError
from rulesearch.inner import run_episodes
from rulesearch.inner.native import NATIVE_G, NATIVE_U, NATIVE_V, NotNative, run_native, term_tables
from rulesearch.lang.pools import named_rule, pool
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import bilinear, err, layer_mean, layer_sum, loss, post, pre, pre_err, w, wT
from rulesearch.networks import Network
from rulesearch.train.runtime import threads

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native backend cannot build")

F64 = torch.float64
RTOL = 1e-10
SIZES = (6, 5, 4, 3)
BIO = named_rule("bio")

# The kernel is one build per dtype (the network's feedback, activation and loss come with each call): the tests use
# these six networks, in which each pair of values of two of the three options appears (a covering array of
# strength 2), in float64, and the first in float32.
NETS = (
    ("fa", "softplus", "ce"),
    ("bp", "softplus", "mse"),
    ("bp", "tanh", "ce"),
    ("fa", "tanh", "mse"),
    ("fa", "sigmoid", "ce"),
    ("bp", "sigmoid", "mse"),
)


@pytest.fixture(autouse=True, scope="module")
def _cache(native_cache):
    """Kernels built by these tests go to a temporary cache, not the user's (conftest's native_cache)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Torch on one thread: these matrices are tiny (and threads waiting on a busy core are many times slower)."""
    with threads(1):
        yield


@pytest.fixture(autouse=True, scope="module")
def _kernels(_cache, _one_thread):
    """Build the two kernels (float64, float32) in parallel; a failure is left for the tests to report."""
    update = compile_rule(BIO)

    def build(dtype):
        net = Network(sizes=(3, 2))
        try:
            with torch.no_grad():
                run_episodes(net, _batch((3, 2), b=1, n=1, nq=1, dtype=dtype), update, torch.zeros(3, dtype=dtype),
                             seed=0, method="native")  # fmt: skip
        except Exception:
            pass

    term_tables(BIO)  # SymPy, once, before the threads
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(build, (F64, torch.float32)))


def _batch(sizes=SIZES, b=3, n=24, nq=5, seed=0, dtype=F64):
    """Random inputs and labels (drawn in float64 whatever ``dtype``: the same numbers, rounded)."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        x_train=torch.rand(b, n, sizes[0], generator=g, dtype=F64).to(dtype),
        y_train=torch.randint(sizes[-1], (b, n), generator=g),
        x_query=torch.rand(b, nq, sizes[0], generator=g, dtype=F64).to(dtype),
        y_query=torch.randint(sizes[-1], (b, nq), generator=g),
    )


def _run(method, net, batch, rule, theta, wgrad=False, **kw):
    """``(result, grads)``: the gradients of the summed query loss of the episodes that did not diverge w.r.t.
    ``theta`` and, with ``wgrad``, the initial weights (drawn, with the feedback, from seed 0)."""
    leaf = theta.clone().requires_grad_(True)
    ws, fbs = net.init_episodes(0, 0, range(batch.x_train.shape[0]), dtype=batch.x_train.dtype)
    ws = [x.requires_grad_(wgrad) for x in ws]
    res = run_episodes(net, batch, compile_rule(rule), leaf, ws, fbs, method=method, **kw)
    ok = ~res.diverged
    grads = torch.autograd.grad(res.loss[ok].sum(), [leaf, *ws] if wgrad else [leaf]) if ok.any() else ()
    return res, grads


def _close(got, want, rtol=RTOL, what=""):
    """Equal to ``rtol`` relative to each entry, with an absolute floor of ``rtol`` times the largest entry (the
    entries near 0 of a gradient are sums that cancel) and of 1e-24 (a gradient that is exactly 0 up to rounding:
    a term whose every path to the loss cancels, e.g. of the order 1e-32 in a one-layer network)."""
    got, want = got.detach(), want.detach()
    scale = float(want.abs().nan_to_num(posinf=0.0, neginf=0.0).max()) if want.numel() else 0.0
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=rtol * scale + 1e-24, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _compare(net, batch, rule, theta, wgrad=False, native_kw=None, **kw):
    """native against autograd: the divergence flags; the query loss, the gradients (theta, then the initial weights)
    and the final weights of the episodes that did not diverge."""
    ref, g_ref = _run("autograd", net, batch, rule, theta, wgrad, **kw)
    res, g = _run("native", net, batch, rule, theta, wgrad, **kw, **(native_kw or {}))
    assert torch.equal(res.diverged, ref.diverged), (res.diverged, ref.diverged)
    assert torch.equal(res.diverged_step, ref.diverged_step), (res.diverged_step, ref.diverged_step)
    assert torch.equal(res.diverged_layer, ref.diverged_layer), (res.diverged_layer, ref.diverged_layer)
    ok = ~ref.diverged
    _close(res.loss[ok], ref.loss[ok], what="query loss")
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        _close(a, b, what="theta gradient" if i == 0 else f"gradient of W_{i - 1}")
    for i, (a, b) in enumerate(zip(res.weights, ref.weights)):
        _close(a.detach()[ok], b.detach()[ok], what=f"final W_{i}")
    return res, ref, g, g_ref


# ---- 1. random rules of the kernel's vocabulary ------------------------------------------------------------------

MONOMIALS = (
    -err * pre,
    post * pre_err,
    err,
    pre,
    post * wT(post),
    -w,
    err * pre_err,
    post * (pre - wT(post)),
    -pre_err,
    -post * pre,
    -layer_sum(post) * err * pre,  # the global factors: layer sums and means, bilinear forms
    layer_mean(pre_err) * post,
    layer_sum(err) * pre_err,
    layer_mean(pre) * err * pre,
    -bilinear(post, pre_err) * post * pre_err,
    -bilinear(err, pre) * post * pre_err,
    bilinear(post, pre) * err,
    -bilinear(post, pre_err) * err * pre,
)
COEFS = (1, -1, 2, -3, sp.Rational(1, 2), sp.Rational(-3, 4))


@st.composite
def term_expr(draw):
    """One monomial of the vocabulary, or a sum of two with small integer/rational coefficients."""
    a = draw(st.sampled_from(MONOMIALS))
    if draw(st.booleans()):
        return a
    b = draw(st.sampled_from(MONOMIALS))
    return draw(st.sampled_from(COEFS)) * a + draw(st.sampled_from(COEFS)) * b


@st.composite
def cases(draw):
    exprs = draw(st.lists(term_expr(), min_size=1, max_size=4))
    exprs = [e for e in exprs if sp.expand(e) != 0] or [-err * pre]
    rule = Rule([Term(f"T{r}", e) for r, e in enumerate(exprs)], "random")
    feedback, activation, loss_fn = draw(st.sampled_from(NETS))
    sizes = draw(st.sampled_from(((6, 5, 4, 3), (4, 7, 2), (5, 3))))
    b = draw(st.integers(1, 3))
    per_episode = draw(st.booleans())
    shape = (b, rule.n_params) if per_episode else (rule.n_params,)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    theta = 0.02 * torch.randn(shape, generator=g, dtype=F64)
    return SimpleNamespace(
        rule=rule,
        theta=theta,
        net=Network(sizes=sizes, feedback=feedback, activation=activation, loss=loss_fn),
        batch=_batch(sizes, b=b, n=draw(st.integers(15, 30)), seed=draw(st.integers(0, 3))),
        wgrad=draw(st.booleans()),
        every=draw(st.sampled_from((3, 7, 50))),
        check_every=draw(st.sampled_from((5, 25))),
    )


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(c=cases())
def test_random_rules_equal_autograd(c):
    """Random rules of 1-4 terms (outer products of (1, post, err) and (1, pre, pre_err, W^T post), and -W), shared or
    per-episode theta, fa/bp, softplus/tanh/sigmoid, ce/mse, snapshots every 3, 7 or 50 steps: native = autograd."""
    _compare(c.net, c.batch, c.rule, c.theta, wgrad=c.wgrad, native_kw={"checkpoint_every": c.every},
             check_every=c.check_every, raise_on_divergence=False)  # fmt: skip


# ---- 2. F^bio: per-episode theta, weight gradients, curves -------------------------------------------------------


@pytest.mark.parametrize(("feedback", "loss_fn"), [("fa", "ce"), ("bp", "mse")])
def test_bio_per_episode_with_weight_gradients_and_curves(feedback, loss_fn):
    net, batch = Network(sizes=SIZES, feedback=feedback, loss=loss_fn), _batch(n=30)
    g = torch.Generator().manual_seed(1)
    theta = 0.02 * torch.randn(3, BIO.n_params, generator=g, dtype=F64)
    theta[:, 0] = torch.tensor([0.1, 0.05, 0.15], dtype=F64)
    res, ref, grads, _ = _compare(net, batch, BIO, theta, wgrad=True, native_kw={"checkpoint_every": 7},
                                  curves=True)  # fmt: skip
    assert len(grads) == 1 + net.n_layers and all(bool(x.abs().max() > 0) for x in grads)
    assert grads[0].shape == theta.shape and not bool(ref.diverged.any())
    assert res.train_loss.shape == (3, 30) and res.train_accuracy.shape == (3, 30)
    _close(res.train_loss, ref.train_loss, what="train_loss")
    _close(res.train_accuracy, ref.train_accuracy, what="train_accuracy")
    _close(res.accuracy, ref.accuracy, what="query accuracy")
    _close(res.angles, ref.angles, rtol=1e-8, what="angles")


@pytest.mark.parametrize("feedback", ["fa", "bp"])
def test_whole_pool_equals_autograd(feedback):
    """F0-F9 (layer sums, bilinear forms, decay, W^T post) with per-episode theta and weight gradients."""
    net, batch = Network(sizes=SIZES, feedback=feedback), _batch(n=30)
    g = torch.Generator().manual_seed(2)
    theta = 0.01 * torch.randn(3, pool.n_params, generator=g, dtype=F64)
    theta[:, 0] = torch.tensor([0.1, 0.05, 0.15], dtype=F64)
    res, ref, grads, _ = _compare(net, batch, pool, theta, wgrad=True, native_kw={"checkpoint_every": 7})
    assert not bool(ref.diverged.any()) and bool((grads[0].abs() > 0).all())


def test_a_rule_per_layer_equals_autograd():
    """One rule and one theta per layer (a NetworkRule's compiled form): each layer gets its own tables."""
    net, batch = Network(sizes=SIZES), _batch(n=20)
    rules = [named_rule("bio"), pool.select(["F0", "F5", "F8"]), pool.select(["F0", "F3"])]
    g = torch.Generator().manual_seed(3)
    thetas = [0.01 * torch.randn(3, r.n_params, generator=g, dtype=F64) + 0.05 for r in rules]
    ws, fbs = net.init_episodes(0, 0, range(3), dtype=F64)
    out = {}
    for method in ("autograd", "native"):
        leaves = [t.clone().requires_grad_(True) for t in thetas]
        res = run_episodes(net, batch, [compile_rule(r) for r in rules], leaves, ws, fbs, method=method)
        out[method] = (res, torch.autograd.grad(res.loss.sum(), leaves))
    (ref, g_ref), (res, g_nat) = out["autograd"], out["native"]
    _close(res.loss, ref.loss, what="query loss")
    for i, (a, b) in enumerate(zip(g_nat, g_ref)):
        _close(a, b, what=f"theta gradient of layer {i}")


def test_auto_takes_the_kernel_where_it_applies():
    """``method="auto"`` runs the kernel for a rule of its vocabulary, the torch fast path for one outside it (a
    squared signal) and autograd for a stateful rule; ``InnerResult.method`` says which ran."""
    net, batch = Network(sizes=SIZES), _batch(n=6)
    theta = torch.tensor([0.1, 0.0, 0.0], dtype=F64)
    assert run_episodes(net, batch, compile_rule(BIO), theta, seed=0).method == "native"
    assert run_episodes(net, batch, compile_rule(BIO), theta, seed=0, method="adjoint").method == "adjoint"
    square = Rule([Term("P", -err * pre * post**2)], "square")
    one = torch.tensor([0.1], dtype=F64)
    assert run_episodes(net, batch, compile_rule(square), one, seed=0).method == "adjoint"
    from rulesearch.lang.signals import trace

    traced = Rule([Term("T", -err * trace(pre, tau=3))], "traced")
    assert run_episodes(net, batch, compile_rule(traced), one, seed=0).method == "autograd"


# ---- 3. float32 ---------------------------------------------------------------------------------------------------


def test_float32_close_to_float64_and_deterministic():
    net = Network(sizes=SIZES)
    theta = torch.tensor([0.1, 0.01, 0.02], dtype=F64)
    r64, g64 = _run("native", net, _batch(n=30), BIO, theta, checkpoint_every=7)
    runs = [_run("native", net, _batch(n=30, dtype=torch.float32), BIO, theta.float(), checkpoint_every=7)
            for _ in range(2)]  # fmt: skip
    (r32, g32), (r32b, g32b) = runs
    assert r32.loss.dtype == torch.float32 and g32[0].dtype == torch.float32
    assert torch.equal(r32.loss, r32b.loss) and torch.equal(g32[0], g32b[0])
    assert all(torch.equal(a, b) for a, b in zip(r32.weights, r32b.weights))
    torch.testing.assert_close(r32.loss.double(), r64.loss.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(g32[0].double(), g64[0], rtol=1e-4, atol=1e-4 * float(g64[0].abs().max()))
    a32, ga32 = _run("autograd", net, _batch(n=30, dtype=torch.float32), BIO, theta.float())
    torch.testing.assert_close(r32.loss, a32.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(g32[0], ga32[0], rtol=1e-4, atol=1e-4 * float(ga32[0].abs().max()))


@pytest.mark.skipif(not native.simd_flags(), reason="no wider vector unit on this CPU (native.simd_flags() is empty)")
def test_the_vector_width_does_not_change_a_bit(monkeypatch):
    """The kernel built with native.simd_flags() (AVX2) and without (the compiler's baseline) gives the same bits: its
    sums run over LANES partial sums whatever the width. Rows of 40 and 33 (two blocks of 16 and a remainder), every
    outer product (u = 1, post, err), a decay, W^T post, backprop (the G pass's three update vectors)."""
    from rulesearch.inner import native as inner_native

    sizes = (40, 33, 18, 5)
    net = Network(sizes=sizes, feedback="bp", activation="tanh", loss="ce")
    rule = Rule([*named_rule("pool").terms, Term("U", pre)], "pool+U")
    theta = 1e-3 * torch.randn(rule.n_params, generator=torch.Generator().manual_seed(1), dtype=F64)
    batch = _batch(sizes, b=2, n=30)

    def run():
        inner_native._kernel.cache_clear()
        native.simd_flags.cache_clear()
        res, grads = _run("native", net, batch, rule, theta, wgrad=True, checkpoint_every=7)
        return [res.loss.detach(), *grads, *(w.detach() for w in res.weights)]

    wide = run()
    monkeypatch.setenv("RULESEARCH_NATIVE_SIMD", "0")
    assert native.simd_flags.__wrapped__() == ()
    try:
        base = run()
    finally:
        monkeypatch.undo()
        inner_native._kernel.cache_clear()
        native.simd_flags.cache_clear()
    assert len(wide) == len(base) == 1 + 1 + 3 + 3
    assert all(torch.equal(a, b) for a, b in zip(wide, base))


# ---- 4. divergence -----------------------------------------------------------------------------------------------


def test_divergence_flags_and_error():
    """Per-episode learning rates that blow up at different checks (and layers), and one that does not."""
    net, batch = Network(sizes=SIZES), _batch(n=24)
    theta = torch.tensor([[1.5, 0.0, 0.0], [3.0, 0.0, 0.0], [0.01, 0.0, 0.0]], dtype=F64)
    kw = dict(divergence_bound=2.0, check_every=4, raise_on_divergence=False)
    _, ref, _, _ = _compare(net, batch, BIO, theta, native_kw={"checkpoint_every": 5}, **kw)
    assert ref.diverged.tolist() == [True, True, False], ref.diverged
    assert ref.diverged_step[2] == -1 and ref.diverged_step[0] != ref.diverged_step[1], ref.diverged_step
    with pytest.raises(DivergenceError, match="diverged by step"):
        run_episodes(net, batch, compile_rule(BIO), theta, seed=0, method="native", divergence_bound=2.0,
                     check_every=4)  # fmt: skip


# ---- 5. what the kernel does not cover ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        (Rule([Term("F0", -err * pre), Term("S", layer_sum(post) * layer_sum(err) * pre)], "sums"), "layer 0"),
        (Rule([Term("B", bilinear(err, pre_err) * post)], "bilinear"), "layer 0"),
        (Rule([Term("P", post**2 * pre)], "square"), "only first powers"),
        (Rule([Term("L", -loss * err * pre)], "loss"), "reads ['loss']"),
        (Rule([Term("WW", -post * w)], "post_w"), "the weights times other signals"),
    ],
    ids=["two_globals", "bilinear_err_pre_err", "square", "loss", "post_w"],
)
def test_unsupported_rules_raise(rule, fragment):
    net, batch = Network(sizes=SIZES), _batch(n=4)
    theta = torch.full((rule.n_params,), 0.01, dtype=F64)
    with pytest.raises(ConfigError, match="method='native'") as info:
        run_episodes(net, batch, compile_rule(rule), theta, seed=0, method="native")
    assert fragment in str(info.value)
    with pytest.raises(NotNative):
        term_tables(rule)


def test_unsupported_networks_and_options_raise():
    batch, theta = _batch(n=4), torch.tensor([0.1, 0.0, 0.0], dtype=F64)
    for feedback in ("sign", "dfa"):
        with pytest.raises(ConfigError, match=f"feedback {feedback!r}"):
            run_episodes(Network(sizes=SIZES, feedback=feedback), batch, compile_rule(BIO), theta, seed=0,
                         method="native")  # fmt: skip
    with pytest.raises(ConfigError, match="an observer"):
        run_episodes(Network(sizes=SIZES), batch, compile_rule(BIO), theta, seed=0, method="native",
                     observe=lambda *a: None)  # fmt: skip

    class Plain:
        needs = frozenset({"pre", "err"})

        def __call__(self, s, p):
            return -p * s["err"][:, :, None] * s["pre"][:, None, :]

    with pytest.raises(ConfigError, match="not a compiled rule"):
        run_episodes(Network(sizes=SIZES), batch, Plain(), torch.tensor(0.1, dtype=F64), seed=0, method="native")


def test_no_compiler_raises(monkeypatch, tmp_path):
    """Without a compiler the kernel cannot be built (an empty kernel cache, the process's loaded kernels forgotten):
    method="native" raises, and "auto" takes the torch path."""
    from rulesearch.inner import native as inner_native

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("RULESEARCH_CACHE", str(tmp_path))
    net = Network(sizes=SIZES, activation="linear", loss="mse")
    theta = torch.tensor([0.1, 0.0, 0.0]).double()
    inner_native._kernel.cache_clear()
    inner_native._builds.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError, match="No C compiler"):
            run_episodes(net, _batch(n=4), compile_rule(BIO), theta, seed=0, method="native")
        assert run_episodes(net, _batch(n=4), compile_rule(BIO), theta, seed=0).method == "adjoint"
    finally:
        monkeypatch.undo()
        inner_native._kernel.cache_clear()
        inner_native._builds.cache_clear()


def test_term_tables():
    T, d = term_tables(BIO)  # F0 = -e x^T, F2 = -e e'^T, F9 = y x^T - y (W^T y)^T
    assert NATIVE_U == ("1", "post", "err") and NATIVE_V == ("1", "pre", "pre_err", "wT(post)")
    assert T.shape == (3, 12, 3, 4) and T.dtype == F64 and d.tolist() == [0.0, 0.0, 0.0]
    want = torch.zeros(3, 12, 3, 4, dtype=F64)  # (term, global factor, u, v); global 0 is the constant 1
    want[0, 0, 2, 1] = -1
    want[1, 0, 2, 2] = -1
    want[2, 0, 1, 1], want[2, 0, 1, 3] = 1, -1
    assert torch.equal(T, want)
    T, d = term_tables(pool)  # F5: -(sum y) e x^T, F6: -(y^T W e') y e'^T, F7: -(y^T W e') e x^T, F8: -(e^T W x) y e'^T
    assert d.tolist() == [0.0, 0.0, 0.0, -1.0] + [0.0] * 6
    assert T[1, 0, 1, 2] == -1 and T[4, 0, 0, 2] == -1
    assert NATIVE_G[1] == "layer_sum(post)" and T[5, 1, 2, 1] == -1
    assert NATIVE_G[11] == "bilinear(post, pre_err)" and T[6, 11, 1, 2] == -1 and T[7, 11, 2, 1] == -1
    assert NATIVE_G[10] == "bilinear(err, pre)" and T[8, 10, 1, 2] == -1
    assert int((T != 0).sum()) == 10
    T, d = term_tables(Rule([Term("A", 2 * err * pre - sp.Rational(1, 2) * post * (pre - wT(post)) - 3 * w)]))
    assert (T[0, 0, 2, 1], T[0, 0, 1, 1], T[0, 0, 1, 3], d[0]) == (2.0, -0.5, 0.5, -3.0)
    assert int((T != 0).sum()) == 3


# ---- 6. no gradient ----------------------------------------------------------------------------------------------


def test_no_grad_equals_autograd():
    net, batch = Network(sizes=SIZES, feedback="bp", activation="sigmoid", loss="mse"), _batch()
    theta = torch.tensor([0.1, 0.02, -0.01], dtype=F64)
    ws, fbs = net.init_episodes(0, 0, range(3), dtype=F64)
    keep = [x.clone() for x in ws]
    with torch.no_grad():
        ref = run_episodes(net, batch, compile_rule(BIO), theta, ws, fbs, method="autograd")
        res = run_episodes(net, batch, compile_rule(BIO), theta, ws, fbs, method="native")
    assert res.loss.grad_fn is None and all(torch.equal(a, b) for a, b in zip(ws, keep))
    _close(res.loss, ref.loss, what="query loss")
    for i, (a, b) in enumerate(zip(res.weights, ref.weights)):
        _close(a, b, what=f"final W_{i}")


# ---- 7. the Trainer ----------------------------------------------------------------------------------------------


def test_trainer_meta_steps_native_equal_adjoint(monkeypatch):
    """Two meta-steps of F^bio on the bundled teacher task, float64: the same meta-loss and meta-gradient norm at each
    step (1e-10) and the same theta after (1e-8) with method="native" as with "adjoint"; the kernel really ran."""
    import rulesearch.inner.loop as loop
    from rulesearch.train import DiscoverConfig, MetaConfig, NetworkConfig, Problem, TaskConfig, Trainer, resolve_rule

    calls = []

    def counted(*a, **kw):
        calls.append(1)
        return run_native(*a, **kw)

    monkeypatch.setattr(loop, "run_native", counted)
    task = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 200}, M=3, K=4, Q=2)
    thetas, rows = {}, {}
    for method in ("adjoint", "native"):
        meta = MetaConfig(episodes=2, meta_batch=2, l1=0.0, dtype="float64", compare=False, threads=1, lr=1e-2,
                          method=method)  # fmt: skip
        cfg = DiscoverConfig(rule="bio", task=task, network=NetworkConfig(sizes=(6, 5, 3), feedback="fa"), meta=meta)
        trainer = Trainer(Problem(cfg, resolve_rule("bio")))
        state = trainer.fresh_state()
        theta0 = state.params["theta"].clone()
        rows[method] = [row for _ in range(2) for row in trainer.step(state)]
        thetas[method] = state.params["theta"]
        assert not torch.equal(thetas[method], theta0)
        assert bool(calls) == (method == "native")
    for nat, adj in zip(rows["native"], rows["adjoint"]):
        assert nat["diverged"] == adj["diverged"] == 0
        for key in ("meta_loss", "grad_norm"):
            assert nat[key] == pytest.approx(adj[key], rel=1e-10), key
    torch.testing.assert_close(thetas["native"], thetas["adjoint"], rtol=1e-8, atol=1e-12)

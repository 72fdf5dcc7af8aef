"""The native backend: rules translated to C (rulesearch.compile.ccode) against the torch compiler, property-based;
the reservoir's C kernel (backend="native") against the torch loop on short runs of every algorithm and task; its
determinism per seed; the kernel cache; and the errors of bad input. Skipped where no C compiler is found."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulesearch import native
from rulesearch.compile.ccode import C_PRELUDE, rule_c
from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import BackendUnavailableError, ConfigError, SignalError, UnsupportedNodeError
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import Constant, err, layer_sum, loss, post, pre, reward, reward_baseline, trace, w
from rulesearch.reservoir import Reservoir, modulator_family, paper_learning, run_reservoir

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native backend cannot build")

SIGNALS = {"pre": "pre", "post": "post", "w": "synapse", "reward": "global", "loss": "global"}


@pytest.fixture(autouse=True, scope="module")
def _cache(native_cache):
    """Kernels built by these tests go to a temporary cache, not the user's (conftest's native_cache)."""


def _c_update(rule: Rule):
    """A callable running the C translation of ``rule`` for one network: ``(signals, params, st, first, W)``."""
    c = rule_c(rule, SIGNALS)
    src = "#include <tgmath.h>\ntypedef double real;\n" + C_PRELUDE + c.code
    src += (
        "void call(int n_post, int n_pre, const real *const *sig, const real *prm, real *st, int first, real *W) {\n"
        f"    {c.name}(n_post, n_pre, sig, prm, st, first, W);\n}}\n"
    )
    fn = native.load(src, "rule_test").call
    fn.restype = None

    def run(signals: dict, prm: torch.Tensor, st: torch.Tensor, first: bool, W: torch.Tensor):
        n_post, n_pre = W.shape
        vals = [signals[n].contiguous() for n in c.signals]
        ptrs = (ctypes.c_void_p * len(vals))(*(v.data_ptr() for v in vals))
        fn(n_post, n_pre, ptrs, ctypes.c_void_p(prm.data_ptr()), ctypes.c_void_p(st.data_ptr()), int(first),
           ctypes.c_void_p(W.data_ptr()))  # fmt: skip

    return c, run


def _signals(g: torch.Generator, n_post: int, n_pre: int) -> dict:
    return {
        "pre": torch.rand(n_pre, generator=g, dtype=torch.float64) + 0.1,
        "post": torch.randn(n_post, generator=g, dtype=torch.float64),
        "w": torch.randn(n_post, n_pre, generator=g, dtype=torch.float64),
        "reward": torch.randn((), generator=g, dtype=torch.float64),
        "loss": torch.rand((), generator=g, dtype=torch.float64) + 0.1,
    }


def _check_against_torch(rule: Rule, params, steps: int = 3, seed: int = 0) -> None:
    """``steps`` online steps of the C translation equal the torch compiler's (states included) to 1e-12."""
    c, run = _c_update(rule)
    g = torch.Generator().manual_seed(seed)
    n_post, n_pre = 3, 5
    update = compile_rule(rule)
    if rule.is_linear:
        theta = torch.as_tensor(params, dtype=torch.float64).reshape(1, -1)
        prm = theta[0].clone()
    else:
        theta = {k: torch.tensor([v], dtype=torch.float64) for k, v in params.items() if k != "scale"}
        prm = torch.tensor([params[n] for n in c.params], dtype=torch.float64)
    st_c = torch.zeros(max(c.state_size(n_post, n_pre), 1), dtype=torch.float64)
    states: dict = {}
    bound = None
    for t in range(steps):
        sig = _signals(g, n_post, n_pre)
        batch = {k: v.unsqueeze(0) if k not in ("reward", "loss") else v.reshape(1) for k, v in sig.items()}
        batch = {k: batch[k] for k in update.needs}
        if bound is None:
            bound = update.bind(batch, theta)
        bound.advance(states, batch)
        want = bound(batch)[0]
        if not rule.is_linear:
            want = want * params["scale"]
        got = torch.zeros(n_post, n_pre, dtype=torch.float64)
        run(sig, prm, st_c, t == 0, got)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"step {t} of {rule}")


BAR = reward_baseline(3.0, name="rbar_t")
POST_BAR = trace(post, 4.0, name="post_bar_t")
ATOMS = {"post": (post, POST_BAR), "pre": (pre,), "global": (reward, loss, BAR), "synapse": (w,)}
FUNCS = (sp.tanh, sp.exp, sp.Abs, sp.sign, sp.Heaviside, lambda x: sp.Max(x, 0),
         lambda x: sp.Abs(x) ** sp.Rational(1, 4))  # fmt: skip


@st.composite
def factor(draw, role: str):
    """An elementwise expression of one role: an atom, a function of an atom, a power, a sum or a product."""
    a = draw(st.sampled_from(ATOMS[role]))
    kind = draw(st.sampled_from(("atom", "func", "square", "sqrt", "inverse", "sum", "scaled")))
    if kind == "func":
        return draw(st.sampled_from(FUNCS))(a)
    if kind == "square":
        return a**2
    if kind == "sqrt":
        return sp.sqrt(a**2 + 1)
    if kind == "inverse":
        return 1 / (a**2 + 1)
    if kind == "sum":
        return a + draw(st.sampled_from(ATOMS["global"]))
    if kind == "scaled":
        return sp.Rational(draw(st.integers(-3, 3)), 2) * a
    return a


@st.composite
def term(draw):
    """A product of factors whose roles join to a synapse-role term."""
    shape = draw(st.sampled_from((("post", "pre"), ("global", "post", "pre"), ("synapse",), ("global", "synapse"),
                                  ("post", "synapse"), ("pre", "global", "post"))))  # fmt: skip
    return sp.Mul(*(draw(factor(r)) for r in shape))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(terms=st.lists(term(), min_size=1, max_size=3), seed=st.integers(0, 3))
def test_c_translation_equals_the_torch_compiler(terms, seed):
    rule = Rule([Term(f"t{k}", e) for k, e in enumerate(terms)])
    thetas = [0.5 - 0.25 * k for k in range(len(terms))]
    _check_against_torch(rule, thetas, seed=seed)


def test_c_translation_of_a_general_rule_and_the_reservoir_rules():
    fam = modulator_family()
    _check_against_torch(fam, {"a": 0.3, "p": 0.5, "scale": 2e-3})
    a = Constant("a")
    _check_against_torch(Rule.general(sp.exp(-a * loss) * post * pre, [a]), {"a": 1.5, "scale": 0.1})
    for learning in (paper_learning("supertrex", "butterfly"), paper_learning("rmhl", "arm2")):
        _check_against_torch(learning.exploration.rule, [5e-4], steps=5)


def test_c_translation_hoists_by_level():
    """The node-perturbation update costs one multiplication per synapse: the global modulator and the post factor
    are combined per row, before the (i, j) loop."""
    c = rule_c(paper_learning("rmhl", "butterfly").exploration.rule, SIGNALS)
    body = c.code.split("for (int j = 0; j < n_pre; j++) {")[-1]
    assert body.count("*") == 2  # the product, and W[i * n_pre + j]
    assert {role for _, role in c.states} == {"global", "post"}  # the reward baseline and the output's trace


def test_c_translation_errors():
    with pytest.raises(UnsupportedNodeError, match="LayerSum.*torch backend"):
        rule_c(Rule([Term("ls", layer_sum(post) * pre)]), SIGNALS)
    with pytest.raises(SignalError, match="err"):
        rule_c(Rule([Term("e", err * pre)]), SIGNALS)


def _gate_open(learning):
    return replace(learning, mastery=replace(learning.mastery, threshold=1e3, scale=0.05))


CASES = [
    ("butterfly", paper_learning("supertrex", "butterfly")),
    ("butterfly", _gate_open(paper_learning("supertrex", "butterfly"))),
    ("butterfly", paper_learning("force", "butterfly")),
    ("butterfly", paper_learning("rmhl", "butterfly")),
    ("arm2", _gate_open(paper_learning("supertrex", "arm2"))),  # mastery target zbar, delayed-output test
    ("arm3", _gate_open(paper_learning("supertrex", "arm3"))),  # three joints, joint costs
    ("arm3", paper_learning("supertrex", "arm3", rule=modulator_family())),  # a general rule, constants per row
]


@pytest.mark.parametrize("task, learning", CASES, ids=[f"{t}-{L.name}-{k}" for k, (t, L) in enumerate(CASES)])
def test_native_backend_agrees_with_torch(task, learning):
    """2 training trials of 300 steps and a test trial, N = 80, float64, two rows with different dopamine and
    mastery switches: per-trial errors, weight norms, deviations and gate fractions agree to 1e-9 relative (the
    sums are ordered differently; the learned loop keeps the difference near rounding: 1e-14 to 1e-11 here)."""
    kw = dict(n_train=2, n_test=1, trial_steps=300, dopamine=[1.0, 0.4], mastery_on=[True, False])
    if learning.exploration is not None and not learning.exploration.rule.is_linear:
        kw["rule_constants"] = {"a": [1.0, 0.0], "p": [0.25, 0.5]}
    if learning.force is not None:
        kw.pop("dopamine"), kw.pop("mastery_on")
    res = Reservoir(n=80, sparse=True)
    a = run_reservoir(res, task, learning, [0, 1], **kw)
    b = run_reservoir(res, task, learning, [0, 1], backend="native", **kw)
    for name in ("trial_error", "trial_error_mastery", "w_exp_norm", "w_mst_norm", "deviation", "deviation_mastery",
                 "gate_open", "drawn"):  # fmt: skip
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-13, err_msg=name)
    assert not b.diverged.any()
    if learning.mastery is not None and learning.mastery.threshold > 1:
        assert (b.w_mst_norm[0] > 0).all() and (b.w_mst_norm[1] == 0).all()  # row 1's mastery switched off


def test_native_backend_float32_and_determinism_per_seed():
    learning = _gate_open(paper_learning("supertrex", "butterfly"))
    kw = dict(n_train=2, n_test=1, trial_steps=200, backend="native")
    res = Reservoir(n=60, sparse=True)
    a = run_reservoir(res, "butterfly", learning, [3, 5], **kw)
    b = run_reservoir(res, "butterfly", learning, [3, 5], **kw)
    c = run_reservoir(res, "butterfly", learning, [5], **kw)
    np.testing.assert_array_equal(a.trial_error, b.trial_error)
    np.testing.assert_array_equal(a.trial_error[1], c.trial_error[0])  # a row depends on its own seed only
    f32 = run_reservoir(res, "butterfly", learning, [3, 5], dtype=torch.float32, **kw)
    ref = run_reservoir(res, "butterfly", learning, [3, 5], dtype=torch.float32, trial_steps=200, n_train=2, n_test=1)
    np.testing.assert_allclose(f32.trial_error, ref.trial_error, rtol=1e-4)


def test_native_backend_errors(monkeypatch, tmp_path):
    learning = paper_learning("supertrex", "butterfly")
    with pytest.raises(ConfigError, match="backend='cuda'"):
        run_reservoir(Reservoir(n=40, sparse=True), "butterfly", learning, [0], trial_steps=20, backend="cuda")
    with pytest.raises(ConfigError, match="symmetric_rls"):
        run_reservoir(Reservoir(n=40, sparse=True), "butterfly", learning, [0], trial_steps=20, backend="native",
                      symmetric_rls=True)  # fmt: skip
    with pytest.raises(ConfigError, match="sparse J"):
        run_reservoir(Reservoir(n=40, sparse=False), "butterfly", learning, [0], trial_steps=20, backend="native")
    rule = Rule([Term("ls", layer_sum(post) * pre)])
    with pytest.raises(UnsupportedNodeError, match="torch backend"):
        run_reservoir(Reservoir(n=40, sparse=True), "butterfly", paper_learning("rmhl", "butterfly", rule=rule), [0],
                      trial_steps=20, backend="native")  # fmt: skip
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert not native.available()
    with pytest.raises(BackendUnavailableError, match="No C compiler.*torch backend"):
        native.load("int f(void) { return 1; }", "nothing")


def test_kernel_cache_is_reused_and_build_errors_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("RULESEARCH_CACHE", str(tmp_path))
    lib = native.load("int answer(void) { return 42; }", "answer")
    assert lib.answer() == 42
    built = list((tmp_path / "native").glob("answer-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.load("int answer(void) { return 42; }", "answer").answer() == 42
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "native").iterdir())) == 1
    with pytest.raises(BackendUnavailableError, match="(?s)failed.*error: expected"):
        native.load("int broken(void) { return ; ", "broken")
    assert not list((tmp_path / "native").glob("broken-*"))  # nothing half-built is left
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("RULESEARCH_CACHE", str(blocked))  # the cache cannot be made: a temporary folder instead
    assert native.load("int answer(void) { return 42; }", "answer").answer() == 42


def test_simd_builds_are_kept_apart_and_fall_back(monkeypatch, tmp_path):
    """load(simd=True) adds simd_flags() to the build and the cache key; a compiler that refuses them gets the
    baseline build, with a warning; RULESEARCH_NATIVE_SIMD=0 and a CPU other than x86-64 give no flags."""
    monkeypatch.setenv("RULESEARCH_CACHE", str(tmp_path))
    src = "int wide(void) {\n#ifdef RS_WIDE\n    return 1;\n#else\n    return 0;\n#endif\n}\n"
    monkeypatch.setattr(native, "simd_flags", lambda: ("-DRS_WIDE=1",))
    assert native.load(src, "wide", simd=True).wide() == 1
    assert native.load(src, "wide").wide() == 0
    assert len(list((tmp_path / "native").glob("wide-*.so"))) == 2
    monkeypatch.setattr(native, "simd_flags", lambda: ("-mno-such-vector-unit",))
    with pytest.warns(RuntimeWarning, match="without -mno-such-vector-unit"):
        assert native.load(src, "wide", simd=True).wide() == 0
    monkeypatch.undo()
    flags = native.simd_flags.__wrapped__
    assert flags() in ((), ("-mavx2",))
    monkeypatch.setenv("RULESEARCH_NATIVE_SIMD", "0")
    assert flags() == ()
    monkeypatch.delenv("RULESEARCH_NATIVE_SIMD")
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert flags() == ()

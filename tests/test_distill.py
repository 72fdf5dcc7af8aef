"""Tests of rulesearch.distill: backends, samples, selection, closed loop, pipeline and CLI.

Recovery *rates* live in experiments/bench_recovery.py; here each backend only has to recover one planted rule on
small data.
"""

import importlib.util
import os
import sys
import time

import numpy as np
import pytest
import sympy as sp
import torch
from texcheck import latex_errors

from rulesearch.compile.compiler import compile_rule
from rulesearch.distill import (
    BACKENDS,
    Candidate,
    DistillDataError,
    FunctionUpdate,
    OperonBackend,
    PySRBackend,
    SparseBackend,
    add_noise,
    clean_formula,
    evaluate_expr,
    expr_complexity,
    formula_to_rule,
    get_backend,
    is_recovered,
    reduce_identities,
    same_terms,
)
from rulesearch.distill import pysr as pysr_module
from rulesearch.distill.closed_loop import closed_loop, rule_params
from rulesearch.distill.operon import OPERON_SYMBOLS, operon_symbols, parse_model
from rulesearch.distill.pipeline import data_identities, distill, heldout_error
from rulesearch.distill.samples import (
    ID_COLUMNS,
    TARGET,
    SampleCollector,
    collect_samples,
    load_samples,
    sample_atoms,
    samples_arrays,
    samples_features,
    save_samples,
)
from rulesearch.distill.select import (
    find_collinear,
    information_criterion,
    pareto_front,
    select_candidate,
    simple_values,
    snap_constants,
)
from rulesearch.errors import BackendUnavailableError, ConfigError, NotFittedError, ShapeError
from rulesearch.lang.grammar import Grammar
from rulesearch.lang.pools import f0, oja, pool
from rulesearch.lang.rule import Rule
from rulesearch.lang.signals import bilinear, err, layer_sum, post, pre, pre_err, reward, sanger, trace, w, wT
from rulesearch.networks.feedforward import Network
from rulesearch.reference.naive import naive_eval

SIGNAL_FEATURES = [pre, post, err, w]
TRUTH = 0.7 * err * pre - 0.2 * post**2 * w  # the planted rule of environment.md


def _planted(rng, n=2000, noise=0.0):
    X = rng.normal(size=(n, 4))
    y = evaluate_expr(TRUTH, SIGNAL_FEATURES, X)
    return X, y + noise * y.std() * rng.normal(size=n)


def _coef_map(expr):
    out = {}
    for t in sp.Add.make_args(sp.expand(expr)):
        c, m = t.as_coeff_Mul()
        out[m] = float(c)
    return out


def _same_formula(found, truth, rtol=1e-6):
    a, b = _coef_map(found), _coef_map(truth)
    return set(a) == set(b) and all(abs(a[m] - b[m]) <= rtol * abs(b[m]) for m in b)


def _small_grammar():
    return Grammar(atoms=(pre, post, err, w), max_degree=3, degree_per_signal={"w": 1})


# ---------------------------------------------------------------------------------------------- backends


def _backend(name):
    if name == "operon":
        pytest.importorskip("pyoperon")
        return OperonBackend(max_time=20, generations=60, population_size=300, random_state=0)
    if name == "pysr":
        if not PySRBackend.available():
            pytest.skip(f"PySR unavailable: {pysr_module.pysr_status()[1]}")
        return PySRBackend(niterations=20, random_state=0)
    return SparseBackend(library=_small_grammar())


@pytest.mark.parametrize("name", ["sparse", "operon", "pysr"], ids=["sparse", "operon", "pysr"])
def test_backend_recovers_planted_rule(name, np_rng):
    X, y = _planted(np_rng)
    backend = _backend(name).fit(X, y, SIGNAL_FEATURES)
    assert _same_formula(backend.best_.expr, TRUTH), backend.equations()
    assert backend.front_[0].complexity <= backend.best_.complexity
    rule = backend.rule_
    assert set(rule.term_names()) == {"err*pre", "post^2*w"}
    np.testing.assert_allclose(backend.predict(X), y, rtol=1e-6, atol=1e-9)


def _weighted_planted(rng):
    """The planted rule on 1600 rows of weight 1, and a different rule (3 pre) on 400 rows of weight 0."""
    X, y = _planted(rng, n=2000)
    w_rows = np.ones(len(y))
    w_rows[:400] = 0.0
    y = y.copy()
    y[:400] = 3.0 * X[:400, 0]
    return X, y, w_rows


@pytest.mark.parametrize("name", ["sparse", "operon", "pysr"], ids=["sparse", "operon", "pysr"])
def test_weighted_fit_uses_weights(name, np_rng):
    X, y, w_rows = _weighted_planted(np_rng)
    backend = _backend(name)
    if name == "operon":  # Operon sees a weighted bootstrap (duplicated rows): its default, larger search
        backend.set_params(population_size=500, generations=100)
    backend.fit(X, y, SIGNAL_FEATURES, w_rows)
    assert _same_formula(backend.best_.expr, TRUTH), backend.equations()


def test_pysr_passes_weights_through(monkeypatch, np_rng):
    # a stand-in pysr module: PySR sees the row weights, and the weighted cleaning drops what fits the weight-0 rows
    seen = {}

    class FakeRegressor:
        def __init__(self, **params):
            seen["params"] = params

        def fit(self, X, y, weights=None, variable_names=None):
            seen.update(X=X, weights=weights, names=variable_names)
            self.equations_ = [None]

        def sympy(self, index):
            x0, x1, x2, x3 = sp.symbols("x0 x1 x2 x3")
            return 0.69 * x2 * x0 - 0.21 * x1**2 * x3 + 0.5 * x0

    monkeypatch.setattr(pysr_module, "pysr_status", lambda: (True, "stand-in"))
    monkeypatch.setitem(sys.modules, "pysr", type(sys)("pysr"))
    monkeypatch.setattr(sys.modules["pysr"], "PySRRegressor", FakeRegressor, raising=False)
    X, y, w_rows = _weighted_planted(np_rng)
    backend = PySRBackend().fit(X, y, SIGNAL_FEATURES, w_rows)
    np.testing.assert_allclose(seen["weights"], w_rows / w_rows.mean())
    assert seen["names"] == ["x0", "x1", "x2", "x3"] and seen["params"]["deterministic"]
    assert _same_formula(backend.best_.expr, TRUTH, rtol=1e-9), backend.equations()


def test_sparse_recovers_under_noise(np_rng):
    X, y = _planted(np_rng, n=4000, noise=0.01)
    backend = SparseBackend(library=_small_grammar()).fit(X, y, SIGNAL_FEATURES)
    assert set(_coef_map(backend.best_.expr)) == set(_coef_map(TRUTH))


def _pysr_refusal(np_rng) -> str:
    """The message of PySRBackend's refusal to fit, checked to come in under a second without importing pysr."""
    had = "pysr" in sys.modules
    X, y = _planted(np_rng, n=50)
    t0 = time.perf_counter()
    with pytest.raises(BackendUnavailableError) as info:
        PySRBackend().fit(X, y, SIGNAL_FEATURES)
    assert time.perf_counter() - t0 < 1.0
    assert had or "pysr" not in sys.modules  # availability is decided without importing pysr
    return str(info.value)


def test_pysr_unavailable_error_is_clear_and_fast(monkeypatch, np_rng):
    monkeypatch.setattr(pysr_module, "julia_executable", lambda: None)
    msg = _pysr_refusal(np_rng)
    assert "pysr" in msg and "Julia" in msg and "rulesearch[pysr]" in msg and "backend='sparse'" in msg
    assert not PySRBackend.available()


@pytest.fixture
def bare_julia(tmp_path, monkeypatch):
    """pysr findable and a Julia executable, but an empty juliapkg project and depot: ``import pysr`` would download."""
    exe = tmp_path / "bin" / "julia"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "pysr" else real_find_spec(name, *a)
    )
    monkeypatch.delenv("PYTHON_JULIACALL_EXE", raising=False)
    monkeypatch.setenv("PYTHON_JULIAPKG_EXE", str(exe))
    monkeypatch.setenv("PYTHON_JULIAPKG_PROJECT", str(tmp_path / "julia_env"))
    monkeypatch.setenv("JULIA_DEPOT_PATH", str(tmp_path / "depot"))
    return tmp_path


def test_pysr_without_prepared_julia_packages_is_refused(bare_julia, np_rng):
    ok, reason = pysr_module.pysr_status()
    assert not ok and "not prepared" in reason and str(bare_julia / "julia_env") in reason and "download" in reason
    msg = _pysr_refusal(np_rng)
    assert 'python -c "import pysr"' in msg and "JULIA_DEPOT_PATH" in msg and "backend='sparse'" in msg


def test_pysr_prepared_state_is_detected(bare_julia):
    project = bare_julia / "julia_env"
    (project / "pyjuliapkg").mkdir(parents=True)
    (project / "pyjuliapkg" / "meta.json").write_text("{}")
    (project / "Manifest.toml").write_text('[[deps.SymbolicRegression]]\nuuid = "8254be44"\n')
    ok, reason = pysr_module.pysr_status()
    assert not ok and "packages/SymbolicRegression" in reason  # resolved, but the depot lacks the packages
    (bare_julia / "depot" / "packages" / "SymbolicRegression").mkdir(parents=True)
    assert pysr_module.pysr_status() == (True, "pysr, Julia and SymbolicRegression.jl found")


def test_pysr_is_imported_offline(monkeypatch):
    monkeypatch.delenv("PYTHON_JULIAPKG_OFFLINE", raising=False)
    with pysr_module._offline_juliapkg():
        assert os.environ["PYTHON_JULIAPKG_OFFLINE"] == "yes"
    assert "PYTHON_JULIAPKG_OFFLINE" not in os.environ
    monkeypatch.setenv("PYTHON_JULIAPKG_OFFLINE", "no")  # the user's choice stands
    with pysr_module._offline_juliapkg():
        assert os.environ["PYTHON_JULIAPKG_OFFLINE"] == "no"


def test_operon_unavailable_error(monkeypatch, np_rng):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    X, y = _planted(np_rng, n=50)
    with pytest.raises(BackendUnavailableError, match=r"rulesearch\[operon\]"):
        OperonBackend().fit(X, y, SIGNAL_FEATURES)


def test_operon_primitive_sets_compile_into_rules():
    assert operon_symbols("polynomial") == "add,sub,mul,constant,variable"  # the default
    assert operon_symbols("nonlinear") == "add,sub,mul,div,tanh,exp,abs,constant,variable"
    assert operon_symbols(" tanh, div ,variable") == "tanh,div,constant,variable"
    for bad in ("add,fmin", "aq", ""):
        with pytest.raises(ConfigError, match="polynomial, rational, nonlinear"):
            operon_symbols(bad)
    # every allowed symbol as Operon prints it reads as a function of the rule language and compiles
    printed = {"add": "(x0 + x1)", "sub": "(x0 - x1)", "mul": "(x0 * x1)", "div": "(x0 / x1)", "square": "(x0 ^ 2)",
               "abs": "abs(x0)", "exp": "exp(x0)", "log": "log(x0)", "logabs": "log(abs(x0))", "sqrt": "sqrt(x0)",
               "sqrtabs": "sqrt(abs(x0))", "tanh": "tanh((0.5 * x0))", "sin": "sin(x0)", "cos": "cos(x0)"}  # fmt: skip
    assert set(printed) == set(OPERON_SYMBOLS)
    for symbol, text in printed.items():
        expr = parse_model(f"(1.5 * {text}) * (x1 ^ 3)", [post, pre])
        assert {s.name for s in expr.free_symbols} == {"post", "pre"}, symbol
        formula_to_rule(expr).compile()
    with pytest.raises(ConfigError, match="max_time must be a number of seconds >= 2"):
        OperonBackend(max_time=1).fit(np.ones((4, 1)), np.arange(4.0), [pre])


def test_operon_max_time_bounds_the_whole_fit(np_rng):
    pytest.importorskip("pyoperon")
    X = np_rng.normal(size=(3000, 4))
    y = np.tanh(2 * X[:, 0]) * X[:, 1] + 0.3 * np.abs(X[:, 2]) - 0.1 * X[:, 3] / (1 + X[:, 0] ** 2)
    backend = OperonBackend(primitives="nonlinear", max_time=3, population_size=1000, generations=100000)
    t0 = time.perf_counter()
    backend.fit(X, y, SIGNAL_FEATURES)
    assert time.perf_counter() - t0 < 3 + 0.5, backend.history_
    assert np.isfinite(backend.predict(X)).all()
    assert any(isinstance(c.expr, sp.Basic) for c in backend.front_)


@pytest.mark.parametrize("name", sorted(BACKENDS), ids=sorted(BACKENDS))
def test_backend_params_round_trip(name):
    backend = get_backend(name)
    params = backend.get_params()
    clone = backend.clone()
    assert type(clone) is type(backend) and clone.get_params() == params and clone is not backend
    first = next(iter(params))
    backend.set_params(**{first: params[first]})
    with pytest.raises(TypeError, match="has no parameter"):
        backend.set_params(not_a_parameter=1)
    assert isinstance(backend.supports_constants, bool) and isinstance(backend.supports_nonlinear, bool)


def test_capabilities():
    assert not SparseBackend().supports_nonlinear and not SparseBackend().supports_constants
    assert OperonBackend().supports_nonlinear and OperonBackend().supports_constants


def test_get_backend_unknown_name():
    with pytest.raises(ConfigError, match="Did you mean 'sparse'"):
        get_backend("sparce")


def test_not_fitted():
    with pytest.raises(NotFittedError):
        SparseBackend().predict(np.zeros((2, 2)))


def test_repr_marks_selected_row(np_rng):
    X, y = _planted(np_rng, n=500)
    backend = SparseBackend(library=_small_grammar()).fit(X, y, SIGNAL_FEATURES)
    text = repr(backend)
    assert "SparseBackend(" in text and "\n> " in text


# ---------------------------------------------------------------------------------------------- bad data


def test_empty_table_is_a_clear_error():
    with pytest.raises(DistillDataError, match="empty"):
        SparseBackend().fit(np.zeros((0, 2)), np.zeros(0), ["a", "b"])


def test_empty_sample_table_is_a_clear_error(tiny_samples):
    empty = tiny_samples.iloc[:0].copy()
    empty.attrs = tiny_samples.attrs
    with pytest.raises(DistillDataError, match="empty"):
        distill(empty)


def test_constant_target_is_a_clear_error(np_rng):
    X = np_rng.normal(size=(50, 2))
    with pytest.raises(DistillDataError, match="constant"):
        SparseBackend().fit(X, np.zeros(50), ["a", "b"])


def test_nan_rows_are_a_clear_error(np_rng):
    X, y = np_rng.normal(size=(50, 2)), np_rng.normal(size=50)
    X[[3, 7], 1] = np.nan
    with pytest.raises(DistillDataError, match=r"2 of 50 rows hold NaN.*\[3, 7\].*\['b'\]"):
        SparseBackend().fit(X, y, ["a", "b"])
    y[5] = np.inf
    X[:] = 0.5
    with pytest.raises(DistillDataError, match="target dw"):
        SparseBackend().fit(X, y, ["a", "b"])


def test_bad_shapes_and_weights(np_rng):
    X, y = np_rng.normal(size=(20, 2)), np_rng.normal(size=20)
    with pytest.raises(ShapeError, match="feature_names"):
        SparseBackend().fit(X, y, ["a"])
    with pytest.raises(ShapeError, match=r"shape \(n_samples,\)"):
        SparseBackend().fit(X, y[:5], ["a", "b"])
    with pytest.raises(DistillDataError, match="non-negative"):
        SparseBackend().fit(X, y, ["a", "b"], weights=-np.ones(20))


# ---------------------------------------------------------------------------------------------- formulas -> rules


def _signals(B=3, n_post=4, n_pre=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "pre": r(B, n_pre),
        "post": r(B, n_post),
        "err": r(B, n_post) - 0.5,
        "pre_err": r(B, n_pre) - 0.5,
        "w": r(B, n_post, n_pre) - 0.5,
        "reward": (r(B) > 0.5).double(),
    }


@pytest.mark.parametrize(
    "formula",
    [
        0.01 * post * pre - 0.002 * w,
        -0.05 * err * pre + 0.003 * post * (pre - wT(post)),
        0.004 * post * (pre - sanger()) + 0.02 * reward * post * pre,
        0.3 * sp.tanh(1.7 * post) * pre - 0.01 * w,
    ],
    ids=["hebb", "bio", "sanger-reward", "tanh-general"],
)
def test_distilled_rule_compiles_to_the_formula(formula):
    rule = formula_to_rule(formula)
    assert rule.is_linear == (not sp.expand(formula).atoms(sp.tanh))
    sig = _signals()
    dw = compile_rule(rule)(sig, rule_params(rule))
    shape = tuple(sig["w"].shape)
    ref = naive_eval(formula, sig, {}, shape)
    assert dw.shape == shape
    torch.testing.assert_close(dw, ref, rtol=1e-12, atol=1e-14)
    assert rule.sympy().free_symbols == formula.free_symbols


def test_formula_to_rule_zero():
    with pytest.raises(Exception, match="is 0"):
        formula_to_rule(sp.Integer(0))


def test_expr_complexity_orders_terms():
    assert expr_complexity(post * pre) < expr_complexity(post * wT(post)) < expr_complexity(post * pre * wT(post))
    assert expr_complexity(-post) == expr_complexity(post)


# ---------------------------------------------------------------------------------------------- selection


def test_find_collinear_keeps_simplest_member(np_rng):
    x = np_rng.normal(size=300)
    r = (np_rng.random(300) > 0.5).astype(float)
    A = np.stack([x * r**2, x * r, x, x + 2 * x * r], 1)
    rep = find_collinear(A, ["x*r^2", "x*r", "x", "x+2xr"], order=[2, 1, 0, 3])
    assert rep.kept == (2, 1)
    texts = [str(i) for i in rep.identities]
    assert texts[0] == "x*r^2 = x*r" and texts[1].startswith("x+2xr = ")
    assert all(i.kind == "identity" for i in rep.identities)


def test_sparse_reports_identities_and_uses_simplest_member(np_rng):
    n = 600
    X = np.stack([np_rng.normal(size=n), (np_rng.random(n) > 0.5).astype(float)], 1)
    x = sp.Symbol("x", real=True)
    rr = sp.Symbol("r", real=True)
    y = 0.3 * X[:, 0] * X[:, 1] ** 2  # planted with r^2, which equals r on 0/1 data
    backend = SparseBackend(library=[x, x * rr, x * rr**2, x**2]).fit(X, y, [x, rr])
    assert sp.expand(backend.best_.expr - 0.3 * x * rr) == 0 or _same_formula(backend.best_.expr, 0.3 * x * rr)
    assert "x*r^2 = r*x" in [str(i) for i in backend.collinearity_.identities]


def test_information_criteria_and_floor():
    # at the numerical floor, fewer parameters win
    assert information_criterion(1e-30, 2, 1000, 1e-20) < information_criterion(1e-32, 3, 1000, 1e-20)
    assert information_criterion(1.0, 2, 1000, kind="ebic", n_candidates=500) > information_criterion(1.0, 2, 1000)
    with pytest.raises(ConfigError):
        select_candidate([], 10)


def test_sparse_candidates_come_from_all_three_paths(np_rng, monkeypatch):
    added = {}

    def spy(path):  # records the labels of the supports each path adds
        orig = getattr(SparseBackend, path)

        def wrapped(self, G, c, supports):
            before = set(supports)
            orig(self, G, c, supports)
            added[path] = {supports[S] for S in supports if S not in before}

        return wrapped

    for path in ("_stlsq", "_lasso_path", "_backward"):
        monkeypatch.setattr(SparseBackend, path, spy(path))
    X, y = _planted(np_rng, n=400, noise=0.05)
    backend = SparseBackend(library=_small_grammar()).fit(X, y, SIGNAL_FEATURES)
    assert added == {"_stlsq": {"stlsq"}, "_lasso_path": {"lasso"}, "_backward": {"backward"}}
    assert {c.source for c in backend.candidates_} <= {"stlsq", "lasso", "backward"}


def test_clean_formula_refits_a_nonlinear_formula(np_rng):
    # a GP-style tree: rough constants, a stray intercept and a negligible term
    a, b, c = sp.symbols("a b c", real=True)
    X = np_rng.normal(size=(500, 3))
    y = 0.3 * np.tanh(1.7 * X[:, 0]) * X[:, 1]
    raw = 0.31 * sp.tanh(1.65 * a) * b + 1e-4 + 1e-5 * c
    expr, loss = clean_formula(raw, [a, b, c], X, y, np.ones(500))
    assert expr.free_symbols == {a, b} and len(expr.atoms(sp.tanh)) == 1
    np.testing.assert_allclose(sorted(float(f) for f in expr.atoms(sp.Float)), [0.3, 1.7], rtol=1e-6)
    assert loss < 1e-12 * float(np.mean(y**2))


def test_pareto_front_and_knee(np_rng):
    X, y = _planted(np_rng, n=400, noise=0.01)
    backend = SparseBackend(library=_small_grammar(), selection="knee").fit(X, y, SIGNAL_FEATURES)
    front = pareto_front(backend.candidates_)
    assert all(a.complexity < b.complexity and a.loss > b.loss for a, b in zip(front, front[1:]))
    assert set(_coef_map(backend.best_.expr)) == set(_coef_map(TRUTH))


def test_snapping_only_when_fit_does_not_get_worse(np_rng):
    X = np_rng.normal(size=(500, 2))
    a, b = sp.symbols("a b", real=True)
    exact = SparseBackend(degree=1).fit(X, 0.5 * X[:, 0] - 2.0 * X[:, 1], [a, b])
    assert exact.best_.expr == a / 2 - 2 * b
    off = SparseBackend(degree=1).fit(X, 0.5137 * X[:, 0] - 2.0 * X[:, 1], [a, b])
    assert sp.Rational(1, 2) not in off.best_.expr.atoms(sp.Rational)
    assert abs(_coef_map(off.best_.expr)[a] - 0.5137) < 1e-9
    assert simple_values(0.4999)[:2] == [0.0, 0.5]


def test_snapping_is_strict_on_noisy_data(np_rng):
    # the least-squares coefficient is well within one standard error of 1/2, yet 1/2 fits worse: no snap
    a = sp.Symbol("a", real=True)
    X = np_rng.normal(size=(400, 1))
    y = 0.5 * X[:, 0] + 0.1 * np_rng.normal(size=400)
    beta = float(np.linalg.lstsq(X, y, rcond=None)[0][0])
    loss = float(np.mean((y - beta * X[:, 0]) ** 2))
    half = float(np.mean((y - 0.5 * X[:, 0]) ** 2))
    assert loss < half < loss * (1 + 1 / 400)  # a 1/n tolerance would have snapped
    cand = Candidate(sp.Float(beta) * a, 3, loss, 1, "stlsq")
    assert snap_constants(cand, [a], X, y, np.ones(400)) is cand
    fitted = SparseBackend(degree=1).fit(X, y, [a])
    assert fitted.best_.loss <= fitted.front_[fitted.selection_["index"]].loss * (1 + 1e-12)
    assert "snap" not in fitted.best_.source


# ---------------------------------------------------------------------------------------------- samples


@pytest.fixture
def tiny_setup():
    net = Network(sizes=(6, 5, 3), feedback="fa")
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.rand(2, 12, 6, generator=g, dtype=torch.float64),
        torch.randint(3, (2, 12), generator=g),
        torch.rand(2, 4, 6, generator=g, dtype=torch.float64),
        torch.randint(3, (2, 4), generator=g),
    )
    return net, batch


@pytest.fixture
def tiny_samples(tiny_setup):
    net, batch = tiny_setup
    theta = torch.tensor([0.05, 0.02], dtype=torch.float64)
    return collect_samples(net, batch, oja.compile(), theta, grammar=Grammar.classic(), n_per_step=12, run_seed=0)


def test_sample_collection_on_a_tiny_net(tiny_samples):
    df = tiny_samples
    features, names = samples_features(df)
    assert list(df.columns[: len(ID_COLUMNS)]) == list(ID_COLUMNS) and df.columns[-1] == TARGET
    assert {"pre", "post", "err", "pre_err", "w", "reward", "pre_trace10", "theta_bcm", "Contract(w,post)"} <= set(
        names
    )
    assert len(df) == 2 * 12 * 12  # layers x steps x rows per step
    # inverse-probability weights: per (layer, step) they sum to the number of synapses of the layer (x B)
    sums = df.groupby(["layer", "step"]).weight.sum().unstack(0)
    np.testing.assert_allclose(sums[0], 2 * 5 * 6)
    np.testing.assert_allclose(sums[1], 2 * 3 * 5)
    # the recorded dw is the oja update evaluated on the recorded signals (contraction included)
    X, y, w_rows, feats, _ = samples_arrays(df)
    f = 0.05 * (-err * pre) + 0.02 * post * (pre - wT(post))
    np.testing.assert_allclose(evaluate_expr(f, feats, X), y, rtol=1e-10, atol=1e-14)


def test_collected_states_match_their_definition(tiny_setup):
    net, batch = tiny_setup
    xbar = trace(pre, 10)
    rule = Rule.general(0.1 * post * (pre - xbar))  # the update itself reads the trace
    df = collect_samples(net, batch, rule.compile(), {}, atoms=[pre, post, xbar], n_per_step=8, run_seed=0)
    X, y, _, feats, _ = samples_arrays(df)
    np.testing.assert_allclose(evaluate_expr(0.1 * post * (pre - xbar), feats, X), y, rtol=1e-10, atol=1e-14)


def test_rows_are_never_chosen_by_dw():
    atoms = sample_atoms(Grammar(atoms=(pre, post, err, w)))
    sig = _signals(B=2, n_post=6, n_pre=7)
    picks = []
    for scale in (1.0, -1e6):
        col = SampleCollector(atoms, n_per_step=10, seed=3)
        col(0, 0, sig, scale * torch.arange(84, dtype=torch.float64).reshape(2, 6, 7))
        df = col.frame()
        picks.append(df[["episode", "post_index", "pre_index"]].to_numpy())
    np.testing.assert_array_equal(picks[0], picks[1])


def test_stratification_oversamples_large_signals():
    atoms = sample_atoms(Grammar(atoms=(pre, post, err)))
    sig = _signals(B=1, n_post=20, n_pre=50)
    sig["pre"] = torch.zeros(1, 50, dtype=torch.float64)
    sig["pre"][0, :5] = 1.0  # few large inputs
    col = SampleCollector(atoms, n_per_step=40, n_strata=4, stratify=("pre",), seed=0)
    col(0, 0, sig, torch.zeros(1, 20, 50, dtype=torch.float64))
    df = col.frame()
    assert (df.pre > 0).mean() > 0.15  # 10% of the synapses, most of the top stratum (12.5%)
    assert df.weight.sum() == pytest.approx(1000)


def test_samples_round_trip_parquet_and_csv(tiny_samples, tmp_path, monkeypatch):
    path = save_samples(tiny_samples, tmp_path / "s.parquet")
    back = load_samples(path)
    assert samples_features(back)[1] == samples_features(tiny_samples)[1]
    np.testing.assert_array_equal(back.to_numpy(), tiny_samples.to_numpy())
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails: CSV fallback
    path = save_samples(tiny_samples, tmp_path / "t.parquet")
    assert path.suffix == ".csv"
    back = load_samples(path)
    feats, names = samples_features(back)
    np.testing.assert_allclose(back[names].to_numpy(), tiny_samples[names].to_numpy())


def test_samples_without_metadata_error(tiny_samples):
    plain = tiny_samples.copy()
    plain.attrs = {}
    with pytest.raises(ShapeError, match="metadata"):
        samples_features(plain)


def test_distill_recovers_rule_from_samples(tiny_samples):
    res = distill(tiny_samples, grammar=Grammar.default(reward_signals=False))
    truth = 0.05 * (-err * pre) + 0.02 * post * (pre - wT(post))
    assert _same_formula(res.formula, sp.expand(truth), rtol=1e-6)
    assert heldout_error(res.formula, tiny_samples) < 1e-10
    assert res.rule.is_linear and "Distilled rule" in res.report()


@pytest.fixture
def softmax_samples(tiny_setup):
    """Samples whose library holds layer_sum(post): the sum of the softmax outputs, 1 in the output layer."""
    net, batch = tiny_setup
    grammar = Grammar(atoms=(pre, post, err, w, layer_sum(post)), max_degree=2, degree_per_signal={"w": 1})
    theta = torch.tensor([0.05, 0.02], dtype=torch.float64)
    return collect_samples(net, batch, oja.compile(), theta, grammar=grammar, n_per_step=12, run_seed=0), grammar


def test_data_identities_find_the_softmax_sum(softmax_samples):
    df, _ = softmax_samples
    X, _, w_rows, feats, _ = samples_arrays(df, layers=[1])
    found = [str(i) for i in data_identities(X, w_rows, feats).identities]
    assert {"LayerSum(post)*pre = pre", "LayerSum(post)*err*w = err*w", "LayerSum(post)^3 = LayerSum(post)"} <= set(
        found
    )
    X, _, w_rows, feats, _ = samples_arrays(df, layers=[0])  # hidden layer: no softmax, no identity
    assert not any("LayerSum" in str(i) for i in data_identities(X, w_rows, feats).identities)


@pytest.mark.parametrize("name", ["sparse", "operon", "pysr"], ids=["sparse", "operon", "pysr"])
def test_every_backend_reports_identities(name, softmax_samples):
    df, grammar = softmax_samples
    if name == "operon":
        pytest.importorskip("pyoperon")
        backend = OperonBackend(generations=5, population_size=50, max_time=2)
    elif name == "pysr":
        if not PySRBackend.available():
            pytest.skip(f"PySR unavailable: {pysr_module.pysr_status()[1]}")
        backend = PySRBackend(niterations=2)
    else:
        backend = SparseBackend()
    res = distill(df, backend, grammar=grammar, layers=[1])
    assert "LayerSum(post)*pre = pre" in res.identities and "LayerSum(post)^2 = LayerSum(post)" in res.identities
    assert "LayerSum(post)*pre = pre" in res.report()


# ---------------------------------------------------------------------------------------------- closed loop


def test_closed_loop_on_a_tiny_config(tiny_setup):
    net, batch = tiny_setup
    lr = torch.tensor([0.1], dtype=torch.float64)
    same = closed_loop(formula_to_rule(-0.1 * err * pre), f0.compile(), lr, net, batch, seed=0)
    assert same.cosine == pytest.approx(1.0, abs=1e-12) and same.relative_error < 1e-12
    assert same.accuracy_original == same.accuracy_distilled and same.n_episodes == 2
    other = closed_loop(formula_to_rule(-0.1 * err * pre + 0.05 * post * pre), f0.compile(), lr, net, batch, seed=0)
    assert other.cosine < 0.999 and other.relative_error > 1e-3
    assert len(other.cosine_per_layer) == 2 and "cosine" in str(other)
    only_first = closed_loop(formula_to_rule(-0.3 * err * pre), f0.compile(), lr, net, batch, seed=0, layers=[0])
    assert np.isnan(only_first.cosine_per_layer[1]) and only_first.cosine == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- pipeline and CLI


@pytest.fixture
def trained_run(tmp_path):
    meta = pytest.importorskip("rulesearch.train")
    search = meta.RuleSearch(
        rule="oja",
        network=meta.NetworkConfig(sizes=(64, 8, 10), feedback="fa"),
        task=meta.TaskConfig(dataset="digits", M=3, K=3, Q=2),
        meta=meta.MetaConfig(episodes=2, l1=0.0, compare=False),
        out=str(tmp_path / "run"),
        progress=False,
    ).fit()
    return tmp_path / "run", search


@pytest.mark.parametrize("split", ["all", "0.5"])
def test_distill_run_assembly_equals_the_hand_assembly(tmp_path, split):
    """distill_run's network and episodes (a Problem of the run's config) equal the assembly it made itself before:
    the run's dataset, the held-out classes of a class split, the network sized by the data."""
    from rulesearch.distill.pipeline import _context
    from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig

    task = TaskConfig(dataset="digits", M=3, K=2, Q=2, split=split)
    network = NetworkConfig(feedback="fa")
    meta = MetaConfig(episodes=1, l1=0.0, compare=False)
    RuleSearch("f0", network, task, meta, out=tmp_path / "run", progress=False).fit()
    _, _, net, sampler, run_kwargs = _context(tmp_path / "run")
    dataset = task.load()
    want = task.sampler(dataset, "train" if split == "all" else "test")
    assert net == network.build(dataset.n_features, want.n_outputs)
    assert sampler.classes == want.classes and run_kwargs == {"divergence_bound": meta.divergence_bound}
    if split != "all":
        assert set(sampler.classes) == set(task.classes(dataset, "test"))
    for t in (1_000_000, 1_000_001):
        got, ref = sampler.sample(0, t, range(3)), want.sample(0, t, range(3))
        for name in ("x_train", "y_train", "x_query", "y_query"):
            assert torch.equal(getattr(got, name), getattr(ref, name))


def test_distill_run_writes_outputs(trained_run):
    from rulesearch.distill.pipeline import distill_run

    path, _ = trained_run
    res = distill_run(path, grammar=Grammar.default(reward_signals=False, max_degree=2), n_episodes=3, test_episodes=2)
    trained = Rule.from_json(__import__("json").loads((path / "rule.json").read_text()))
    truth = trained.sympy()
    assert _same_formula(res.formula, sp.expand(truth), rtol=1e-5)
    assert res.closed_loop.cosine > 0.999999
    for name in ("samples.parquet", "rule.json", "rule.tex", "front.csv", "summary.json", "report.md"):
        assert (path / "distill" / name).is_file(), name
    assert Rule.from_json(__import__("json").loads((path / "distill" / "rule.json").read_text())).is_linear


def test_distill_command(trained_run):
    from typer.testing import CliRunner

    from rulesearch.cli import app  # the installed `rulesearch` command

    runner = CliRunner()
    help_text = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert help_text.exit_code == 0, help_text.output
    assert all(opt in help_text.output for opt in ("RUN", "--backend", "--grammar", "--layers", "--set"))
    path, _ = trained_run
    args = ["distill", str(path), "--grammar", "default", "--episodes", "2", "--test-episodes", "2"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "dW_ij =" in out.output and f"wrote {path / 'distill'}/" in out.output
    # stage messages with estimates and times (stderr); --quiet silences them
    for stage in ("sampling the update on 2 episodes x 9 steps", "sampling 2 held-out episodes (about ",
                  "fitting sparse: ", "closed loop: ", "closed_loop done in ", "writing "):  # fmt: skip
        assert f"distill: {stage}" in out.output or f"distill:   {stage}" in out.output, stage
    for name in ("samples.parquet", "rule.json", "rule.tex", "front.csv", "summary.json", "report.md"):
        assert (path / "distill" / name).is_file(), name
    report = (path / "distill" / "report.md").read_text()
    assert report.count(r"\Delta W_{ij}") == 1 and "reward" not in report  # oja reads no reward
    quiet = runner.invoke(app, [*args, "--quiet", "--no-check", "--out", "quiet"])
    assert quiet.exit_code == 0 and "distill:" not in quiet.output, quiet.output
    bad = runner.invoke(app, [*args, "--backend", "operon", "--set", "primitives=add,fmin"])
    assert bad.exit_code == 2 and "polynomial, rational, nonlinear" in bad.output and "sampling" not in bad.output
    if OperonBackend.available():  # the nonlinear primitives and a time bound from the command line
        nonlinear = ["--backend", "operon", "--set", "primitives=nonlinear", "--set", "max_time=2", "--no-check"]
        done = runner.invoke(app, [*args, *nonlinear, "--out", "operon"])
        assert done.exit_code == 0 and "fitting operon: " in done.output and "(about 2 s)" in done.output, done.output
    bad = runner.invoke(app, ["distill", str(path / "missing")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_distill_run_default_library_and_reports(trained_run):
    """The default library is fitted to the rule (no reward terms for a rule that reads no reward, the rule's own
    operators in it); report.md and rule.tex hold one complete equation, the front's formulas uncut."""
    from rulesearch.distill.pipeline import distill_run, library_for

    path, _ = trained_run
    res = distill_run(path, n_episodes=2, test_episodes=2, check=False)
    trained = Rule.from_json(__import__("json").loads((path / "rule.json").read_text()))
    assert _same_formula(res.formula, sp.expand(trained.sympy()), rtol=1e-5)
    assert res.rule.n_terms == 3  # -a e x + b y x - b y (W^T y): the rule itself, nothing spurious
    assert not {"reward", "reward_bar", "mod"} & set(res.samples.columns)
    report = (path / "distill" / "report.md").read_text()
    assert "reward" not in report and report.count(r"\Delta W_{ij}") == 1
    rows = [line.split("`")[1] for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(res.backend.front_) and all(sp.sympify(r) is not None for r in rows)  # uncut
    assert max(len(r) for r in rows) > 0 and all(r.count("(") == r.count(")") for r in rows)
    tex = (path / "distill" / "rule.tex").read_text()
    assert tex.startswith("% \\input") and tex.count(r"\Delta W_{ij}") == 1
    equation = tex.split("\\begin{equation}\n")[1].split("\n\\end{equation}")[0]
    assert not latex_errors(equation)
    # a rule that reads the reward keeps the reward atoms; the pool's layer sum and bilinear forms become atoms
    three_factor = Rule.general(reward * post * pre, name="three_factor")
    assert reward in library_for(three_factor.compile()).atoms
    pool_atoms = library_for(pool.compile()).atoms
    assert layer_sum(post) in pool_atoms and bilinear(post, pre_err) in pool_atoms and reward not in pool_atoms
    g = Grammar.default()
    assert library_for(pool.compile(), g) is g  # a Grammar object is used as given


def test_distill_update_of_a_black_box_neural_rule():
    from rulesearch.distill.pipeline import distill_update
    from rulesearch.neural import NeuralRule
    from rulesearch.tasks.data import load_dataset
    from rulesearch.tasks.episodes import TaskSampler

    rule = NeuralRule(hidden=(4,))
    params = rule.init_params(torch.Generator().manual_seed(0), theta0=0.02)  # a fresh neural rule is exactly F0
    sampler = TaskSampler(load_dataset("digits"), M=3, K=3, Q=2)
    net = Network(sizes=(64, 8, 10), feedback="fa")
    grammar = Grammar(atoms=(pre, post, err, w), max_degree=2)
    res = distill_update(rule, params, net, sampler, grammar=grammar, n_episodes=3, test_episodes=2)
    assert _same_formula(res.formula, -0.02 * err * pre, rtol=1e-6)
    assert res.heldout_error < 1e-6 and res.closed_loop.cosine > 0.999999


def test_distill_run_of_a_network_rule(trained_run, tmp_path):
    import json

    from rulesearch.distill.pipeline import distill_run
    from rulesearch.lang.rule import NetworkRule
    from rulesearch.train import trained_rule_json

    path, _ = trained_run
    first = f0.with_values([0.05])
    second = oja.with_values([0.03, 0.01])
    file = tmp_path / "network_rule.json"
    file.write_text(json.dumps(trained_rule_json(NetworkRule({(0,): first, (1,): second}))))
    grammar = Grammar.default(reward_signals=False, max_degree=2)
    results = distill_run(path, rule=file, grammar=grammar, n_episodes=2, test_episodes=2, out="dnet")
    assert len(results) == 2
    assert _same_formula(results[0].formula, first.sympy(), rtol=1e-6)
    assert _same_formula(results[1].formula, sp.expand(second.sympy()), rtol=1e-6)
    assert (path / "dnet" / "group1" / "rule.tex").is_file()


# ---------------------------------------------------------------------------------------------- planted rules


def test_a_planted_torch_function_is_recovered(tiny_setup):
    net, batch = tiny_setup

    def hebb_decay(s):  # 0.03 y_i x_j - 0.01 W_ij, written in torch only
        return 0.03 * s["post"][:, :, None] * s["pre"][:, None, :] - 0.01 * s["w"]

    update = FunctionUpdate(hebb_decay, needs=("pre", "post", "w"), name="hebb_decay")
    grammar = _small_grammar()
    train = collect_samples(net, batch, update, None, grammar=grammar, n_per_step=12, run_seed=0)
    held = collect_samples(net, batch, update, None, grammar=grammar, n_per_step=12, run_seed=1, seed=1)
    res = distill(add_noise(train, 0.0), grammar=grammar)
    truth = 0.03 * post * pre - 0.01 * w
    assert is_recovered(res.formula, truth, res.backend.identities_, heldout=held)
    assert not is_recovered(0.03 * post * pre - 0.02 * w, truth, heldout=held)  # same terms, other values
    assert not is_recovered(res.formula, 0.03 * post * pre)
    with pytest.raises(ShapeError, match=r"returned \(2, 5\); an update returns dW of shape \(B, n_post, n_pre\)"):
        collect_samples(net, batch, FunctionUpdate(lambda s: s["post"], needs=("post", "pre", "w")), None,
                        grammar=grammar, run_seed=0)  # fmt: skip
    with pytest.raises(ConfigError, match="needs must name base signals"):
        FunctionUpdate(hebb_decay, needs=("pre", "presynaptic"))


def test_add_noise_changes_only_the_target(tiny_samples):
    noisy = add_noise(tiny_samples, 0.1, seed=[0, 3])
    dw = tiny_samples[TARGET].to_numpy()
    diff = noisy[TARGET].to_numpy() - dw
    assert abs(diff.std() / (0.1 * dw.std()) - 1) < 0.15
    assert noisy.drop(columns=TARGET).equals(tiny_samples.drop(columns=TARGET))
    assert noisy.attrs == tiny_samples.attrs and samples_features(noisy)[1] == samples_features(tiny_samples)[1]
    assert add_noise(tiny_samples, 0.1, seed=[0, 3]).equals(noisy) and add_noise(tiny_samples, 0.0).equals(tiny_samples)
    with pytest.raises(ConfigError, match="Noise level must be a finite number >= 0"):
        add_noise(tiny_samples, -0.1)


def test_same_terms_modulo_identities():
    identities = [(reward**2, reward), (layer_sum(post) * pre, pre)]
    assert same_terms(0.5 * post * pre + 0.2 * reward**2 * err, 0.5 * post * pre + 0.21 * reward * err, []) is False
    assert same_terms(0.5 * post * pre + 0.2 * reward**2, 0.5 * post * pre + 0.2 * reward, identities)
    assert same_terms(0.1 * layer_sum(post) * pre + 0.1 * pre, 0.2 * pre, identities)
    assert not same_terms(0.5 * post * pre, 0.5 * post * pre + 1e-3 * w)
    assert reduce_identities(0.1 * layer_sum(post) * pre - 0.1 * pre, identities) == {}

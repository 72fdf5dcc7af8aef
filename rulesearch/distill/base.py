r"""The symbolic-regression backend interface and the formula utilities every backend shares.

A backend fits :math:`\Delta W_{ij} \approx f(a_1, \dots, a_d)` to sampled rows: ``X`` holds the *features*
(signals and operator atoms such as :math:`x_j`, :math:`y_i`, :math:`(W^\top y)_j`, one column each), ``y`` the
observed update ``dw``, ``weights`` the rows' inverse-probability weights. :meth:`DistillBackend.fit` is a
template method: it validates shapes and finiteness, scales the target to unit weighted RMS, seeds, calls the
subclass's only duty ``_search(X, y, weights) -> list[Candidate]``, then keeps the Pareto front of complexity
versus loss, selects one candidate (:mod:`rulesearch.distill.select`) and snaps its constants to simple values
where the fit does not get worse.

Examples
--------
>>> import numpy as np
>>> from rulesearch.distill import SparseBackend
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(400, 3))
>>> y = 0.5 * X[:, 0] * X[:, 1] - 2.0 * X[:, 2] ** 2
>>> backend = SparseBackend(degree=2).fit(X, y, ["a", "b", "c"])
>>> backend.best_.expr
a*b/2 - 2*c**2
"""

from __future__ import annotations

import abc
import copy
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..errors import ConfigError, InvalidRuleError, NotFittedError, RuleSearchError, ShapeError
from ..lang.export import round_floats
from ..lang.rule import Rule, Term
from ..lang.signals import BASE_SIGNALS, OPERATORS, Constant, Signal, expand_derived

__all__ = [
    "BACKENDS",
    "builtin_backends",
    "Candidate",
    "DistillBackend",
    "DistillDataError",
    "evaluate_expr",
    "expr_complexity",
    "clean_formula",
    "feature_exprs",
    "get_backend",
    "formula_to_rule",
    "term_name",
]


class DistillDataError(RuleSearchError, ValueError):
    """The samples cannot be distilled: empty table, constant target, NaN rows, bad weights."""


@dataclass(frozen=True)
class Candidate:
    """One formula found by a backend.

    Attributes
    ----------
    expr : sympy.Expr
        The formula over the features, with numeric coefficients.
    complexity : int
        Node count (:func:`expr_complexity`).
    loss : float
        Weighted mean squared error on the fitted rows, in the target's units.
    n_params : int
        Number of fitted constants (the information criteria's parameter count).
    source : str
        Where the candidate came from (e.g. ``"stlsq"``, ``"lasso"``, ``"operon"``).
    """

    expr: sp.Expr
    complexity: int
    loss: float
    n_params: int
    source: str = ""

    def rule(self, name: str = "distilled") -> Rule:
        """The candidate as a compilable :class:`~rulesearch.lang.rule.Rule` (see :func:`formula_to_rule`)."""
        return formula_to_rule(self.expr, name)


# ------------------------------------------------------------------------------------------------------------
# Formula utilities


def term_name(expr) -> str:
    """Compact name of a term, as the grammar writes it (``post*pre``, ``post^2*w``, ``Contract(w,post)``)."""
    return sp.sstr(expr, order="none").replace("**", "^").replace(" ", "")


def expr_complexity(expr) -> int:
    """Number of nodes of a formula: leaves and numbers count 1, each binary operation 1.

    ``x**n`` for a positive integer ``n`` counts as the product ``x*...*x``; an operator such as
    :math:`(W^\\top y)_j` counts 1 plus its arguments, so ``Contract(w, post)`` costs 3 and is less simple than
    a plain signal.

    >>> from rulesearch.lang.signals import pre, post, w
    >>> expr_complexity(post * pre), expr_complexity(0.5 * post**2 * w)
    (3, 7)
    """
    expr = sp.sympify(expr)
    if isinstance(expr, (sp.Symbol, sp.Number, sp.NumberSymbol)):
        return 1
    if isinstance(expr, (sp.Add, sp.Mul)):
        args = expr.args
        if isinstance(expr, sp.Mul) and args and args[0] in (-1, 1):  # a sign costs nothing
            args = args[1:]
            if len(args) == 1:
                return expr_complexity(args[0])
        return sum(expr_complexity(a) for a in args) + len(args) - 1
    if isinstance(expr, sp.Pow):
        base, ex = expr.args
        if ex.is_Integer and int(ex) > 0:
            return int(ex) * expr_complexity(base) + int(ex) - 1
        return expr_complexity(base) + expr_complexity(ex) + 1
    return 1 + sum(expr_complexity(a) for a in expr.args)


def feature_exprs(names: Sequence) -> list[sp.Expr]:
    """Resolve feature names: SymPy expressions pass through, built-in signal names become their signals,
    other strings become plain real symbols."""
    out = []
    for n in names:
        if isinstance(n, sp.Basic):
            out.append(n)
        elif isinstance(n, str):
            if not n:
                raise ShapeError("Feature names must be non-empty strings or SymPy expressions; got ''.")
            out.append(BASE_SIGNALS.get(n) or sp.Symbol(n, real=True))
        else:
            raise ShapeError(f"Feature names must be strings or SymPy expressions; got {type(n).__name__} {n!r}.")
    return out


_NUMPY_FUNCTIONS = {
    "exp": np.exp,
    "log": np.log,
    "tanh": np.tanh,
    "sinh": np.sinh,
    "cosh": np.cosh,
    "sin": np.sin,
    "cos": np.cos,
    "Abs": np.abs,
    "sign": np.sign,
    "sqrt": np.sqrt,
    "atan": np.arctan,
}


def evaluate_expr(expr, features: Sequence, X: np.ndarray, memo: dict | None = None) -> np.ndarray:
    """Evaluate ``expr`` on the rows of ``X`` whose columns are ``features`` (SymPy expressions).

    Any subexpression equal to a feature is read from its column (so operator atoms such as
    :math:`(W^\\top y)_j` are looked up, never recomputed); stateless derived signals are expanded.

    Raises
    ------
    ShapeError
        The expression uses a signal that is not a column.
    """
    X = np.asarray(X)
    n = X.shape[0]
    index = {f: k for k, f in enumerate(features)}
    memo = {} if memo is None else memo

    def ev(e):
        if e in memo:
            return memo[e]
        k = index.get(e)
        if k is not None:
            out = X[:, k]
        elif isinstance(e, sp.Number) or (not e.free_symbols and e.is_number):
            out = float(e)
        elif isinstance(e, sp.Add):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
        elif isinstance(e, sp.Mul):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
        elif isinstance(e, sp.Pow):
            base, ex = e.args
            b = ev(base)
            if ex.is_Integer and 0 < int(ex) <= 4:
                out = b
                for _ in range(int(ex) - 1):
                    out = out * b
            else:
                with np.errstate(all="ignore"):
                    out = np.power(b, ev(ex))
        elif isinstance(e, Signal) and isinstance(e.definition, sp.Basic) and not isinstance(e, Constant):
            out = ev(expand_derived(e))
        elif type(e).__name__ in _NUMPY_FUNCTIONS:
            with np.errstate(all="ignore"):
                out = _NUMPY_FUNCTIONS[type(e).__name__](*(ev(a) for a in e.args))
        elif isinstance(e, sp.Heaviside):
            x = ev(e.args[0])
            h = ev(e.args[1]) if len(e.args) > 1 else 0.5
            out = np.where(np.asarray(x) > 0, 1.0, np.where(np.asarray(x) < 0, 0.0, h))
        elif isinstance(e, (sp.Max, sp.Min)):
            fn = np.maximum if isinstance(e, sp.Max) else np.minimum
            vals = [ev(a) for a in e.args]
            out = vals[0]
            for v in vals[1:]:
                out = fn(out, v)
        else:
            avail = ", ".join(term_name(f) for f in features)
            missing = [s for s in e.free_symbols if s not in index] or [e]
            raise ShapeError(
                f"Cannot evaluate {term_name(e)}: {', '.join(map(term_name, missing))} is not a column of the "
                f"samples (columns: {avail}). Collect the samples with a grammar (or extra signals) that "
                f"contains it: collect_samples(..., grammar=..., signals=[...])."
            )
        memo[e] = out
        return out

    out = ev(sp.sympify(expr))
    return np.broadcast_to(np.asarray(out, dtype=np.float64), (n,)).copy()


def _split_terms(expr) -> list[tuple[float, sp.Expr]]:
    """``expr`` expanded into ``(coefficient, monomial)`` pairs when every coefficient is numeric."""
    out: dict[sp.Expr, float] = {}
    for t in sp.Add.make_args(sp.expand(expr)):
        c, m = t.as_coeff_Mul()
        if m.atoms(sp.Float) or not c.is_Number:
            raise ValueError
        out[m] = out.get(m, 0.0) + float(c)
    return [(c, m) for m, c in out.items() if c != 0]


def formula_to_rule(expr, name: str = "distilled") -> Rule:
    r"""A distilled formula as a :class:`~rulesearch.lang.rule.Rule`.

    A sum of numeric coefficients times monomials becomes a *linear* rule (one term per monomial, ``values`` the
    coefficients, so :math:`\theta` is the distilled coefficient vector); anything else becomes a *general* rule
    whose Floats are replaced by free :class:`~rulesearch.lang.signals.Constant` s ``c0, c1, ...`` with their values.

    >>> from rulesearch.lang.signals import pre, post, w
    >>> r = formula_to_rule(0.01 * post * pre - 0.002 * w)
    >>> r.term_names(), r.values
    (('w', 'post*pre'), (-0.002, 0.01))
    """
    expr = sp.sympify(expr)
    if expr == 0:
        raise InvalidRuleError("The distilled formula is 0: there is no rule to build.")
    try:
        pairs = _split_terms(expr)
    except ValueError:
        pairs = None
    if pairs:
        pairs.sort(key=lambda cm: (expr_complexity(cm[1]), term_name(cm[1])))
        terms = tuple(Term(term_name(m), m) for _, m in pairs)
        return Rule(terms, name, values=tuple(c for c, _ in pairs))
    floats = sorted(expr.atoms(sp.Float), key=lambda f: (abs(float(f)), float(f)))
    consts = {f: Constant(f"c{k}") for k, f in enumerate(floats)}
    general = expr.xreplace(consts)
    return Rule.general(general, tuple(consts.values()), name, values={c.name: float(f) for f, c in consts.items()})


def _scale(expr, s: float):
    """``s * expr`` with the factor distributed over a sum (numbers merge into each term's coefficient)."""
    if s == 1:
        return expr
    if isinstance(expr, sp.Add):
        return sp.Add(*(_scale(a, s) for a in expr.args))
    return sp.Float(s) * expr


def _uses_signals(exprs) -> bool:
    return all(all(isinstance(s, Signal) for s in e.free_symbols) or isinstance(e, OPERATORS) for e in exprs)


# ------------------------------------------------------------------------------------------------------------
# The backend ABC


BACKENDS: dict[str, type] = {}
"""Backend classes by name (``sparse``, ``operon``, ``pysr``); filled as the backend modules are imported
(:func:`builtin_backends`)."""


def builtin_backends() -> dict[str, type]:
    """:data:`BACKENDS`, with the package's own backends imported (each registers itself)."""
    from . import operon, pysr, sparse  # noqa: F401

    return BACKENDS


def get_backend(backend="sparse", **params) -> DistillBackend:
    """A backend instance from a name in :data:`BACKENDS` (with ``params``) or an instance (returned as is)."""
    if isinstance(backend, DistillBackend):
        if params:
            raise ConfigError("Pass backend parameters either in the instance or as keywords, not both.")
        return backend
    if isinstance(backend, type) and issubclass(backend, DistillBackend):
        return backend(**params)
    cls = builtin_backends().get(str(backend).lower())
    if cls is None:
        import difflib

        close = difflib.get_close_matches(str(backend), list(BACKENDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown distillation backend {backend!r}; known: {sorted(BACKENDS)}.{hint}")
    return cls(**params)


def clean_formula(
    expr,
    features: Sequence,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    drop_tol: float = 1e-3,
    rel_floor: float = 1e-9,
    deadline: float | None = None,
) -> tuple[sp.Expr, float]:
    r"""Clean a formula found by genetic programming: expand, drop negligible terms, refit constants.

    1. ``sympy.expand``; the outer coefficients of the additive terms are refitted by weighted least squares on all
       rows, and terms whose weighted RMS contribution is below ``drop_tol * rms(y)`` are dropped (repeatedly).
    2. Backward elimination: the term whose removal raises the loss least is dropped while that rise stays within
       the BIC price of one parameter, :math:`\log(n)/n` relative (losses below ``(rel_floor * rms(y))**2``
       tie); GP trees often carry a tiny intercept or a term that only fits the noise.
    3. Constants inside non-linear parts are refitted jointly by Levenberg-Marquardt
       (``scipy.optimize.least_squares``) when that lowers the loss.

    ``deadline`` (a ``time.perf_counter()`` value) ends steps 2 and 3 early, keeping what is fitted by then.

    Returns the cleaned formula and its weighted mean squared error.
    """

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    W = w.sum()
    y_rms = float(np.sqrt(np.sum(w * y**2) / W))
    floor = (rel_floor * y_rms) ** 2
    n_eff = W**2 / float(np.sum(w**2))
    price = math.log(max(n_eff, 2.0)) / max(n_eff, 2.0)
    sw = np.sqrt(w)

    def loss_of(pred):
        return float(np.sum(w * (y - pred) ** 2) / W)

    def fit(cols):
        if not cols:
            return np.zeros(0), loss_of(np.zeros_like(y))
        A = np.stack(cols, axis=1)
        coef, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
        return coef, loss_of(A @ coef)

    expr = sp.expand(sp.sympify(expr))
    parts = []
    memo: dict = {}
    for t in sp.Add.make_args(expr):
        c, rest = t.as_coeff_Mul()
        col = evaluate_expr(rest, features, X, memo)
        if np.isfinite(col).all():
            parts.append((rest, col))
    while True:  # terminates: every pass that does not break drops a term
        coef, loss = fit([col for _, col in parts])
        if not parts:
            return sp.Integer(0), loss
        size = np.abs(coef) * np.sqrt(np.array([np.sum(w * col**2) / W for _, col in parts]))
        keep = size >= drop_tol * y_rms
        if keep.all():
            break
        parts = [p for p, k in zip(parts, keep) if k]
    while len(parts) > 1 and not out_of_time():
        trials = [fit([col for j, (_, col) in enumerate(parts) if j != k]) for k in range(len(parts))]
        k = min(range(len(parts)), key=lambda k: trials[k][1])
        if max(trials[k][1], floor) > max(loss, floor) * (1 + price):
            break
        parts = [p for j, p in enumerate(parts) if j != k]
        coef, loss = trials[k]
    out = sp.Add(*(sp.Float(float(c)) * rest for c, (rest, _) in zip(coef, parts)))
    inner = sorted(out.atoms(sp.Float) - {sp.Float(float(c)) for c in coef}, key=str)
    if inner and not out_of_time():
        out, loss = _refit_constants(out, features, X, y, w, loss, deadline)
    return out, loss


class _OutOfTime(Exception):
    pass


def _refit_constants(expr, features, X, y, w, loss, deadline=None):
    import scipy.optimize

    floats = sorted(expr.atoms(sp.Float), key=str)
    syms = [sp.Dummy(f"c{k}") for k in range(len(floats))]
    templ = expr.xreplace(dict(zip(floats, syms)))
    fsyms = [sp.Dummy(f"x{k}") for k in range(len(features))]
    templ = templ.xreplace(dict(zip(features, fsyms)))
    try:
        fn = sp.lambdify(fsyms + syms, templ, "numpy")
    except Exception:  # pragma: no cover - exotic nodes: keep the linear refit
        return expr, loss
    sw = np.sqrt(w / w.sum())
    cols = [X[:, k] for k in range(X.shape[1])]

    def resid(c):
        if deadline is not None and time.perf_counter() > deadline:
            raise _OutOfTime
        with np.errstate(all="ignore"):
            r = (np.broadcast_to(fn(*cols, *c), y.shape) - y) * sw
        return np.nan_to_num(r, nan=1e6, posinf=1e6, neginf=-1e6)

    x0 = np.array([float(f) for f in floats])
    try:
        sol = scipy.optimize.least_squares(resid, x0, method="lm", max_nfev=200 * (len(x0) + 1))
    except (ValueError, np.linalg.LinAlgError, _OutOfTime):
        return expr, loss
    new = float(np.sum(resid(sol.x) ** 2))
    if np.isfinite(new) and new < loss:
        return templ.xreplace({**dict(zip(syms, map(sp.Float, sol.x))), **dict(zip(fsyms, features))}), new
    return expr, loss


class DistillBackend(abc.ABC):
    """Base class of symbolic-regression backends (template method :meth:`fit`).

    Subclasses store their arguments in ``__init__`` under their own names (so :meth:`get_params`,
    :meth:`set_params` and :meth:`clone` round-trip) and implement ``_search``. Optional dependencies are imported
    inside ``_search`` (or :meth:`_check_available`) and raise :class:`~rulesearch.errors.BackendUnavailableError`
    naming the pip extra.

    Attributes (after fit)
    ----------------------
    candidates_ : list of Candidate
        Everything the search returned (in target units).
    front_ : list of Candidate
        The Pareto front of complexity versus loss, simplest first.
    best_ : Candidate
        The selected candidate, constants snapped where the fit does not get worse.
    selection_ : dict
        Criterion values on the front (``scores``) and the selected index.
    features_, feature_names_ : list
        The features as SymPy expressions and as names.
    n_samples_, n_features_, n_eff_ : int, int, float
        Rows, columns, and the effective sample size :math:`(\\sum w)^2 / \\sum w^2`.
    history_ : list of dict
        Stages with their wall times.
    """

    extra: str | None = None
    """The pip extra that provides the backend's dependency (``rulesearch[<extra>]``)."""

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is not None:
            BACKENDS[name] = cls
            cls.name = name

    # ---- capabilities ------------------------------------------------------------------------------------
    @property
    def supports_constants(self) -> bool:
        """Whether fitted constants may appear anywhere in a formula (not only as term coefficients)."""
        return False

    @property
    def supports_nonlinear(self) -> bool:
        """Whether formulas outside the backend's fixed term library (e.g. ``tanh``, division) can be found."""
        return False

    @classmethod
    def available(cls) -> bool:
        """Whether the backend can run here (cheap: imports nothing heavy)."""
        return True

    def _check_available(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Raise :class:`~rulesearch.errors.BackendUnavailableError` when the backend cannot run."""

    # ---- sklearn-style parameters ------------------------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        return [p for p, v in sig.parameters.items() if p != "self" and v.kind not in kinds]

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params) -> DistillBackend:
        names = self._param_names()
        for k, v in params.items():
            if k not in names:
                raise TypeError(f"{type(self).__name__} has no parameter {k!r}; parameters: {names}.")
            setattr(self, k, v)
        return self

    def clone(self) -> DistillBackend:
        """An unfitted copy with the same parameters."""
        return type(self)(**copy.deepcopy(self.get_params()))

    # ---- fit ---------------------------------------------------------------------------------------------
    def fit(self, X, y, feature_names: Sequence, weights=None) -> DistillBackend:
        """Fit formulas :math:`y \\approx f(X)`; returns ``self``.

        Parameters
        ----------
        X : array, shape (n_samples, n_features)
            Feature columns (signals and operator atoms).
        y : array, shape (n_samples,)
            Observed updates ``dw``.
        feature_names : sequence of str or sympy.Expr, length n_features
            What each column is (a SymPy expression over signals, or a name).
        weights : array, shape (n_samples,), optional
            Non-negative row weights (inverse inclusion probabilities); uniform by default.

        Raises
        ------
        DistillDataError
            Empty table, NaN/inf rows, constant target, bad weights.
        ShapeError
            Inconsistent shapes or feature names.
        BackendUnavailableError
            The backend's optional dependency is missing.
        """
        self._check_available()
        t0 = time.perf_counter()
        X, y, w = self._validate(X, y, feature_names, weights)
        self.features_ = feature_exprs(feature_names)
        self.feature_names_ = [term_name(f) for f in self.features_]
        if len(set(self.features_)) != len(self.features_):
            dup = sorted({n for n in self.feature_names_ if self.feature_names_.count(n) > 1})
            raise ShapeError(f"Feature names repeat: {dup}; every column must be a distinct feature.")
        self.n_samples_, self.n_features_ = X.shape
        self.n_eff_ = float(w.sum() ** 2 / (w**2).sum())
        self.y_scale_ = float(np.sqrt(np.sum(w * y**2) / w.sum()))
        self.history_ = [{"stage": "validate", "seconds": time.perf_counter() - t0}]
        t1 = time.perf_counter()
        raw = self._search(X, y / self.y_scale_, w)
        if not raw:
            raise RuleSearchError(f"{type(self).__name__} returned no candidate formula.")
        s = self.y_scale_
        self.candidates_ = [
            Candidate(_scale(c.expr, s), c.complexity, c.loss * s * s, c.n_params, c.source) for c in raw
        ]
        self.history_.append({"stage": "search", "seconds": time.perf_counter() - t1,
                              "candidates": len(self.candidates_)})  # fmt: skip
        t2 = time.perf_counter()
        from .select import pareto_front, select_candidate, snap_constants

        self.front_ = pareto_front(self.candidates_)
        floor = self._floor()
        n_cand = getattr(self, "n_candidates_", None)
        index, scores = select_candidate(self.front_, self.n_eff_, self._selection(), floor, n_cand)
        self.selection_ = {"method": self._selection(), "index": index, "scores": scores, "floor": floor}
        best = self.front_[index]
        if getattr(self, "snap", True):
            best = snap_constants(best, self.features_, X, y, w, floor=floor)
        self.best_ = best
        self.history_.append({"stage": "select", "seconds": time.perf_counter() - t2})
        return self

    def _selection(self) -> str:
        return getattr(self, "selection", "bic")

    def _floor(self) -> float:
        """Loss floor: losses below ``(rel_floor * rms(y))**2`` count as equal (numerical resolution)."""
        rel = getattr(self, "rel_floor", 1e-9)
        return float((rel * self.y_scale_) ** 2)

    @abc.abstractmethod
    def _search(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray) -> list[Candidate]:
        """Return candidate formulas for ``y`` (unit weighted RMS) over ``self.features_``; weights mean 1."""

    # ---- validation --------------------------------------------------------------------------------------
    @staticmethod
    def _validate(X, y, feature_names, weights):
        try:
            X = np.asarray(X, dtype=np.float64)
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ShapeError(f"X and y must be numeric arrays; conversion failed: {e}.") from None
        if X.ndim != 2:
            raise ShapeError(f"X must have shape (n_samples, n_features); received shape {X.shape}.")
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ShapeError(f"y must have shape (n_samples,) = ({X.shape[0]},) to match X; received shape {y.shape}.")
        if feature_names is None or isinstance(feature_names, (str, sp.Basic)) or len(feature_names) != X.shape[1]:
            got = "None" if feature_names is None else f"{feature_names!r}"[:120]
            raise ShapeError(
                f"feature_names must name the {X.shape[1]} columns of X (a sequence of str or SymPy expressions); "
                f"received {got}."
            )
        if X.shape[0] == 0:
            raise DistillDataError(
                "The sample table is empty (0 rows): nothing to distill. Collect samples first "
                "(collect_samples(...)) and check that the layers= / steps= filters select some rows."
            )
        bad = ~(np.isfinite(X).all(axis=1) & np.isfinite(y))
        if bad.any():
            rows = np.flatnonzero(bad)
            cols = sorted({k for k in range(X.shape[1]) if not np.isfinite(X[rows, k]).all()})
            where = f"columns {[str(feature_names[k]) for k in cols]}" if cols else "the target dw"
            raise DistillDataError(
                f"{bad.sum()} of {X.shape[0]} rows hold NaN or inf (rows {rows[:8].tolist()}"
                f"{' ...' if len(rows) > 8 else ''}) in {where}. The network probably diverged while the samples "
                f"were collected: drop those rows (samples.dropna()) or lower the rule's coefficients."
            )
        if weights is None:
            w = np.ones(X.shape[0])
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != y.shape:
                raise ShapeError(f"weights must have shape ({X.shape[0]},) to match X; received {w.shape}.")
            if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise DistillDataError(
                    "weights must be finite, non-negative and not all zero (inverse inclusion probabilities); "
                    f"received min {np.nanmin(w) if w.size else 'n/a'}, sum {np.nansum(w)}."
                )
        w = w / w.mean()
        if np.ptp(y[w > 0]) == 0:
            raise DistillDataError(
                f"The target dw is constant (every one of {X.shape[0]} rows equals {y[0]:g}): there is no update to "
                "distill. Check that the rule's coefficients are nonzero and the sampled layers are plastic."
            )
        return X, y, w

    # ---- results -----------------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "best_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(X, y, feature_names).")

    @property
    def complexity(self) -> int:
        """Complexity of the selected formula."""
        self._check_fitted()
        return self.best_.complexity

    @property
    def rule_(self) -> Rule:
        """The selected formula as a compilable Rule (features must be rulesearch signals)."""
        self._check_fitted()
        if not _uses_signals(self.features_):
            raise InvalidRuleError(
                "The features are plain symbols, not rulesearch signals, so the formula cannot become a Rule. "
                "Fit with feature_names given as signals (e.g. the columns of collect_samples)."
            )
        return self.best_.rule()

    def predict(self, X) -> np.ndarray:
        """The selected formula evaluated on the rows of ``X``, shape (n_samples,)."""
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_:
            raise ShapeError(f"X must have shape (n_samples, {self.n_features_}); received {X.shape}.")
        return evaluate_expr(self.best_.expr, self.features_, X)

    def equations(self, precision: int = 4) -> str:
        """The Pareto front as a table, the selected row marked with ``>``."""
        self._check_fitted()
        lines = [f"{'':2}{'complexity':>10}  {'loss':>11}  {'params':>6}  formula"]
        chosen = self.front_[self.selection_["index"]]
        for c in self.front_:
            mark = ">" if c is chosen else " "
            f = sp.sstr(round_floats(c.expr, precision), order="none")
            lines.append(f"{mark:2}{c.complexity:>10}  {c.loss:>11.4e}  {c.n_params:>6}  {f}")
        if self.best_.expr != chosen.expr:
            lines.append(f"snapped: {sp.sstr(self.best_.expr, order='none')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        head = f"{type(self).__name__}({params})"
        if not hasattr(self, "best_"):
            return head
        return f"{head}\n{self.equations()}"

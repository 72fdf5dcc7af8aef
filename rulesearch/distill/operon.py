r"""Genetic programming with Operon (``pip install 'rulesearch[operon]'``) for non-polynomial formulas.

Operon (Burlacu et al. 2020) evolves expression trees over the features (signals and operator atoms) with
NSGA-II on accuracy and length and fits their constants by Levenberg-Marquardt. Its raw trees are bloated, so every
tree on its Pareto front is cleaned with SymPy (:func:`~rulesearch.distill.base.clean_formula`): expanded,
negligible terms dropped, constants refitted on *all* rows with the exact weights, then put in canonical (expanded,
sorted) form. Operon itself takes no row weights: it sees a weighted bootstrap of at most ``max_rows`` rows (rows
drawn with probability proportional to their weight), which has the weighted loss as its expectation.

Primitive sets (``primitives=``; constants and the atom columns are always leaves):

=============  =========================================  ==================================================
name           Operon symbols                             formulas
=============  =========================================  ==================================================
``polynomial`` add, sub, mul (the default)                polynomials in the atoms with fitted constants
``rational``   + div                                      ratios of polynomials (divisive normalization)
``nonlinear``  + div, tanh, exp, abs                      saturating, exponential and rectified updates
=============  =========================================  ==================================================

or a comma-separated list of Operon symbols from :data:`OPERON_SYMBOLS` (each maps to a function of the rule
language, so every formula compiles). Larger sets search a larger space: give them more ``max_time``.

``max_time`` bounds the whole :meth:`fit` in wall-clock seconds: Operon gets ``search_share`` of it, and cleaning
(expansion, refits, Levenberg-Marquardt) stops at the deadline, keeping the formulas cleaned by then (simplest
first; at least the simplest one).

References
----------
Burlacu, B., Kronberger, G. & Kommenda, M. Operon C++: an efficient genetic programming framework for symbolic
regression. GECCO 2020 Companion, 1562-1570 (2020).
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import sympy as sp

from ..errors import BackendUnavailableError, ConfigError
from .base import Candidate, DistillBackend, clean_formula, expr_complexity

__all__ = ["OPERON_SYMBOLS", "PRIMITIVE_SETS", "OperonBackend"]

PRIMITIVE_SETS = {
    "polynomial": ("add", "sub", "mul"),
    "rational": ("add", "sub", "mul", "div"),
    "nonlinear": ("add", "sub", "mul", "div", "tanh", "exp", "abs"),
}
"""Named primitive sets of the operon backend (see the module docstring)."""

OPERON_SYMBOLS = (
    "add", "sub", "mul", "div", "square", "abs", "exp", "log", "logabs", "sqrt", "sqrtabs", "tanh", "sin", "cos",
)  # fmt: skip
"""The Operon symbols accepted in ``primitives``: those whose printed form SymPy reads as a function of the rule
language (``logabs`` prints as ``log(abs(x))``, ``sqrtabs`` as ``sqrt(abs(x))``, ``square`` as ``x ^ 2``)."""


def operon_symbols(primitives: str) -> str:
    """Operon's ``allowed_symbols`` for a set name of :data:`PRIMITIVE_SETS` or a comma-separated symbol list."""
    names = PRIMITIVE_SETS.get(primitives)
    if names is None:
        names = tuple(s.strip() for s in str(primitives).split(",") if s.strip() not in ("", "constant", "variable"))
        bad = [s for s in names if s not in OPERON_SYMBOLS]
        if bad or not names:
            raise ConfigError(
                f"operon primitives {primitives!r}: give a set name ({', '.join(PRIMITIVE_SETS)}) or a comma-separated "
                f"list of {', '.join(OPERON_SYMBOLS)}; {bad or 'none given'} not allowed."
            )
    return ",".join((*names, "constant", "variable"))


def parse_model(text: str, features) -> sp.Expr:
    """An Operon model string over ``x0, x1, ...`` (Operon's own output, not user input) as SymPy over
    ``features``."""
    syms = {f"x{k}": sp.Symbol(f"x{k}", real=True) for k in range(len(features))}
    raw = sp.sympify(text.replace("^", "**"), locals=syms)
    return raw.xreplace({syms[f"x{k}"]: f for k, f in enumerate(features)})


class OperonBackend(DistillBackend, name="operon"):
    """Operon genetic programming, results cleaned with SymPy.

    Parameters
    ----------
    primitives : str
        A primitive set of :data:`PRIMITIVE_SETS` (``polynomial``, ``rational``, ``nonlinear``) or a comma-separated
        list of :data:`OPERON_SYMBOLS`.
    population_size, generations, max_length, max_depth : int
        GP size limits.
    max_time : float
        Wall-clock bound of the whole fit in seconds (search, cleaning and refits).
    search_share : float
        Fraction of ``max_time`` given to Operon's search; the rest is for cleaning the front.
    n_threads : int
        Operon's worker threads.
    max_rows : int
        Rows shown to Operon (a weighted bootstrap when the table is larger or weighted).
    drop_tol : float
        Terms contributing less than this fraction of RMS(dw) are dropped when cleaning.
    selection, rel_floor, snap :
        As for :class:`~rulesearch.distill.sparse.SparseBackend`.
    random_state : int
        Seeds Operon and the bootstrap.
    """

    extra = "operon"

    def __init__(
        self,
        primitives: str = "polynomial",
        population_size: int = 500,
        generations: int = 100,
        max_length: int = 25,
        max_depth: int = 10,
        max_time: float = 30,
        search_share: float = 0.7,
        n_threads: int = 1,
        max_rows: int = 5000,
        drop_tol: float = 1e-3,
        selection: str = "bic",
        rel_floor: float = 1e-9,
        snap: bool = True,
        random_state: int = 0,
    ):
        self.primitives = primitives
        self.population_size = population_size
        self.generations = generations
        self.max_length = max_length
        self.max_depth = max_depth
        self.max_time = max_time
        self.search_share = search_share
        self.n_threads = n_threads
        self.max_rows = max_rows
        self.drop_tol = drop_tol
        self.selection = selection
        self.rel_floor = rel_floor
        self.snap = snap
        self.random_state = random_state
        self._check_params()

    def _check_params(self) -> None:
        """Refuse bad primitives and time bounds at once (again in :meth:`fit`, after ``set_params``)."""
        operon_symbols(self.primitives)
        if isinstance(self.max_time, bool) or not (isinstance(self.max_time, (int, float)) and self.max_time >= 2):
            raise ConfigError(f"operon max_time must be a number of seconds >= 2; received {self.max_time!r}.")
        if not 0 < self.search_share < 1:
            raise ConfigError(f"operon search_share must lie in (0, 1); received {self.search_share!r}.")

    @property
    def supports_constants(self) -> bool:
        return True

    @property
    def supports_nonlinear(self) -> bool:
        return True

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("pyoperon") is not None

    def _check_available(self) -> None:
        if not self.available():
            raise BackendUnavailableError(
                "The 'operon' distillation backend needs pyoperon, which is not installed. Install it with "
                "pip install 'rulesearch[operon]' (or pip install pyoperon), or use backend='sparse' (the default, "
                "no extra dependency)."
            )

    def fit(self, X, y, feature_names, weights=None):
        self._check_params()
        self._deadline = time.perf_counter() + 0.95 * self.max_time  # the rest: selection and snapping
        return super().fit(X, y, feature_names, weights)

    def _search(self, X, y, weights):
        try:
            from pyoperon.sklearn import SymbolicRegressor
        except ImportError as err:
            raise BackendUnavailableError(
                f"pyoperon is installed but does not import ({err}); reinstall it with pip install "
                "'rulesearch[operon]', or use backend='sparse'."
            ) from err
        rng = np.random.default_rng(self.random_state)
        n = X.shape[0]
        uniform = np.allclose(weights, weights[0])
        if n > self.max_rows or not uniform:
            rows = rng.choice(n, size=min(n, self.max_rows), replace=True, p=weights / weights.sum())
        else:
            rows = np.arange(n)
        reg = SymbolicRegressor(
            allowed_symbols=operon_symbols(self.primitives),
            population_size=self.population_size,
            generations=self.generations,
            max_length=self.max_length,
            max_depth=self.max_depth,
            max_time=max(1, int(self.search_share * self.max_time)),
            n_threads=self.n_threads,
            objectives=["r2", "length"],
            random_state=self.random_state,
        )
        reg.fit(X[rows], y[rows])
        names = [f"x{k}" for k in range(X.shape[1])]
        out, seen = [], set()
        for model in sorted(reg.pareto_front_, key=lambda m: m["tree"].Length):  # simplest first
            if out and time.perf_counter() > self._deadline:
                break
            raw = parse_model(reg.get_model_string(model["tree"], 17, names), self.features_)
            expr, loss = clean_formula(raw, self.features_, X, y, weights, self.drop_tol, self.rel_floor,
                                       deadline=self._deadline)  # fmt: skip
            if expr == 0 or expr in seen:
                continue
            seen.add(expr)
            n_params = len(expr.atoms(sp.Float))
            out.append(Candidate(expr, expr_complexity(expr), loss, n_params, "operon"))
        return out

r"""Genetic programming with Operon (``pip install 'rulesearch[operon]'``) for non-polynomial formulas.

Operon (Burlacu et al. 2020) evolves expression trees over the features (signals and operator atoms) with
NSGA-II on accuracy and length and fits their constants by Levenberg-Marquardt. Its raw trees are bloated, so every
tree on its Pareto front is cleaned with SymPy (:func:`~rulesearch.distill.base.clean_formula`): expanded,
negligible terms dropped, constants refitted on *all* rows with the exact weights, then put in canonical (expanded,
sorted) form. Operon itself takes no row weights: it sees a weighted bootstrap of at most ``max_rows`` rows (rows
drawn with probability proportional to their weight), which has the weighted loss as its expectation.

References
----------
Burlacu, B., Kronberger, G. & Kommenda, M. Operon C++: an efficient genetic programming framework for symbolic
regression. GECCO 2020 Companion, 1562-1570 (2020).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import sympy as sp

from ..errors import BackendUnavailableError
from .base import Candidate, DistillBackend, clean_formula, expr_complexity

__all__ = ["OperonBackend"]


class OperonBackend(DistillBackend, name="operon"):
    """Operon genetic programming, results cleaned with SymPy.

    Parameters
    ----------
    allowed_symbols : str
        Operon's primitive set (e.g. ``"add,sub,mul,div,exp,tanh,constant,variable"``).
    population_size, generations, max_length, max_depth : int
        GP size limits.
    max_time : int
        Wall-clock limit of the search in seconds.
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
        allowed_symbols: str = "add,sub,mul,constant,variable",
        population_size: int = 500,
        generations: int = 100,
        max_length: int = 25,
        max_depth: int = 10,
        max_time: int = 30,
        n_threads: int = 1,
        max_rows: int = 5000,
        drop_tol: float = 1e-3,
        selection: str = "bic",
        rel_floor: float = 1e-9,
        snap: bool = True,
        random_state: int = 0,
    ):
        self.allowed_symbols = allowed_symbols
        self.population_size = population_size
        self.generations = generations
        self.max_length = max_length
        self.max_depth = max_depth
        self.max_time = max_time
        self.n_threads = n_threads
        self.max_rows = max_rows
        self.drop_tol = drop_tol
        self.selection = selection
        self.rel_floor = rel_floor
        self.snap = snap
        self.random_state = random_state

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
            allowed_symbols=self.allowed_symbols,
            population_size=self.population_size,
            generations=self.generations,
            max_length=self.max_length,
            max_depth=self.max_depth,
            max_time=self.max_time,
            n_threads=self.n_threads,
            objectives=["r2", "length"],
            random_state=self.random_state,
        )
        reg.fit(X[rows], y[rows])
        names = [f"x{k}" for k in range(X.shape[1])]
        syms = {nm: sp.Symbol(nm, real=True) for nm in names}
        back = {syms[nm]: f for nm, f in zip(names, self.features_)}
        out, seen = [], set()
        for model in reg.pareto_front_:
            text = reg.get_model_string(model["tree"], 17, names)
            raw = sp.sympify(text.replace("^", "**"), locals=syms)  # Operon's own output, not user input
            expr, loss = clean_formula(raw.xreplace(back), self.features_, X, y, weights, self.drop_tol, self.rel_floor)
            if expr == 0 or expr in seen:
                continue
            seen.add(expr)
            n_params = len(expr.atoms(sp.Float))
            out.append(Candidate(expr, expr_complexity(expr), loss, n_params, "operon"))
        return out

r"""PySR (``pip install 'rulesearch[pysr]'``), used only where a Julia executable exists.

``import pysr`` downloads Julia and the SymbolicRegression.jl registry on first use and fails (or hangs) without
network access, so :func:`pysr_status` decides availability *without importing pysr*: the package must be findable
(``importlib.util.find_spec``) and a Julia executable must exist (``PYTHON_JULIACALL_EXE``, ``PYTHON_JULIAPKG_EXE``,
``julia`` on the ``PATH``, or the one juliapkg installs under ``sys.prefix``). Otherwise :meth:`PySRBackend.fit`
raises :class:`~rulesearch.errors.BackendUnavailableError` at once, saying how to enable it.

Offline machines need a pre-populated ``JULIA_DEPOT_PATH`` plus ``PYTHON_JULIAPKG_OFFLINE=yes`` and
``PYTHON_JULIAPKG_EXE`` pointing to a Julia binary (PySR's Apptainer recipe builds such a depot).

References
----------
Cranmer, M. Interpretable machine learning for science with PySR and SymbolicRegression.jl. arXiv:2305.01582
(2023).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import BackendUnavailableError
from .base import Candidate, DistillBackend, clean_formula, expr_complexity

__all__ = ["PySRBackend", "julia_executable", "pysr_status"]


def julia_executable() -> str | None:
    """Path of a Julia executable PySR could use, or None (checks the environment only; starts nothing)."""
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE"):
        exe = os.environ.get(var)
        if exe and Path(exe).is_file():
            return exe
    found = shutil.which("julia")
    if found:
        return found
    bundled = Path(sys.prefix) / "julia_env" / "pyjuliapkg" / "install" / "bin" / "julia"
    return str(bundled) if bundled.is_file() else None


def pysr_status() -> tuple[bool, str]:
    """``(available, reason)`` for the PySR backend, without importing pysr or triggering any download."""
    if importlib.util.find_spec("pysr") is None:
        return False, "the pysr package is not installed"
    if julia_executable() is None:
        return False, (
            "no Julia executable was found (PYTHON_JULIACALL_EXE, PYTHON_JULIAPKG_EXE, julia on PATH, or "
            f"{Path(sys.prefix) / 'julia_env'})"
        )
    return True, "pysr and Julia found"


class PySRBackend(DistillBackend, name="pysr"):
    """PySR's evolutionary search (SymbolicRegression.jl); deterministic serial mode, row weights passed through.

    Parameters
    ----------
    binary_operators, unary_operators : tuple of str
        PySR operators.
    niterations, populations, maxsize : int
        Search size.
    timeout_in_seconds : float, optional
        Wall-clock limit.
    max_rows : int
        Rows passed to PySR (uniform subsample when larger; weights are passed through).
    drop_tol, selection, rel_floor, snap, random_state :
        As for :class:`~rulesearch.distill.operon.OperonBackend`.
    """

    extra = "pysr"

    def __init__(
        self,
        binary_operators: tuple[str, ...] = ("+", "-", "*"),
        unary_operators: tuple[str, ...] = (),
        niterations: int = 40,
        populations: int = 15,
        maxsize: int = 25,
        timeout_in_seconds: float | None = None,
        max_rows: int = 5000,
        drop_tol: float = 1e-3,
        selection: str = "bic",
        rel_floor: float = 1e-9,
        snap: bool = True,
        random_state: int = 0,
    ):
        self.binary_operators = binary_operators
        self.unary_operators = unary_operators
        self.niterations = niterations
        self.populations = populations
        self.maxsize = maxsize
        self.timeout_in_seconds = timeout_in_seconds
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
        return pysr_status()[0]

    def _check_available(self) -> None:
        ok, reason = pysr_status()
        if not ok:
            raise BackendUnavailableError(
                f"The 'pysr' distillation backend cannot run here: {reason}. To enable it, pip install "
                "'rulesearch[pysr]' and install Julia (>= 1.10) so that `julia` is on the PATH, or set "
                "PYTHON_JULIAPKG_EXE to a Julia binary (offline: also JULIA_DEPOT_PATH with SymbolicRegression.jl "
                "and PYTHON_JULIAPKG_OFFLINE=yes). Without Julia use backend='sparse' (the default) or "
                "backend='operon'."
            )

    def _search(self, X, y, weights):
        try:
            from pysr import PySRRegressor
        except Exception as err:  # juliacall raises various errors when Julia is broken
            raise BackendUnavailableError(
                f"pysr failed to import ({type(err).__name__}: {err}); check the Julia installation, or use "
                "backend='sparse'."
            ) from err
        rng = np.random.default_rng(self.random_state)
        n = X.shape[0]
        rows = np.sort(rng.choice(n, size=self.max_rows, replace=False)) if n > self.max_rows else np.arange(n)
        names = [f"x{k}" for k in range(X.shape[1])]
        model = PySRRegressor(
            binary_operators=list(self.binary_operators),
            unary_operators=list(self.unary_operators),
            niterations=self.niterations,
            populations=self.populations,
            maxsize=self.maxsize,
            timeout_in_seconds=self.timeout_in_seconds,
            parallelism="serial",
            deterministic=True,
            random_state=self.random_state,
            progress=False,
            verbosity=0,
        )
        model.fit(X[rows], y[rows], weights=weights[rows], variable_names=names)
        syms = {nm: sp.Symbol(nm, real=True) for nm in names}
        back = {sp.Symbol(nm): f for nm, f in zip(names, self.features_)}
        back.update({syms[nm]: f for nm, f in zip(names, self.features_)})
        out, seen = [], set()
        for i in range(len(model.equations_)):
            raw = model.sympy(i)
            expr, loss = clean_formula(raw.xreplace(back), self.features_, X, y, weights, self.drop_tol, self.rel_floor)
            if expr == 0 or expr in seen:
                continue
            seen.add(expr)
            out.append(Candidate(expr, expr_complexity(expr), loss, len(expr.atoms(sp.Float)), "pysr"))
        return out

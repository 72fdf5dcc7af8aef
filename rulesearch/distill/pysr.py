r"""PySR (``pip install 'rulesearch[pysr]'``), used only where a Julia executable exists.

``import pysr`` downloads Julia and the SymbolicRegression.jl registry on first use and fails (or hangs) without
network access, so :func:`pysr_status` decides availability *without importing pysr* (reading a few paths, well
under a millisecond):

1. the package is findable (``importlib.util.find_spec``);
2. a Julia executable exists (``PYTHON_JULIACALL_EXE``, ``PYTHON_JULIAPKG_EXE``, ``julia`` on the ``PATH``, or the
   one juliapkg installs into its project);
3. PySR's Julia packages are prepared: juliapkg's project (``PYTHON_JULIAPKG_PROJECT``, else ``julia_env`` in the
   virtual or conda environment, else ``<depot>/environments/pyjuliapkg``) was resolved (``pyjuliapkg/meta.json``)
   with SymbolicRegression in its manifest, and a depot (``JULIA_DEPOT_PATH``, else ``~/.julia``) holds
   ``packages/SymbolicRegression``. A bare Julia would make the first ``import pysr`` install them, which is a
   download.

Otherwise :meth:`PySRBackend.fit` raises :class:`~rulesearch.errors.BackendUnavailableError` at once, saying how to
enable it. Prepare once on a machine with network access: ``python -c "import pysr"``. Offline machines need a
pre-populated ``JULIA_DEPOT_PATH`` plus ``PYTHON_JULIAPKG_EXE`` (PySR's Apptainer recipe builds such a depot). As a
guard, pysr is imported with ``PYTHON_JULIAPKG_OFFLINE=yes`` unless that variable is set, so a fit never installs
Julia packages (a stale juliapkg state then fails at once instead of downloading).

References
----------
Cranmer, M. Interpretable machine learning for science with PySR and SymbolicRegression.jl. arXiv:2305.01582
(2023).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import BackendUnavailableError
from .base import Candidate, DistillBackend, clean_formula, expr_complexity

__all__ = ["PySRBackend", "julia_depots", "julia_executable", "juliapkg_project", "pysr_status"]


def julia_depots() -> list[Path]:
    """Julia depots to search for installed packages: ``JULIA_DEPOT_PATH`` (empty entries: ``~/.julia``)."""
    entries = os.environ.get("JULIA_DEPOT_PATH", "").split(os.pathsep)
    return [Path(e) if e else Path.home() / ".julia" for e in entries]


def juliapkg_project() -> Path:
    """The Julia project juliapkg (used by pysr) installs into, located as juliapkg does without importing it."""
    project = os.environ.get("PYTHON_JULIAPKG_PROJECT")
    if project:
        return Path(project)
    prefix = sys.prefix if sys.prefix != sys.base_prefix else os.environ.get("CONDA_PREFIX")
    return Path(prefix) / "julia_env" if prefix else julia_depots()[0] / "environments" / "pyjuliapkg"


def julia_executable() -> str | None:
    """Path of a Julia executable PySR could use, or None (checks the environment only; starts nothing)."""
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIAPKG_EXE"):
        exe = os.environ.get(var)
        if exe and Path(exe).is_file():
            return exe
    found = shutil.which("julia")
    if found:
        return found
    bundled = juliapkg_project() / "pyjuliapkg" / "install" / "bin" / "julia"
    return str(bundled) if bundled.is_file() else None


def _prepared() -> str | None:
    """Why PySR's Julia packages are not ready to load without a download, or None when they are."""
    project = juliapkg_project()
    manifests = sorted(project.glob("Manifest*.toml"))
    if not (project / "pyjuliapkg" / "meta.json").is_file() or not any(
        "SymbolicRegression" in m.read_text(errors="replace") for m in manifests
    ):
        return f"juliapkg's project {project} has not been resolved with SymbolicRegression.jl"
    depots = julia_depots()
    if not any((d / "packages" / "SymbolicRegression").is_dir() for d in depots):
        return f"no Julia depot ({os.pathsep.join(map(str, depots))}) holds packages/SymbolicRegression"
    return None


def pysr_status() -> tuple[bool, str]:
    """``(available, reason)`` for the PySR backend, without importing pysr or triggering any download."""
    if importlib.util.find_spec("pysr") is None:
        return False, "the pysr package is not installed"
    exe = julia_executable()
    if exe is None:
        return False, (
            "no Julia executable was found (PYTHON_JULIACALL_EXE, PYTHON_JULIAPKG_EXE, julia on PATH, or "
            f"{juliapkg_project() / 'pyjuliapkg' / 'install'})"
        )
    missing = _prepared()
    if missing is not None:
        return False, (
            f"Julia was found ({exe}) but PySR's Julia packages are not prepared ({missing}); the first "
            "`import pysr` would download them and may hang without network access"
        )
    return True, "pysr, Julia and SymbolicRegression.jl found"


@contextlib.contextmanager
def _offline_juliapkg():
    """Import pysr with ``PYTHON_JULIAPKG_OFFLINE=yes`` (unless set): juliapkg then never installs packages."""
    if "PYTHON_JULIAPKG_OFFLINE" in os.environ:
        yield
        return
    os.environ["PYTHON_JULIAPKG_OFFLINE"] = "yes"
    try:
        yield
    finally:
        os.environ.pop("PYTHON_JULIAPKG_OFFLINE", None)


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
                f"The 'pysr' distillation backend cannot run here: {reason}. To enable it: pip install "
                "'rulesearch[pysr]'; install Julia (>= 1.10) on the PATH or set PYTHON_JULIAPKG_EXE to a Julia "
                'binary; then run python -c "import pysr" once with network access (it installs '
                "SymbolicRegression.jl). Offline: set JULIA_DEPOT_PATH (and PYTHON_JULIAPKG_PROJECT) to a depot "
                "prepared elsewhere. Without Julia use backend='sparse' (the default) or backend='operon'."
            )

    def _search(self, X, y, weights):
        try:
            with _offline_juliapkg():
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

r"""The default backend: sparse regression over a term library (numpy; no optional dependency).

The library :math:`\Theta` holds one column per candidate term :math:`T_r` (a :class:`~rulesearch.Grammar`'s
terms, an explicit list, or every monomial of the features up to ``degree``), evaluated at the sampled rows. After
dropping near-collinear columns (simplest member kept, identities reported; see
:func:`~rulesearch.distill.select.find_collinear`) the columns are scaled to unit weighted RMS and

.. math:: \min_\beta \sum_n w_n \Big(\Delta W_n - \sum_r \beta_r \Theta_{nr}\Big)^2

is solved along three sparsity paths whose supports are each refitted by weighted least squares:

1. sequentially thresholded least squares (STLSQ, Brunton et al. 2016) over a grid of thresholds;
2. an L1 (lasso) path by coordinate descent on the Gram matrix, warm-started from large to small penalties;
3. backward elimination from the largest supports of 1 (drop the term whose removal costs least,
   :math:`\beta_k^2 / [G_{SS}^{-1}]_{kk}`).

Every distinct support becomes a :class:`~rulesearch.distill.base.Candidate`; the base class keeps the Pareto
front of complexity versus loss and selects one.

References
----------
Brunton, S. L., Proctor, J. L. & Kutz, J. N. Discovering governing equations from data by sparse identification of
nonlinear dynamical systems. PNAS 113, 3932-3937 (2016).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import sympy as sp

from ..errors import ConfigError
from ..lang.grammar import Grammar
from ..lang.rule import Pool, Rule, Term
from .base import Candidate, DistillBackend, evaluate_expr, expr_complexity, term_name
from .select import CollinearityReport, find_collinear

__all__ = ["SparseBackend", "identity_exprs", "library_collinearity", "library_terms"]

_TERMS_CACHE: dict[int, tuple[Grammar, tuple]] = {}


def library_terms(library, features: Sequence | None = None, degree: int = 3) -> list[sp.Expr]:
    """The library as a list of SymPy terms: a Grammar's terms (cached), a Pool/Rule/sequence of Terms or
    expressions, or (``library=None``) every monomial of ``features`` of degree ``1..degree``."""
    if library is None:
        if features is None:
            raise ConfigError("library=None builds monomials of the features; pass features.")
        out = []
        for d in range(1, degree + 1):
            for combo in itertools.combinations_with_replacement(range(len(features)), d):
                out.append(sp.Mul(*(features[k] for k in combo)))
        return out
    if isinstance(library, Grammar):
        hit = _TERMS_CACHE.get(id(library))
        if hit is None or hit[0] is not library:
            hit = (library, tuple(t.expr for t in library.terms()))
            _TERMS_CACHE[id(library)] = hit
        return list(hit[1])
    if isinstance(library, (Pool, Rule)):
        return [t.expr for t in library.terms]
    try:
        items = list(library)
    except TypeError:
        raise ConfigError(
            f"library must be a Grammar, a Pool, a Rule, a sequence of Terms/expressions or None; received "
            f"{type(library).__name__}."
        ) from None
    return [t.expr if isinstance(t, Term) else sp.sympify(t) for t in items]


def library_collinearity(
    terms: Sequence[sp.Expr], features: Sequence, X: np.ndarray, weights=None, tol: float = 1e-6
) -> tuple[np.ndarray, CollinearityReport]:
    """The library evaluated on the rows (columns with non-finite values zeroed: such terms cannot explain the
    data) and its near-collinear columns, visited simplest first (:func:`~rulesearch.distill.select.find_collinear`).

    Every backend reports these identities: the sparse backend fits on the kept columns, the GP backends search over
    the atoms whose products the library holds.
    """
    memo: dict = {}
    Theta = np.stack([evaluate_expr(t, features, X, memo) for t in terms], axis=1)
    bad = ~np.isfinite(Theta).all(axis=0)
    if bad.any():
        Theta[:, bad] = 0.0  # e.g. log of a negative signal
    comp = [expr_complexity(t) for t in terms]
    order = sorted(range(len(terms)), key=lambda k: (comp[k], k))
    return Theta, find_collinear(Theta, [term_name(t) for t in terms], order, weights, tol)


def identity_exprs(terms: Sequence[sp.Expr], report: CollinearityReport) -> list[tuple[sp.Expr, sp.Expr]]:
    """Each dropped library term and the combination of kept terms it equals on the data, as SymPy."""
    return [
        (terms[i.index], sp.Add(*(sp.Float(c) * terms[j] for j, (_, c) in zip(i.kept_indices, i.combination))))
        for i in report.identities
    ]


@contextlib.contextmanager
def _one_blas_thread():
    """Small dense problems run far faster on one BLAS thread, above all on a loaded machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _solve(G, c):
    """Solve ``G x = c`` for a symmetric positive (semi)definite ``G``; least squares when singular."""
    import scipy.linalg  # here, not at import: the distill package is imported by every command of the CLI

    if G.shape[0] == 0:
        return np.zeros(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # near-collinear columns are expected
            return scipy.linalg.solve(G, c, assume_a="pos", check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        return np.linalg.lstsq(G, c, rcond=None)[0]


class SparseBackend(DistillBackend, name="sparse"):
    r"""Sparse regression over a term library: STLSQ + L1 path + backward elimination, weighted.

    Parameters
    ----------
    library : Grammar, Pool, Rule, sequence of Term or sympy.Expr, optional
        Candidate terms. None: every monomial of the features of degree ``1..degree``.
    degree : int
        Degree of the monomial library when ``library`` is None.
    thresholds : sequence of float, optional
        STLSQ thresholds on the coefficients of unit-RMS columns (relative to the RMS of ``dw``); default a
        geometric grid from 1e-6 to 1.
    n_alphas : int
        Number of penalties on the L1 path (geometric, from the largest useful one down by 1e-6).
    max_terms : int
        Candidates with more terms are not kept.
    collinearity_tol : float
        Relative residual below which a column counts as a combination of simpler ones.
    selection : str
        ``"ebic"`` (extended BIC over the library size), ``"bic"``, ``"aic"`` or ``"knee"`` (see
        :func:`~rulesearch.distill.select.select_candidate`).
    rel_floor : float
        Relative RMS error below which fits count as exact (the data's numerical resolution).
    snap : bool
        Snap coefficients to simple values where the fit does not get worse.
    random_state : int
        Unused by this deterministic backend; kept for a uniform interface.

    Attributes
    ----------
    library_ : list of sympy.Expr
        All library terms.
    collinearity_ : CollinearityReport
        Kept columns and the identities found on the data.
    identities_ : list of tuple(sympy.Expr, sympy.Expr)
        Each dropped term and the combination of kept terms it equals on the data.
    """

    def __init__(
        self,
        library=None,
        degree: int = 3,
        thresholds: Sequence[float] | None = None,
        n_alphas: int = 30,
        max_terms: int = 30,
        collinearity_tol: float = 1e-6,
        selection: str = "ebic",
        rel_floor: float = 1e-9,
        snap: bool = True,
        random_state: int = 0,
    ):
        self.library = library
        self.degree = degree
        self.thresholds = thresholds
        self.n_alphas = n_alphas
        self.max_terms = max_terms
        self.collinearity_tol = collinearity_tol
        self.selection = selection
        self.rel_floor = rel_floor
        self.snap = snap
        self.random_state = random_state

    def _search(self, X, y, weights):
        with _one_blas_thread():
            return self._search_impl(X, y, weights)

    def _search_impl(self, X, y, weights):
        terms = library_terms(self.library, self.features_, self.degree)
        if not terms:
            raise ConfigError("The library is empty; give a grammar or terms with at least one term.")
        self.library_ = terms
        Theta, report = library_collinearity(terms, self.features_, X, weights, self.collinearity_tol)
        self.collinearity_: CollinearityReport = report
        self.identities_ = identity_exprs(terms, report)
        comp = [expr_complexity(t) for t in terms]
        kept = list(report.kept)
        self.n_candidates_ = len(kept)
        A = Theta[:, kept]
        sw = np.sqrt(weights / weights.sum())
        norms = np.sqrt(((A * sw[:, None]) ** 2).sum(0))
        Aw = A * (sw[:, None] / norms)
        b = y * sw
        G = Aw.T @ Aw
        c = Aw.T @ b
        supports: dict[frozenset, str] = {}
        self._stlsq(G, c, supports)
        self._lasso_path(G, c, supports)
        self._backward(G, c, supports)
        # refit every support (QR least squares: exact to round-off at noise 0), then build SymPy formulas only
        # for the supports on the numeric Pareto front of (complexity, loss)
        kept_terms = [terms[k] for k in kept]
        kept_comp = [comp[k] for k in kept]
        fits = []
        for S, source in supports.items():
            if not S or len(S) > self.max_terms:
                continue
            idx = sorted(S)
            beta, *_ = np.linalg.lstsq(Aw[:, idx], b, rcond=None)
            resid = b - Aw[:, idx] @ beta
            complexity = sum(kept_comp[k] + 2 for k in idx) - 1  # coefficient and product per term, sums between
            fits.append((complexity, float(resid @ resid), idx, beta, source))
        fits.sort(key=lambda f: (f[0], f[1]))
        out, lowest = [], np.inf
        for _complexity, loss, idx, beta, source in fits:
            if loss >= lowest:
                continue
            lowest = loss
            coef = beta / norms[idx]
            expr = sp.Add(*(sp.Float(float(cf)) * kept_terms[k] for cf, k in zip(coef, idx)))
            out.append(Candidate(expr, expr_complexity(expr), loss, len(idx), source))
        return out

    # ---- paths -------------------------------------------------------------------------------------------
    def _stlsq(self, G, c, supports, max_iter: int = 25):
        p = len(c)
        full = _solve(G, c)
        grid = self.thresholds if self.thresholds is not None else np.geomspace(1e-6, 1.0, 37)
        for t in grid:
            S = np.ones(p, dtype=bool)
            beta = full.copy()
            for _ in range(max_iter):
                new = S & (np.abs(beta) >= t)
                if not new.any():
                    break
                if (new == S).all():
                    break
                S = new
                beta = np.zeros(p)
                idx = np.flatnonzero(S)
                beta[idx] = _solve(G[np.ix_(idx, idx)], c[idx])
            if S.any():
                supports.setdefault(frozenset(np.flatnonzero(S).tolist()), "stlsq")

    def _lasso_path(self, G, c, supports, max_sweeps: int = 200, tol: float = 1e-10):
        p = len(c)
        diag = np.diag(G).copy()
        amax = float(np.max(np.abs(c)))
        if amax == 0 or self.n_alphas < 1:
            return
        beta = np.zeros(p)
        r = c.copy()  # c - G beta
        for alpha in amax * np.geomspace(1.0, 1e-6, self.n_alphas + 1)[1:]:
            for sweep in range(max_sweeps):
                full_sweep = sweep % 5 == 0
                coords = range(p) if full_sweep else np.flatnonzero(beta).tolist()
                change = 0.0
                for k in coords:
                    old = beta[k]
                    z = r[k] + diag[k] * old
                    new = np.sign(z) * max(abs(z) - alpha, 0.0) / diag[k]
                    if new != old:
                        r -= G[:, k] * (new - old)
                        beta[k] = new
                        change = max(change, abs(new - old))
                if full_sweep and change < tol:
                    break
            S = np.flatnonzero(beta)
            if len(S) > 3 * self.max_terms:
                break
            if len(S):
                supports.setdefault(frozenset(S.tolist()), "lasso")

    def _backward(self, G, c, supports, n_starts: int = 3):
        starts = sorted((S for S in supports if len(S) <= 3 * self.max_terms), key=len, reverse=True)[:n_starts]
        for S in starts:
            S = sorted(S)
            while len(S) > 1:
                Gs = G[np.ix_(S, S)]
                try:
                    inv = np.linalg.inv(Gs)
                except np.linalg.LinAlgError:
                    inv = np.linalg.pinv(Gs)
                beta = inv @ c[S]
                cost = beta**2 / np.maximum(np.diag(inv), 1e-300)
                S = [s for k, s in enumerate(S) if k != int(np.argmin(cost))]
                supports.setdefault(frozenset(S), "backward")

    @property
    def supports_constants(self) -> bool:
        return False

    @property
    def supports_nonlinear(self) -> bool:
        return False

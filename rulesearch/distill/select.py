r"""Model selection on the Pareto front, constant snapping, and near-collinear library columns.

* :func:`pareto_front` keeps, for growing complexity, only candidates that lower the loss.
* :func:`select_candidate` picks one by an information criterion (``ebic``, the extended BIC that also pays for
  choosing terms out of a large library, default of the sparse backend; ``bic``; ``aic``) or the knee of the front
  (``knee``). Losses below a *floor* (the numerical resolution of the data) count as equal, so at noise 0
  the criterion prefers the simplest exact formula instead of chasing round-off.
* :func:`snap_constants` replaces constants by simple values (integers, simple fractions, one or two significant
  digits) one at a time, refitting the remaining linear coefficients, and keeps a change only when the weighted
  loss does not increase (up to float round-off, and with losses below the floor tied).
* :func:`find_collinear` detects library columns that are (near-)linear combinations of simpler ones on the data:
  identities that hold in network data, such as :math:`r^2 = r` for a 0/1 reward, :math:`\sum_i y_i = 1` under a
  softmax or :math:`e^\top W x = e \cdot z`. Columns are visited simplest first; a column whose residual after
  projection onto the kept columns is below ``tol`` (relative) is dropped and reported as an :class:`Identity`, so
  the fit always uses the simplest member of an equivalence class.

References
----------
Chen, J. & Chen, Z. Extended Bayesian information criteria for model selection with large model spaces.
Biometrika 95, 759-771 (2008).

Examples
--------
>>> import numpy as np
>>> r = np.array([0.0, 1.0, 1.0, 0.0, 1.0]); x = np.arange(5.0)
>>> report = find_collinear(np.stack([x * r, x * r**2, x], 1), ["x*r", "x*r^2", "x"])
>>> [str(i) for i in report.identities]
['x*r^2 = x*r']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy as sp

from ..errors import ConfigError
from .base import Candidate, _split_terms, evaluate_expr, expr_complexity

__all__ = [
    "Identity",
    "CollinearityReport",
    "find_collinear",
    "pareto_front",
    "select_candidate",
    "information_criterion",
    "snap_constants",
    "simple_values",
    "SELECTION_METHODS",
]

SELECTION_METHODS = ("ebic", "bic", "aic", "knee")


# ------------------------------------------------------------------------------------------------------------
# Pareto front and selection


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Non-dominated candidates (lower complexity or lower loss), simplest first; ties keep the first found."""
    best: dict[int, Candidate] = {}
    for c in candidates:
        if not math.isfinite(c.loss):
            continue
        old = best.get(c.complexity)
        if old is None or c.loss < old.loss:
            best[c.complexity] = c
    front, lowest = [], math.inf
    for k in sorted(best):
        c = best[k]
        if c.loss < lowest:
            front.append(c)
            lowest = c.loss
    if not front:
        raise ConfigError("No candidate has a finite loss; the backend produced only non-finite formulas.")
    return front


def information_criterion(
    loss: float, n_params: int, n: float, floor: float = 0.0, kind: str = "bic", n_candidates: int | None = None
) -> float:
    r"""Information criterion of a fit with weighted MSE ``loss`` and ``n_params`` parameters on ``n`` rows.

    .. math::

        n \log \max(\mathrm{loss}, \mathrm{floor}) + \begin{cases} k \log n & \text{bic} \\ 2k & \text{aic} \\
        k \log n + 2 \log \binom{p}{k} & \text{ebic (extended BIC, } p \text{ candidate terms)} \end{cases}

    The extended BIC (Chen & Chen 2008) also pays for *choosing* ``k`` of ``p`` candidate terms, so a search over
    hundreds of library terms does not pick up terms that only fit the noise.
    """
    ll = n * math.log(max(loss, floor, 1e-300))
    if kind == "aic":
        return ll + 2.0 * n_params
    pen = n_params * math.log(n)
    if kind == "ebic" and n_candidates is not None and n_candidates > n_params:
        p, k = n_candidates, n_params
        pen += 2.0 * (math.lgamma(p + 1) - math.lgamma(k + 1) - math.lgamma(p - k + 1))
    return ll + pen


def select_candidate(
    front: Sequence[Candidate], n: float, method: str = "bic", floor: float = 0.0, n_candidates: int | None = None
) -> tuple[int, list[float]]:
    """Index of the selected candidate on ``front`` and the per-candidate scores (lower is better).

    ``bic`` / ``aic`` / ``ebic``: :func:`information_criterion` (``ebic`` needs ``n_candidates``, the library
    size). ``knee``: the front is drawn as (complexity, log loss) scaled to the unit square; the knee is the point
    farthest below the chord from the simplest to the most accurate candidate.
    """
    if method not in SELECTION_METHODS:
        raise ConfigError(f"Unknown selection method {method!r}; choose one of {SELECTION_METHODS}.")
    if not front:
        raise ConfigError("Cannot select from an empty Pareto front.")
    if method in ("bic", "aic", "ebic"):
        scores = [information_criterion(c.loss, c.n_params, n, floor, method, n_candidates) for c in front]
        best = min(range(len(front)), key=lambda k: (scores[k], front[k].complexity))
        return best, scores
    xs = np.array([c.complexity for c in front], dtype=float)
    ys = np.log(np.maximum([c.loss for c in front], max(floor, 1e-300)))
    if len(front) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        k = int(np.argmin(ys)) if np.ptp(ys) > 0 else 0
        return k, list(ys)
    xn = (xs - xs[0]) / np.ptp(xs)
    yn = (ys - ys.min()) / np.ptp(ys)
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    dist = yn - chord  # most negative = farthest below the chord
    return int(np.argmin(dist)), dist.tolist()


# ------------------------------------------------------------------------------------------------------------
# Constant snapping


def simple_values(v: float, max_denominator: int = 12) -> list[float]:
    """Simple values near ``v``, simplest first: integers, fractions p/q with q <= 12, 1 and 2 significant digits.

    >>> simple_values(0.4999)[:2]
    [0.0, 0.5]
    """
    out: list[float] = []
    if not math.isfinite(v) or v == 0:
        return out

    def add(x):
        x = float(x)
        if x not in out:
            out.append(x)

    add(round(v))
    f = Fraction(v).limit_denominator(max_denominator)
    add(f.numerator / f.denominator)
    e = math.floor(math.log10(abs(v)))
    for digits in (1, 2):
        add(round(v, -e + digits - 1))
    return [x for x in out if x != v]


def _snap_value(x: float) -> sp.Expr:
    f = Fraction(x).limit_denominator(10**6)
    if abs(f.numerator / f.denominator - x) <= 1e-12 * max(1.0, abs(x)) and f.denominator <= 12:
        return sp.Rational(f.numerator, f.denominator)
    return sp.Float(x)


def snap_constants(
    cand: Candidate,
    features: Sequence,
    X: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    floor: float = 0.0,
    rtol: float = 1e-12,
) -> Candidate:
    r"""Snap the constants of ``cand`` to simple values where the fit does not get worse.

    A change is kept only when ``max(loss_new, floor) <= max(loss_old, floor) * (1 + rtol)``: the weighted loss may
    not increase beyond float round-off (``rtol``). Losses below ``floor`` (the data's numerical resolution) tie,
    so on exact data a coefficient snaps when the snapped value fits as well as the fitted one; on noisy data a
    least-squares coefficient almost never snaps (any other value raises the loss). For a linear formula the other
    coefficients are refitted (weighted least squares) after each snap; a snapped value becomes an exact Rational
    when it is a simple fraction.
    """
    w = np.asarray(weights, dtype=float)
    W = w.sum()

    def loss_of(pred):
        return float(np.sum(w * (y - pred) ** 2) / W)

    try:
        pairs = _split_terms(cand.expr)
    except ValueError:
        pairs = None
    if pairs:
        memo: dict = {}
        cols = np.stack([evaluate_expr(m, features, X, memo) for _, m in pairs], axis=1)
        coefs = np.array([c for c, _ in pairs])
        fixed: dict[int, float] = {}
        base = max(loss_of(cols @ coefs), floor)
        order = np.argsort(-np.abs(coefs * np.sqrt((w[:, None] * cols**2).sum(0) / W)))
        for k in order:
            for v in simple_values(float(coefs[k])):
                trial_fixed = {**fixed, int(k): v}
                trial = _refit(cols, y, w, trial_fixed)
                if trial is None:
                    continue
                new = max(loss_of(cols @ trial), floor)
                if new <= base * (1 + rtol):
                    fixed, coefs, base = trial_fixed, trial, new
                    break
        if not fixed:
            return cand
        expr = sp.Add(*(
            (_snap_value(coefs[k]) if k in fixed else sp.Float(coefs[k])) * m for k, (_, m) in enumerate(pairs)
        ))  # fmt: skip
        return Candidate(expr, expr_complexity(expr), loss_of(cols @ coefs), cand.n_params - len(fixed),
                         cand.source + "+snap")  # fmt: skip
    # general formula: snap Floats one at a time, no refit
    expr = cand.expr
    base = max(loss_of(evaluate_expr(expr, features, X)), floor)
    n_snapped = 0
    for f in sorted(expr.atoms(sp.Float), key=lambda f: -abs(float(f))):
        for v in simple_values(float(f)):
            trial = expr.xreplace({f: _snap_value(v)})
            new = max(loss_of(evaluate_expr(trial, features, X)), floor)
            if np.isfinite(new) and new <= base * (1 + rtol):
                expr, base, n_snapped = trial, new, n_snapped + 1
                break
    if n_snapped == 0:
        return cand
    return Candidate(expr, expr_complexity(expr), base, max(cand.n_params - n_snapped, 0), cand.source + "+snap")


def _refit(cols, y, w, fixed: dict[int, float]):
    """Weighted least squares for the free coefficients with ``fixed`` ones held."""
    p = cols.shape[1]
    free = [k for k in range(p) if k not in fixed]
    coefs = np.zeros(p)
    for k, v in fixed.items():
        coefs[k] = v
    r = y - cols @ coefs
    if free:
        sw = np.sqrt(w)[:, None]
        sol, *_ = np.linalg.lstsq(cols[:, free] * sw, r * sw[:, 0], rcond=None)
        if not np.isfinite(sol).all():
            return None
        coefs[free] = sol
    return coefs


# ------------------------------------------------------------------------------------------------------------
# Near-collinear columns


def _sparse_combination(G, kept, k, tol, max_atoms: int = 8):
    """Orthogonal matching pursuit on the Gram matrix: a short combination of kept columns equal to column ``k``
    (relative residual below ``tol``), or None. Identities read best with few terms (``x*r^2 = x*r``)."""
    S: list[int] = []
    beta = np.zeros(0)
    for _ in range(min(max_atoms, len(kept))):
        corr = G[kept, k] - (G[np.ix_(kept, S)] @ beta if S else 0.0)
        order = np.argsort(-np.abs(corr))
        nxt = next((kept[i] for i in order if kept[i] not in S), None)
        if nxt is None:
            return None
        S.append(nxt)
        Gs = G[np.ix_(S, S)]
        try:
            beta = np.linalg.solve(Gs, G[S, k])
        except np.linalg.LinAlgError:
            return None
        r2 = G[k, k] - float(G[S, k] @ beta)
        if r2 < tol * tol:
            return S, beta
    return None


@dataclass(frozen=True)
class Identity:
    """A column that equals a combination of simpler kept columns on the data: ``term = sum c_k kept_k``.

    ``index`` is the dropped column, ``kept_indices`` the columns of ``combination`` (aligned with it). ``kind`` is
    ``"identity"`` when a short combination (at most 8 columns) explains the column, as for algebraic identities of
    the network (``r^2 = r``), and ``"degenerate"`` otherwise: too few informative rows (e.g. a reward that is
    rarely 1) make many columns dependent; collecting more samples removes those.
    """

    term: str
    combination: tuple[tuple[str, float], ...]
    residual: float
    index: int = -1
    kept_indices: tuple[int, ...] = field(default=())
    kind: str = "identity"

    def __str__(self) -> str:
        if not self.combination:
            return f"{self.term} = 0"
        parts = []
        for name, c in self.combination:
            mag = abs(c)
            coef = "" if abs(mag - 1) < 1e-9 else f"{mag:.6g}*"
            sign = "-" if c < 0 else "+"
            parts.append(f"{sign} {coef}{name}")
        rhs = " ".join(parts)
        rhs = rhs[2:] if rhs.startswith("+ ") else "-" + rhs[2:]
        return f"{self.term} = {rhs}"


@dataclass(frozen=True)
class CollinearityReport:
    """Which columns were kept and the identities that explain the dropped ones."""

    kept: tuple[int, ...]
    identities: tuple[Identity, ...]

    @property
    def n_degenerate(self) -> int:
        return sum(i.kind == "degenerate" for i in self.identities)

    def __str__(self) -> str:
        if not self.identities:
            return "no near-collinear columns"
        lines = [str(i) for i in self.identities if i.kind == "identity"]
        if self.n_degenerate:
            lines.append(
                f"{self.n_degenerate} further columns are dependent on the data without a short identity (too few "
                "informative rows; collect more samples)"
            )
        return "\n".join(lines)


def find_collinear(
    A: np.ndarray,
    names: Sequence[str],
    order: Sequence[int] | None = None,
    weights: np.ndarray | None = None,
    tol: float = 1e-6,
) -> CollinearityReport:
    r"""Detect columns of ``A`` that are (near-)linear combinations of earlier ones in ``order``.

    Columns are scaled to unit weighted RMS; visiting them in ``order`` (simplest first), an incremental Cholesky
    factor of the weighted Gram matrix gives each column's residual norm after projection onto the kept ones. A
    relative residual below ``tol`` marks an identity; all-zero columns are identities ``term = 0``.

    Returns
    -------
    CollinearityReport
        ``kept`` indices (in ``order``) and one :class:`Identity` per dropped column with its coefficients in the
        original column units.
    """
    import scipy.linalg  # here, not at import: the distill package is imported by every command of the CLI

    A = np.asarray(A, dtype=np.float64)
    n, p = A.shape
    order = list(range(p)) if order is None else list(order)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    sw = np.sqrt(w / w.sum())
    As = A * sw[:, None]
    norms = np.sqrt((As**2).sum(0))
    safe = np.where(norms > 0, norms, 1.0)
    G = (As.T @ As) / np.outer(safe, safe)
    L = np.zeros((p, p))
    kept: list[int] = []
    identities: list[Identity] = []
    for k in order:
        if norms[k] == 0 or not np.isfinite(norms[k]):
            identities.append(Identity(names[k], (), 0.0, k, (), "identity"))
            continue
        m = len(kept)
        g = G[kept, k] if m else np.zeros(0)
        lvec = scipy.linalg.solve_triangular(L[:m, :m], g, lower=True, check_finite=False) if m else g
        d = G[k, k] - float(lvec @ lvec)
        resid = math.sqrt(max(d, 0.0))
        if resid < tol:
            sparse = _sparse_combination(G, kept, k, tol)
            kind = "identity" if sparse is not None else "degenerate"
            if sparse is not None:
                idx, a = sparse
            else:
                idx = kept
                a = scipy.linalg.solve_triangular(L[:m, :m].T, lvec, lower=False, check_finite=False) if m else lvec
            coefs = np.asarray(a) * norms[k] / safe[idx]
            big = [(j, float(c)) for j, c in zip(idx, coefs) if abs(c) * safe[j] > 1e-8 * norms[k]]
            combo = tuple((names[j], c) for j, c in big)
            identities.append(Identity(names[k], combo, resid, k, tuple(j for j, _ in big), kind))
            continue
        L[m, :m] = lvec
        L[m, m] = resid
        kept.append(k)
    return CollinearityReport(tuple(kept), tuple(identities))

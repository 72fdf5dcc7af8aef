"""Small statistics helpers shared by plots, evaluation and experiments (numpy; SciPy for the t quantile).

>>> mean, lo, hi = bootstrap_ci([0.8, 0.9, 0.85, 0.95, 0.7], seed=0)
>>> bool(lo <= mean <= hi)
True
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["bootstrap_ci", "moving_average", "t_interval"]


def bootstrap_ci(
    values,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    *,
    axis: int = 0,
    nan_policy: str = "raise",
):
    r"""Mean and percentile-bootstrap confidence interval of the mean.

    Resamples the ``n`` observations along ``axis`` with replacement ``n_resamples`` times; the interval is
    the :math:`(1 - ci)/2` and :math:`(1 + ci)/2` quantiles of the resampled means.

    Parameters
    ----------
    values : array_like, shape (n,) or (n, ...)
        Observations along ``axis`` (e.g. runs); other axes (e.g. steps) get one interval each.
    n_resamples
        Bootstrap resamples.
    ci
        Coverage in (0, 1).
    seed
        Seed of the ``numpy.random.Generator`` that draws the resamples.
    axis
        The axis of observations.
    nan_policy
        ``"raise"``: NaN is an error; ``"omit"``: NaN entries are left out (per position; a position with no
        finite value gets NaN).

    Returns
    -------
    (mean, lo, hi)
        Floats for 1-D ``values``, else arrays of the shape of ``values`` without ``axis``.

    Examples
    --------
    >>> runs = np.array([[0.1, 0.5], [0.3, 0.7], [0.2, np.nan]])  # (runs, steps)
    >>> mean, lo, hi = bootstrap_ci(runs, nan_policy="omit")
    >>> mean.round(2).tolist()
    [0.2, 0.6]
    """
    x = np.asarray(values, dtype=float)
    if x.ndim == 0:
        raise ValueError("bootstrap_ci needs an array of observations, received a scalar.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, received {n_resamples!r}.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1) (e.g. 0.95), received {ci!r}.")
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', received {nan_policy!r}.")
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one observation, received an empty array.")
    valid = np.isfinite(x)
    if nan_policy == "raise" and not valid.all():
        raise ValueError("values contain NaN or inf; clean them or pass nan_policy='omit'.")
    flat = np.where(valid, x, 0.0).reshape(n, -1)
    mask = valid.reshape(n, -1).astype(float)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(float)  # (n_resamples, n)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN positions
        means = (counts @ flat) / (counts @ mask)  # (n_resamples, m)
        mean = flat.sum(0) / mask.sum(0)
        lo, hi = np.nanquantile(means, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0], axis=0)
    shape = x.shape[1:]
    mean, lo, hi = (a.reshape(shape) for a in (mean, lo, hi))
    if not shape:
        return float(mean), float(lo), float(hi)
    return mean, lo, hi


def t_interval(values, ci: float = 0.95, *, axis: int = 0):
    r"""Mean and Student-t confidence interval of the mean, :math:`\bar x \pm t_{(1+ci)/2,\,n-1}\, s/\sqrt{n}`.

    The interval for a small number of runs or seeds (a percentile bootstrap under-covers there). NaN entries are
    left out per position; a position with fewer than two finite values gets a NaN interval.

    Parameters
    ----------
    values : array_like, shape (n,) or (n, ...)
        Observations along ``axis``.
    ci
        Coverage in (0, 1).
    axis
        The axis of observations.

    Returns
    -------
    (mean, lo, hi)
        Floats for 1-D ``values``, else arrays of the shape of ``values`` without ``axis``.

    Examples
    --------
    >>> mean, lo, hi = t_interval([0.70, 0.72, 0.74])
    >>> round(mean, 2), round(hi - mean, 3)
    (0.72, 0.05)
    """
    from scipy import stats

    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1) (e.g. 0.95), received {ci!r}.")
    x = np.moveaxis(np.asarray(values, dtype=float), axis, 0)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("t_interval needs at least one observation along axis.")
    n = np.isfinite(x).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # positions with < 2 finite values
        mean = np.nanmean(x, axis=0)
        half = stats.t.ppf((1.0 + ci) / 2.0, np.maximum(n - 1, 1)) * np.nanstd(x, axis=0, ddof=1) / np.sqrt(n)
    half = np.where(n > 1, half, np.nan)
    lo, hi = mean - half, mean + half
    if x.ndim == 1:
        return float(mean), float(lo), float(hi)
    return mean, lo, hi


def moving_average(values, window: int):
    """Trailing moving average over the last ``window`` finite values (shorter at the start), same length.

    >>> moving_average([1.0, 2.0, 3.0, 4.0], 2).tolist()
    [1.0, 1.5, 2.5, 3.5]
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int, received {window!r}.")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"moving_average expects a 1-D array, received shape {x.shape}.")
    valid = np.isfinite(x)
    csum = np.concatenate([[0.0], np.cumsum(np.where(valid, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(valid)])
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (csum[idx] - csum[start]) / (ccount[idx] - ccount[start])

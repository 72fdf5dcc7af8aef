"""Tests for rulesearch.io.stats: bootstrap confidence intervals and moving averages."""

from __future__ import annotations

import numpy as np
import pytest

from rulesearch.io.stats import bootstrap_ci, moving_average


def test_ci_contains_the_mean(np_rng):
    values = np_rng.normal(1.0, 2.0, size=50)
    mean, lo, hi = bootstrap_ci(values)
    assert isinstance(mean, float) and mean == pytest.approx(values.mean())
    assert lo < mean < hi


def test_ci_narrows_with_n(np_rng):
    widths = []
    for n in (10, 100, 1000):
        _, lo, hi = bootstrap_ci(np_rng.normal(size=n), seed=1)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # about 2 * 1.96 / sqrt(n) for unit variance
    assert widths[2] == pytest.approx(2 * 1.96 / np.sqrt(1000), rel=0.25)


def test_ci_wider_with_coverage_and_deterministic(np_rng):
    values = np_rng.normal(size=30)
    _, lo90, hi90 = bootstrap_ci(values, ci=0.9)
    _, lo99, hi99 = bootstrap_ci(values, ci=0.99)
    assert lo99 < lo90 and hi90 < hi99
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


def test_ci_along_an_axis_matches_columns(np_rng):
    values = np_rng.normal(size=(8, 5))  # (runs, steps)
    mean, lo, hi = bootstrap_ci(values, axis=0, seed=2)
    assert mean.shape == lo.shape == hi.shape == (5,)
    assert np.allclose(mean, values.mean(0))
    assert np.all(lo <= mean) and np.all(mean <= hi)
    transposed = bootstrap_ci(values.T, axis=1, seed=2)
    for a, b in zip((mean, lo, hi), transposed):
        assert np.allclose(a, b)


def test_nan_policy(np_rng):
    values = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, 5.0]])
    with pytest.raises(ValueError, match="nan_policy='omit'"):
        bootstrap_ci(values)
    mean, lo, hi = bootstrap_ci(values, nan_policy="omit")
    assert mean.tolist() == [2.0, 5.0] and lo[1] == hi[1] == 5.0
    all_nan = bootstrap_ci(np.array([[np.nan], [np.nan]]), nan_policy="omit")
    assert all(np.isnan(a).all() for a in all_nan)


def test_single_observation_and_bad_arguments():
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match=r"ci must lie in \(0, 1\)"):
        bootstrap_ci([1.0, 2.0], ci=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match="scalar"):
        bootstrap_ci(1.0)


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 3).tolist() == [1.0, 1.5, 2.0, 3.0]
    assert moving_average([1.0, np.nan, 3.0], 2).tolist() == [1.0, 1.0, 3.0]
    assert moving_average([1.0, 2.0], 1).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)

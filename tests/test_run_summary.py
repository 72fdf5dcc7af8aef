"""Per-run window summaries (rulesearch.io.summary), Student-t intervals, and the paper reproduction's table row:
skipped episodes and stopped runs are counted, never silently dropped."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rulesearch.io.stats import t_interval
from rulesearch.io.summary import run_windows

PLANNED = 20


def history() -> pd.DataFrame:
    """3 runs x 20 planned meta-steps: run 0 clean; run 1 skips steps 19 and 20; run 2 stops after step 13."""
    rows = []
    for run in range(3):
        for step in range(1, PLANNED + 1):
            if run == 2 and step > 13:
                break
            skipped = int(run == 1 and step >= 19)
            rows.append({"step": step, "run": run, "meta_accuracy": np.nan if skipped else 0.1 * run + 0.01 * step,
                         "skipped": skipped, "query_loss": 1.0, "angle.1": 80.0, "angle.2": 60.0, "ew.1": 1.0,
                         "ew.2": 3.0 + step, "theta.F0": 0.001 * step})  # fmt: skip
    return pd.DataFrame(rows)


def test_run_windows_counts_skips_and_stops():
    w = run_windows(history(), planned=PLANNED, n_windows=10)
    assert len(w) == 3 * 10 and (w.groupby("run").size() == 10).all()
    last = w[w["window"] == 10].set_index("run")
    assert last["first_step"].tolist() == [19, 19, 19] and last["last_step"].tolist() == [20, 20, 20]
    # run 1: both episodes of the last window skipped: left out of the mean, scored 0 in the other column
    assert last.loc[1, "skipped"] == 2 and np.isnan(last.loc[1, "meta_accuracy"])
    assert last.loc[1, "meta_accuracy_skips_failed"] == 0.0
    assert last.loc[0, "meta_accuracy"] == pytest.approx(0.195)
    # run 2 stopped after step 13: flagged in every window, its later windows are empty
    assert w.loc[w["run"] == 2, "stopped"].all() and not w.loc[w["run"] != 2, "stopped"].any()
    assert (w.loc[w["run"] == 2, "stopped_at"] == 13).all() and w.loc[w["run"] != 2, "stopped_at"].isna().all()
    assert last.loc[2, "episodes"] == 0 and np.isnan(last.loc[2, "meta_accuracy"])
    window7 = w[(w["run"] == 2) & (w["window"] == 7)].iloc[0]  # steps 13-14: only 13 ran
    assert window7["episodes"] == 1 and window7["theta.F0"] == pytest.approx(0.013)
    # layer means, the largest E_W, coefficients after the window's last step
    assert last.loc[0, "angle"] == 70.0 and last.loc[0, "ew_max"] == 23.0 and last.loc[0, "theta.F0"] == 0.02
    assert int(w["skipped"].sum()) == 2 and int(w["episodes"].sum()) == 20 + 20 + 13


def test_run_windows_defaults_and_errors():
    w = run_windows(history())  # planned = the last step run: 20
    assert w["window"].max() == 10 and w["last_step"].max() == PLANNED
    with pytest.raises(ValueError, match="skipped"):
        run_windows(history().drop(columns="skipped"))
    with pytest.raises(ValueError, match="n_windows"):
        run_windows(history(), n_windows=0)


def test_t_interval_matches_scipy():
    x = np.array([0.61, 0.58, 0.66, 0.7, 0.55])
    m, lo, hi = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert m == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(ref)
    m2, lo2, hi2 = t_interval(np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 4.0]]))  # per column, NaN left out
    assert m2.tolist() == [3.0, 3.0] and (lo2[1], hi2[1]) == pytest.approx(t_interval([2.0, 4.0])[1:])
    one = t_interval([0.5])
    assert one[0] == 0.5 and np.isnan(one[1]) and np.isnan(one[2])
    with pytest.raises(ValueError, match="ci"):
        t_interval(x, ci=95)


def test_paper_summary_row_counts_skips_and_stopped_runs():
    path = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_paper.py"
    spec = importlib.util.spec_from_file_location("reproduce_paper", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = mod.variant_row("bio", run_windows(history(), planned=PLANNED), episodes=PLANNED)
    assert row["runs"] == 3 and row["runs stopped (at episode)"] == "1 (13)"
    assert row["skipped / episodes run"] == "2 of 53" and row["skipped, last 10%"] == 2
    # last 10%: run 0 only (run 1 skipped both, run 2 stopped) vs skipped scored 0: runs 0 and 1
    assert row["meta-acc last 10%"] == "0.195"
    m = float(row["meta-acc last 10%, skipped = 0"].split()[0])
    assert m == pytest.approx((0.195 + 0.0) / 2, abs=1e-3)
    assert row["E_W max"] == "23"

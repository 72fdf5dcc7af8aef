"""Per-run summaries of a meta-training history over windows of meta-steps: the small table behind every interval.

A history (``RuleSearch.history_``, a run directory's ``metrics.csv``) has one row per run and meta-step. Window
:math:`w` of :math:`n_w` covers the meta-steps :math:`(\\lfloor (w-1)P/n_w \\rfloor, \\lfloor wP/n_w \\rfloor]` of the
planned :math:`P`. Skipped (diverged) meta-steps are counted, left out of the means, and counted as accuracy 0 in
``meta_accuracy_skips_failed``; a run that stopped has no rows after its stop, so its later windows are empty
(``episodes`` 0, NaN means) and it is flagged ``stopped``.

>>> import pandas as pd
>>> h = pd.DataFrame({"step": [1, 2, 1, 2], "run": [0, 0, 1, 1], "meta_accuracy": [0.5, 0.7, 0.4, 0.0],
...                   "skipped": [0, 0, 0, 1]})
>>> w = run_windows(h, n_windows=2)
>>> w["skipped"].tolist(), w["meta_accuracy"].tolist(), w["meta_accuracy_skips_failed"].tolist()
([0, 0, 0, 1], [0.5, 0.7, 0.4, nan], [0.5, 0.7, 0.4, 0.0])
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["run_windows"]


def run_windows(history: pd.DataFrame, planned: int | None = None, n_windows: int = 10) -> pd.DataFrame:
    """Per (run, window) summary of a meta-training history.

    Parameters
    ----------
    history
        Rows with ``step`` (1-based), ``run``, ``meta_accuracy`` and ``skipped``; optional ``query_loss``,
        ``angle.<layer>``, ``ew.<layer>`` and ``theta.<name>`` columns.
    planned
        The planned number of meta-steps (default: the last step in ``history``); a run whose last row is before it
        stopped.
    n_windows
        Number of equal windows over the planned meta-steps (10: deciles, the first and last 10% of a table).

    Returns
    -------
    pandas.DataFrame
        One row per run and window: ``run``, ``window`` (1-based), ``first_step``, ``last_step``, ``episodes``
        (meta-steps run), ``skipped``, ``meta_accuracy`` (mean over episodes not skipped),
        ``meta_accuracy_skips_failed`` (skipped episodes scored 0), ``query_loss``, ``angle`` and ``ew`` (means over
        layers and the episodes not skipped), ``ew_max`` (largest per-layer E_W of an episode not skipped),
        ``theta.*`` (the coefficients after the window's last meta-step run), ``stopped`` and ``stopped_at`` (the
        last meta-step a stopped run ran; NaN otherwise).
    """
    missing = {"step", "run", "meta_accuracy", "skipped"} - set(history.columns)
    if missing:
        raise ValueError(f"run_windows needs the history columns {sorted(missing)}; pass RuleSearch.history_ or a "
                         "run directory's metrics.csv.")  # fmt: skip
    if isinstance(n_windows, bool) or not isinstance(n_windows, (int, np.integer)) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, received {n_windows!r}.")
    planned = int(history["step"].max()) if planned is None else int(planned)
    angles = [c for c in history.columns if c.startswith("angle.")]
    ews = [c for c in history.columns if c.startswith("ew.")]
    thetas = [c for c in history.columns if c.startswith("theta.")]
    h = history.assign(
        angle=history[angles].mean(axis=1) if angles else np.nan,
        ew=history[ews].mean(axis=1) if ews else np.nan,
        ew_max=history[ews].max(axis=1) if ews else np.nan,
        query_loss=history["query_loss"] if "query_loss" in history else np.nan,
    )
    bounds = [(w * planned) // n_windows for w in range(n_windows + 1)]
    rows = []
    for run, g in h.sort_values("step").groupby("run", sort=True):
        last_run = int(g["step"].max())
        stopped = last_run < planned
        for w in range(n_windows):
            lo, hi = bounds[w], bounds[w + 1]
            win = g[(g["step"] > lo) & (g["step"] <= hi)]
            ok = win[win["skipped"] == 0]
            row = {
                "run": int(run),
                "window": w + 1,
                "first_step": lo + 1,
                "last_step": hi,
                "episodes": len(win),
                "skipped": int(win["skipped"].sum()),
                "meta_accuracy": ok["meta_accuracy"].mean(),
                "meta_accuracy_skips_failed": win["meta_accuracy"].where(win["skipped"] == 0, 0.0).mean(),
                "query_loss": ok["query_loss"].mean(),
                "angle": ok["angle"].mean(),
                "ew": ok["ew"].mean(),
                "ew_max": ok["ew_max"].max(),
            }
            row.update({c: (win[c].iloc[-1] if len(win) else np.nan) for c in thetas})
            row.update({"stopped": stopped, "stopped_at": last_run if stopped else np.nan})
            rows.append(row)
    return pd.DataFrame(rows)

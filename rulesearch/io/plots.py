"""Figures from a run's metrics: meta-accuracy, coefficient trajectories, alignment angles.

Each function takes a ``pandas.DataFrame`` laid out like ``metrics.csv`` (an x column ``step``, one column per
quantity) and writes one figure atomically. When a ``run`` column is present, curves are the mean over runs at
each step, with a shaded 95% bootstrap band (:func:`rulesearch.io.stats.bootstrap_ci`).

Figures are built on ``matplotlib.figure.Figure`` directly: no pyplot, no backend switch, no global state, so
importing or calling this module never changes the caller's matplotlib setup and never opens a window.

>>> import tempfile, pandas as pd
>>> df = pd.DataFrame({"step": range(20), "meta_accuracy": [i / 20 for i in range(20)]})
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = plot_meta_accuracy(df, f"{tmp}/acc.png", window=5)
...     path.stat().st_size > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rulesearch.io.runs import RunDir, atomic_open
from rulesearch.io.stats import bootstrap_ci, moving_average

__all__ = ["plot_meta_accuracy", "plot_coefficients", "plot_alignment", "plot_run"]

_DPI = 150


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=_DPI)
    return path


def _require(df, columns: list[str], what: str) -> None:
    if not columns:
        raise ValueError(f"No {what} columns in the metrics (columns: {', '.join(map(str, df.columns))}).")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"Metrics lack column(s) {', '.join(missing)} needed for the {what} plot "
            f"(columns: {', '.join(map(str, df.columns))})."
        )


def _x_column(df, x: str) -> str | None:
    return x if x in df.columns else None


def _per_run(df, column: str, x: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` with values of shape ``(n_runs, n_steps)`` (one row without a ``run`` column)."""
    import pandas as pd

    data = df[[c for c in (x, column, "run") if c is not None and c in df.columns]].copy()
    data[column] = pd.to_numeric(data[column], errors="coerce")
    if x is None:
        data = data.reset_index(drop=True)
        data["_x"] = np.arange(len(data))
        x = "_x"
        if "run" in data.columns:
            data["_x"] = data.groupby("run").cumcount()
    if "run" in data.columns:
        table = data.pivot_table(index=x, columns="run", values=column, aggfunc="mean", dropna=False)
        return table.index.to_numpy(dtype=float), table.to_numpy(dtype=float).T
    series = data.groupby(x, sort=True)[column].mean()
    return series.index.to_numpy(dtype=float), series.to_numpy(dtype=float)[None, :]


def _curve(ax, df, column: str, x: str | None, *, label: str, color: Any, window: int, raw: bool) -> int:
    """Mean over runs (smoothed over ``window`` steps), its 95% bootstrap band, the raw mean faintly.

    Returns the number of runs.
    """
    steps, values = _per_run(df, column, x)
    if values.shape[1] == 0:
        return values.shape[0]
    n_runs = values.shape[0]
    if n_runs > 1:
        mean, lo, hi = bootstrap_ci(values, axis=0, nan_policy="omit")
        mean, lo, hi = np.atleast_1d(mean), np.atleast_1d(lo), np.atleast_1d(hi)
    else:
        mean = values[0]
    smooth = moving_average(mean, window) if window > 1 else mean
    if raw and window > 1:
        ax.plot(steps, mean, color=color, alpha=0.25, linewidth=0.8)
    if n_runs > 1:
        lo_s = moving_average(lo, window) if window > 1 else lo
        hi_s = moving_average(hi, window) if window > 1 else hi
        ax.fill_between(steps, lo_s, hi_s, color=color, alpha=0.2, linewidth=0)
    ax.plot(steps, smooth, color=color, linewidth=1.6, label=label)
    return n_runs


def _title(ax, title: str, n_runs: int) -> None:
    """The figure's title, and under it the runs averaged."""
    if n_runs > 1:
        title += f"\nmean of {n_runs} runs; shaded: 95% bootstrap CI"
    ax.set_title(title, fontsize="medium")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax, n: int) -> None:
    if n <= 12:
        ax.legend(fontsize="small", ncol=1 if n <= 6 else 2)
    else:
        ax.legend(fontsize="x-small", ncol=max(1, n // 25 + 1), loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_meta_accuracy(
    df, path: str | os.PathLike, window: int = 10, *, x: str = "step", references: Mapping[str, float] | None = None
) -> Path:
    """Meta-accuracy per meta-step (column ``meta_accuracy``), raw and as a trailing moving average, with optional
    horizontal reference lines (``{label: accuracy}``, e.g. baselines and chance).

    With a ``run`` column: the mean over runs with a shaded 95% bootstrap band. Returns ``path``.
    """
    _require(df, ["meta_accuracy"], "meta-accuracy")
    fig = _figure()
    ax = fig.add_subplot()
    xcol = _x_column(df, x)
    label = f"rule, moving average ({window})" if window > 1 else "rule"
    n_runs = _curve(ax, df, "meta_accuracy", xcol, label=label, color="C0", window=window, raw=True)
    _title(ax, "Query accuracy after each meta-step's online episodes", n_runs)
    styles = iter(("--", "-.", ":", (0, (5, 1))))
    for (name, value), color in zip((references or {}).items(), _colors(len(references or {}) + 1)[1:]):
        if value is not None and np.isfinite(value):
            ax.axhline(value, color=color, linewidth=1.2, linestyle=next(styles, "--"), label=name)
    ax.set_xlabel("meta-step" if xcol else "row")
    ax.set_ylabel("meta-accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_coefficients(df, path: str | os.PathLike, *, x: str = "step") -> Path:
    """Trajectories of the rule coefficients (columns ``theta.<term>``), one labelled line per term."""
    columns = [c for c in df.columns if str(c).startswith("theta.")]
    _require(df, columns, "coefficient (theta.*)")
    fig = _figure(7.2 if len(columns) > 12 else 6.4, 4.0)
    ax = fig.add_subplot()
    xcol = _x_column(df, x)
    for column, color in zip(columns, _colors(len(columns))):
        label = str(column)[len("theta.") :]
        n_runs = _curve(ax, df, column, xcol, label=label, color=color, window=1, raw=False)
    _title(ax, "Rule coefficients during meta-training", n_runs)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("meta-step" if xcol else "row")
    ax.set_ylabel(r"coefficient $\theta_k$")
    ax.grid(alpha=0.3)
    _legend(ax, len(columns))
    return _save(fig, path)


def plot_alignment(df, path: str | os.PathLike, *, x: str = "step") -> Path:
    """Alignment angle (degrees) per hidden layer (columns ``angle.<layer>``): the angle between the errors the
    feedback pathway delivers to that layer and backprop's errors, averaged over query samples; 0 degrees is
    backprop's direction, 90 degrees orthogonal (no useful credit), below 90 the pathway's errors descend the loss."""
    columns = [c for c in df.columns if str(c).startswith("angle.")]
    _require(df, columns, "alignment (angle.*)")
    fig = _figure()
    ax = fig.add_subplot()
    xcol = _x_column(df, x)
    for column, color in zip(columns, _colors(len(columns))):
        label = str(column)[len("angle.") :]
        label = f"layer {label}" if label.isdigit() else label
        n_runs = _curve(ax, df, column, xcol, label=label, color=color, window=1, raw=False)
    _title(ax, "Alignment of the feedback errors with backprop's (0° = backprop, 90° = orthogonal)", n_runs)
    ax.axhline(90.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("meta-step" if xcol else "row")
    ax.set_ylabel("alignment angle (degrees)")
    ax.grid(alpha=0.3)
    _legend(ax, len(columns))
    return _save(fig, path)


def plot_run(
    run_dir: RunDir | str | os.PathLike,
    *,
    window: int = 10,
    fmt: str = "png",
    references: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Every figure whose columns ``metrics.csv`` has, written to ``<run>/figures/<name>.<fmt>`` (``references``:
    reference lines of the meta-accuracy figure, see :func:`plot_meta_accuracy`).

    Returns the written paths by figure name (``meta_accuracy``, ``coefficients``, ``alignment``).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    df = run.read_metrics()
    out_dir = run.path / "figures"
    written: dict[str, Path] = {}
    if df.empty:
        return written
    if "meta_accuracy" in df.columns:
        written["meta_accuracy"] = plot_meta_accuracy(
            df, out_dir / f"meta_accuracy.{fmt}", window, references=references
        )
    if any(str(c).startswith("theta.") for c in df.columns):
        written["coefficients"] = plot_coefficients(df, out_dir / f"coefficients.{fmt}")
    if any(str(c).startswith("angle.") for c in df.columns):
        written["alignment"] = plot_alignment(df, out_dir / f"alignment.{fmt}")
    return written

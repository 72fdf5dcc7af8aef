"""Tests for rulesearch.io.plots: figures from metrics, written atomically, without global matplotlib state."""

from __future__ import annotations

import inspect

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from rulesearch.io import plots
from rulesearch.io import runs as runs_module
from rulesearch.io.plots import plot_alignment, plot_coefficients, plot_meta_accuracy, plot_run
from rulesearch.io.runs import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(np_rng, n_steps: int = 40, n_runs: int | None = None) -> pd.DataFrame:
    frames = []
    for r in range(n_runs or 1):
        steps = np.arange(n_steps)
        frame = pd.DataFrame(
            {
                "step": steps,
                "meta_accuracy": np.clip(0.2 + steps / n_steps * 0.6 + 0.05 * np_rng.standard_normal(n_steps), 0, 1),
                "theta.F0": 0.01 * steps + 0.01 * np_rng.standard_normal(n_steps),
                "theta.F1": -0.005 * steps,
                "angle.0": 80 - steps + np_rng.standard_normal(n_steps),
                "angle.1": 85 - 0.5 * steps,
                "loss": 1.0 / (steps + 1),
            }
        )
        if n_runs is not None:
            frame["run"] = r
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("n_runs", [None, 3], ids=["single", "runs"])
@pytest.mark.parametrize("plot", [plot_meta_accuracy, plot_coefficients, plot_alignment], ids=lambda f: f.__name__)
def test_plots_write_png(tmp_path, np_rng, plot, n_runs):
    df = metrics(np_rng, n_runs=n_runs)
    path = plot(df, tmp_path / "fig.png")
    assert path == tmp_path / "fig.png"
    assert_png(path)


def test_meta_accuracy_window_and_missing_steps(tmp_path, np_rng):
    df = metrics(np_rng, n_steps=5, n_runs=2)
    df = df[~((df["run"] == 1) & (df["step"] == 3))]  # one run lacks a step
    assert_png(plot_meta_accuracy(df, tmp_path / "a.png", window=100))
    assert_png(plot_meta_accuracy(df.drop(columns=["step", "run"]), tmp_path / "b.png", window=1))


def test_other_formats(tmp_path, np_rng):
    path = plot_coefficients(metrics(np_rng), tmp_path / "coef.pdf")
    assert path.read_bytes()[:4] == b"%PDF"


def test_many_coefficients_fit(tmp_path, np_rng):
    df = pd.DataFrame({"step": np.arange(10), **{f"theta.F{k}": np_rng.standard_normal(10) for k in range(30)}})
    assert_png(plot_coefficients(df, tmp_path / "many.png"))


def test_missing_columns_raise(tmp_path):
    df = pd.DataFrame({"step": [0, 1], "loss": [1.0, 0.5]})
    with pytest.raises(ValueError, match="meta_accuracy.*columns: step, loss"):
        plot_meta_accuracy(df, tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"No coefficient \(theta\.\*\) columns"):
        plot_coefficients(df, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"No alignment \(angle\.\*\) columns"):
        plot_alignment(df, tmp_path / "d.png")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_saving_keeps_old_figure(tmp_path, np_rng, monkeypatch):
    df = metrics(np_rng)
    path = plot_alignment(df, tmp_path / "fig.png")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(runs_module.os, "replace", crash)
    with pytest.raises(OSError):
        plot_meta_accuracy(df, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_plot_run_writes_available_figures(tmp_path, np_rng):
    run = RunDir.create(tmp_path / "run", {"seed": 0})
    assert plot_run(run) == {}
    df = metrics(np_rng, n_steps=12).drop(columns=["angle.0", "angle.1"])
    run.append_metrics(df.to_dict("records"))
    run.save_checkpoint(11, {"theta": torch.zeros(2)})
    written = plot_run(run.path)
    assert set(written) == {"meta_accuracy", "coefficients"}
    for path in written.values():
        assert path.parent == run.path / "figures"
        assert_png(path)


def test_no_global_matplotlib_state(tmp_path, np_rng):
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    plot_meta_accuracy(metrics(np_rng), tmp_path / "a.png")
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc


def test_plotting_never_uses_pyplot_or_switches_backend():
    source = inspect.getsource(plots)
    assert "pyplot" not in source.replace("no pyplot", "") and "matplotlib.use(" not in source

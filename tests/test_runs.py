"""Tests for rulesearch.io.runs: run directory creation, atomic writes, metrics, checkpoints, finished marker."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import rulesearch
from rulesearch.errors import RunDirectoryError
from rulesearch.io import runs as runs_module
from rulesearch.io.config import Config, option
from rulesearch.io.runs import RunDir, atomic_write_text, run_path

CONFIG = {"seed": 3, "inner": {"lr": 0.1, "sizes": [4, 2]}, "device": "cpu"}


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir.create(tmp_path / "run", CONFIG)


def tmp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- creation


def test_create_writes_config_and_manifest(run):
    assert run.config() == CONFIG
    m = run.manifest()
    for key in ("rulesearch_version", "git_commit", "torch_version", "python_version", "seed", "threads",
                "device", "start_time", "hostname"):  # fmt: skip
        assert key in m
    assert m["rulesearch_version"] == rulesearch.__version__
    assert m["torch_version"] == torch.__version__
    assert m["seed"] == 3 and m["device"] == "cpu" and m["threads"] == torch.get_num_threads()
    assert m["git_commit"] is None or len(m["git_commit"]) == 40
    assert not run.is_finished and tmp_files(run.path) == []


@dataclass(frozen=True)
class InnerExample(Config):
    lr: float = option(0.1, help="Learning rate.")


@dataclass(frozen=True)
class RunExample(Config):
    name: str = option(help="Run name.")
    seed: int = option(0, help="Seed.")
    inner: InnerExample = option(default_factory=InnerExample, help="Inner loop.")


def test_create_accepts_a_config_dataclass_and_manifest_extra(tmp_path):
    cfg = RunExample(name="x", seed=11)
    run = RunDir.create(tmp_path / "r", cfg, manifest_extra={"note": "hi"}, device="cuda:0")
    assert RunExample.from_dict(run.config()) == cfg
    m = run.manifest()
    assert m["seed"] == 11 and m["note"] == "hi" and m["device"] == "cuda:0"


def test_git_failure_is_silent(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runs_module.subprocess, "run", boom)
    run = RunDir.create(tmp_path / "r", CONFIG)
    assert run.manifest()["git_commit"] is None


def test_run_path_default_and_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_path("demo") == tmp_path / "runs" / "demo"
    assert run_path("demo", out=tmp_path / "x") == tmp_path / "x"
    with pytest.raises(RunDirectoryError, match="--out"):
        run_path("a/b")


def test_refuses_to_overwrite_unfinished_and_finished_runs(run):
    with pytest.raises(RunDirectoryError, match=r"unfinished run.*--resume.*another --out"):
        RunDir.create(run.path, CONFIG)
    run.mark_finished({"acc": 0.9})
    with pytest.raises(RunDirectoryError, match=r"a finished run.*--resume.*another --out"):
        RunDir.create(run.path, CONFIG)
    assert run.summary() == {"acc": 0.9}  # untouched


def test_refuses_non_run_directories(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty and is not a run directory"):
        RunDir.create(tmp_path / "busy", CONFIG)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        RunDir.create(tmp_path / "file", CONFIG)
    (tmp_path / "empty").mkdir()
    assert RunDir.create(tmp_path / "empty", CONFIG).config() == CONFIG


def test_resume_reopens_and_records(run):
    again = RunDir.create(run.path, CONFIG, resume=True)
    assert again.path == run.path
    assert len(again.manifest()["resumes"]) == 1
    with pytest.raises(RunDirectoryError, match=r"changed keys: inner\.lr, extra"):
        RunDir.create(run.path, {**CONFIG, "inner": {"lr": 0.2, "sizes": [4, 2]}, "extra": 1}, resume=True)


def test_resume_fills_config_keys_added_since_with_their_defaults(tmp_path):
    from rulesearch.io.config import dump_yaml, load_yaml
    from rulesearch.train import DiscoverConfig

    cfg = DiscoverConfig()
    run = RunDir.create(tmp_path / "old", cfg)
    stored = load_yaml((run.path / "config.yaml").read_text())
    del stored["network"]["feedback_rule"]  # a run written before the key existed
    (run.path / "config.yaml").write_text(dump_yaml(stored))
    assert len(RunDir.create(run.path, cfg, resume=True).manifest()["resumes"]) == 1
    with pytest.raises(RunDirectoryError, match=r"changed keys: meta\.lr"):
        RunDir.create(run.path, cfg.replace(**{"meta.lr": 0.5}), resume=True)


def test_resume_of_missing_run_starts_fresh(tmp_path):
    run = RunDir.create(tmp_path / "new", CONFIG, resume=True)
    assert run.config() == CONFIG and "resumes" not in run.manifest()


def test_open_existing_and_missing(run, tmp_path):
    assert RunDir.open(run.path).config() == CONFIG
    with pytest.raises(RunDirectoryError, match="does not exist"):
        RunDir.open(tmp_path / "nope")
    (run.path / "manifest.json").unlink()
    with pytest.raises(RunDirectoryError, match="manifest.json is missing"):
        RunDir.open(run.path)
    (tmp_path / "other").mkdir()
    with pytest.raises(RunDirectoryError, match="config.yaml is missing"):
        RunDir.open(tmp_path / "other")


# ----------------------------------------------------------------------------------------- atomic writes


def test_write_text_and_json(run):
    run.write_text("rule.tex", "\\Delta W = 0\n")
    run.write_json("rule.json", {"theta": torch.tensor([1.0, 2.0]), "n": np.int64(3), "p": Path("a")})
    run.write_text("sub/summary.md", "# ok\n")
    assert (run.path / "rule.tex").read_text() == "\\Delta W = 0\n"
    assert run.read_json("rule.json") == {"theta": [1.0, 2.0], "n": 3, "p": "a"}
    assert (run.path / "sub" / "summary.md").exists()
    for bad in ("../escape.txt", "/abs.txt"):
        with pytest.raises(RunDirectoryError, match="relative path inside the run directory"):
            run.write_text(bad, "x")


def test_crash_during_replace_keeps_old_file(run, monkeypatch):
    target = run.path / "rule.json"
    run.write_json("rule.json", {"v": 1})

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(runs_module.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        run.write_json("rule.json", {"v": 2})
    with pytest.raises(OSError, match="power cut"):
        atomic_write_text(run.path / "new.txt", "x")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert not (run.path / "new.txt").exists()
    assert tmp_files(run.path) == []


def test_crash_while_writing_leaves_no_partial_file(run):
    with pytest.raises(RuntimeError):
        with runs_module.atomic_open(run.path / "fig.png") as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert not (run.path / "fig.png").exists() and tmp_files(run.path) == []


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_append_read_and_superset_columns(run):
    assert run.read_metrics().empty
    run.append_metrics([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}])
    run.append_metrics([{"step": 2, "loss": 0.25, "theta.F0": 0.1}])  # new column: rewrite
    run.append_metrics([{"step": 3, "theta.F0": torch.tensor(0.2)}])  # subset: append
    run.append_metrics({"step": 4, "loss": np.float32(0.125), "note": None})
    df = run.read_metrics()
    assert list(df.columns) == ["step", "loss", "theta.F0", "note"]
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    assert df["loss"].tolist()[:3] == [1.0, 0.5, 0.25] and np.isnan(df["loss"][3])
    assert df["theta.F0"][3] == pytest.approx(0.2) and np.isnan(df["theta.F0"][0])
    assert tmp_files(run.path) == []


def test_metrics_floats_round_trip_exactly(run):
    values = [0.1 + 0.2, 1e-300, 123456789.123456789, float("inf")]
    run.append_metrics([{"step": i, "x": v} for i, v in enumerate(values)])
    assert run.read_metrics()["x"].tolist() == values


def test_metrics_reject_non_scalars(run):
    with pytest.raises(TypeError, match="'angle' has shape"):
        run.append_metrics([{"step": 0, "angle": torch.zeros(3)}])
    assert run.read_metrics().empty


def test_torn_metrics_append_is_ignored_then_repaired(run, monkeypatch):
    run.append_metrics([{"step": 0, "loss": 1.0}])
    real_write = os.write

    def torn_write(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError("power cut")

    monkeypatch.setattr(runs_module.os, "write", torn_write)
    with pytest.raises(OSError, match="power cut"):
        run.append_metrics([{"step": 1, "loss": 0.123456}])
    monkeypatch.undo()
    assert not run.metrics_path.read_bytes().endswith(b"\n")  # the tear is really there
    assert run.read_metrics()["step"].tolist() == [0]
    with pytest.warns(RuntimeWarning, match="torn last line"):
        run.append_metrics([{"step": 1, "loss": 0.5}])
    df = run.read_metrics()
    assert df["step"].tolist() == [0, 1] and df["loss"].tolist() == [1.0, 0.5]


def test_crash_during_metrics_rewrite_keeps_old_table(run, monkeypatch):
    run.append_metrics([{"step": 0, "loss": 1.0}])
    before = run.metrics_path.read_bytes()
    monkeypatch.setattr(runs_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        run.append_metrics([{"step": 1, "new": 2.0}])  # new column -> atomic rewrite
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before and tmp_files(run.path) == []


def test_truncate_metrics(run):
    run.append_metrics([{"step": s, "loss": 1.0 / (s + 1)} for s in range(10)])
    assert run.truncate_metrics(4) == 5
    assert run.read_metrics()["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.truncate_metrics(100) == 0
    run.append_metrics([{"step": 5, "loss": 0.0}])
    assert run.read_metrics()["step"].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(RunDirectoryError, match="no 'epoch' column"):
        run.truncate_metrics(1, step_column="epoch")


# -------------------------------------------------------------------------------------------- checkpoints


def make_state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "theta": torch.full((4,), float(step), dtype=torch.float64),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.Generator().manual_seed(step).get_state(),
        "numpy_rng": np.random.default_rng(step).bit_generator.state,
        "history": [1.0, 2.0, {"nested": (1, "a", None)}],
        "step": step,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_with_weights_only(run, monkeypatch):
    state = make_state(5)
    path = run.save_checkpoint(5, state)
    assert path == run.path / "checkpoints" / "step_000005.pt"
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    step, loaded = run.load_checkpoint()
    assert step == 5 and calls == [True]
    assert_same(state, loaded)
    gen = torch.Generator()
    gen.set_state(loaded["torch_rng"])
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_no_checkpoint_returns_none(run):
    assert run.load_checkpoint() is None and run.resume() is None
    with pytest.raises(RunDirectoryError, match="No checkpoint for step 3"):
        run.load_checkpoint(3)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.nn.Linear(2, 2), r"state_dict\(\)"),
        (np.zeros(3), "torch.from_numpy"),
        (np.float64(1.0), r"\.item\(\)"),
        (torch.Generator(), "get_state"),
        (object(), "checkpoints hold only"),
    ],
    ids=["module", "ndarray", "numpy-scalar", "generator", "object"],
)
def test_save_refuses_what_weights_only_cannot_load(run, bad, match):
    with pytest.raises(TypeError, match=match):
        run.save_checkpoint(1, {"x": {"y": [bad]}})
    assert run.checkpoint_steps() == []


def test_keep_last_n(tmp_path):
    run = RunDir.create(tmp_path / "r", CONFIG, keep=3)
    for step in range(0, 60, 10):
        run.save_checkpoint(step, {"theta": torch.tensor([float(step)])})
    assert run.checkpoint_steps() == [30, 40, 50]
    assert RunDir.open(run.path).keep == 2  # keep is a property of the handle, not the directory
    run.save_checkpoint(1_234_567, {"theta": torch.zeros(1)})  # more than six digits still sorts by number
    assert run.checkpoint_steps() == [40, 50, 1_234_567]


def test_saving_an_earlier_step_drops_later_checkpoints(run):
    for step in (10, 20):
        run.save_checkpoint(step, {"theta": torch.tensor([float(step)])})
    run.save_checkpoint(15, {"theta": torch.tensor([15.0])})
    assert run.checkpoint_steps() == [10, 15]
    assert run.load_checkpoint()[0] == 15


def test_corrupt_latest_checkpoint_falls_back(run):
    run.save_checkpoint(1, {"theta": torch.tensor([1.0])})
    run.save_checkpoint(2, {"theta": torch.tensor([2.0])})
    latest = run.checkpoint_path(2)
    latest.write_bytes(latest.read_bytes()[:40])  # truncated, as by a crash outside rulesearch
    with pytest.warns(RuntimeWarning, match="step_000002.pt is unreadable"):
        step, state = run.load_checkpoint()
    assert step == 1 and torch.equal(state["theta"], torch.tensor([1.0]))
    with pytest.raises(RunDirectoryError, match="unreadable"):
        run.load_checkpoint(2)
    run.checkpoint_path(1).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(RunDirectoryError, match="Every checkpoint"):
        run.load_checkpoint()


class Evil:
    pass


def test_pickled_object_is_refused_at_load(run):
    run.checkpoint_dir.mkdir()
    torch.save({"format": 1, "step": 3, "state": {"x": Evil()}}, run.checkpoint_path(3))
    with pytest.raises(RunDirectoryError, match="unreadable"):
        run.load_checkpoint(3)


def test_crash_during_checkpoint_save_keeps_previous(run, monkeypatch):
    run.save_checkpoint(1, {"theta": torch.tensor([1.0])})
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(30)  # half written
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint(2, {"theta": torch.tensor([2.0])})
    monkeypatch.undo()
    assert run.checkpoint_steps() == [1] and tmp_files(run.path) == []
    step, state = run.load_checkpoint()
    assert step == 1 and torch.equal(state["theta"], torch.tensor([1.0]))


def test_resume_truncates_metrics_to_the_checkpoint(run):
    for step in range(6):
        run.append_metrics([{"step": step, "loss": float(step)}])
        if step % 2 == 0:
            run.save_checkpoint(step, {"theta": torch.tensor([float(step)])})
    # the process died after logging step 5 (last checkpoint: step 4)
    reopened = RunDir.create(run.path, CONFIG, resume=True)
    step, state = reopened.resume()
    assert step == 4 and state["theta"].item() == 4.0
    assert reopened.read_metrics()["step"].tolist() == [0, 1, 2, 3, 4]


def test_resume_without_checkpoint_clears_metrics(run):
    run.append_metrics([{"step": 0, "loss": 1.0}])
    assert run.resume() is None
    assert run.read_metrics().empty


# ----------------------------------------------------------------------------------------------- finished


def test_finished_marker(run):
    run.append_metrics([{"step": 0, "loss": 1.0}])
    assert not run.is_finished
    with pytest.raises(RunDirectoryError, match="not finished"):
        run.summary()
    run.mark_finished({"meta_accuracy": 0.8, "theta": torch.tensor([0.5])})
    assert run.is_finished and RunDir.open(run.path).is_finished
    assert run.summary() == {"meta_accuracy": 0.8, "theta": [0.5]}
    assert "end_time" in run.read_json("finished.json")


def test_crash_before_finish_leaves_run_unfinished(run, monkeypatch):
    monkeypatch.setattr(runs_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        run.mark_finished({"acc": 1.0})
    monkeypatch.undo()
    assert not run.is_finished and tmp_files(run.path) == []


def test_read_metrics_returns_dataframe(run):
    assert isinstance(run.read_metrics(), pd.DataFrame)

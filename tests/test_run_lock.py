"""The run directory's exclusive lock: two real processes on one run (fault injection), and the lock's rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rulesearch
from rulesearch.cli import app
from rulesearch.errors import RunDirectoryError
from rulesearch.io.runs import LOCK, RunDir

ROOT = Path(rulesearch.__file__).resolve().parent.parent
TINY = [
    "--dataset", "teacher", "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 150}",
    "--sizes", "6,5,3", "-M", "3", "-K", "3", "-Q", "2", "--episodes", "3", "--dtype", "float64",
    "--threads", "1", "--no-progress", "--no-compare", "--checkpoint-every", "1",
]  # fmt: skip

# `rulesearch discover` that stops inside meta-step 3 (after checkpoint 2) until it is killed
_HOLDER = textwrap.dedent(
    """
    import pathlib, sys, time
    from rulesearch.train import trainer

    real_step = trainer.Trainer.step

    def step(self, st):
        if st.t == 2:
            pathlib.Path(sys.argv[1]).write_text("ready")
            time.sleep(300)
        return real_step(self, st)

    trainer.Trainer.step = step
    from rulesearch.cli import app

    app(sys.argv[2:])
    """
)


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_second_process_fails_at_once_and_resume_after_kill_finishes(tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    (tmp_path / "holder.py").write_text(_HOLDER)
    holder = subprocess.Popen(
        [sys.executable, str(tmp_path / "holder.py"), str(ready), "discover", *TINY, "--name", "shared"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert holder.poll() is None, holder.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first discover never reached meta-step 3"
            time.sleep(0.2)
        run = RunDir.open(tmp_path / "runs" / "shared")
        rows_before = len(run.read_metrics())
        monkeypatch.chdir(tmp_path)  # --name resolves against the working directory
        for extra in ([], ["--resume"]):  # the same name again, and --resume while the first process still runs
            result = CliRunner().invoke(app, ["discover", *TINY, "--name", "shared", *extra])
            err = result.output
            assert result.exit_code == 2, err
            assert "is in use by another process" in err and f"pid {holder.pid}" in err, err
            assert "since 20" in err and "holder.py" in err and "--resume" in err  # start time, command, the fix
        assert len(run.read_metrics()) == rows_before and run.checkpoint_steps() == [1, 2]
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, the pid stays in the file
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert str(holder.pid) in (run.path / LOCK).read_text()
    (run.path / ".metrics.csv.x1y2.tmp").write_text("torn")  # a killed atomic write
    result = CliRunner().invoke(app, ["discover", *TINY, "--name", "shared", "--resume"])
    assert result.exit_code == 0, result.output
    assert run.is_finished and not (run.path / ".metrics.csv.x1y2.tmp").exists()
    steps = run.read_metrics().groupby("run")["step"].apply(list).tolist()
    assert steps == [[1, 2, 3]]  # no row lost or logged twice
    assert (run.path / LOCK).read_text() == ""  # released


def test_lock_is_exclusive_per_open_and_released(tmp_path):
    first = RunDir.create(tmp_path / "r", {"seed": 0}, lock=True)
    assert first.locked
    with pytest.raises(RunDirectoryError, match=rf"in use by another process \(pid {os.getpid()} on host"):
        RunDir.create(tmp_path / "r", {"seed": 0}, resume=True, lock=True)
    first.unlock()
    again = RunDir.create(tmp_path / "r", {"seed": 0}, resume=True, lock=True)
    assert again.locked and len(again.manifest()["resumes"]) == 1
    again.unlock()


def test_failed_create_releases_the_lock(tmp_path):
    RunDir.create(tmp_path / "r", {"seed": 0})
    with pytest.raises(RunDirectoryError, match="different config"):
        RunDir.create(tmp_path / "r", {"seed": 1}, resume=True, lock=True)
    RunDir.create(tmp_path / "r", {"seed": 0}, resume=True, lock=True).unlock()  # not left locked


def test_resume_may_change_threads_not_the_experiment(tmp_path):
    RunDir.create(tmp_path / "r", {"meta": {"threads": 2, "lr": 1e-3}})
    again = RunDir.create(tmp_path / "r", {"meta": {"threads": 1, "lr": 1e-3}}, resume=True)
    assert len(again.manifest()["resumes"]) == 1 and "threads" in again.manifest()["resumes"][0]
    with pytest.raises(RunDirectoryError, match="changed keys: meta.lr"):
        RunDir.create(tmp_path / "r", {"meta": {"threads": 1, "lr": 3e-4}}, resume=True)


def test_foreign_directory_is_refused_before_a_lock_file_is_made(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not empty and is not a run directory"):
        RunDir.create(tmp_path / "mine", {"seed": 0}, lock=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]

"""Inputs that used to give silently wrong results now fail or are repaired: negative layer widths, '..' as a run
name, fractional labels, a checkpoint claiming 10^9 meta-steps, NaN parameters and coefficients in rule files,
temporary files of killed writes, and a run killed between manifest.json and config.yaml."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rulesearch.cli import _ints, app
from rulesearch.errors import ConfigError, DatasetError, RunDirectoryError
from rulesearch.io.runs import RunDir, run_path
from rulesearch.lang.pools import pool
from rulesearch.neural import NeuralRule
from rulesearch.tasks.data import load_emnist

TINY = [
    "--dataset", "teacher", "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 150}",
    "-M", "3", "-K", "3", "-Q", "2", "--episodes", "2", "--dtype", "float64",
    "--threads", "1", "--no-progress", "--no-compare", "--checkpoint-every", "1",
]  # fmt: skip


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def test_negative_layer_width_is_refused_not_made_positive(tmp_path):
    assert _ints("64,170,10", "--sizes") == _ints("64-170-10", "--sizes") == _ints("64x170x10", "--sizes")
    assert _ints("64,-5,10", "--sizes") == (64, -5, 10)
    with pytest.raises(ConfigError, match="expected integers separated by commas"):
        _ints("64,,10", "--sizes")
    code, text = invoke("discover", *TINY, "--sizes", "6,-5,3", "--out", tmp_path / "run")
    assert code == 2 and "positive integers" in text and "(6, -5, 3)" in text, text
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["..", ".", "a/..", ""])
def test_run_name_must_be_a_plain_directory_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirectoryError, match="plain directory name"):
        run_path(name)
    code, text = invoke("discover", *TINY, "--sizes", "6,5,3", "--name", name)
    assert code == 2 and "plain directory name" in text, text
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory


def test_fractional_labels_are_refused_whole_float_labels_accepted(tmp_path):
    images = np.zeros((12, 28, 28), np.uint8)
    np.savez(tmp_path / "frac.npz", images=images, labels=np.arange(12) % 3 + 0.5)
    with pytest.raises(DatasetError, match=r"labels must be whole numbers; received \[0.5, 1.5, 2.5\]"):
        load_emnist(tmp_path / "frac.npz")
    np.savez(tmp_path / "whole.npz", images=images, labels=(np.arange(12) % 3).astype(np.float32))
    assert load_emnist(tmp_path / "whole.npz").labels.tolist() == [0, 1, 2] * 4


def test_checkpoint_claiming_more_steps_than_the_run_has_is_refused(tmp_path):
    out = tmp_path / "run"
    code, text = invoke("discover", *TINY, "--sizes", "6,5,3", "--out", out)
    assert code == 0, text
    run = RunDir.open(out)
    (out / "finished.json").unlink()
    file = run.checkpoint_path(2)
    payload = torch.load(file, weights_only=True)
    payload["state"]["t"] = 10**9
    torch.save(payload, file)
    code, text = invoke("discover", *TINY, "--sizes", "6,5,3", "--out", out, "--resume")
    assert code == 2 and "holds t = 1000000000; the meta-steps done must be 0..2" in text, text
    assert not run.is_finished


def test_nan_in_rule_files_is_refused_by_evaluate_terms_and_export(tmp_path):
    neural = NeuralRule(hidden=(3,))
    params = neural.init_params(torch.Generator().manual_seed(0))
    params["skip"][0] = float("nan")
    (tmp_path / "neural.json").write_text(json.dumps(neural.with_params(params).to_json()))
    code, text = invoke("evaluate", tmp_path / "neural.json", "--seeds", "1", "--episodes", "1")
    assert code == 2 and "parameter 'skip' holds NaN or infinite values" in text, text
    data = pool.with_values([float("nan")] + [0.0] * 9).to_json()
    (tmp_path / "rule.json").write_text(json.dumps(data))  # json writes NaN, a literal json.loads accepts
    for args in (["terms", "--rule", tmp_path / "rule.json"], ["export", tmp_path / "rule.json", "-f", "json"]):
        code, text = invoke(*args)
        assert code == 2 and "Coefficient nan is not a finite number" in text and "NaN" not in text, text


def test_temporary_files_of_killed_writes_are_removed_under_the_lock(tmp_path):
    run = RunDir.create(tmp_path / "run", {"seed": 0})
    (run.path / "figures").mkdir()
    run.checkpoint_dir.mkdir()
    stale = [
        run.path / ".rule.json.ab12.tmp",
        run.checkpoint_dir / ".step_000002.pt.x.tmp",
        run.path / "figures" / ".a.png.q.tmp",
    ]
    for path in stale:
        path.write_text("half")
    (run.path / "notes.tmp").write_text("mine")  # not one of atomic_open's names
    RunDir.create(run.path, {"seed": 0}, resume=True)
    assert all(p.exists() for p in stale)  # no lock: another writer may be active
    RunDir.create(run.path, {"seed": 0}, resume=True, lock=True).unlock()
    assert not any(p.exists() for p in stale) and (run.path / "notes.tmp").exists()


def test_run_killed_between_manifest_and_config_is_taken_over(tmp_path):
    def interrupted(path):
        RunDir.create(path, {"seed": 0})
        (path / "config.yaml").unlink()  # the state a kill after manifest.json leaves

    interrupted(tmp_path / "a")
    again = RunDir.create(tmp_path / "a", {"seed": 1})
    assert again.config() == {"seed": 1} and "resumes" not in again.manifest()
    interrupted(tmp_path / "b")
    assert RunDir.create(tmp_path / "b", {"seed": 1}, resume=True).config() == {"seed": 1}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text('{"mine": 1}')  # not written by rulesearch: left alone
    with pytest.raises(RunDirectoryError, match="config.yaml is missing"):
        RunDir.create(tmp_path / "c", {"seed": 0}, resume=True)
    assert (tmp_path / "c" / "manifest.json").read_text() == '{"mine": 1}'
    interrupted(tmp_path / "d")
    code, text = invoke("discover", *TINY, "--sizes", "6,5,3", "--out", tmp_path / "d")
    assert code == 0 and RunDir.open(tmp_path / "d").is_finished, text
    assert os.listdir(tmp_path / "d").count("manifest.json") == 1

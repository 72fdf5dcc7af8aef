"""Malformed inputs get one clear message (a RuleSearchError: the problem and the fix), never a raw traceback:
config, rule, manifest and metrics files that are not UTF-8, are directories, nest JSON 5,000 deep or hold 5,000-digit
integers; network rules without groups; neural rules with string parameters; damaged checkpoints; truncated, empty
or string-labelled npz datasets; a full disk; absurd thread counts. Property tests fuzz rule files and raw bytes."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.errors import RuleSearchError
from rulesearch.io import runs as runs_module
from rulesearch.io.config import load_config
from rulesearch.io.runs import RunDir
from rulesearch.lang.pools import pool
from rulesearch.lang.rule import NetworkRule
from rulesearch.neural import NeuralRule
from rulesearch.train import load_rule, threads
from rulesearch.train.rules import load_feedback_rule, trained_rule_json

TINY = [
    "--dataset", "teacher", "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 150}",
    "--sizes", "6,5,3", "-M", "3", "-K", "3", "-Q", "2", "--episodes", "3", "--dtype", "float64",
    "--threads", "1", "--no-progress", "--no-compare", "--checkpoint-every", "1",
]  # fmt: skip
SETTINGS = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


BAD_FILES = {  # name -> (writer, words the message must hold)
    "not UTF-8": (lambda p: p.write_bytes(b'{"a": "\xff\xfe"}'), "is not UTF-8 text"),
    "a directory": (lambda p: p.mkdir(), "is a directory, not a file"),
    "JSON nested 5,000 deep": (lambda p: p.write_text("[" * 5000 + "]" * 5000), "deeper than 100 levels"),
    "a 5,000-digit integer": (lambda p: p.write_text('{"seed": ' + "9" * 5000 + "}"), "more than 4300 digits"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_config_and_rule_files(tmp_path, name):
    write, words = BAD_FILES[name]
    write(tmp_path / "bad.json")
    code, text = invoke("discover", "--config", tmp_path / "bad.json", *TINY, "--out", tmp_path / "run")
    assert code == 2 and "Config file" in text and words in text and "Pass a YAML or JSON file" in text, text
    assert not (tmp_path / "run").exists()
    (tmp_path / "r").mkdir()  # a run directory whose rule.json is bad
    write(tmp_path / "r" / "rule.json")
    calls = [["terms", "--rule", tmp_path / "r"]] + [["export", tmp_path / "r" / "rule.json"]] * (name != "a directory")
    for args in calls:
        code, text = invoke(*args)
        assert code == 2 and words in text and "Pass a rule JSON file" in text, text


def test_network_rule_without_groups_and_neural_rule_with_string_parameters(tmp_path):
    (tmp_path / "net.json").write_text(json.dumps({"format": "rulesearch.network_rule/1"}))
    code, text = invoke("terms", "--rule", tmp_path / "net.json")
    assert code == 2 and "needs 'groups'" in text and '"layers": [0]' in text, text
    neural = NeuralRule(hidden=(3,))
    data = neural.with_params(neural.init_params(torch.Generator().manual_seed(0))).to_json()
    data["params"]["skip"] = ["a"] * neural.n_features
    (tmp_path / "neural.json").write_text(json.dumps(data))
    for args in (["terms", "--rule", tmp_path / "neural.json"], ["evaluate", tmp_path / "neural.json"]):
        code, text = invoke(*args)
        assert code == 2 and "parameter 'skip' must be numbers" in text and "export it again" in text, text


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A tiny run whose result files are removed, so export and --resume read its config, manifest, metrics and
    checkpoints."""
    out = tmp_path_factory.mktemp("malformed") / "run"
    code, text = invoke("discover", *TINY, "--out", out)
    assert code == 0, text
    for name in ("rule.json", "finished.json"):
        (out / name).unlink()
    return out


def _set_checkpoint(key, value):
    def damage(path):
        run = RunDir(path)
        file = run.checkpoint_path(run.checkpoint_steps()[-1])
        payload = torch.load(file, weights_only=True)
        if value is None:
            del payload["state"][key]
        else:
            payload["state"][key] = value
        torch.save(payload, file)

    return damage


def _replace_metrics(path):
    (path / "metrics.csv").unlink()
    (path / "metrics.csv").mkdir()


DAMAGE = {
    "config not UTF-8": (lambda p: (p / "config.yaml").write_bytes(b"seed: \xff\n"), "config.yaml' is not UTF-8"),
    "manifest not UTF-8": (lambda p: (p / "manifest.json").write_bytes(b"\xff{}"), "manifest.json' is not UTF-8"),
    "manifest nested deep": (lambda p: (p / "manifest.json").write_text("[" * 5000 + "]" * 5000), "deeper than 100"),
    "metrics a directory": (_replace_metrics, "metrics.csv cannot be read (Is a directory)"),
    "metrics not UTF-8": (lambda p: (p / "metrics.csv").write_bytes(b"step,run\n1,\xff\n"), "is not UTF-8 text"),
    "checkpoint lacks a key": (_set_checkpoint("adam_m", None), "lacks ['adam_m']"),
    "checkpoint with t < 0": (_set_checkpoint("t", -3), "holds t = -3; the meta-steps done must be 0..3"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_run_directories(unfinished_run, tmp_path, name):
    damage, words = DAMAGE[name]
    run = tmp_path / "run"
    shutil.copytree(unfinished_run, run)
    damage(run)
    for args in (["export", run], ["discover", *TINY, "--out", run, "--resume"]):
        code, text = invoke(*args)
        assert code == 2 and words in text, text
        assert "start the run afresh" in text or "restore the file" in text
    assert not RunDir(run).is_finished


@pytest.mark.parametrize(
    "name, write, words",
    [
        ("truncated", lambda p, good: p.write_bytes(good[: len(good) // 2]), "truncated, not an npz"),
        ("empty", lambda p, good: p.write_bytes(b""), "truncated, not an npz"),
        ("string labels", None, "labels have dtype <U1 (not integers)"),
    ],
)
def test_bad_npz_datasets(tmp_path, name, write, words):
    images = np.zeros((30, 28, 28), np.uint8)
    labels = np.array(list("abc") * 10) if write is None else np.arange(30) % 3
    np.savez(tmp_path / "good.npz", images=images, labels=labels)
    path = tmp_path / "data.npz"
    if write is None:
        (tmp_path / "good.npz").rename(path)
    else:
        write(path, (tmp_path / "good.npz").read_bytes())
    code, text = invoke(
        "discover", "--dataset", "emnist", "--data-dir", path, "--sizes", "784,5,3", "-M", "3", "-K", "1", "-Q", "1",
        "--episodes", "1", "--no-progress", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 2 and words in text and ("numpy.savez" in text or "integer class indices" in text), text
    assert not (tmp_path / "run").exists()


class _FullDisk:
    """``os`` for rulesearch.io.runs on a full disk: appends to metrics.csv fail with ENOSPC."""

    def __getattr__(self, name):
        import os

        return getattr(os, name)

    def write(self, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_fails_cleanly_and_the_run_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(runs_module, "os", _FullDisk())
    code, text = invoke("discover", *TINY, "--out", out)
    assert code == 1 and "Cannot write" in text and "No space left on device" in text, text
    assert "Free space on that disk" in text and "--resume" in text
    monkeypatch.undo()
    run = RunDir.open(out)
    assert not run.is_finished and run.checkpoint_steps() == [1]
    code, text = invoke("discover", *TINY, "--out", out, "--resume")
    assert code == 0, text
    assert run.read_metrics()["step"].tolist() == [1, 2, 3]


def test_absurd_thread_counts(tmp_path, monkeypatch):
    code, text = invoke("discover", *TINY, "--threads", "100000", "--out", tmp_path / "run")
    assert code == 2 and "'meta.threads' is 100000; at most 1024 threads" in text and "--threads" in text, text
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    with pytest.warns(RuntimeWarning, match="meta.threads is 2 but this process may use 1 CPU cores"), threads(2):
        pass


# ---- property tests ---------------------------------------------------------------------------------------------

_NEURAL = NeuralRule(hidden=(3,))
_PARAMS = _NEURAL.init_params(torch.Generator().manual_seed(0))
SEEDS = [
    json.loads(json.dumps(d))
    for d in (
        trained_rule_json(pool.with_values([0.1] * 10), runs=[[0.1] * 10, [0.2] * 10], intervals=[[0, 1]] * 10),
        trained_rule_json(NetworkRule({(0,): pool.with_values([0.1] * 10), (1, 2): pool.with_values([0.2] * 10)})),
        _NEURAL.with_params(_PARAMS).to_json(runs=[_PARAMS]),
    )
]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True), st.text(max_size=5)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=6,
)


def _locations(data, where=()):
    yield where
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield from _locations(value, (*where, key))


@SETTINGS
@given(st.data())
def test_fuzzed_rule_files_raise_only_rulesearch_errors(data):
    rule = json.loads(json.dumps(data.draw(st.sampled_from(SEEDS))))
    where = data.draw(st.sampled_from(list(_locations(rule))[1:]))
    parent = rule
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(json_values)
    for load in (lambda: load_rule(rule), lambda: load_rule(rule, run=0), lambda: load_feedback_rule(rule)):
        try:
            load()
        except RuleSearchError:
            pass


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".json", ".yaml"]))
def test_fuzzed_bytes_as_config_rule_and_manifest(tmp_path_factory, data, suffix):
    folder = tmp_path_factory.mktemp("bytes")
    (folder / f"file{suffix}").write_bytes(data)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "manifest.json").write_bytes(data)
    (folder / "metrics.csv").write_bytes(data)
    for read in (
        lambda: load_config(folder / f"file{suffix}"),
        lambda: load_rule(folder / f"file{suffix}"),
        lambda: RunDir.open(folder).manifest(),
        lambda: RunDir.open(folder).read_metrics(),
    ):
        try:
            read()
        except RuleSearchError:
            pass

"""A run that stops on divergence is left out of the reported rule, its intervals, rule.json and the accuracies;
where it diverged (meta-step, episode, inner step, layer) is reported, and `discover` exits with 3."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import rulesearch.train as train_mod
from rulesearch.cli import app
from rulesearch.io.runs import RunDir
from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig, export_run, load_rule

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 200}, M=3, K=4, Q=2)
META = dict(episodes=5, runs=3, l1=0.0, dtype="float64", compare=False, threads=1, max_skips=2)


@pytest.fixture
def run_1_blows_up(monkeypatch):
    """From meta-step 2 on, run 1's training inputs are huge: its episodes diverge, the others' do not."""
    original = train_mod.Problem.episodes

    def poisoned(self, t, runs, net=None, ks=None):
        batch, w, fb = original(self, t, runs, net, ks)
        if t >= 1 and 1 in list(runs):
            i = list(runs).index(1) * self.B
            batch[0][i : i + self.B] = 1e6
        return batch, w, fb

    monkeypatch.setattr(train_mod.Problem, "episodes", poisoned)


def test_stopped_run_is_left_out_of_rule_intervals_json_and_report(tmp_path, run_1_blows_up):
    net = NetworkConfig(sizes=(6, 5, 3))
    s = RuleSearch("ehebb", net, TASK, MetaConfig(**META), out=tmp_path / "r", progress=False)
    with pytest.warns(RuntimeWarning, match=r"run 1 \(seed 1\) stopped at meta-step 3 .*inner step \d+, layer \d"):
        s.fit()
    assert s.stopped_runs_ == [1] and s.reported_runs_ == [0, 2]
    theta = s.theta_.double()
    torch.testing.assert_close(torch.tensor(s.rule_.values, dtype=torch.float64), theta[[0, 2]].mean(0))
    assert not torch.allclose(torch.tensor(s.rule_.values, dtype=torch.float64), theta.mean(0))
    kept = theta[[0, 2]].numpy()
    assert (s.intervals_[:, 0] <= kept.min(0) + 1e-12).all() and (s.intervals_[:, 1] >= kept.max(0) - 1e-12).all()
    div = s.summary_["divergences"]
    assert len(div) == 1 and div[0]["run"] == 1 and div[0]["meta_step"] == 3 and div[0]["diverged_k"] == 0
    assert div[0]["diverged_inner_step"] >= 1 and div[0]["diverged_layer"] in (1, 2)
    h = s.history_
    assert h[h.run == 1].diverged_layer.notna().tolist() == [False, True, True]

    run = RunDir.open(tmp_path / "r")
    assert run.is_finished and run.summary()["stopped_runs"] == [1]
    data = json.loads((run.path / "rule.json").read_text())
    assert len(data["runs"]) == 2 and len(data["intervals"]) == 2
    assert data["stopped_runs"][0]["meta_step"] == 3 and data["stopped_runs"][0]["parameters"] == theta[1].tolist()
    assert load_rule(run.path).values == s.rule_.values
    report = s.report()
    assert "mean of 2 of 3 runs; 1 stopped" in report and "left out of the rule" in report
    assert f"inner step {div[0]['diverged_inner_step']}, layer {div[0]['diverged_layer']}" in report
    reloaded = RuleSearch.from_run(run.path)  # the same exclusion from the run directory alone
    assert reloaded.reported_runs_ == [0, 2] and reloaded.rule_.values == s.rule_.values
    exported = json.loads(export_run(run.path, "json", 3))
    assert len(exported["runs"]) == 2 and exported["stopped_runs"][0]["run"] == 1


def test_cli_exit_code_3_when_some_runs_stopped(tmp_path, run_1_blows_up):
    args = [
        "discover", "--rule", "ehebb", "--dataset", "teacher",
        "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 200}",
        "--sizes", "6,5,3", "-M", "3", "-K", "4", "-Q", "2", "--episodes", "5", "--runs", "3", "--l1", "0",
        "--dtype", "float64", "--threads", "1", "--no-progress", "--no-compare", "--set", "meta.max_skips=2",
        "--out", str(tmp_path / "r"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "2 of 3 runs; 1 stopped" in result.output and "left out of the reported rule" in result.output
    assert re.search(r"run 1 \(seed 1\) stopped at meta-step \d after 2 consecutive diverged meta-steps \(episode k=0 "
                     r"diverged at inner step \d+, layer \d\)", result.output)  # fmt: skip
    assert RunDir.open(tmp_path / "r").is_finished

"""Tests of rulesearch.evaluate: rule vs f0 baselines on fresh tasks with bootstrap intervals."""

import warnings

import numpy as np
import pytest
import torch

from rulesearch.errors import ConfigError
from rulesearch.evaluate import EvalConfig, evaluate, evaluate_spec, rule_params
from rulesearch.lang.pools import bio, f0
from rulesearch.lang.rule import NetworkRule
from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 4, "n_samples": 300}, M=3, K=4, Q=3)
NET = NetworkConfig(sizes=(6, 5, 4))
CFG = EvalConfig(seeds=4, episodes=2, dtype="float64")


def test_table_has_intervals_and_baselines_share_episodes():
    ev = evaluate(f0.with_values([0.05]), network=NET, task=TASK, config=CFG)
    t = ev.table
    assert list(t.method) == ["rule (fa)", "f0 (fa)", "f0 (bp)"]
    assert (t.accuracy_lo <= t.accuracy).all() and (t.accuracy <= t.accuracy_hi).all()
    assert (t.seeds == 4).all() and (t.episodes == 2).all()
    # f0 at lr 0.05 under fa IS the rule: identical per-seed results
    ps = ev.per_seed
    np.testing.assert_array_equal(ps[ps.method == "rule (fa)"].accuracy, ps[ps.method == "f0 (fa)"].accuracy)
    assert t.lr.iloc[1] == pytest.approx(0.05)
    assert "95% interval" in ev.to_markdown() and "4 seeds x 2 episodes" in str(ev)


def test_feedback_mode_and_held_out_classes():
    ev = evaluate(
        bio.with_values([0.05, -0.01, 0.001]),
        network=NetworkConfig(sizes=(6, 5, 4), feedback="bp"),
        task=TASK.replace(split="0.5", M=2),
        config=CFG.replace(classes="held-out", baselines=False),
    )
    assert list(ev.table.method) == ["rule (bp)"]
    assert ev.info["classes"] == "held-out"
    with pytest.raises(ConfigError, match="Held-out classes need a class split"):
        evaluate(f0.with_values([0.05]), network=NET, task=TASK, config=CFG.replace(classes="held-out"))


def test_rule_without_values_warns_and_per_layer_rules():
    with pytest.warns(RuntimeWarning, match="no trained coefficients"):
        update, theta = rule_params(bio, 2, theta0=0.02)
    assert theta.tolist() == [0.02, 0.0, 0.0]
    nr = NetworkRule({(0,): bio.with_values([0.1, 0, 0]), (1,): f0.with_values([0.2])})
    updates, params = rule_params(nr, 2)
    assert [p.tolist() for p in params] == [[0.1, 0.0, 0.0], [0.2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev = evaluate(nr, network=NET, task=TASK, config=CFG.replace(seeds=2))
    assert ev.table.lr.iloc[1] == pytest.approx(0.15)  # mean of the layers' -e x coefficients


def test_evaluate_run_directory_writes_results(tmp_path):
    RuleSearch(
        rule="bio",
        network=NET,
        task=TASK,
        meta=MetaConfig(episodes=2, runs=2, dtype="float64", compare=False),
        out=tmp_path / "run",
        progress=False,
    ).fit()
    ev, target = evaluate_spec(tmp_path / "run", network={"feedback": "bp"}, config=CFG)
    assert target == tmp_path / "run" / "evaluation"
    for name in ("evaluation.csv", "evaluation_per_seed.csv", "evaluation.md", "evaluation.json", "evaluation.png"):
        assert (target / name).is_file(), name
    assert ev.table.method.iloc[0] == "rule (bp)"
    ev1, _ = evaluate_spec(tmp_path / "run", run=1, config=CFG.replace(baselines=False), out=tmp_path / "ev1")
    assert (tmp_path / "ev1" / "evaluation.png").is_file()
    # another dataset (transfer)
    ev2, _ = evaluate_spec(
        tmp_path / "run",
        network={"sizes": (64, 6, 10)},
        task={"dataset": "digits", "M": 3, "K": 3, "Q": 2},
        config=CFG.replace(seeds=2, episodes=1),
        out=None,
    )
    assert ev2.info["dataset"] == "digits" and ev2.info["task"]["options"] == {}


def test_named_rule_spec():
    with pytest.warns(RuntimeWarning):
        ev, target = evaluate_spec("f0", network={"sizes": (6, 5, 4)}, task=TASK.to_dict(), config=CFG)
    assert target is None and len(ev.table) == 3
    assert torch.isfinite(torch.tensor(ev.table.accuracy.to_numpy())).all()

"""Tests of rulesearch.evaluate: rule vs f0 baselines on fresh tasks with bootstrap intervals."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import ConfigError
from rulesearch.evaluate import EvalConfig, evaluate, evaluate_spec, rule_params
from rulesearch.inner import f0 as f0_update
from rulesearch.inner import run_episodes
from rulesearch.lang.pools import bio, f0
from rulesearch.lang.rule import NetworkRule
from rulesearch.networks.feedforward import stack_episodes
from rulesearch.train import MetaConfig, NetworkConfig, Problem, RuleSearch, TaskConfig

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


def _by_hand(task, network, side, items, dtype=torch.float64, feedback=None):
    """The assembly evaluate used before Problem: dataset -> sampler -> network (sized by the data) -> episodes."""
    dataset = task.load()
    sampler = task.sampler(dataset, side)
    net = network.build(dataset.n_features, sampler.n_outputs)
    if feedback is not None:
        net = dataclasses.replace(net, feedback=feedback)
    return net, stack_episodes(sampler, net, items, dtype)


@pytest.mark.parametrize(
    "task,network,side",
    [
        (TASK, NET, "train"),
        (TASK.replace(split="0.5", M=2), NET, "test"),
        (TaskConfig(dataset="digits", M=3, K=2, Q=2), NetworkConfig(feedback="bp"), "train"),  # sized by the data
    ],
)
def test_problem_episodes_equal_the_hand_assembly(task, network, side):
    items = [(10_000 + i, 0, range(2)) for i in range(3)]
    problem = Problem.of(task, network, side=side, dtype="float64")
    for feedback in (None, "fa", "bp"):  # the rule's network and the baselines'
        net, want = _by_hand(task, network, side, items, feedback=feedback)
        mine = problem.net if feedback is None else dataclasses.replace(problem.net, feedback=feedback)
        assert mine == net
        got = problem.batch(items, mine)
        for a, b in zip([*want[0], *want[1], *want[2]], [*got[0], *got[1], *got[2]]):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_evaluation_numbers_equal_the_hand_assembly():
    """Per-seed accuracy and loss of evaluate equal run_episodes on the hand-assembled episodes (same numbers)."""
    rule = bio.with_values([0.05, -0.01, 0.001])
    task = TASK.replace(split="0.5", M=2)
    ev = evaluate(rule, network=NET, task=task, config=CFG.replace(classes="held-out"))
    seeds = [CFG.seed + i for i in range(CFG.seeds)]
    items = [(s, 0, range(CFG.episodes)) for s in seeds]
    for method, feedback, update, params in [
        ("rule (fa)", None, compile_rule(rule), torch.tensor(rule.values, dtype=torch.float64)),
        ("f0 (bp)", "bp", f0_update, torch.tensor(ev.info["baseline_lr"], dtype=torch.float64)),
    ]:
        net, (batch, weights, fb) = _by_hand(task, NET, "test", items, feedback=feedback)
        with torch.no_grad():
            res = run_episodes(net, batch, update, params, weights, fb, raise_on_divergence=False)
        ps = ev.per_seed[ev.per_seed.method == method]
        acc = res.accuracy.double().reshape(len(seeds), -1).mean(1)
        loss = res.loss.double().reshape(len(seeds), -1).mean(1)
        assert not res.diverged.any()
        np.testing.assert_array_equal(ps.accuracy.to_numpy(), acc.numpy())
        np.testing.assert_array_equal(ps.loss.to_numpy(), loss.numpy())

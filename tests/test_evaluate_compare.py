"""`evaluate` compares several rules and runs side by side on the same episodes, with given coefficients."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.errors import ConfigError
from rulesearch.evaluate import EvalConfig, evaluate, evaluate_spec, parse_spec
from rulesearch.lang.pools import f0
from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 4, "n_samples": 300}, M=3, K=4, Q=3)
NET = NetworkConfig(sizes=(6, 5, 4))
CFG = EvalConfig(seeds=3, episodes=2, dtype="float64")


def test_rules_side_by_side_share_episodes_and_baselines():
    ev = evaluate({"slow": f0.with_values([0.01]), "fast": f0.with_values([0.05])}, network=NET, task=TASK, config=CFG)
    assert list(ev.table.method) == ["slow (fa)", "fast (fa)", "f0 (fa)", "f0 (bp)"]
    ps = ev.per_seed
    assert ev.info["baseline_lr"] == pytest.approx(0.01)  # the first rule's -e x coefficient
    np.testing.assert_array_equal(ps[ps.method == "slow (fa)"].accuracy, ps[ps.method == "f0 (fa)"].accuracy)
    assert not np.array_equal(ps[ps.method == "slow (fa)"].loss, ps[ps.method == "fast (fa)"].loss)
    assert ev.info["rules"] == {"slow": "f0", "fast": "f0"} and "slow, fast" in str(ev)


def test_specs_with_coefficients_and_runs(tmp_path):
    assert parse_spec("f0@0.05") == ("f0", (0.05,)) and parse_spec("ehebb@1e-3,-2") == ("ehebb", (1e-3, -2.0))
    assert parse_spec("runs/a") == ("runs/a", None)
    RuleSearch("f0", NET, TASK, MetaConfig(episodes=2, dtype="float64", compare=False), out=tmp_path / "run",
               progress=False).fit()  # fmt: skip
    ev, target = evaluate_spec([tmp_path / "run", "f0@0.05", "f0@0.2"], config=CFG.replace(baselines=False))
    assert list(ev.table.method) == ["run (fa)", "f0@0.05 (fa)", "f0@0.2 (fa)"]
    assert ev.info["network"]["sizes"] == [6, 5, 4] and target is None  # the run's network, nothing written
    with pytest.raises(ConfigError, match=r"2 coefficients for the 1 terms F0 of 'f0'"):
        evaluate_spec(["f0@0.1,0.2"], config=CFG)
    with pytest.raises(ConfigError, match="coefficients after '@' must be finite"):
        evaluate_spec(["f0@nan"], config=CFG)


def test_cli_compares_several_rules(tmp_path):
    args = [
        "evaluate", "f0@0.05", "ehebb@0.05,0.001", "f0@0.05", "--dataset", "digits", "--sizes", "64,6,10",
        "-M", "3", "-K", "2", "-Q", "2", "--seeds", "2", "--episodes", "1", "--dtype", "float64",
        "--no-baselines", "--out", str(tmp_path / "ev"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for method in ("1:f0@0.05 (fa)", "2:ehebb@0.05,0.001 (fa)", "3:f0@0.05 (fa)"):
        assert f"| {method} |" in result.output
    assert (tmp_path / "ev" / "evaluation.png").is_file()
    result = CliRunner().invoke(app, ["evaluate", "f0@0.05", "oja@1", "--seeds", "1"])
    assert result.exit_code == 2 and "1 coefficients for the 2 terms" in result.output, result.output

"""The meta-trainer under plastic feedback: a second, Kolen-Pollack-like rule updates the feedback matrices."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.errors import ConfigError
from rulesearch.evaluate import EvalConfig, evaluate_spec
from rulesearch.io.runs import RunDir
from rulesearch.lang.pools import kp
from rulesearch.train import (
    MetaConfig,
    NetworkConfig,
    RuleSearch,
    TaskConfig,
    export_run,
    load_feedback_rule,
    load_rule,
    resolve_feedback_rule,
)

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 150}, M=3, K=3, Q=2)
PLASTIC = NetworkConfig(sizes=(6, 5, 3), feedback="plastic")


def tiny_meta(**kw):
    base = dict(episodes=3, runs=2, lr=1e-2, theta0=0.05, l1=0.1, dtype="float64", compare=False, threads=1)
    base.update(kw)
    return MetaConfig(**base)


def search(rule="f0", network=PLASTIC, meta=None, **kw):
    return RuleSearch(rule=rule, network=network, task=TASK, meta=meta or tiny_meta(), progress=False, **kw)


def deterministic(df):
    return df.drop(columns=["seconds"])


@pytest.fixture
def no_figures(monkeypatch):
    """Skip drawing the run and evaluation figures (tested elsewhere; matplotlib dominates these tests' time)."""
    monkeypatch.setattr("rulesearch.io.plots.plot_run", lambda run, **kw: None)
    monkeypatch.setattr("rulesearch.evaluate.plot_evaluation", lambda evaluation, path: path)


def test_kp_coefficients_are_meta_learned_and_logged():
    s = search(meta=tiny_meta(feedback_init=(0.05, 0.01))).fit()
    assert set(s.params_) == {"theta", "fb_theta"}
    fb = s.feedback_theta_
    assert fb.shape == (2, 2) and fb.dtype == torch.float64 and torch.isfinite(fb).all()
    assert (fb - torch.tensor([0.05, 0.01], dtype=torch.float64)).abs().min() > 1e-4  # both coefficients moved
    assert s.feedback_rule_.term_names() == ("KP0", "KP1")
    torch.testing.assert_close(torch.tensor(s.feedback_rule_.values, dtype=torch.float64), fb.mean(0))
    h = s.history_
    assert {"fb_theta.KP0", "fb_theta.KP1"} <= set(h.columns) and not h.skipped.any()
    last = h[(h.step == 3) & (h.run == 1)]
    assert last["fb_theta.KP1"].item() == pytest.approx(float(fb[1, 1]), abs=0)
    # the L1 term is the forward rule's only
    first = h[(h.step == 1) & (h.run == 0)]
    assert first["l1"].item() == pytest.approx(0.1 * 0.05)
    assert "feedback: dB_ji = " in s.formula() and "feedback rule (plastic)" in s.coefficient_table()
    assert r"\Delta B_{ji}" in s.to_latex()


def test_proximal_l1_leaves_the_feedback_rule_alone():
    s = search(meta=tiny_meta(l1=1e3, l1_mode="proximal", runs=1)).fit()
    assert (s.theta_ == 0).all()
    assert (s.feedback_theta_ != 0).any()


def test_fixed_feedback_rule_and_default_init():
    s = search(meta=tiny_meta(meta_feedback=False, runs=1)).fit()
    assert set(s.params_) == {"theta"}
    assert s.feedback_theta_.tolist() == [[0.05, 0.0]]  # theta0 on the -e_i x_j term, 0 for the decay
    assert set(s.history_["fb_theta.KP0"]) == {0.05}


def test_neural_and_per_layer_rules_with_a_plastic_feedback_rule():
    neural = search("neural", meta=tiny_meta(episodes=1, runs=1), neural={"checkpoint": False}).fit()
    assert "fb_theta" in neural.params_ and neural.feedback_theta_.shape == (1, 2)
    data = neural.to_json()
    assert set(load_rule(data, run=0).params) == set(neural.rule_.params)  # fb_theta is not a neural parameter
    assert load_feedback_rule(data).values == neural.feedback_rule_.values
    per_layer = search("bio", meta=tiny_meta(episodes=1, per_layer=True)).fit()
    assert per_layer.theta_.shape == (2, 2, 3) and torch.isfinite(per_layer.feedback_theta_).all()


def test_resume_and_run_directory(tmp_path, no_figures):
    ref = search(meta=tiny_meta(episodes=4, checkpoint_every=2)).fit()

    class Stop(Exception):
        pass

    def stop_at_3(step, rows):
        if step == 3:
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        search(meta=tiny_meta(episodes=4, checkpoint_every=2), out=out, callback=stop_at_3).fit()
    res = search(meta=tiny_meta(episodes=4, checkpoint_every=2), out=out, resume=True).fit()
    assert torch.equal(res.params_["fb_theta"], ref.params_["fb_theta"]) and torch.equal(res.theta_, ref.theta_)
    assert deterministic(res.history_).equals(deterministic(ref.history_))

    data = json.loads((out / "rule.json").read_text())
    assert data["feedback_rule"]["name"] == "kp" and len(data["feedback_rule"]["runs"]) == 2
    assert load_rule(out).name == "f0"  # the forward rule loads as before
    assert load_feedback_rule(out, run=1).values == tuple(res.feedback_theta_[1].tolist())
    assert r"\Delta B_{ji}" in (out / "rule.tex").read_text()
    again = RuleSearch.from_run(out)
    assert torch.equal(again.feedback_theta_, res.feedback_theta_)
    assert export_run(out, "latex") == res.to_latex()
    assert "feedback rule (plastic)" in export_run(out, "markdown")

    ev, _ = evaluate_spec(out, config=EvalConfig(seeds=2, episodes=2, dtype="float64", resamples=50))
    assert list(ev.table["method"]) == ["rule (plastic)", "f0 (fa)", "f0 (bp)"]
    assert ev.info["feedback_rule"] == "kp" and (out / "evaluation" / "evaluation.md").is_file()


def test_feedback_rule_specs_and_errors(tmp_path):
    assert resolve_feedback_rule() is kp and resolve_feedback_rule("f0").term_names() == ("F0",)
    path = tmp_path / "fb.json"
    path.write_text(json.dumps(kp.select(["KP0"]).to_json()))
    s = search(network=PLASTIC.replace(feedback_rule=str(path)), meta=tiny_meta(episodes=1, runs=1)).fit()
    assert s.feedback_rule_.term_names() == ("KP0",)
    with pytest.raises(ConfigError, match="'network.feedback_rule': received 'kpp', expected one of kp, pool"):
        search(network=PLASTIC.replace(feedback_rule="kpp")).fit()
    with pytest.raises(ConfigError, match="feedback 'plastic' only"):
        search(network=NetworkConfig(sizes=(6, 5, 3), feedback="fa", feedback_rule="kp")).fit()
    with pytest.raises(ConfigError, match="'meta.feedback_init' has 3 values but rule 'kp' has 2 terms"):
        search(meta=tiny_meta(feedback_init=(0.1, 0.0, 0.0))).fit()
    with pytest.raises(ConfigError, match="must be a linear Rule"):
        resolve_feedback_rule(
            {"format": "rulesearch.network_rule/1", "groups": [{"layers": [0], "rule": kp.to_json()}]}
        )


def test_cli_discover_evaluate_export_under_plastic_feedback(tmp_path, no_figures):
    out = tmp_path / "run"
    args = [
        "discover", "--dataset", "teacher", "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 150}",
        "--sizes", "6,5,3", "-M", "3", "-K", "3", "-Q", "2", "--episodes", "2", "--dtype", "float64",
        "--threads", "1", "--no-progress", "--no-compare", "--rule", "f0", "--feedback", "plastic",
        "--feedback-rule", "kp", "--feedback-init", "0.01,0.001", "--out", str(out),
    ]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "feedback: dB_ji" in result.output and "KP1" in result.output
    cfg = RunDir.open(out).config()
    assert cfg["network"]["feedback_rule"] == "kp" and cfg["meta"]["feedback_init"] == [0.01, 0.001]
    assert cfg["meta"]["meta_feedback"] is True
    result = runner.invoke(app, ["evaluate", str(out), "--seeds", "2", "--episodes", "1", "--dtype", "float64"])
    assert result.exit_code == 0 and "rule (plastic)" in result.output, result.output
    result = runner.invoke(app, ["export", str(out), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.output)["feedback_rule"]["name"] == "kp"
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "b"), "--feedback", "fa"])
    assert bad.exit_code == 2 and "feedback 'plastic' only" in bad.output

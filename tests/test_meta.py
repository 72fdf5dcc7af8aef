"""Tests of rulesearch.train: the meta-trainer end to end on tiny configs (float64, one thread)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import rulesearch.train as meta_mod
from rulesearch.errors import (
    BackendUnavailableError,
    ConfigError,
    DivergenceError,
    NotFittedError,
    RunDirectoryError,
)
from rulesearch.io.runs import RunDir
from rulesearch.lang.pools import bio, pool
from rulesearch.lang.rule import NetworkRule
from rulesearch.train import (
    DiscoverConfig,
    MetaConfig,
    NetworkConfig,
    RuleSearch,
    TaskConfig,
    export_run,
    load_rule,
    resolve_rule,
)

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 200}, M=3, K=4, Q=2)
NET = NetworkConfig(sizes=(6, 5, 4, 3), feedback="fa")


def tiny_meta(**kw):
    base = dict(episodes=4, l1=0.1, dtype="float64", compare=False, threads=1, checkpoint_every=2)
    base.update(kw)
    return MetaConfig(**base)


def search(rule="pool", meta=None, task=TASK, network=NET, **kw):
    return RuleSearch(rule=rule, network=network, task=task, meta=meta or tiny_meta(), progress=False, **kw)


STEP_COLS = ["step", "run", "seed", "meta_loss", "query_loss", "l1", "meta_accuracy", "skipped", "diverged"]


def deterministic(df):
    return df.drop(columns=["seconds"])


# ---- the main behaviour -------------------------------------------------------------------------------------


def test_teacher_bp_l1_grows_theta0_and_suppresses_distractors():
    """bp on a teacher task: theta_0 = 1e-3 plus 3 distractors at 0; with L1 theta_0 grows, distractors stay small."""
    s = search(
        rule=pool.select(["F0", "F1", "F4", "F8"]),
        network=NetworkConfig(sizes=(4, 16, 2), feedback="bp"),
        task=TaskConfig(dataset="teacher", options={"n_in": 4, "n_classes": 2, "n_samples": 400}, M=2, K=20, Q=10),
        meta=tiny_meta(episodes=30, lr=5e-3, l1=0.5, meta_batch=2, runs=2, checkpoint_every=100),
    ).fit()
    theta = s.theta_
    assert theta.shape == (2, 4)
    for run in range(2):
        assert theta[run, 0] > 0.02  # grew from 1e-3
        assert (theta[run, 1:].abs() < 0.1 * theta[run, 0]).all(), theta[run]
    hist = s.history_
    early = hist[hist.step <= 5].meta_accuracy.mean()
    late = hist[hist.step > 25].meta_accuracy.mean()
    assert late > early


@pytest.mark.parametrize(
    "rule, kw",
    [("pool", {}), ("bio", {"per_layer": True}), ("f0", {"meta_batch": 2, "clip": 0.5})],
    ids=["pool", "bio-per-layer", "f0-batch2-clip"],
)
def test_batched_runs_equal_separate_runs(rule, kw):
    batched = search(rule, tiny_meta(runs=3, seed=5, **kw)).fit()
    for r in range(3):
        alone = search(rule, tiny_meta(runs=1, seed=5 + r, **kw)).fit()
        torch.testing.assert_close(batched.theta_[r], alone.theta_[0], rtol=1e-8, atol=1e-12)
        hb = deterministic(batched.history_[batched.history_.run == r]).drop(columns=["run"]).reset_index(drop=True)
        ha = deterministic(alone.history_).drop(columns=["run"]).reset_index(drop=True)
        np.testing.assert_allclose(hb.to_numpy(float), ha.to_numpy(float), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("rule", ["pool", "bio"])
def test_episodes_in_groups_equal_one_inner_loop(rule):
    """meta.chunk runs a meta-step's episodes in groups (here 6 episodes as 3 + 3, or one at a time): the same
    coefficients and metrics as one inner loop over all of them, to rounding (float64)."""
    whole = search(rule, tiny_meta(runs=3, meta_batch=2, chunk=6)).fit()
    for chunk in (4, 1):
        grouped = search(rule, tiny_meta(runs=3, meta_batch=2, chunk=chunk)).fit()
        torch.testing.assert_close(grouped.theta_, whole.theta_, rtol=1e-9, atol=1e-13)
        hg, hw = deterministic(grouped.history_), deterministic(whole.history_)
        assert list(hg.columns) == list(hw.columns)
        np.testing.assert_allclose(hg.to_numpy(float), hw.to_numpy(float), rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="meta.chunk"):
        tiny_meta(chunk=0)


def test_episode_groups_are_balanced():
    """At most meta.chunk episodes per group, as few groups as will do, sizes differing by at most one."""
    trainer = meta_mod.Trainer(search("bio", tiny_meta(runs=2, chunk=8)).fit()._problem)
    sizes = {n: [g.stop - g.start for g in trainer.groups(n)] for n in (1, 8, 10, 20)}
    assert sizes == {1: [1], 8: [8], 10: [5, 5], 20: [6, 7, 7]}


def test_deterministic_for_seed_and_threads():
    a = search(meta=tiny_meta(runs=2)).fit()
    b = search(meta=tiny_meta(runs=2)).fit()
    assert torch.equal(a.theta_, b.theta_)
    assert deterministic(a.history_).equals(deterministic(b.history_))


def test_defaults_are_the_papers():
    m = MetaConfig()
    assert (m.lr, m.theta0, m.clip, m.l1_mode, m.meta_batch, m.betas) == (
        1e-3,
        1e-3,
        None,
        "subgradient",
        1,
        (0.9, 0.999),
    )
    s = search(meta=tiny_meta(episodes=1, l1=0.0, lr=1e-3))
    state = meta_mod.Trainer(meta_mod.Problem(s.config(), resolve_rule("pool"))).fresh_state()
    assert state.params["theta"].tolist() == [[1e-3] + [0.0] * 9]


def test_init_and_per_layer_shapes():
    s = search("bio", tiny_meta(episodes=1, per_layer=True, init=(0.01, -0.001, 0.0))).fit()
    assert s.theta_.shape == (1, 3, 3)
    assert isinstance(s.rule_, NetworkRule)
    assert len(s.rules_) == 1
    with pytest.raises(ConfigError, match="meta.init"):
        search("bio", tiny_meta(episodes=1, init=(0.01,))).fit()


def test_network_rule_groups():
    rule = NetworkRule({(0,): bio, (1, 2): pool.select(["F0"])})
    s = search(rule, tiny_meta(episodes=2, runs=2)).fit()
    assert [tuple(t.shape) for t in s.theta_] == [(2, 3), (2, 1)]
    assert {"theta.g0.F2", "theta.g1.F0"} <= set(s.history_.columns)
    assert "layer" in s.to_latex()


def test_proximal_l1_reaches_exact_zeros():
    s = search(meta=tiny_meta(episodes=6, lr=1e-2, l1=0.9, l1_mode="proximal")).fit()
    assert (s.theta_ == 0).sum() >= 5


def test_proximal_threshold_is_clipped_with_the_gradient():
    # Adam's step is invariant to the gradient's scale, and so is the proximal threshold once lambda is clipped
    # with the gradient: a clip far below the gradient norm leaves the first step unchanged (an unclipped lambda
    # would zero every coefficient)
    steps = [search(meta=tiny_meta(episodes=1, lr=1e-2, l1=0.05, l1_mode="proximal", clip=c, eps=1e-16)).fit().theta_
             for c in (None, 1e-3)]  # fmt: skip
    assert (steps[0] != 0).sum() >= 3
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("per_layer", [False, True])
def test_term_scale_rms_equalizes_each_terms_step(per_layer):
    from rulesearch.compile.compiler import compile_rule
    from rulesearch.inner import run_episodes

    meta = tiny_meta(episodes=1, term_scale="rms", per_layer=per_layer, l1=0.0)
    fitted = search(meta=meta).fit()
    trainer = meta_mod.Trainer(fitted._problem)
    scale = trainer.lr_scale()["theta"]
    p = fitted._problem
    update, eye = compile_rule(pool), torch.eye(pool.n_params, dtype=torch.float64)
    rms = torch.zeros(p.net.n_layers, pool.n_params, dtype=torch.float64)

    def observe(step, layer, signals, dW):  # naive: each term's update on its own
        rms[layer] += torch.stack([update(signals, e).pow(2).mean().sqrt() for e in eye])

    theta = torch.zeros(pool.n_params, dtype=torch.float64)
    theta[0] = 1e-3
    batch, weights, feedback = p.episodes(0, [0])
    run_episodes(p.net, batch, update, theta, weights, feedback, observe=observe, metrics=False)
    rms = rms if per_layer else rms.mean(0)
    torch.testing.assert_close(scale, rms[..., :1] / rms, rtol=1e-10, atol=0)
    assert torch.all(scale[..., 0] == 1.0) and scale.shape == fitted.theta_.shape[1:]
    assert not torch.equal(fitted.theta_, search(meta=dataclasses.replace(meta, term_scale="none")).fit().theta_)
    assert torch.all(meta_mod.Trainer(search(meta=tiny_meta()).fit()._problem).lr_scale()["theta"] == 1.0)
    capped = meta_mod.Trainer(search(meta=dataclasses.replace(meta, term_scale="capped")).fit()._problem)
    expected = torch.clamp(rms[..., :1] / rms, max=1.0)
    assert (scale > 1).any() and (scale < 1).any()  # the probe has terms both smaller and larger than F0
    torch.testing.assert_close(capped.lr_scale()["theta"], expected, rtol=1e-10, atol=0)


def test_metrics_columns_and_steps():
    s = search(meta=tiny_meta(runs=2)).fit()
    h = s.history_
    assert set(STEP_COLS) <= set(h.columns)
    assert {"angle.1", "angle.2", "theta.F0", "theta.F9", "grad_norm", "seconds"} <= set(h.columns)
    assert list(h.step) == [1, 1, 2, 2, 3, 3, 4, 4] and list(h.run) == [0, 1] * 4
    # theta columns hold the state after the step
    assert h[(h.step == 4) & (h.run == 1)]["theta.F3"].item() == pytest.approx(float(s.theta_[1, 3]), abs=0)


# ---- divergence -------------------------------------------------------------------------------------------------


def test_divergence_skips_and_stops(tmp_path):
    s = search("f0", tiny_meta(episodes=10, theta0=1e4, max_skips=3), out=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="stopped"), pytest.raises(DivergenceError, match="consecutive"):
        s.fit()
    run = RunDir.open(tmp_path / "run")
    assert not run.is_finished
    df = run.read_metrics()
    assert list(df.skipped) == [1, 1, 1]
    step, state = run.load_checkpoint()
    assert step == 3 and bool(state["stopped"].all())
    assert torch.isfinite(state["params"]["theta"]).all() and state["params"]["theta"].item() == 1e4


def test_diverged_run_is_skipped_without_poisoning_others(monkeypatch):
    """Run 1's episodes at step 2 are NaN: it skips that step, run 0 continues exactly as if alone."""
    original = meta_mod.Problem.episodes

    def poisoned(self, t, runs, net=None, ks=None):
        batch, w, fb = original(self, t, runs, net, ks)
        if t == 1 and 1 in list(runs):
            i = list(runs).index(1) * self.B
            batch[0][i : i + self.B] = float("nan")
        return batch, w, fb

    alone = search(meta=tiny_meta(runs=1)).fit()
    monkeypatch.setattr(meta_mod.Problem, "episodes", poisoned)
    both = search(meta=tiny_meta(runs=2)).fit()
    torch.testing.assert_close(both.theta_[0], alone.theta_[0], rtol=1e-8, atol=1e-12)
    h = both.history_
    assert h[(h.run == 1)].skipped.tolist() == [0, 1, 0, 0]
    assert h[(h.run == 0)].skipped.tolist() == [0, 0, 0, 0]
    th1 = h[h.run == 1][[c for c in h.columns if c.startswith("theta.")]].to_numpy()
    np.testing.assert_array_equal(th1[0], th1[1])  # no update at the skipped step
    assert torch.isfinite(both.theta_).all()


def test_summary_counts_skipped_steps_and_gives_accuracy_with_them_as_failures(monkeypatch):
    """Run 1's episodes of the last meta-step are NaN: the summary counts the skipped step and its diverged
    episodes, leaves it out of the last-10% accuracy and, beside it, counts it as accuracy 0."""
    original = meta_mod.Problem.episodes

    def poisoned(self, t, runs, net=None, ks=None):
        batch, w, fb = original(self, t, runs, net, ks)
        if t == 3 and 1 in list(runs):
            i = list(runs).index(1) * self.B
            batch[0][i : i + self.B] = float("nan")
        return batch, w, fb

    monkeypatch.setattr(meta_mod.Problem, "episodes", poisoned)
    s = search(meta=tiny_meta(runs=2)).fit()
    h, summ = s.history_, s.summary_
    assert (summ["skipped_steps"], summ["meta_steps_run"], summ["diverged_episodes"]) == (1, 8, 1)
    last = h[h.step == 4]
    assert summ["rule_last"] == pytest.approx(last[last.skipped == 0].meta_accuracy.mean())
    assert summ["rule_last_skips_failed"] == pytest.approx(last.meta_accuracy.where(last.skipped == 0, 0.0).mean())
    assert summ["rule_last_skips_failed"] < summ["rule_last"]
    assert "skipped (diverged) meta-steps: 1 of 8 (diverged episodes: 1)" in s.report()


# ---- run directory and resume -------------------------------------------------------------------------------


def test_run_directory_contents(tmp_path):
    s = search(meta=tiny_meta(runs=2, compare=True), out=tmp_path / "run").fit()
    run = RunDir.open(tmp_path / "run")
    assert run.is_finished
    for name in ("config.yaml", "manifest.json", "metrics.csv", "rule.json", "rule.tex", "summary.md"):
        assert (run.path / name).is_file(), name
    assert sorted(p.name for p in (run.path / "figures").iterdir()) == [
        "alignment.png",
        "coefficients.png",
        "meta_accuracy.png",
    ]
    assert run.checkpoint_steps() == [2, 4]
    cfg = DiscoverConfig.from_dict(run.config())
    assert cfg.meta.runs == 2 and cfg.network.sizes == (6, 5, 4, 3)
    assert run.manifest()["seed"] == 0
    tex = (run.path / "rule.tex").read_text()
    assert r"\begin{tabular}" in tex and "[" in tex  # mean [lo, hi] per coefficient
    summary = run.summary()
    assert {"rule_first", "rule_last", "f0_fa_first", "f0_bp_last", "compare_lr"} <= set(summary)
    rule = load_rule(run.path)
    torch.testing.assert_close(torch.tensor(rule.values, dtype=torch.float64), s.theta_.double().mean(0))
    assert load_rule(run.path, run=1).values == tuple(s.theta_[1].tolist())
    assert "run directory" in s.report()


def test_f0_comparison_is_tuned_on_held_out_episodes():
    """Each feedback mode's f0 runs at the grid rate with the best accuracy on episodes after the last meta-step;
    compare_tune=0 keeps the base rate."""
    from rulesearch.train.estimator import _TUNE_FACTORS

    s = search("f0", tiny_meta(compare=True, compare_tune=2, runs=2)).fit()
    base, p = s.summary_["compare_lr"], s._problem
    held_out = [s.n_steps_, s.n_steps_ + 1]
    for mode in ("fa", "bp"):
        net = dataclasses.replace(p.net, feedback=mode)
        scores = [float(s._f0_accuracy(p, net, held_out, [0, 1], base * f).mean()) for f in _TUNE_FACTORS]
        assert s.summary_[f"compare_lr_{mode}"] == pytest.approx(base * _TUNE_FACTORS[int(np.argmax(scores))])
    assert "f0 learning rates: fa" in s.report() and "held-out episodes" in s.report()
    untuned = search("f0", tiny_meta(compare=True, compare_tune=0)).fit().summary_
    assert untuned["compare_lr_fa"] == untuned["compare_lr_bp"] == untuned["compare_lr"]


def test_from_run_roundtrip(tmp_path):
    s = search(meta=tiny_meta(runs=2), out=tmp_path / "run").fit()
    r = RuleSearch.from_run(tmp_path / "run")
    assert torch.equal(r.theta_, s.theta_)
    assert deterministic(r.history_).equals(deterministic(s.history_))
    assert r.to_latex() == s.to_latex()
    assert export_run(tmp_path / "run", "latex") == s.to_latex()
    assert json.loads(export_run(tmp_path / "run", "json"))["format"] == "rulesearch.rule/1"
    assert "95% interval" in export_run(tmp_path / "run", "markdown")


def _refuse_data(monkeypatch):
    """Make every way of loading a dataset raise."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(TaskConfig, "load", refuse)
    monkeypatch.setattr("rulesearch.tasks.data.load_dataset", refuse)
    monkeypatch.setattr("rulesearch.train.configs.load_dataset", refuse)


@pytest.mark.parametrize("recorded_sizes", [True, False], ids=["sizes-in-manifest", "old-run"])
def test_from_run_reads_no_data(tmp_path, monkeypatch, recorded_sizes):
    """Reloading a run whose network is sized by its dataset reads no data: the learner needs only the layer count,
    the network's sizes are in the manifest (runs made before they were recorded: sized on first use)."""
    task = TaskConfig(dataset="digits", M=3, K=2, Q=2)
    s = search("bio", tiny_meta(episodes=2, runs=2), task=task, network=NetworkConfig(), out=tmp_path / "run").fit()
    run = RunDir.open(tmp_path / "run")
    assert run.manifest()["network_sizes"] == [64, 170, 130, 100, 70, 10]
    if not recorded_sizes:
        manifest = run.manifest()
        del manifest["network_sizes"]
        run.write_json("manifest.json", manifest)
    _refuse_data(monkeypatch)
    r = RuleSearch.from_run(tmp_path / "run")
    assert torch.equal(r.theta_, s.theta_) and r.theta_.shape == (2, 3)
    assert deterministic(r.history_).equals(deterministic(s.history_))
    assert r.to_json() == s.to_json() and r.summary_["steps"] == 2
    if recorded_sizes:  # the network from the manifest: the report needs no data either
        assert r._problem.net.sizes == (64, 170, 130, 100, 70, 10)
        assert "rule (fa)" in r.report()
    with pytest.raises(AssertionError, match="the dataset was read"):
        r.term_shares()  # runs episodes: that needs the data


def test_existing_run_refused_without_resume(tmp_path):
    search(meta=tiny_meta(episodes=2), out=tmp_path / "run").fit()
    with pytest.raises(RunDirectoryError, match="resume"):
        search(meta=tiny_meta(episodes=2), out=tmp_path / "run").fit()
    with pytest.raises(RunDirectoryError, match="changed keys"):
        search(meta=tiny_meta(episodes=3), out=tmp_path / "run", resume=True).fit()


def test_resume_equals_uninterrupted_in_process(tmp_path):
    ref = search(meta=tiny_meta(episodes=6, runs=2), out=tmp_path / "ref").fit()

    class Stop(Exception):
        pass

    def stop_at_5(step, rows):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        search(meta=tiny_meta(episodes=6, runs=2), out=tmp_path / "run", callback=stop_at_5).fit()
    assert not RunDir.open(tmp_path / "run").is_finished
    res = search(meta=tiny_meta(episodes=6, runs=2), out=tmp_path / "run", resume=True).fit()
    assert torch.equal(res.theta_, ref.theta_)
    assert deterministic(res.history_).equals(deterministic(ref.history_))
    assert deterministic(RunDir.open(tmp_path / "run").read_metrics()).equals(deterministic(ref.history_))


_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import rulesearch.io.runs
    from rulesearch.train import MetaConfig, NetworkConfig, RuleSearch, TaskConfig

    mode, out = sys.argv[1], sys.argv[2]

    def kill_after(step, rows):
        if mode == "after" and step == 5:  # checkpoint 4 written, step 5 logged, no checkpoint 5
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "during":  # die half-way through writing checkpoint 4
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == 4:
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)

        torch.save = save  # rulesearch.io.runs saves checkpoints through torch.save

    RuleSearch(
        rule="pool",
        network=NetworkConfig(sizes=(6, 5, 4, 3), feedback="fa"),
        task=TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 200}, M=3, K=4, Q=2),
        meta=MetaConfig(episodes=6, runs=2, l1=0.1, dtype="float64", compare=False, threads=1, checkpoint_every=2),
        out=out, progress=False, callback=kill_after,
    ).fit()
    """
)


@pytest.mark.parametrize("mode", ["after", "during"], ids=["after-checkpoint", "during-checkpoint-write"])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, mode):
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), mode, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    run = RunDir.open(out)
    assert not run.is_finished
    assert run.checkpoint_steps() == ([2, 4] if mode == "after" else [2])
    if mode == "during":
        assert any(p.name.endswith(".tmp") for p in run.checkpoint_dir.iterdir())  # the torn write
    ref = search(meta=tiny_meta(episodes=6, runs=2), out=tmp_path / "ref").fit()
    res = search(meta=tiny_meta(episodes=6, runs=2), out=out, resume=True).fit()
    assert torch.equal(res.theta_, ref.theta_)
    assert deterministic(run.read_metrics()).equals(deterministic(ref.history_))
    assert run.is_finished


# ---- configuration and errors ---------------------------------------------------------------------------------


def test_bad_config_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"network.feedback.*'fa'"):
        RuleSearch(network={"feedback": "fx"}, out=tmp_path / "run").fit()
    with pytest.raises(ConfigError, match=r"l1_mode.*proximal"):
        MetaConfig(l1_mode="prox")
    with pytest.raises(ConfigError, match=r"Config key 'rule'.*pool"):
        search("poool", out=tmp_path / "run").fit()
    with pytest.raises(ConfigError, match="network.sizes"):
        search(network=NetworkConfig(sizes=(5, 3)), out=tmp_path / "run").fit()
    with pytest.raises(ConfigError, match="Did you mean 'episodes'"):
        DiscoverConfig.from_dict({"meta": {"episode": 3}})
    assert not (tmp_path / "run").exists()


def test_device_handling():
    with pytest.raises(ConfigError, match="meta.device"):
        MetaConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            search(meta=tiny_meta(device="cuda")).fit()
    s = search(meta=tiny_meta(episodes=1, device="cpu")).fit()
    assert s.theta_.device.type == "cpu"


def test_estimator_protocol():
    s = search()
    with pytest.raises(NotFittedError):
        s.to_latex()
    assert "unfitted" in repr(s)
    c = s.clone()
    assert c.get_params() == s.get_params() and c is not s
    c.set_params(rule="bio")
    assert c.rule == "bio" and s.rule == "pool"
    with pytest.raises(ConfigError, match="no parameter"):
        s.set_params(foo=1)
    s.fit()
    text = repr(s)
    assert "F9" in text and "theta" in text and "dW_ij" in text


def test_rule_objects_are_stored_as_json_in_config(tmp_path):
    rule = pool.select(["F0", "F2"])
    s = search(rule, tiny_meta(episodes=2), out=tmp_path / "run").fit()
    cfg = DiscoverConfig.from_dict(RunDir.open(tmp_path / "run").config())
    assert cfg.rule_json["format"] == "rulesearch.rule/1" and cfg.rule_json["values"] is None
    again = RuleSearch.from_run(tmp_path / "run")
    assert again.rule_.term_names() == ("F0", "F2")
    assert s.config().rule_json == cfg.rule_json


def test_grammar_and_terms_and_json_file(tmp_path):
    from rulesearch.lang.grammar import Grammar
    from rulesearch.lang.signals import err, pre, pre_err

    g = Grammar(atoms=(pre, err, pre_err), max_degree=2, required=("err",))
    s = search(g, tiny_meta(episodes=1)).fit()
    assert s.rule_.n_terms == g.size
    s = search("pool", tiny_meta(episodes=1), terms=["F0", "F9"]).fit()
    assert s.rule_.term_names() == ("F0", "F9")
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(bio.to_json()))
    assert resolve_rule(str(path)).term_names() == bio.term_names()
    assert search(str(path), tiny_meta(episodes=1)).config().rule_json is not None


def test_main_job_departs_from_the_paper_only_in_the_learning_rate():
    main = meta_mod.main_job_config()
    assert main.meta.lr == 3e-4 and main.replace(**{"meta.lr": 1e-3}) == DiscoverConfig()
    assert meta_mod.main_job_config({"meta": {"lr": 1e-3, "runs": 2}}).meta.lr == 1e-3  # a config file wins


def test_default_discover_config_is_the_main_job():
    cfg = DiscoverConfig()
    assert cfg.rule == "pool" and cfg.network.feedback == "fa" and cfg.network.activation == "softplus"
    assert cfg.network.beta == 10.0 and (cfg.task.M, cfg.task.K, cfg.task.Q) == (5, 50, 10)
    assert cfg.task.dataset == "digits" and cfg.meta.episodes >= 100 and cfg.meta.l1 > 0
    net = cfg.network.build(64, 10)
    assert net.sizes == (64, 170, 130, 100, 70, 10)
    assert dataclasses.replace(cfg.network, sizes=None).build(784, 47).sizes == (784, 170, 130, 100, 70, 47)


def test_adam_step_matches_torch_adam_and_its_prox_keeps_the_kkt_zeros():
    from rulesearch.train import adam_step

    def f64(t):
        return torch.tensor(float(t), dtype=torch.float64)

    torch.manual_seed(0)
    target = torch.randn(4, dtype=torch.float64)
    ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=1e-2)
    p, m, v = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    for t in range(1, 21):
        opt.zero_grad()
        ((ref - target) ** 2).sum().backward()
        opt.step()
        p, m, v = adam_step(p, 2 * (p - target), m, v, f64(t), 1e-2, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-12, atol=1e-12)
    # constant loss gradients below / above lambda, at two scales: the first coefficient stays exactly 0, the
    # second moves against (gradient - lambda); plain Adam would move both by lr per step
    for scale in (1.0, 1e-3):
        g = torch.tensor([0.5, 2.0], dtype=torch.float64) * scale
        p, m, v = (torch.zeros(2, dtype=torch.float64) for _ in range(3))
        for t in range(1, 301):
            p, m, v = adam_step(p, g, m, v, f64(t), 1e-3, (0.9, 0.999), 1e-12, l1=scale)
        assert p[0] == 0
        assert p[1] < -0.1


def test_term_shares_split_the_learned_update():
    s = search(meta=tiny_meta(episodes=2, runs=2, l1=0.0)).fit()
    shares = s.term_shares()
    assert shares.shape == (2, pool.n_params) and shares.dtype == torch.float64
    torch.testing.assert_close(shares.sum(1), torch.ones(2, dtype=torch.float64))
    assert bool(((shares > 0) == (s.theta_ != 0)).all())  # a term at 0 has no share
    only_f0 = search("f0", tiny_meta(episodes=1, runs=1, l1=0.0)).fit().term_shares()
    torch.testing.assert_close(only_f0, torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(ConfigError, match="term_shares"):
        search(meta=tiny_meta(episodes=1, runs=1, per_layer=True)).fit().term_shares()

"""Tests of rulesearch.neural: the neural rule's protocol, batching, checkpointing, training with the meta-trainer."""

import pytest
import torch

from rulesearch.errors import ConfigError, ShapeError
from rulesearch.inner import run_episodes
from rulesearch.networks.feedforward import Network
from rulesearch.neural import DEFAULT_FEATURES, FEATURES, NeuralRule
from rulesearch.train import MetaConfig, NetworkConfig, NeuralConfig, RuleSearch, TaskConfig, load_rule

F64 = torch.float64


def signals(gen, B=3, n_post=4, n_pre=5):
    return {
        "pre": torch.rand(B, n_pre, generator=gen, dtype=F64),
        "post": torch.rand(B, n_post, generator=gen, dtype=F64),
        "err": torch.randn(B, n_post, generator=gen, dtype=F64),
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=F64),
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=F64),
        "fb": torch.randn(B, n_post, n_pre, generator=gen, dtype=F64),
    }


def random_params(rule, gen, B=None):
    shape = lambda s: s if B is None else (B, *s)  # noqa: E731
    return {k: torch.randn(shape(s), generator=gen, dtype=F64) * 0.3 for k, s in rule.param_shapes().items()}


def naive(rule, sig, params):
    """Per-synapse reference: loop over i, j and evaluate the MLP on one feature vector."""
    B, P, Q = sig["w"].shape
    act = {"tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "silu": torch.nn.functional.silu}[
        rule.activation
    ]
    wTy = torch.einsum("bi,bij->bj", sig["post"], sig["w"])
    wx = torch.einsum("bij,bj->bi", sig["w"], sig["pre"])
    wTe = torch.einsum("bi,bij->bj", sig["err"], sig["w"])
    out = torch.zeros(B, P, Q, dtype=F64)
    for b in range(B):
        p = {k: (v[b] if v.dim() > len(rule.param_shapes()[k]) else v) for k, v in params.items()}
        for i in range(P):
            for j in range(Q):
                base = {
                    "pre": sig["pre"][b, j], "post": sig["post"][b, i], "err": sig["err"][b, i],
                    "pre_err": sig["pre_err"][b, j], "w": sig["w"][b, i, j], "fb": sig["fb"][b, i, j],
                    "wTpost": wTy[b, j], "wpre": wx[b, i], "wTerr": wTe[b, j], "oja": sig["pre"][b, j] - wTy[b, j],
                }  # fmt: skip
                phi = torch.stack(
                    [base[f] if "*" not in f else base[f.split("*")[0]] * base[f.split("*")[1]] for f in rule.features]
                )
                val = torch.zeros((), dtype=F64)
                if rule.skip:
                    val = val + (p["skip"] * phi).sum()
                if rule.hidden:
                    h = act(phi @ p["w0"] + p["b0"])
                    for k in range(1, len(rule.hidden) + 1):
                        h = h @ p[f"w{k}"] + p[f"b{k}"]
                        if k < len(rule.hidden):
                            h = act(h)
                    val = val + rule.out_scale * h[0]
                out[b, i, j] = val
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"hidden": (4, 3), "activation": "softplus"},
        {"features": ("pre", "err", "w", "fb", "wpre", "wTerr", "err*pre", "w*fb"), "skip": False},
        {"hidden": (), "features": ("err*pre", "post*wTpost")},
    ],
    ids=["default", "deep-softplus", "synapse-features", "linear-only"],
)
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per-episode"])
def test_matches_per_synapse_reference(gen, kw, batched):
    rule = NeuralRule(**kw)
    sig = signals(gen)
    params = random_params(rule, gen, B=3 if batched else None)
    torch.testing.assert_close(rule(sig, params), naive(rule, sig, params))


def test_starts_as_f0_and_declares_needs(gen):
    rule = NeuralRule()
    params = rule.init_params(torch.Generator().manual_seed(0), theta0=0.01)
    sig = signals(gen)
    expected = -0.01 * sig["err"][:, :, None] * sig["pre"][:, None, :]
    torch.testing.assert_close(rule(sig, params), expected)
    assert rule.needs == frozenset({"pre", "post", "err", "pre_err", "w"})
    assert rule.states == ()
    assert NeuralRule(features=("fb", "err")).needs == frozenset({"fb", "err"})


def test_checkpoint_gives_the_same_gradients(gen):
    sig = signals(gen)
    for s in sig.values():
        s.requires_grad_(True)
    grads = []
    for ckpt in (True, False):
        rule = NeuralRule(hidden=(6,), checkpoint=ckpt)
        params = {k: v.requires_grad_(True) for k, v in random_params(rule, torch.Generator().manual_seed(1)).items()}
        out = (rule(sig, params) ** 2).sum()
        grads.append(torch.autograd.grad(out, [*params.values(), sig["w"], sig["err"]]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_meta_gradient_through_inner_loop_matches_finite_differences(gen):
    rule = NeuralRule(hidden=(3,), features=("pre", "post", "err", "w", "err*pre"))
    net = Network(sizes=(4, 3, 2), feedback="fa")
    batch = (
        torch.rand(2, 6, 4, generator=gen, dtype=F64),
        torch.randint(2, (2, 6), generator=gen),
        torch.rand(2, 3, 4, generator=gen, dtype=F64),
        torch.randint(2, (2, 3), generator=gen),
    )
    params = random_params(rule, gen)
    params = {k: v * 0.1 for k, v in params.items()}
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = run_episodes(net, batch, rule, leaf, seed=0).loss.sum()
    g = torch.autograd.grad(loss, leaf["w0"])[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    eps = 1e-6
    d = torch.zeros_like(params["w0"])
    d[1, 2] = eps
    lp = run_episodes(net, batch, rule, {**params, "w0": params["w0"] + d}, seed=0).loss.sum()
    lm = run_episodes(net, batch, rule, {**params, "w0": params["w0"] - d}, seed=0).loss.sum()
    torch.testing.assert_close(g[1, 2], (lp - lm) / (2 * eps), rtol=1e-5, atol=1e-9)


def test_trains_on_digits_with_finite_gradients(tmp_path):
    """The neural rule meta-trains on digits (tiny config): parameters move, gradients and values stay finite."""
    s = RuleSearch(
        rule="neural",
        neural=NeuralConfig(hidden=(4,)),
        network=NetworkConfig(sizes=(64, 12, 10), feedback="fa"),
        task=TaskConfig(dataset="digits", M=3, K=3, Q=2),
        meta=MetaConfig(episodes=3, runs=2, lr=1e-2, dtype="float64", threads=1),
        out=tmp_path / "run",
        progress=False,
    ).fit()
    h = s.history_
    assert (h.skipped == 0).all() and h.grad_norm.map(lambda x: x == x and abs(x) < float("inf")).all()
    assert (h.grad_norm > 0).all()
    init = NeuralRule(hidden=(4,)).init_params(torch.Generator().manual_seed(0))
    for k, v in s.params_.items():
        assert v.shape == (2, *init[k].shape) and torch.isfinite(v).all()
    assert not torch.equal(s.params_["w1"][0], torch.zeros_like(init["w1"]))  # the MLP output layer learned
    assert {"skip.err*pre", "mlp_norm"} <= set(h.columns)
    again = load_rule(tmp_path / "run", run=1)
    assert isinstance(again, NeuralRule)
    torch.testing.assert_close(again.params["w0"], s.params_["w0"][1].double())
    assert "NeuralRule" in s.to_latex()
    # the f0 comparison runs at the learned rate of the skip part's -e_i x_j (the first run's rule)
    assert s.compare_lr() == pytest.approx(-float(s.params_["skip"][0, DEFAULT_FEATURES.index("err*pre")]))
    assert {"f0_fa_first", "f0_bp_last", "compare_lr"} <= set(s.summary_)


def test_batched_neural_runs_equal_separate_runs():
    def fit(runs, seed):
        return RuleSearch(
            rule="neural",
            neural=NeuralConfig(hidden=(3,)),
            network=NetworkConfig(sizes=(5, 4, 3)),
            task=TaskConfig(dataset="teacher", options={"n_in": 5, "n_classes": 3, "n_samples": 120}, M=3, K=3, Q=2),
            meta=MetaConfig(episodes=3, runs=runs, seed=seed, lr=1e-2, dtype="float64", compare=False, threads=1),
            progress=False,
        ).fit()

    both = fit(2, 0)
    for r in range(2):
        alone = fit(1, r)
        for k in both.params_:
            torch.testing.assert_close(both.params_[k][r], alone.params_[k][0], rtol=1e-8, atol=1e-12)


def test_json_roundtrip_and_errors(gen):
    rule = NeuralRule(hidden=(4,))
    params = random_params(rule, gen)
    trained = rule.with_params(params)
    again = NeuralRule.from_json(trained.to_json(runs=[params, params]))
    assert again == trained
    for k in params:
        torch.testing.assert_close(again.params[k], params[k])
    sig = signals(gen)
    torch.testing.assert_close(again(sig), rule(sig, params))
    with pytest.raises(ConfigError, match="Unknown neural-rule feature"):
        NeuralRule(features=("pre", "spike"))
    with pytest.raises(ConfigError, match="activation"):
        NeuralRule(activation="relu6")
    with pytest.raises(ShapeError, match="missing"):
        rule(sig, {"w0": params["w0"]})
    with pytest.raises(ShapeError, match="no trained params"):
        rule(sig)
    assert set(DEFAULT_FEATURES) - {f for f in DEFAULT_FEATURES if "*" in f} <= set(FEATURES)


def test_out_scale_scales_only_the_mlp(gen):
    sig = signals(gen)
    rule, big = NeuralRule(hidden=(4,)), NeuralRule(hidden=(4,), out_scale=1.0)
    params = random_params(rule, gen)
    skip = rule(sig, {**params, "w1": torch.zeros_like(params["w1"]), "b1": torch.zeros_like(params["b1"])})
    torch.testing.assert_close(rule(sig, params) - skip, 1e-3 * (big(sig, params) - skip))
    data = big.with_params(params).to_json()
    del data["out_scale"]  # a file written before out_scale existed: an unscaled MLP
    assert NeuralRule.from_json(data).out_scale == 1.0
    with pytest.raises(ConfigError, match="out_scale"):
        NeuralRule(out_scale=0.0)


def test_term_scale_capped_scales_the_skip_part():
    """The skip coefficient of feature f steps by lr * min(1, rms(e x) / rms(phi_f)); the MLP keeps lr."""
    import rulesearch.train as meta_mod

    s = RuleSearch(
        rule="neural",
        neural=NeuralConfig(hidden=(3,)),
        network=NetworkConfig(sizes=(64, 12, 10), feedback="fa"),
        task=TaskConfig(dataset="digits", M=3, K=3, Q=2),
        meta=MetaConfig(episodes=1, lr=1e-2, term_scale="capped", dtype="float64", compare=False, threads=1),
        progress=False,
    ).fit()
    p = s._problem
    rule = p.learner.rule
    rms = torch.zeros(p.net.n_layers, rule.n_features, dtype=F64)

    def observe(step, layer, sig, dW):
        feats = rule.features_of(sig)
        rms[layer] += torch.stack([feats[f].pow(2).mean().sqrt() for f in rule.features])

    init = p.learner.init(p.seeds[:1], p.dtype, p.device)
    batch, weights, feedback = p.episodes(0, [0])
    run_episodes(p.net, batch, rule, init, weights, feedback, observe=observe, metrics=False)
    rms = rms.mean(0)
    ref = rms[rule.features.index("err*pre")]
    scale = meta_mod.Trainer(p).lr_scale()
    torch.testing.assert_close(scale["skip"], torch.clamp(ref / rms, max=1.0), rtol=1e-10, atol=0)
    assert (scale["skip"] < 1).any() and all(torch.all(v == 1) for k, v in scale.items() if k != "skip")


def test_unused_neural_section_takes_the_defaults():
    from rulesearch.train import DiscoverConfig

    assert DiscoverConfig.from_dict({"rule": "pool", "neural": {"hidden": [3]}}).neural == NeuralConfig()
    assert DiscoverConfig.from_dict({"rule": "neural", "neural": {"hidden": [3]}}).neural.hidden == (3,)

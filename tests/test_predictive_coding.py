"""Tests of rulesearch.credit: predictive coding (Exact, FixedPred, Strict) on torch.nn.Sequential models and as the
error pathway of the rule language's network (PCNetwork)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rulesearch.credit import PCNetwork, energy, fixedpred_errors, predictive_coding
from rulesearch.errors import ConfigError, ShapeError
from rulesearch.inner import f0, run_episodes
from rulesearch.networks import Network, backprop_errors, init_params

F64 = torch.float64


def _mlp(seed=0, widths=(7, 6, 5, 4), act=nn.Tanh):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def _cnn(seed=0):
    """A small CNN of the paper's kind: conv blocks (Conv2d, ReLU, MaxPool2d, Flatten) and linear layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten()),
        nn.Linear(8, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).double()


def _data(model, n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 10, 10) if isinstance(model[0], nn.Sequential) else (n, model[0].in_features)
    return torch.randn(shape, generator=g, dtype=F64), torch.randint(4, (n,), generator=g)


def _backprop(model, x, y, loss_fn=F.cross_entropy):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _param_layers(model):
    """The PC layer index (1-based) of every parameter tensor of the model."""
    return [i for i, m in enumerate(model, start=1) for _ in m.parameters()]


# ---- torch.nn.Sequential -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("method, eta", [("exact", 0.1), ("fixedpred", 1.0)])
def test_exact_and_fixedpred_eta1_depth_equal_backprop(make, method, eta):
    model = make()
    x, y = _data(model)
    bp = _backprop(model, x, y)
    res = predictive_coding(model, x, y, F.cross_entropy, method, eta=eta, n_iters=len(model), set_grad=False)
    for g, b in zip(res.grads, bp):
        assert _rel(g, b) < 1e-10
    assert float(res.loss) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-12)
    # errors are dL/dvhat_l, beliefs vhat - eps
    outs, h = [], x
    for m in model:
        h = m(h)
        h.retain_grad()
        outs.append(h)
    F.cross_entropy(h, y).backward()
    for eps, o, vh, b in zip(res.errors[1:], outs, res.vhat[1:], res.beliefs[1:]):
        assert torch.allclose(eps, o.grad, rtol=1e-10, atol=1e-14)
        assert torch.equal(b, vh - eps)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_fixedpred_eta1_k_sweeps_gives_top_k_layers_backprop_and_zero_below(k):
    model = _cnn()
    x, y = _data(model)
    bp = _backprop(model, x, y)
    res = predictive_coding(model, x, y, F.cross_entropy, "fixedpred", eta=1.0, n_iters=k, set_grad=False)
    n = len(model)
    for g, b, layer in zip(res.grads, bp, _param_layers(model)):
        if layer > n - k:
            assert _rel(g, b) < 1e-10
        else:
            assert float(g.abs().max()) == 0.0
    for layer in range(1, n):
        assert (float(res.errors[layer].abs().max()) == 0.0) == (layer <= n - k)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    seed=st.integers(0, 2**16),
    act=st.sampled_from([nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU]),
)
def test_property_fixedpred_eta1_depth_equals_backprop_on_random_mlps(widths, seed, act):
    model = _mlp(seed, (*widths, 4), act)
    x, y = _data(model, n=5, seed=seed)
    bp = _backprop(model, x, y)
    res = predictive_coding(model, x, y, F.cross_entropy, "fixedpred", eta=1.0, n_iters=len(model), set_grad=False)
    for g, b in zip(res.grads, bp):
        assert torch.allclose(g, b, rtol=1e-10, atol=1e-13)


def test_fixedpred_small_eta_converges_to_the_gradient_as_iterations_grow():
    model = _mlp()
    x, y = _data(model)
    bp = _backprop(model, x, y)
    first = 0  # layer 1's weight: the deepest error
    errs = []
    for n in (5, 10, 20, 40, 80, 160):
        res = predictive_coding(model, x, y, F.cross_entropy, "fixedpred", eta=0.2, n_iters=n, set_grad=False)
        errs.append(_rel(res.grads[first], bp[first]))
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert errs[0] > 0.5 and errs[-1] < 1e-6


@pytest.mark.parametrize("eta, calls", [(1.0, [1, 1, 1, 1]), (0.5, [7, 8, 9, 1])])
def test_fixedpred_takes_each_jacobian_product_once_at_eta_1(eta, calls):
    """At eta = 1 a converged error is carried over unchanged, so its product is reused (FixedPred(1, L) costs one
    backward pass); zero errors are skipped at any eta."""
    counts = [0] * 6
    g = torch.Generator().manual_seed(0)
    mats = [None] + [torch.randn(4, 4, generator=g, dtype=F64) for _ in range(5)]

    def back(layer):
        def f(e):
            counts[layer] += 1
            return e @ mats[layer]

        return f

    backs = [None] + [back(layer) for layer in range(1, 6)]
    eps, nxt = fixedpred_errors(torch.ones(4, dtype=F64), backs, eta, 10, range(4, 0, -1))
    assert counts[2:] == calls and counts[1] == 0  # layer 1's product would carry an error into the input
    exact = [None] * 5 + [torch.ones(4, dtype=F64)]
    for layer in range(4, 0, -1):
        exact[layer] = exact[layer + 1] @ mats[layer + 1]
    if eta == 1.0:
        assert all(torch.equal(eps[layer], exact[layer]) for layer in range(1, 6))


def test_strict_update_is_the_energy_gradient_at_the_converged_beliefs():
    model = _cnn()
    x, y = _data(model)
    res = predictive_coding(model, x, y, _mse, "strict", eta=0.5, n_iters=120)
    beliefs = [v.clone().requires_grad_(True) for v in res.beliefs[:-1]]
    model.zero_grad()
    f = energy(model, beliefs, y, _mse)
    grads_v = torch.autograd.grad(f, beliefs[1:], retain_graph=True)
    assert max(float(g.abs().max()) for g in grads_v) < 1e-7  # converged: dF/dv = 0
    dtheta = torch.autograd.grad(f, list(model.parameters()))
    for g, d in zip(res.grads, dtheta):
        assert torch.allclose(g, d, rtol=1e-10, atol=1e-14)
    # the errors are prediction minus belief at the beliefs
    for layer in range(1, len(model)):
        pred = model[layer - 1](res.beliefs[layer - 1])
        assert torch.allclose(res.errors[layer], pred - res.beliefs[layer], atol=1e-12)
    # and differ from backprop's gradient (Strict is not gradient descent on the loss)
    bp = _backprop(model, x, y, _mse)
    assert max(_rel(g, b) for g, b in zip(res.grads, bp)) > 1e-3


def _mse(out, y):
    return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype))


def test_set_grad_accumulates_like_backward_and_drives_an_optimizer():
    model = _mlp()
    x, y = _data(model)
    bp = _backprop(model, x, y)
    model.zero_grad()
    predictive_coding(model, x, y, F.cross_entropy, "fixedpred", eta=1.0, n_iters=len(model))
    assert all(_rel(p.grad, b) < 1e-10 for p, b in zip(model.parameters(), bp))
    predictive_coding(model, x, y, F.cross_entropy, "exact")
    assert all(_rel(p.grad, 2 * b) < 1e-10 for p, b in zip(model.parameters(), bp))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = float(F.cross_entropy(model(x), y).detach())
    for _ in range(5):
        opt.zero_grad()
        predictive_coding(model, x, y, F.cross_entropy, "fixedpred", eta=0.5, n_iters=10)
        opt.step()
    assert float(F.cross_entropy(model(x), y).detach()) < before


def test_frozen_parameters_get_no_update():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    x, y = _data(model)
    res = predictive_coding(model, x, y, F.cross_entropy, "strict", eta=0.1, n_iters=3)
    assert res.grads[0] is None and model[0].weight.grad is None
    assert res.grads[1] is not None


def test_bad_inputs_raise_clear_errors():
    model = _mlp()
    x, y = _data(model)
    with pytest.raises(ConfigError, match="Sequential"):
        predictive_coding(nn.Linear(3, 2), x, y, F.cross_entropy)
    with pytest.raises(ConfigError, match="Unknown PC method 'fixed'"):
        predictive_coding(model, x, y, F.cross_entropy, "fixed")
    with pytest.raises(ConfigError, match="eta"):
        predictive_coding(model, x, y, F.cross_entropy, eta=0.0)
    with pytest.raises(ConfigError, match="n_iters"):
        predictive_coding(model, x, y, F.cross_entropy, n_iters=0)
    with pytest.raises(ShapeError, match="scalar"):
        predictive_coding(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))


# ---- PCNetwork: prediction errors as rule signals ------------------------------------------------------------


def _net_setup(activation="tanh", sizes=(6, 5, 4, 3)):
    net = Network(sizes=sizes, feedback="bp", activation=activation)
    w, _ = init_params(net, 0, 0, [0, 1], dtype=F64)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 7, sizes[0], generator=g, dtype=F64), torch.randint(sizes[-1], (2, 7), generator=g)
    act = net.forward(w, x)
    e_out = act.ys[-1] - net.targets(y, F64, (2, 7))
    return net, w, x, y, act, e_out


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_pcnetwork_fixedpred_errors_reach_backprop_one_layer_per_sweep(activation):
    net, w, x, y, act, e_out = _net_setup(activation)
    bp = backprop_errors(net, w, act.ys, y)
    n = net.n_layers
    layers = range(n - 1, -1, -1)
    for k in range(1, n + 2):
        pc = PCNetwork(net, "fixedpred", eta=1.0, n_iters=k)
        es = pc.propagate(act, e_out, pc.feedback_matrices(w, [], layers), layers)
        for layer in range(n + 1):
            if layer >= n - k + 1:
                assert torch.allclose(es[layer], bp[layer], rtol=1e-12, atol=1e-15)
            else:
                assert float(es[layer].abs().max()) == 0.0
    # eta < 1: each error is backprop's times the binomial tail c_l = P(Bin(n - 1, eta) >= L - l)
    for eta, k in ((0.3, 4), (0.7, 9)):
        pc = PCNetwork(net, "fixedpred", eta=eta, n_iters=k)
        es = pc.propagate(act, e_out, pc.feedback_matrices(w, [], layers), layers)
        tail = torch.distributions.Binomial(k - 1, torch.tensor(eta, dtype=F64))
        for layer in range(n):
            c = float(sum(tail.log_prob(torch.tensor(float(j), dtype=F64)).exp() for j in range(n - layer, k)))
            assert torch.allclose(es[layer], c * bp[layer], rtol=1e-10, atol=1e-15)


def test_pcnetwork_strict_errors_are_the_energy_gradient_of_the_relaxed_beliefs():
    net, w, x, y, act, e_out = _net_setup(sizes=(6, 5, 4, 3))
    pc = PCNetwork(net, "strict", eta=0.1, n_iters=100)
    layers = (2, 1)
    es = pc.propagate(act, e_out, pc.feedback_matrices(w, [], layers), layers)
    # the same network as a Sequential over pre-activations (one episode): Strict's errors must agree
    for b in range(2):
        model = nn.Sequential(
            nn.Linear(6, 5, bias=False),
            nn.Sequential(nn.Tanh(), nn.Linear(5, 4, bias=False)),
            nn.Sequential(nn.Tanh(), nn.Linear(4, 3, bias=False)),
        ).double()
        with torch.no_grad():
            model[0].weight.copy_(w[0][b])
            model[1][1].weight.copy_(w[1][b])
            model[2][1].weight.copy_(w[2][b])

        def ce_sum(out, t):
            return F.cross_entropy(out, t, reduction="sum")

        res = predictive_coding(model, x[b], y[b], ce_sum, "strict", eta=0.1, n_iters=100, set_grad=False)
        for layer in (1, 2, 3):
            assert torch.allclose(es[layer][b], res.errors[layer], rtol=1e-9, atol=1e-12)


def test_pcnetwork_runs_in_the_inner_loop_with_meta_gradients():
    net, w, x, y, act, e_out = _net_setup()
    batch = (x, y, x, y)
    # FixedPred(1, L) is backprop: the same trajectory as F0 under bp
    pc = PCNetwork(net, "fixedpred", eta=1.0, n_iters=net.n_layers)
    ref = run_episodes(net, batch, f0, torch.tensor(0.5, dtype=F64), [t.clone() for t in w], [], metrics=False)
    got = run_episodes(pc, batch, f0, torch.tensor(0.5, dtype=F64), [t.clone() for t in w], [])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got.weights, ref.weights))
    assert float(got.angles.abs().max()) < 1e-5  # PC errors aligned with backprop's
    # truncated FixedPred (errors parallel to backprop's) and Strict: differentiable w.r.t. the rule's parameters
    for pc, aligned in ((PCNetwork(net, "fixedpred", 0.5, 3), True), (PCNetwork(net, "strict", 0.1, 3), False)):
        theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
        res = run_episodes(pc, batch, f0, theta, [t.clone() for t in w], [])
        res.loss.sum().backward()
        assert torch.isfinite(theta.grad) and float(theta.grad) != 0.0
        assert res.angles.shape == (2, net.n_layers - 1)
        assert (float(res.angles.max()) < 1e-5) == aligned


def test_pcnetwork_validates_its_settings():
    with pytest.raises(ConfigError, match="feedback='bp'"):
        PCNetwork(Network(sizes=(4, 3), feedback="fa"))
    base = Network(sizes=(4, 3), feedback="bp")
    with pytest.raises(ConfigError, match="Unknown PC inference"):
        PCNetwork(base, "exactly")
    with pytest.raises(ConfigError, match="eta"):
        PCNetwork(base, eta=-1.0)
    with pytest.raises(ConfigError, match="n_iters"):
        PCNetwork(base, n_iters=0)


# ---- configuration, CLI, docstrings --------------------------------------------------------------------------


def test_network_config_builds_the_pc_network_and_validates_its_keys():
    from rulesearch.train import NetworkConfig

    net = NetworkConfig(credit="pc-fixedpred", pc_iters=2).build(64, 10)
    assert isinstance(net, PCNetwork) and (net.inference, net.eta, net.n_iters) == ("fixedpred", 1.0, 2)
    assert net.base.feedback == "bp" and net.sizes == (64, 170, 130, 100, 70, 10)
    net = NetworkConfig(credit="pc-strict").build(64, 10)
    assert (net.inference, net.eta, net.n_iters) == ("strict", 0.1, 20)
    assert NetworkConfig(credit="pc-fixedpred").build(64, 10).n_iters == 6  # default: exact down to e_0
    assert isinstance(NetworkConfig().build(64, 10), Network)  # the default is unchanged
    with pytest.raises(ConfigError, match="network.pc_iters set, but network.credit is 'feedback'"):
        NetworkConfig(pc_iters=2)
    with pytest.raises(ConfigError, match="'plastic'"):
        NetworkConfig(credit="pc-strict", feedback="plastic")
    with pytest.raises(ConfigError, match="network.pc_eta"):
        NetworkConfig(credit="pc-strict", pc_eta=0.0)
    with pytest.raises(ConfigError, match="Did you mean 'pc-fixedpred'"):
        NetworkConfig.from_dict({"credit": "pc-fixed"})


def test_cli_discover_takes_the_pc_options():
    from typer.testing import CliRunner

    from rulesearch.cli import app

    result = CliRunner().invoke(app, ["discover", "--credit", "pc-fixedpred", "--pc-iters", "3", "--show-config"])
    assert result.exit_code == 0, result.output
    assert "credit: pc-fixedpred" in result.output and "pc_iters: 3" in result.output
    result = CliRunner().invoke(app, ["discover", "--pc-eta", "0.5", "--show-config"])
    assert result.exit_code != 0 and "network.pc_eta" in result.output


@pytest.mark.parametrize("module", ["credit.predictive_coding", "credit.network"])
def test_module_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"rulesearch.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0

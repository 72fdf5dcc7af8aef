"""The seed code's naive meta-training loop (the oracle) against the package's fast inner loop."""

from types import SimpleNamespace

import pytest
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.errors import ConfigError
from rulesearch.inner import run_episodes
from rulesearch.lang.pools import bio, pool
from rulesearch.networks.feedforward import Network
from rulesearch.reference.seed_loop import seed_meta_gradient

F64 = torch.float64
SIZES = (10, 8, 6, 5)


def _batch(b=3, n=12, nq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        x_train=torch.rand(b, n, SIZES[0], generator=g, dtype=F64),
        y_train=torch.randint(SIZES[-1], (b, n), generator=g),
        x_query=torch.rand(b, nq, SIZES[0], generator=g, dtype=F64),
        y_query=torch.randint(SIZES[-1], (b, nq), generator=g),
    )


def _theta(rule, seed=1):
    g = torch.Generator().manual_seed(seed)
    theta = 0.05 * torch.randn(rule.n_params, generator=g, dtype=F64)
    theta[0] = 0.2
    return theta


@pytest.mark.parametrize("feedback", ["fa", "bp"])
@pytest.mark.parametrize("rule", [bio, pool], ids=["bio", "pool"])
@pytest.mark.parametrize("method", ["adjoint", "autograd"])
def test_seed_loop_meta_gradient_equals_fast(rule, feedback, method):
    net = Network(sizes=SIZES, feedback=feedback)
    batch, theta = _batch(), _theta(rule)
    ref = seed_meta_gradient(net, batch, rule, theta, seed=3, t=1, ks=[4, 5, 6])
    leaf = theta.clone().requires_grad_(True)
    res = run_episodes(net, batch, compile_rule(rule), leaf, seed=3, t=1, ks=[4, 5, 6], method=method)
    (grad,) = torch.autograd.grad(res.loss.mean(), leaf)
    torch.testing.assert_close(res.loss.detach(), ref.loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.accuracy, ref.accuracy)
    torch.testing.assert_close(grad, ref.grad, rtol=1e-6, atol=1e-12)
    assert ref.grad.abs().min() > 0  # every term matters on this config


def test_seed_loop_refuses_what_it_does_not_model():
    with pytest.raises(ConfigError, match="seed-loop"):
        seed_meta_gradient(Network(sizes=SIZES, feedback="dfa"), _batch(), bio, _theta(bio), seed=0)
    with pytest.raises(ConfigError, match="linear rule"):
        seed_meta_gradient(Network(sizes=SIZES), _batch(), bio, torch.zeros(2, dtype=F64), seed=0)

r"""The seed code's meta-training algorithm, kept naive on purpose: the test oracle and benchmark baseline of
:func:`rulesearch.inner.run_episodes`.

What makes it naive (Shervani-Tabar & Rosenbaum 2023, Alg. 1 and the public code):

* one episode at a time; a per-step Python loop over layers with column-vector activations (batch size 1);
* every rule term is its own ``[n_post, n_pre]`` tensor (the Oja term as ``y x^T - (y y^T) W``, as in the seed
  code), summed as ``dW = sum_r theta_r F^r``;
* all errors ``e_0 .. e_L`` are computed at every step, whether a term reads them or not;
* the weights are cloned every step (``functional_call`` style), and autograd records everything;
* ``backward()`` after each episode, meta-gradients accumulated over the meta-batch.

The package never calls this module. Only what the paper's experiments need is supported: softplus hidden
layers, cross-entropy, feedback ``fa`` or ``bp``, linear rules (``theta`` of shape ``(R,)``); terms of the
paper's pool are evaluated by hand, any other term by the naive broadcasting evaluator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import sympy as sp
import torch
from torch import Tensor

from ..errors import ConfigError
from ..lang.pools import PAPER_POOL
from ..lang.rule import Rule
from ..networks.feedforward import Network, init_params
from .naive import naive_eval

__all__ = ["SeedResult", "seed_meta_gradient"]


@dataclass(frozen=True)
class SeedResult:
    """Per-episode query losses and accuracies, and ``d/dtheta`` of their mean (accumulated over episodes)."""

    loss: Tensor
    accuracy: Tensor
    grad: Tensor


def _pool_term(index: int):
    """The hand-written ``[n_post, n_pre]`` tensor of pool term ``F^index`` (column vectors ``(n, 1)``)."""

    def f0(x, y, e, ep, W):
        return -e @ x.T

    def f1(x, y, e, ep, W):
        return -y @ ep.T

    def f2(x, y, e, ep, W):
        return -e @ ep.T

    def f3(x, y, e, ep, W):
        return -W

    def f4(x, y, e, ep, W):
        return -torch.ones_like(y) @ ep.T

    def f5(x, y, e, ep, W):
        return -y.sum() * (e @ x.T)

    def f6(x, y, e, ep, W):
        return -(y.T @ W @ ep) * (y @ ep.T)

    def f7(x, y, e, ep, W):
        return -(y.T @ W @ ep) * (e @ x.T)

    def f8(x, y, e, ep, W):
        return -(e.T @ W @ x) * (y @ ep.T)

    def f9(x, y, e, ep, W):
        return y @ x.T - (y @ y.T) @ W

    return (f0, f1, f2, f3, f4, f5, f6, f7, f8, f9)[index]


@functools.cache
def _pool_index(expr: sp.Expr) -> int | None:
    """Index of the paper-pool term equal to ``expr``, or None (a symbolic check, cached: it costs more than an
    episode and is no part of the seed code's algorithm)."""
    return next((r for r, t in enumerate(PAPER_POOL.terms) if sp.simplify(expr - t.expr) == 0), None)


def _term_functions(rule: Rule) -> list:
    fns = []
    for term in rule.terms:
        expr = term.expr
        match = _pool_index(expr)
        if match is not None:
            fns.append(_pool_term(match))
            continue

        def generic(x, y, e, ep, W, expr=expr):
            sig = {"pre": x.T, "post": y.T, "err": e.T, "pre_err": ep.T, "w": W.unsqueeze(0)}
            return naive_eval(expr, sig, {}, (1, W.shape[0], W.shape[1]))[0]

        fns.append(generic)
    return fns


def _softplus(z: Tensor, beta: float) -> Tensor:
    return torch.nn.functional.softplus(z, beta=beta)


def _episode(net, fns, theta, w0, f0, x, y, xq, yq):
    """Query loss and accuracy of one episode after its online steps (autograd through all of them)."""
    beta, n = net.beta, net.n_layers
    ws = list(w0)
    for s in range(x.shape[0]):
        ys = [x[s].reshape(-1, 1)]
        for i in range(n):
            z = ws[i] @ ys[-1]
            ys.append(_softplus(z, beta) if i < n - 1 else torch.softmax(z, dim=0))
        target = torch.zeros_like(ys[-1])
        target[int(y[s])] = 1.0
        es = [ys[-1] - target]
        for i in range(n - 1, -1, -1):
            fb = ws[i] if net.feedback == "bp" else f0[i]
            es.insert(0, (fb.T @ es[0]) * (1 - torch.exp(-beta * ys[i])))
        new = [w.clone() for w in ws]
        for i in range(n):
            terms = [fn(ys[i], ys[i + 1], es[i + 1], es[i], ws[i]) for fn in fns]
            dw = sum(theta[r] * t for r, t in enumerate(terms))
            new[i] = new[i] + dw
        ws = new
    h = xq.T
    for i in range(n):
        h = ws[i] @ h
        if i < n - 1:
            h = _softplus(h, beta)
    logits = h.T
    loss = torch.nn.functional.cross_entropy(logits, yq)
    acc = (logits.argmax(-1) == yq).to(logits.dtype).mean()
    return loss, acc


def seed_meta_gradient(
    net: Network,
    batch,
    rule: Rule,
    theta: Tensor,
    *,
    seed: int | None = None,
    t: int | None = None,
    ks: Sequence[int] | None = None,
) -> SeedResult:
    """Meta-gradient of the mean query loss over the episodes of ``batch``, the seed code's way.

    Episode ``b`` starts from ``init_params(net, seed, t, [ks[b]])`` (the same weights as
    :func:`rulesearch.inner.run_episodes`); ``seed, t, ks`` default to the batch's own.
    """
    if net.activation != "softplus" or net.loss != "ce" or net.feedback not in ("fa", "bp"):
        raise ConfigError(
            "the seed-loop oracle supports softplus, cross-entropy and feedback 'fa' or 'bp' only; received "
            f"activation={net.activation!r}, loss={net.loss!r}, feedback={net.feedback!r}."
        )
    if not rule.is_linear or theta.dim() != 1 or theta.shape[0] != rule.n_params:
        raise ConfigError(f"the seed-loop oracle needs a linear rule and theta of shape ({rule.n_params},).")
    x_train, y_train, x_query, y_query = batch.x_train, batch.y_train, batch.x_query, batch.y_query
    b = int(x_train.shape[0])
    seed = getattr(batch, "seed", None) if seed is None else seed
    t = getattr(batch, "t", 0) if t is None else t
    ks = list(getattr(batch, "ks", range(b)) if ks is None else ks)
    if seed is None:
        raise ConfigError("pass seed= (the initial weights are drawn from (seed, t, k)).")
    fns = _term_functions(rule)
    leaf = theta.detach().clone().requires_grad_(True)
    losses, accs = [], []
    for j in range(b):
        w0, f0 = init_params(net, seed, t, [ks[j]], dtype=x_train.dtype, device=x_train.device)
        w0 = [w[0] for w in w0]
        f0 = [f[0] for f in f0]
        loss, acc = _episode(net, fns, leaf, w0, f0, x_train[j], y_train[j], x_query[j], y_query[j])
        (loss / b).backward()  # one episode's graph at a time; gradients accumulate over the meta-batch
        losses.append(loss.detach())
        accs.append(acc.detach())
    return SeedResult(torch.stack(losses), torch.stack(accs), leaf.grad.detach().clone())

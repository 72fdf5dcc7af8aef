r"""Predictive coding (PC) inference and its parameter updates for any ``torch.nn.Sequential`` (Rosenbaum 2022).

A model is a chain of ``L`` layers (the top-level items of a ``Sequential``: ``Linear``, ``Conv2d``, activations,
pooling, ``Flatten``, ...). The feed-forward pass gives :math:`\hat v_0 = x`, :math:`\hat v_l = f_l(\hat v_{l-1})`
and the loss :math:`\mathcal{L}(\hat v_L, y)`. PC keeps a belief :math:`v_l` per layer and a prediction error
:math:`\epsilon_l` (prediction minus belief, the corrected signs of arXiv 2106.13082 v6), and updates the parameters
of layer ``l`` by

.. math::

    d\theta_l = \epsilon_l^{\top} \, \frac{\partial f_l(u_{l-1})}{\partial \theta_l},

with :math:`u = \hat v` (Exact, FixedPred) or :math:`u = v` (Strict). Three inference methods:

* ``"exact"``: :math:`\epsilon_L = \partial\mathcal{L}/\partial\hat v_L`,
  :math:`\epsilon_l = J_{l+1}(\hat v_l)^{\top}\epsilon_{l+1}`, beliefs :math:`v = \hat v - \epsilon`; the updates
  are the gradients of ``loss.backward()``.
* ``"fixedpred"`` (the fixed prediction assumption): :math:`v \leftarrow \hat v`, :math:`\epsilon_L` fixed; ``n``
  sweeps, each for :math:`l = L-1, \dots, 1`

  .. math::

      \epsilon_l = \hat v_l - v_l, \qquad v_l \leftarrow v_l + \eta\,(\epsilon_l - J_{l+1}(\hat v_l)^{\top}
      \epsilon_{l+1}),

  with the Jacobians at the feed-forward values. In terms of the errors alone, :math:`\epsilon^{(1)}_l = 0` and
  :math:`\epsilon^{(k+1)}_l = \epsilon^{(k)}_l + \eta\,(J_{l+1}^{\top}\epsilon^{(k)}_{l+1} - \epsilon^{(k)}_l)`; the
  parameters use the errors of the last sweep, :math:`\epsilon^{(n)}`. At :math:`\eta = 1` the exact error moves
  down one layer per sweep, so ``n = k`` sweeps give the top ``k`` layers backprop's gradients and the others zero,
  and ``n = L`` equals backprop.
* ``"strict"``: no fixed prediction; each iteration recomputes the predictions at the beliefs,
  :math:`\epsilon_l = f_l(v_{l-1}) - v_l`, :math:`\epsilon_L = \partial\mathcal{L}(f_L(v_{L-1}), y)/\partial f_L`,
  and takes a gradient step on the energy

  .. math::

      F(v, \theta) = \sum_{l=1}^{L-1} \tfrac12 \|f_l(v_{l-1}) - v_l\|^2 + \mathcal{L}(f_L(v_{L-1}), y),
      \qquad v_l \leftarrow v_l - \eta\,\partial F/\partial v_l = v_l + \eta\,(\epsilon_l - J_{l+1}(v_l)^{\top}
      \epsilon_{l+1}).

  After ``n`` steps the errors are recomputed at the beliefs and the updates are :math:`\partial F/\partial\theta`
  there (not gradients of the loss).

The recursions (:func:`fixedpred_errors`, :func:`strict_relax`) are written over layer maps, so the same code serves
a ``Sequential`` (Jacobian products by autograd) and rulesearch's own networks
(:class:`~rulesearch.credit.PCNetwork`, Jacobian products in closed form, differentiable for meta-learning).

Examples
--------
>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
>>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(3, (8,))
>>> res = predictive_coding(model, x, y, torch.nn.functional.cross_entropy, "fixedpred", eta=1.0, n_iters=3)
>>> model.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward()
>>> all(torch.allclose(g, p.grad) for g, p in zip(res.grads, model.parameters()))
True

References
----------
Rosenbaum, R. On the relationship between predictive coding and backpropagation. PLOS ONE 17(3), e0266102 (2022);
arXiv 2106.13082 v6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["METHODS", "PCResult", "predictive_coding", "energy", "fixedpred_errors", "strict_relax"]

METHODS = ("exact", "fixedpred", "strict")
"""The inference methods of :func:`predictive_coding`."""

Pullback = Callable[[Tensor], Tensor]
"""``g -> J_l(u_{l-1})^T g``: carries an error at layer ``l`` to layer ``l - 1``."""


class PCResult(NamedTuple):
    """What :func:`predictive_coding` returns (lists indexed by layer ``l = 0..L``).

    Attributes
    ----------
    vhat : list of Tensor
        Feed-forward values :math:`\\hat v_0 = x, \\dots, \\hat v_L` (the output).
    loss : Tensor
        :math:`\\mathcal{L}(\\hat v_L, y)`, a scalar.
    beliefs : list of Tensor
        Beliefs :math:`v_0 = x, v_1, \\dots, v_L` after inference; the output belief is the (last) prediction minus
        :math:`\\epsilon_L`.
    errors : list of Tensor
        Prediction errors ``[None, eps_1, ..., eps_L]`` that the parameter updates use (the input is clamped).
    grads : list of Tensor or None
        :math:`d\\theta` per tensor of ``model.parameters()`` (None for tensors that do not require grad).
    """

    vhat: list
    loss: Tensor
    beliefs: list
    errors: list
    grads: list


# ---- the recursions over layer maps --------------------------------------------------------------------------


def _relax(old: Tensor | None, target: Tensor | None, eta: float) -> Tensor | None:
    """``old + eta (target - old)``; None stands for an error known to be zero (its products are skipped), and at
    ``eta = 1`` the result is ``target`` itself."""
    if eta == 1.0:
        return target
    if old is None:
        return None if target is None else eta * target
    return (1.0 - eta) * old if target is None else old + eta * (target - old)


def _cached(backs: Sequence[Pullback | None]) -> Callable[[int, Tensor | None], Tensor | None]:
    """``pull(l, g) = backs[l + 1](g)``, skipping zero errors (None) and reusing the last product when ``g`` is the
    same tensor as before (at ``eta = 1`` converged errors are carried over unchanged, so each Jacobian product is
    computed once)."""
    memo: dict[int, tuple[Tensor, Tensor]] = {}

    def pull(l: int, g: Tensor | None) -> Tensor | None:
        if g is None:
            return None
        hit = memo.get(l)
        if hit is None or hit[0] is not g:
            hit = memo[l] = (g, backs[l + 1](g))
        return hit[1]

    return pull


def _sweep(eps: list, pull, eta: float, layers: Sequence[int]) -> list:
    """One FixedPred sweep in error form: ``eps_l <- eps_l + eta (J_{l+1}^T eps_{l+1} - eps_l)`` for ``l`` in
    ``layers`` (descending), every product taken with the errors the sweep started from."""
    new = list(eps)
    for l in layers:
        new[l] = _relax(eps[l], pull(l, eps[l + 1]), eta)
    return new


def fixedpred_errors(
    eps_out: Tensor, backs: Sequence[Pullback | None], eta: float, n_iters: int, layers: Sequence[int]
) -> tuple[list, list]:
    """FixedPred's errors after ``n_iters`` sweeps.

    .. math::

        \\epsilon^{(1)}_l = 0 \\;(l < L), \\quad \\epsilon_L = \\partial\\mathcal{L}/\\partial\\hat v_L, \\qquad
        \\epsilon^{(k+1)}_l = \\epsilon^{(k)}_l + \\eta\\,(J_{l+1}(\\hat v_l)^{\\top}\\epsilon^{(k)}_{l+1}
        - \\epsilon^{(k)}_l).

    Parameters
    ----------
    eps_out : Tensor
        :math:`\\epsilon_L`.
    backs : sequence
        ``backs[l]`` carries an error at ``l`` to ``l - 1`` (the Jacobian at the feed-forward value), ``l = 1..L``.
    layers : sequence of int
        The error indices ``l < L`` to relax, descending and contiguous from ``L - 1``.

    Returns
    -------
    (errors, next_errors)
        :math:`\\epsilon^{(n)}` (what the parameter updates use; None marks an error that is still exactly zero) and
        :math:`\\epsilon^{(n+1)}`, with which the beliefs after ``n`` sweeps are :math:`v = \\hat v -
        \\epsilon^{(n+1)}`.
    """
    eps: list = [None] * len(backs)
    eps[-1] = eps_out
    pull = _cached(backs)
    for _ in range(n_iters - 1):
        eps = _sweep(eps, pull, eta, layers)
    return eps, _sweep(eps, pull, eta, layers)


def strict_relax(
    predict: Callable[[int, Tensor], tuple[Tensor, Pullback]],
    out_error: Callable[[Tensor], Tensor],
    beliefs: Sequence[Tensor],
    eta: float,
    n_iters: int,
) -> tuple[list, list, list]:
    """Strict PC: ``n_iters`` gradient steps on the energy ``F`` in the beliefs ``v_1..v_{L-1}``.

    .. math::

        \\epsilon_l = f_l(v_{l-1}) - v_l, \\quad \\epsilon_L = \\partial\\mathcal{L}/\\partial f_L(v_{L-1}), \\qquad
        v_l \\leftarrow v_l + \\eta\\,(\\epsilon_l - J_{l+1}(v_l)^{\\top}\\epsilon_{l+1}).

    Parameters
    ----------
    predict : callable
        ``predict(l, v_{l-1}) -> (f_l(v_{l-1}), pullback)`` with ``pullback(g) = J_l(v_{l-1})^T g``.
    out_error : callable
        ``p_L -> dL/dp_L``.
    beliefs : sequence of Tensor
        Initial ``[v_0 = x, v_1, ..., v_{L-1}]`` (usually the feed-forward values).

    Returns
    -------
    (beliefs, errors, pullbacks)
        The final beliefs ``[v_0, ..., v_{L-1}]``, the errors ``[None, eps_1, ..., eps_L]`` recomputed at them and
        the pullbacks there (``pullbacks[l]`` of layer ``l``), so that the updates are :math:`\\partial F/\\partial
        \\theta` at the returned beliefs.
    """
    v = list(beliefs)
    n = len(v)

    def errors_at(v):
        preds = [None] + [predict(l, v[l - 1]) for l in range(1, n + 1)]
        eps = [None] + [preds[l][0] - v[l] for l in range(1, n)] + [out_error(preds[n][0])]
        return eps, [None] + [p[1] for p in preds[1:]]

    for _ in range(n_iters):
        eps, backs = errors_at(v)
        v = [v[0]] + [v[l] + eta * (eps[l] - backs[l + 1](eps[l + 1])) for l in range(1, n)]
    eps, backs = errors_at(v)
    return v, eps, backs


# ---- torch.nn.Sequential -----------------------------------------------------------------------------------


def _check_args(model, method: str, eta, n_iters) -> None:
    if not isinstance(model, torch.nn.Sequential) or len(model) == 0:
        raise ConfigError(
            f"predictive_coding needs a non-empty torch.nn.Sequential (its top-level items are the PC layers); "
            f"received {type(model).__name__}. Wrap the layers: torch.nn.Sequential(layer_1, ..., layer_L)."
        )
    if method not in METHODS:
        raise ConfigError(f"Unknown PC method {method!r}; allowed: {', '.join(map(repr, METHODS))}.")
    if isinstance(eta, bool) or not isinstance(eta, Real) or not math.isfinite(eta) or eta <= 0:
        raise ConfigError(f"eta (the belief step size) must be a finite number > 0; received {eta!r}.")
    if isinstance(n_iters, bool) or not isinstance(n_iters, Integral) or n_iters < 1:
        raise ConfigError(f"n_iters (inference iterations) must be an integer >= 1; received {n_iters!r}.")


def _layer(module: torch.nn.Module, u: Tensor, need_input: bool) -> tuple[Tensor, Pullback, list]:
    """``f_l(u)`` with the graph kept for repeated products: ``(prediction, pullback, params)``."""
    a = u.detach().requires_grad_(need_input)
    with torch.enable_grad():
        p = module(a)

    def pullback(g: Tensor) -> Tensor:
        return torch.autograd.grad(p, a, g, retain_graph=True)[0]

    return p, pullback, [q for q in module.parameters() if q.requires_grad]


def _loss_grad(loss_fn, y) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def grad(out: Tensor) -> tuple[Tensor, Tensor]:
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(o, y)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise ShapeError(
                f"loss_fn(output, y) must return a scalar tensor; received {shape}. Use a reduction such as "
                f"'mean' (e.g. torch.nn.functional.cross_entropy)."
            )
        return loss.detach(), torch.autograd.grad(loss, o)[0]

    return grad


def _param_grads(model, preds: list, eps: list) -> list:
    """``eps_l^T d f_l / d theta_l`` per layer, gathered in the order of ``model.parameters()``."""
    acc: dict[int, Tensor] = {}
    for (p, _, params), e in zip(preds[1:], eps[1:]):
        if not params:
            continue
        gs = (
            [torch.zeros_like(q) for q in params] if e is None else torch.autograd.grad(p, params, e, retain_graph=True)
        )
        for q, g in zip(params, gs):
            acc[id(q)] = acc[id(q)] + g if id(q) in acc else g
    return [acc.get(id(q)) for q in model.parameters()]


def energy(model: torch.nn.Sequential, beliefs: Sequence[Tensor], y, loss_fn) -> Tensor:
    """The PC energy at the beliefs ``[v_0 = x, v_1, ..., v_{L-1}, ...]`` (entries past ``L - 1`` are ignored).

    .. math::

        F = \\sum_{l=1}^{L-1} \\tfrac12 \\|f_l(v_{l-1}) - v_l\\|^2 + \\mathcal{L}(f_L(v_{L-1}), y)

    Differentiable w.r.t. the parameters and the beliefs; Strict PC's updates are its gradient in the parameters.
    """
    if len(beliefs) < len(model):
        raise ShapeError(f"energy needs the beliefs v_0..v_{len(model) - 1}; received {len(beliefs)} tensors.")
    terms = [0.5 * (layer(beliefs[l]) - beliefs[l + 1]).pow(2).sum() for l, layer in enumerate(model[:-1])]
    return sum(terms) + loss_fn(model[-1](beliefs[len(model) - 1]), y)


def predictive_coding(
    model: torch.nn.Sequential,
    x: Tensor,
    y,
    loss_fn: Callable,
    method: str = "fixedpred",
    eta: float = 0.1,
    n_iters: int = 20,
    set_grad: bool = True,
) -> PCResult:
    """Run PC inference on ``model`` for one batch and compute its parameter updates (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Sequential
        ``L`` layers ``f_1..f_L`` (its top-level items); any differentiable modules.
    x, y
        The input batch and whatever ``loss_fn`` takes as targets.
    loss_fn : callable
        ``loss_fn(output, y)`` -> scalar (e.g. ``torch.nn.functional.cross_entropy``).
    method : str
        ``"exact"``, ``"fixedpred"`` or ``"strict"``.
    eta, n_iters
        Belief step size and number of sweeps (FixedPred) or energy steps (Strict); unused by Exact.
    set_grad : bool
        Accumulate the updates into ``.grad`` of the parameters, as ``loss.backward()`` would, so that any
        ``torch.optim`` optimizer can step on them.

    Returns
    -------
    PCResult
    """
    _check_args(model, method, eta, n_iters)
    if not torch.is_tensor(x):
        raise ShapeError(f"x must be a tensor; received {type(x).__name__}.")
    n = len(model)
    vhat, preds = [x.detach()], [None]
    for l, module in enumerate(model, start=1):
        preds.append(_layer(module, vhat[-1], need_input=l > 1))
        vhat.append(preds[-1][0].detach())
    loss_grad = _loss_grad(loss_fn, y)
    loss, eps_out = loss_grad(vhat[n])
    layers = range(n - 1, 0, -1)
    backs = [None] + [p[1] for p in preds[1:]]
    if method == "exact":  # the backprop recursion: FixedPred(1, L) takes each product once
        eps, nxt = fixedpred_errors(eps_out, backs, 1.0, n, layers)
        beliefs = [vhat[0]] + [vh - e for vh, e in zip(vhat[1:], eps[1:])]
    elif method == "fixedpred":
        eps, nxt = fixedpred_errors(eps_out, backs, float(eta), int(n_iters), layers)
        beliefs = [vhat[0]] + [vh if e is None else vh - e for vh, e in zip(vhat[1:-1], nxt[1:-1])]
        beliefs.append(vhat[n] - eps_out)
    else:

        def predict(l: int, u: Tensor):
            p = _layer(model[l - 1], u, need_input=l > 1)
            preds[l] = p  # the graph, for the updates at the final beliefs
            return p[0].detach(), p[1]

        v, eps, _ = strict_relax(predict, lambda out: loss_grad(out)[1], vhat[:-1], float(eta), int(n_iters))
        beliefs = [u.detach() for u in v] + [preds[n][0].detach() - eps[n]]
    eps = [None] + [None if e is None else e.detach() for e in eps[1:]]
    grads = _param_grads(model, preds, eps)
    eps = [None] + [torch.zeros_like(vh) if e is None else e for vh, e in zip(vhat[1:], eps[1:])]
    if set_grad:
        for q, g in zip(model.parameters(), grads):
            if g is not None:
                q.grad = g.clone() if q.grad is None else q.grad + g
    return PCResult(vhat=vhat, loss=loss, beliefs=beliefs, errors=eps, grads=grads)

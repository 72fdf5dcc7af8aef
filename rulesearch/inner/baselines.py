"""Baseline updates (the pseudo-gradient F0, Kolen-Pollack feedback) and baseline runs of them."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..networks.feedforward import (
    Network,
)
from .loop import InnerResult, _unpack, run_episodes

__all__ = ["F0", "f0", "KolenPollack", "kolen_pollack", "run_baseline", "baselines"]


# ---- baselines ---------------------------------------------------------------------------------------------


def _per_episode(p, vec: Tensor):
    """A scalar, 0-d tensor or per-episode ``(B,)`` coefficient shaped to scale a ``(B, n)`` vector."""
    if torch.is_tensor(p) and p.dim() == 1:
        return p.unsqueeze(-1)
    return p


class F0:
    """The pseudo-gradient rule ``F^0`` at a learning rate: ``dW = -lr e_l y_{l-1}^T``.

    ``params`` is the learning rate: a float, a 0-d tensor, or a ``(B,)`` tensor (one per episode). Under
    ``bp`` this is online SGD on the per-sample loss; under ``fa`` it is feedback alignment.
    """

    needs = frozenset({"pre", "err"})
    states = ()

    def __call__(self, signals, params) -> Tensor:
        err = signals["err"]
        return (err * _per_episode(-params, err)).unsqueeze(2) * signals["pre"].unsqueeze(1)

    def __repr__(self) -> str:
        return "F0()"


f0 = F0()
"""The shared :class:`F0` instance."""


class KolenPollack:
    """Kolen-Pollack plastic feedback: ``dfb = -lr e_l y_{l-1}^T - decay fb`` (in W's layout).

    ``params`` holds ``(lr, decay)``: a tensor of shape ``(2,)`` or per episode ``(B, 2)``. With the same
    ``lr`` for the weights (and the same decay), ``W - fb`` decays geometrically, so ``fb`` aligns with ``W``.
    """

    needs = frozenset({"pre", "err", "fb"})
    states = ()

    def __call__(self, signals, params) -> Tensor:
        p = torch.as_tensor(params)
        lr, decay = p[..., 0], p[..., 1]
        err = signals["err"]
        outer = (err * _per_episode(-lr, err)).unsqueeze(2) * signals["pre"].unsqueeze(1)
        d = decay.reshape(-1, 1, 1) if decay.dim() == 1 else decay
        return outer - d * signals["fb"]

    def __repr__(self) -> str:
        return "KolenPollack()"


kolen_pollack = KolenPollack()
"""The shared :class:`KolenPollack` instance."""


def run_baseline(
    net: Network,
    batch,
    lr: float | Tensor,
    *,
    feedback: str | None = None,
    seed: int | None = None,
    t: int | None = None,
    ks=None,
    **kwargs,
) -> InnerResult:
    """Run ``F0`` at a fixed learning rate ``lr`` under ``feedback`` (default: the network's own mode).

    ``seed, t, ks`` default to the batch's own (see :func:`run_episodes`). Extra keyword arguments go to
    :func:`run_episodes` (e.g. ``curves=True``; ``feedback_update`` under plastic feedback).
    """
    if feedback is not None:
        net = dataclasses.replace(net, feedback=feedback)
    x = _unpack(batch)[0]
    theta = torch.as_tensor(lr, dtype=x.dtype, device=x.device)
    return run_episodes(net, batch, f0, theta, seed=seed, t=t, ks=ks, **kwargs)


def baselines(
    net: Network,
    batch,
    lr: float | Tensor,
    *,
    seed: int | None = None,
    t: int | None = None,
    ks=None,
    modes=("bp", "fa"),
    **kwargs,
) -> dict[str, InnerResult]:
    """``F0`` at learning rate ``lr`` under each feedback mode in ``modes`` on the same episodes and initial
    weights (the weights are drawn before the feedback, so they coincide across modes)."""
    return {m: run_baseline(net, batch, lr, feedback=m, seed=seed, t=t, ks=ks, **kwargs) for m in modes}

"""The outer loop's optimizer: per-run Adam with an optional proximal L1 step, and per-term step sizes."""

from __future__ import annotations

import torch
from torch import Tensor

from .learners import _FB, NeuralLearner

__all__ = []


def _term_ms(update, eye: Tensor, signals) -> Tensor:
    """Per episode the mean square over the synapses of every term ``F_r`` of a compiled linear rule (``theta`` the
    one-hot rows of ``eye``): ``(B, R)``."""
    return torch.stack([update(signals, e).pow(2).mean((-2, -1)) for e in eye], -1)


def _rms_multipliers(
    learner, init: dict[str, Tensor], sums: list[Tensor], cap: float = float("inf")
) -> dict[str, Tensor]:
    """``min(cap, rms(T_ref) / rms(T_r))`` per parameter name from per-layer RMS sums ``sums[layer][r]`` (see
    :meth:`Trainer.lr_scale`); ``T_ref`` is the term with the largest initial ``|theta|`` in that layout."""
    base = getattr(learner, "base", learner)
    out = {}
    for k, v in init.items():
        if k == _FB:
            continue
        if isinstance(base, NeuralLearner) or base.kind == "shared":
            rms = torch.stack(sums).mean(0)
        elif base.kind == "per_layer":
            rms = torch.stack(sums)
        else:
            g = base.names.index(k)
            rms = torch.stack([sums[layer] for layer in range(base.n_layers) if base.rule.group_of(layer) == g]).mean(0)
        ref = rms.gather(-1, v[0].abs().double().cpu().reshape(rms.shape).argmax(-1, keepdim=True))
        mult = torch.where(rms > 0, ref / rms.clamp_min(1e-300), torch.ones_like(rms)).clamp(max=cap)
        out[k] = mult.to(dtype=v.dtype, device=v.device)
    return out


def adam_step(p, g, m, v, t, lr, betas, eps, l1=None):
    r"""One Adam step (bias-corrected; ``t`` >= 1, the step count as a tensor) on ``p`` with gradient ``g``; returns
    ``(p, m, v)``.

    With ``l1`` (a number or a tensor that broadcasts to ``p``) the step is proximal in Adam's own metric
    :math:`D = \sqrt{\hat v} + \epsilon`: :math:`p \leftarrow S_{\eta\lambda/D}(p - \eta \hat m / D)`, the
    soft threshold :math:`S_\tau(u) = \mathrm{sign}(u)\max(|u| - \tau, 0)`. So a coefficient stays exactly zero
    while its mean loss gradient is below ``l1`` (the KKT condition of ``loss + l1 * |p|_1``), whatever the
    gradient's scale; ``lr`` may be a tensor (per-coefficient step sizes).
    """
    b1, b2 = betas
    m = m * b1 + g * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    denom = v.sqrt() / (1 - b2**t).sqrt() + eps
    p = p - (lr / (1 - b1**t)) * m / denom
    if l1 is not None:
        tau = lr * l1 / denom
        p = torch.sign(p) * torch.clamp(p.abs() - tau, min=0.0)
    return p, m, v

"""The outer loop's optimizer: per-run Adam with an optional proximal L1 step."""

from __future__ import annotations

import torch

__all__ = ["adam_step"]


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

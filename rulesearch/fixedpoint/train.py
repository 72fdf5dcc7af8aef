r"""Learning a recurrent network's fixed points with a compiled rule: per sample at the fixed point, averaged over
the batch.

One step on a batch :math:`(x_b, y_b)`: solve :math:`r^*_b = \tanh(W r^*_b + W_x x_b)`, read the rule's signals
there, and :math:`W \leftarrow W + \frac1B \sum_b \Delta W_b` (:meth:`~rulesearch.compile.CompiledRule.batch_mean`;
the rule carries the learning rate in its coefficient :math:`\theta`, and a descent rule its minus sign).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compile import compile_rule
from ..errors import ConfigError
from ..lang.rule import Rule
from ..networks.fixedpoint import FIXED_POINT_SIGNALS, FixedPointNetwork, FixedPointParams, stability

__all__ = ["StepRecord", "fixed_point_step", "heldout_metrics", "train_fixed_point"]


@dataclass(frozen=True)
class StepRecord:
    """One training step: the batch's mean loss and accuracy before the update, the solver's largest residual,
    iterations and number of samples not converged, and the norm of the update."""

    loss: float
    accuracy: float
    residual: float
    iterations: int
    n_failed: int
    update_norm: float


def _theta(rule: Rule, lr, like: Tensor) -> Tensor:
    return torch.as_tensor(lr, dtype=like.dtype, device=like.device).reshape(-1).expand(rule.n_terms).contiguous()


def fixed_point_step(
    net: FixedPointNetwork, params: FixedPointParams, W: Tensor, x: Tensor, y: Tensor, rule: Rule, lr
) -> tuple[Tensor, StepRecord, Tensor]:
    r"""``(W + mean_b dW_b, record, gain)``: one step of ``rule`` with coefficients ``lr`` (a number for every term,
    or ``(R,)``) on the batch ``x`` ``(B, n_in)``, ``y`` ``(B,)`` (labels); ``gain`` ``(B, N)`` for diagnostics."""
    update = compile_rule(rule)
    unknown = set(update.needs) - FIXED_POINT_SIGNALS
    if unknown:
        raise ConfigError(
            f"Rule {rule.name!r} needs {sorted(unknown)}, which a FixedPointNetwork does not provide; it provides "
            f"{sorted(FIXED_POINT_SIGNALS)} (for pre_err use as_pre(err); a recurrent layer has no fb)."
        )
    sol = net.solve(params, x, W)
    sig = net.signals(params, W, sol.r, y, update.needs | {"gain"})
    dW = update.batch_mean({k: sig[k] for k in update.needs}, _theta(rule, lr, W))
    rec = StepRecord(
        float(sig["loss"].mean()),
        float(sig["reward"].mean()),
        float(sol.residual.max()),
        sol.iterations,
        sol.n_failed,
        float(torch.linalg.matrix_norm(dW)),
    )
    return W + dW, rec, sig["gain"]


@torch.no_grad()
def heldout_metrics(
    net: FixedPointNetwork, params: FixedPointParams, W: Tensor, x: Tensor, y: Tensor, n_stability: int | None = 64
) -> dict[str, float]:
    """Held-out ``loss``, ``accuracy``, the solver's ``n_failed`` and ``max_residual``, and :func:`stability` at the
    fixed points of the first ``n_stability`` samples of ``x`` (all if None: one N x N eigenproblem each)."""
    sol = net.solve(params, x, W)
    logits = net.readout(params, sol.r)
    out = {
        "loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(-1) == y).double().mean()),
        "n_failed": sol.n_failed,
        "max_residual": float(sol.residual.max()),
    }
    out.update(stability(W, 1 - sol.r[:n_stability] ** 2))
    return out


def train_fixed_point(
    net: FixedPointNetwork,
    params: FixedPointParams,
    rule: Rule,
    lr,
    batches: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    eval_data: tuple[Tensor, Tensor] | None = None,
    eval_every: int = 10,
    callback: Callable[[dict], None] | None = None,
    n_stability: int | None = 64,
) -> tuple[Tensor, list[dict]]:
    """Train ``params.W`` with ``rule`` for ``steps`` batches; returns the final ``W`` and one row per step
    (:class:`StepRecord` fields, ``step``, and every ``eval_every`` steps and at the end the :func:`heldout_metrics`
    columns prefixed ``test_``, before that step's update). A non-finite ``W`` or loss stops the run with
    ``diverged`` set in the last row. ``callback(row)`` sees (and may add to) every row."""
    if steps < 1 or eval_every < 1:
        raise ConfigError(f"steps={steps} and eval_every={eval_every} must be >= 1.")
    W, rows = params.W, []
    with torch.no_grad():
        for step in range(steps):
            x, y = next(batches)
            row = {"step": step}
            if eval_data is not None and step % eval_every == 0:
                row.update(
                    {f"test_{k}": v for k, v in heldout_metrics(net, params, W, *eval_data, n_stability).items()}
                )
            W, rec, _ = fixed_point_step(net, params, W, x, y, rule, lr)
            row.update(rec.__dict__, diverged=not bool(torch.isfinite(W).all()) or not math.isfinite(rec.loss))
            rows.append(row)
            if callback is not None:
                callback(row)
            if row["diverged"]:
                return W, rows
        if eval_data is not None:
            rows.append(
                {
                    "step": steps,
                    **{f"test_{k}": v for k, v in heldout_metrics(net, params, W, *eval_data, n_stability).items()},
                }
            )
            if callback is not None:
                callback(rows[-1])
    return W, rows

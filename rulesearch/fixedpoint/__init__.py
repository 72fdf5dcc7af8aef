"""Recurrent networks learned at their fixed points (Zhu & Rosenbaum 2024): the preconditioned-gradient rules
dW1 / dW3 / dW4 and their family (:mod:`.rules`), training with compiled rules averaged over a batch (:mod:`.train`).
The network and its solver are :class:`rulesearch.networks.FixedPointNetwork`."""

from .rules import (
    FACTORS,
    FIXED_POINT_RULES,
    TRANSPOSE,
    apply_factors,
    dW1,
    dW3,
    dW4,
    preconditioned,
    preconditioned_vectors,
)
from .train import StepRecord, fixed_point_step, heldout_metrics, train_fixed_point

__all__ = [
    "FACTORS",
    "FIXED_POINT_RULES",
    "TRANSPOSE",
    "apply_factors",
    "dW1",
    "dW3",
    "dW4",
    "preconditioned",
    "preconditioned_vectors",
    "StepRecord",
    "heldout_metrics",
    "fixed_point_step",
    "train_fixed_point",
]

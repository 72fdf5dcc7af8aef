"""Symbolic distillation: learned updates to compact formulas, verified in the loop."""

from .base import Candidate, DistillBackend, DistillDataError, evaluate, expr_complexity, formula_to_rule
from .sparse import SparseBackend

__all__ = [
    "Candidate",
    "DistillBackend",
    "DistillDataError",
    "SparseBackend",
    "evaluate",
    "expr_complexity",
    "formula_to_rule",
]

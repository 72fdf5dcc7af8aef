"""Symbolic distillation: learned updates to compact formulas, verified in the loop."""

from .base import (
    BACKENDS,
    Candidate,
    DistillBackend,
    DistillDataError,
    clean_formula,
    evaluate,
    expr_complexity,
    formula_to_rule,
    get_backend,
)
from .operon import OperonBackend
from .pysr import PySRBackend, pysr_status
from .sparse import SparseBackend

__all__ = [
    "BACKENDS",
    "Candidate",
    "DistillBackend",
    "DistillDataError",
    "OperonBackend",
    "PySRBackend",
    "SparseBackend",
    "clean_formula",
    "evaluate",
    "expr_complexity",
    "formula_to_rule",
    "get_backend",
    "pysr_status",
]

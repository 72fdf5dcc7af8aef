"""Symbolic distillation: learned updates to compact formulas, verified in the loop."""

from .base import (
    BACKENDS,
    Candidate,
    DistillBackend,
    DistillDataError,
    clean_formula,
    evaluate_expr,
    expr_complexity,
    formula_to_rule,
    get_backend,
)
from .operon import OperonBackend
from .pipeline import DistillResult, distill, distill_run, distill_update
from .pysr import PySRBackend, pysr_status
from .samples import collect_samples, load_samples, save_samples
from .sparse import SparseBackend

__all__ = [
    "BACKENDS",
    "Candidate",
    "DistillBackend",
    "DistillDataError",
    "DistillResult",
    "OperonBackend",
    "PySRBackend",
    "SparseBackend",
    "clean_formula",
    "collect_samples",
    "distill",
    "distill_run",
    "distill_update",
    "evaluate_expr",
    "expr_complexity",
    "formula_to_rule",
    "get_backend",
    "load_samples",
    "pysr_status",
    "save_samples",
]

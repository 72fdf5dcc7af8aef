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
from .pipeline import DistillResult, Progress, distill, distill_run, distill_update, library_for
from .pysr import PySRBackend, pysr_status
from .recovery import FunctionUpdate, add_noise, is_recovered, reduce_identities, same_terms
from .samples import collect_samples, load_samples, save_samples
from .sparse import SparseBackend

__all__ = [
    "BACKENDS",
    "Candidate",
    "DistillBackend",
    "DistillDataError",
    "DistillResult",
    "FunctionUpdate",
    "OperonBackend",
    "Progress",
    "PySRBackend",
    "SparseBackend",
    "add_noise",
    "clean_formula",
    "collect_samples",
    "distill",
    "distill_run",
    "distill_update",
    "evaluate_expr",
    "expr_complexity",
    "formula_to_rule",
    "get_backend",
    "is_recovered",
    "library_for",
    "load_samples",
    "pysr_status",
    "reduce_identities",
    "same_terms",
    "save_samples",
]

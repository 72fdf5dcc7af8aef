"""Symbolic distillation: learned updates to compact formulas, verified in the loop.

The backends (numpy, SymPy) are imported with the package, so that they are registered in :data:`BACKENDS`; the
sampling and the pipeline (torch, pandas) are imported when first used, which keeps the command line quick.
"""

from .._lazy import lazy_exports
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
from .pysr import PySRBackend, pysr_status
from .sparse import SparseBackend

_LAZY = {
    **dict.fromkeys(
        ("DistillResult", "Progress", "distill", "distill_run", "distill_update", "library_for"), "pipeline"
    ),
    **dict.fromkeys(("FunctionUpdate", "add_noise", "is_recovered", "reduce_identities", "same_terms"), "recovery"),
    **dict.fromkeys(("collect_samples", "load_samples", "save_samples"), "samples"),
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


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

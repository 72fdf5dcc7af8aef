"""Symbolic distillation: learned updates to compact formulas, verified in the loop.

Every name is imported when first used, which keeps the command line quick (its ``distill`` verb lives in
:mod:`.cli`): the backends (numpy, SymPy) register themselves in :data:`BACKENDS` as their modules are imported,
which reading ``BACKENDS``, a backend class or :func:`get_backend` does; the sampling and the pipeline (torch,
pandas) are imported with their names.
"""

from .._lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(
        ("BACKENDS", "Candidate", "DistillBackend", "DistillDataError", "clean_formula", "evaluate_expr",
         "expr_complexity", "formula_to_rule", "get_backend"), "base"
    ),
    "OperonBackend": "operon", "PySRBackend": "pysr", "pysr_status": "pysr", "SparseBackend": "sparse",
    **dict.fromkeys(
        ("DistillResult", "Progress", "distill", "distill_run", "distill_update", "library_for"), "pipeline"
    ),
    **dict.fromkeys(("FunctionUpdate", "add_noise", "is_recovered", "reduce_identities", "same_terms"), "recovery"),
    **dict.fromkeys(("collect_samples", "load_samples", "save_samples"), "samples"),
}  # fmt: skip


_getattr, __dir__ = lazy_exports(__name__, globals(), _LAZY)


def __getattr__(name: str):
    if name == "BACKENDS":  # the registry fills as the backends' modules are imported
        from .base import builtin_backends

        builtin_backends()
    return _getattr(name)


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

"""Compile rules to batched, differentiable torch updates.

:func:`compile_rule` turns a :class:`~rulesearch.lang.rule.Rule` into a :class:`CompiledRule`, a function
``update(signals, params) -> dW`` built on a :class:`TorchCompiler` tape (:class:`RuleModule` wraps one as a
``torch.nn.Module`` with trainable coefficients; :meth:`CompiledRule.bind` gives a :class:`BoundRule`, validated
once for an online loop's steps). :func:`low_rank_of` gives the factored form
``dW = a W + U V^T`` of a compiled rule (a :class:`LowRank`, whose per-step :class:`Factors` the inner loop's fast
path and its hand-written adjoint use; the weights enter its tape as a :class:`WeightRef`), or the reason the rule
has no such form (:class:`NotLowRank`). :func:`rule_c` writes an elementwise rule's update as a C function
(:class:`CRule`), for kernels that fuse it into a loop (the reservoir's native backend).
"""

from .ccode import CRule, rule_c
from .compiler import BoundRule, CompiledRule, RuleModule, TorchCompiler, compile_rule
from .lowrank import Factors, LowRank, NotLowRank, WeightRef, low_rank_of

__all__ = [
    "compile_rule",
    "CompiledRule",
    "BoundRule",
    "RuleModule",
    "TorchCompiler",
    "low_rank_of",
    "LowRank",
    "Factors",
    "WeightRef",
    "NotLowRank",
    "rule_c",
    "CRule",
]

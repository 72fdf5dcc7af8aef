"""Credit assignment beyond a feedback pathway: predictive coding (Exact, FixedPred, Strict) for any
``torch.nn.Sequential`` and, as a network of the rule language, :class:`PCNetwork`."""

from .network import INFERENCES, PCNetwork
from .predictive_coding import METHODS, PCResult, energy, fixedpred_errors, predictive_coding, strict_relax

__all__ = [
    "INFERENCES",
    "PCNetwork",
    "METHODS",
    "PCResult",
    "energy",
    "fixedpred_errors",
    "predictive_coding",
    "strict_relax",
]

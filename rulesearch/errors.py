"""Exceptions raised by rulesearch.

Every message says what was received, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "RuleSearchError",
    "InvalidRuleError",
    "UnsupportedNodeError",
    "SignalError",
    "ShapeError",
    "ConfigError",
    "DatasetError",
    "DivergenceError",
    "BackendUnavailableError",
    "NotFittedError",
    "RunDirectoryError",
    "StorageError",
]


class RuleSearchError(Exception):
    """Base class of every rulesearch error."""


class InvalidRuleError(RuleSearchError, ValueError):
    """A rule, term or signal expression is malformed or ill-typed."""


class UnsupportedNodeError(RuleSearchError, NotImplementedError):
    """A SymPy node has no torch/LaTeX/JSON translation."""


class SignalError(RuleSearchError, KeyError):
    """A signal needed at call time is missing, unknown or unavailable in this setting."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeError(RuleSearchError, ValueError):
    """A tensor has the wrong shape, dtype or device."""


class ConfigError(RuleSearchError, ValueError):
    """A configuration key or value is unknown or out of range."""


class DatasetError(RuleSearchError, FileNotFoundError):
    """A dataset is missing, malformed or too small for the requested tasks."""


class DivergenceError(RuleSearchError, FloatingPointError):
    """Weights or errors became non-finite or exceeded the divergence bound."""


class BackendUnavailableError(RuleSearchError, ImportError):
    """An optional backend (pyoperon, PySR/Julia, CUDA, ...) is not installed or cannot run."""


class NotFittedError(RuleSearchError, AttributeError):
    """An estimator was used before ``fit``."""


class RunDirectoryError(RuleSearchError, OSError):
    """A run directory is missing, incomplete, or would be overwritten."""


class StorageError(RunDirectoryError):
    """A write failed for lack of room or permission (disk full, quota exceeded, read-only file system)."""

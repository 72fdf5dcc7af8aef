r"""The meta-objective: what the outer loop minimizes over the adapted networks of a meta-step.

An :class:`Objective` maps the :class:`~rulesearch.inner.InnerResult` of ``B`` episodes (and their batch) to a
differentiable per-episode loss ``(B,)``; the trainer averages it over the meta-batch and adds the L1 term,

.. math::

    \mathcal{L}_{meta}(\theta) = \frac{1}{B} \sum_k \mathrm{objective}_k(\theta) + \lambda \lVert\theta\rVert_1 .

The default, :class:`QueryLoss`, is the paper's (Shervani-Tabar & Rosenbaum 2023, Eq. 6): the mean query loss of the
adapted network. Anything differentiable in the result works, e.g. the final weights (``result.weights``) or the
per-step training loss (``result.train_loss`` when the trainer records curves).

How to add an objective: subclass :class:`Objective` and pass an instance as ``RuleSearch(objective=...)`` (or
``Trainer(problem, objective=...)``); ``tests/test_contracts.py`` adds a weight-decay-penalized objective this way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

__all__ = ["Objective", "QueryLoss"]


class Objective(ABC):
    """A meta-objective (see the module docstring)."""

    name: str = "objective"
    """The objective's name in reports."""

    @abstractmethod
    def __call__(self, result, batch) -> Tensor:
        """Per-episode meta-loss ``(B,)`` of the adapted networks in ``result`` (differentiable in the rule's
        parameters); ``batch`` is the episodes' batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class QueryLoss(Objective):
    """The mean loss of the adapted network on each episode's query samples (the paper's meta-loss)."""

    name = "query_loss"

    def __call__(self, result, batch) -> Tensor:
        return result.loss

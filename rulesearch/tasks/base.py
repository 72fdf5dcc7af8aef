r"""The task contract: episodes that a network learns online, each a pure function of ``(seed, t, k)``.

An episode is one inner-loop run: ``N`` training steps presented in order (one sample per step, batch size 1), then a
query set that scores the adapted network. A :class:`Task` draws ``B`` episodes at once as an
:class:`~rulesearch.tasks.episodes.EpisodeBatch`-like object with

========== ============================ ==============================================================
x_train    (B, N, n_in) float           the inputs of the ``N`` online steps, in presentation order
y_train    (B, N) int64 or (B, N, n_out) class labels, or float targets (a trajectory, a regression)
x_query    (B, Nq, n_in) float          held-out inputs scored after adaptation
y_query    (B, Nq) or (B, Nq, n_out)    their labels or targets
seed, t    int                          the run seed and meta-step of the episodes
ks         tuple of int                 the episode index ``k`` of every row
========== ============================ ==============================================================

Row ``b`` must depend on ``(seed, t, ks[b])`` only (draw it from
:func:`~rulesearch.tasks.episodes.episode_generator`), so that batching, resuming and data-parallel sharding see the
same episodes. Today's implementation is the M-way K-shot Q-query :class:`~rulesearch.tasks.episodes.TaskSampler`;
a sequence or trajectory task returns float targets per step (the network then needs an MSE-like loss).

How to add a task: subclass :class:`Task`, give ``n_inputs``, ``n_outputs`` and ``sample`` (``tests/test_contracts.py``
adds a linear-teacher regression task this way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["Task"]


class Task(ABC):
    """Episodes for the inner loop (see the module docstring)."""

    @property
    @abstractmethod
    def n_inputs(self) -> int:
        """Input width ``n_in`` of every sample."""

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Output width ``n_out`` the network needs (classes, or the target dimension)."""

    @abstractmethod
    def sample(self, seed: int, t: int, ks: int | Sequence[int]):
        """The episodes ``(seed, t, k)`` for ``k`` in ``ks`` (an int ``n`` means ``range(n)``) as one batch."""

r"""The network contract: what the inner loop asks of a network whose plastic weights a rule updates.

A network is a frozen value (its configuration). Its per-episode state is plain tensors with a leading episode
dimension ``B``: ``L`` weight matrices ``(B, n_post, n_pre)`` and the stored feedback matrices (any shapes, possibly
none). One online step of :func:`rulesearch.inner.run_episodes` asks the network, in this order, for

1. :meth:`~LayeredNetwork.forward`: activities ``y_0 = x, ..., y_L`` and pre-activations,
2. :meth:`~LayeredNetwork.loss_per_sample` (only when a signal needs it),
3. :meth:`~LayeredNetwork.feedback_matrices` and :meth:`~LayeredNetwork.propagate`: the errors
   :math:`e_l` through the network's feedback pathway, only as deep as :meth:`~LayeredNetwork.error_layers` says,

and builds each layer's signals from them: ``pre = y_l``, ``post = y_{l+1}``, ``err = e_{l+1}``, ``pre_err = e_l``,
``w = W_l``, ``fb`` the layer's feedback matrix in W's layout. The loop never looks inside a network; autograd
differentiates through these calls. A network that also implements the fast path's hand-written VJP
(:class:`AdjointNetwork`) gets the in-place loop and adjoint of compiled low-rank rules.

How to add a network: subclass :class:`LayeredNetwork` (a frozen dataclass is easiest), implement the abstract
methods, and pass it to :func:`~rulesearch.inner.run_episodes` (``tests/test_contracts.py`` adds a 2-layer linear
network this way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..errors import ShapeError

__all__ = ["Activity", "LayeredNetwork", "AdjointNetwork", "StepTrace"]


class Activity(NamedTuple):
    """A forward pass: activities ``ys = [y_0 = x, y_1, ..., y_L]`` and pre-activations ``zs = [None, z_1, ...,
    z_L]`` (``zs[l]`` may be ``ys[l]`` itself for a linear layer), each ``(B, n_l)`` or ``(B, N, n_l)``."""

    ys: list
    zs: list


class LayeredNetwork(ABC):
    """The contract of a network for the inner loop (see the module docstring).

    Subclasses provide the sizes (:attr:`sizes`), per-episode initialization, the forward pass, the per-sample loss,
    the output targets and the error pathway. Everything is batched over episodes and pure: tensors in, tensors out.
    """

    sizes: tuple[int, ...]
    """Layer widths ``(n_0, ..., n_L)``."""

    # ---- shapes ------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of weight layers ``L``."""
        return len(self.sizes) - 1

    @property
    def n_in(self) -> int:
        return self.sizes[0]

    @property
    def n_out(self) -> int:
        return self.sizes[-1]

    @property
    def weight_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(n_post, n_pre)`` of every weight layer."""
        return tuple((self.sizes[i + 1], self.sizes[i]) for i in range(self.n_layers))

    @property
    def feedback_shapes(self) -> tuple[tuple[int, int], ...]:
        """Shapes (without ``B``) of the stored feedback matrices; empty when the network stores none."""
        return ()

    @property
    def plastic_feedback(self) -> bool:
        """Whether a feedback rule updates the stored feedback matrices (then they have W's layout)."""
        return False

    # ---- state -------------------------------------------------------------------------------------------
    @abstractmethod
    def init_episodes(self, seed: int, t: int, ks: Sequence[int], dtype=torch.float32, device=None):
        """Fresh ``(weights, feedback)`` lists for the episodes ``(seed, t, k)``, ``k in ks`` (``B = len(ks)``), each
        episode drawn from its own generator (:func:`rulesearch.tasks.episode_generator`) so that it is the same
        alone or in a batch."""

    def check_weights(self, weights: Sequence[Tensor]) -> int:
        """Validate the weights' shapes; returns ``B``. Raises :class:`~rulesearch.errors.ShapeError`."""
        if not isinstance(weights, (list, tuple)) or len(weights) != self.n_layers:
            got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ShapeError(f"weights must be a list of {self.n_layers} tensors (one per layer); received {got}.")
        b = weights[0].shape[0] if weights[0].dim() == 3 else None
        for i, (w, shape) in enumerate(zip(weights, self.weight_shapes)):
            if w.dim() != 3 or tuple(w.shape[1:]) != shape or w.shape[0] != b:
                raise ShapeError(
                    f"weights[{i}] has shape {tuple(w.shape)}; expected (B, n_post, n_pre) = ({b}, {shape[0]}, "
                    f"{shape[1]}) for sizes {self.sizes}."
                )
        return int(b)

    def check_feedback(self, feedback: Sequence[Tensor], b: int) -> None:
        """Validate the stored feedback's shapes for ``B = b`` episodes."""
        shapes = self.feedback_shapes
        if not isinstance(feedback, (list, tuple)) or len(feedback) != len(shapes):
            got = len(feedback) if isinstance(feedback, (list, tuple)) else type(feedback).__name__
            raise ShapeError(
                f"feedback must be a list of {len(shapes)} tensors{self.feedback_context}; received {got}. Draw it "
                f"with init_episodes (a network that stores none takes [])."
            )
        for i, (f, shape) in enumerate(zip(feedback, shapes)):
            if f.dim() != 3 or tuple(f.shape) != (b, *shape):
                raise ShapeError(
                    f"feedback[{i}] has shape {tuple(f.shape)}; expected {(b, *shape)}{self.feedback_context}."
                )

    @property
    def feedback_context(self) -> str:
        """What the stored feedback is, for error messages (e.g. ``" for feedback mode 'fa'"``)."""
        return ""

    @abstractmethod
    def targets(self, y: Tensor, dtype: torch.dtype, batch_shape: tuple[int, ...] | None = None) -> Tensor:
        """Output targets ``batch_shape + (n_out,)`` from labels or float targets (validated)."""

    # ---- one step ----------------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, weights: Sequence[Tensor], x: Tensor) -> Activity:
        """The forward pass of ``x`` ``(B, n_in)`` or ``(B, N, n_in)``."""

    @abstractmethod
    def loss_per_sample(self, act: Activity, target: Tensor) -> Tensor:
        """The loss of every sample, shape ``x.shape[:-1]``; its gradient w.r.t. ``z_L`` is ``e_L = y_L - target``."""

    def output_error(self, act: Activity, target: Tensor) -> Tensor:
        """``e_L = y_L - target``."""
        return act.ys[-1] - target

    def error_layers(self, wanted: set[int]) -> tuple[int, ...]:
        """The error indices ``l < L`` to compute, in the order :meth:`propagate` takes them, so that every index in
        ``wanted`` is available (default: the chain ``L-1, ..., min(wanted)``)."""
        below = [j for j in wanted if j < self.n_layers]
        return tuple(range(self.n_layers - 1, min(below) - 1, -1)) if below else ()

    @abstractmethod
    def feedback_matrices(self, weights, feedback, layers: Sequence[int]) -> list[Tensor | None]:
        """Per layer, the matrix that carries the error into the layer's input (``fb`` in W's layout, the signal of
        that name) for the listed layers; None elsewhere."""

    @abstractmethod
    def propagate(self, act: Activity, e_out: Tensor, mats, layers: Sequence[int]) -> list[Tensor | None]:
        """Errors ``[e_0, ..., e_L]`` (``e_L = e_out``) for the indices in ``layers``; None elsewhere."""

    def check_needs(self, needs: Sequence[frozenset]) -> None:
        """Refuse base signals (per layer ``needs[l]``) that this network cannot provide, with a
        :class:`~rulesearch.errors.SignalError` that says what to use instead (default: all are provided)."""
        return None

    # ---- after adaptation --------------------------------------------------------------------------------
    def diagnostics(self, weights, feedback, act: Activity, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(angles, angles_per_sample, ew)`` of the adapted network on the query samples ``(B, N, n_in)``:
        ``(B, k)`` tensors, possibly empty (the default)."""
        empty = act.ys[-1].new_zeros((act.ys[-1].shape[0], 0))
        return empty, empty, empty


@dataclass(eq=False)
class StepTrace:
    """One online step as the fast path keeps it for its adjoint: activities ``ys``, pre-activations ``zs``, errors
    ``es = [e_0, ..., e_L]`` (None where not computed), the per-sample ``loss`` (None unless asked for) and whatever
    else the network's :meth:`~AdjointNetwork.step_vjp` needs (``saved``, the network's own)."""

    ys: list
    zs: list
    es: list
    loss: Tensor | None
    saved: dict = field(default_factory=dict)


class AdjointNetwork(LayeredNetwork):
    """A network with the hand-written VJP of its step, which the fast path of compiled low-rank rules needs
    (in-place online steps and the adjoint of :mod:`rulesearch.inner.adjoint`). The fast path runs without
    autograd: the step is traced (:meth:`trace_step`), the rule's graph starts at the trace's tensors, and the
    gradients that reach them are carried back by :meth:`step_vjp`."""

    @abstractmethod
    def trace_step(
        self, weights, feedback, x: Tensor, target: Tensor, err_layers: Sequence[int], need_loss: bool
    ) -> StepTrace:
        """The step's forward pass of ``x`` ``(B, n_in)``, its loss (if ``need_loss``) and its errors at the indices
        ``err_layers`` (:meth:`error_layers`), without autograd."""

    @abstractmethod
    def step_vjp(self, trace: StepTrace, weights, feedback, target: Tensor, sinks) -> None:
        """Carry the gradients of a traced step's tensors (their ``.grad``: activities, pre-activations, errors,
        loss) back through its errors and forward pass, by hand.

        ``weights`` are the step's weights as objects with ``vecmat(g, transpose)`` (``g^T W``, or ``g^T W^T``) and
        ``dense()`` (the tensor). Every product with a weight matrix sends its weight gradient to ``sinks[l]`` (a
        list per layer) as a :class:`~rulesearch.batched.RankOne` ``(p, q, o1, o2)``: the factor ``p q^T`` of
        ``dL/dW_l`` and two vectors whose dot product is ``p^T W_l q``.
        """

    def fb_source(self, layer: int) -> Literal["weight", "stored"] | None:
        """Where the fast path reads a layer's ``fb`` signal: the weight itself (``"weight"``), the stored feedback
        matrix of that layer (``"stored"``, a constant), or nowhere (None: such rules take the autograd path)."""
        return None

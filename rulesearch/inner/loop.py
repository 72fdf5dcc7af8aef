"""The one online inner loop: pure, batched over episodes, differentiable w.r.t. the rule's parameters.

:func:`run_episodes` adapts ``B`` networks in parallel (one per episode), one training sample per step per
episode, and then scores them on their query sets. Every step does

1. a forward pass (one bmm per layer),
2. the errors through the network's feedback pathway (one bmm per layer; only as deep as some update needs:
   ``e_0`` is computed only when a first-layer update reads ``pre_err``),
3. the derived (stateful) signals of each update, in declaration order,
4. ``dW_l = update_l(signals_l, params_l)`` for all layers from the same forward/backward pass, then
   ``W_l <- W_l + dW_l`` (and ``fb_l <- fb_l + dfb_l`` under ``feedback="plastic"``).

Nothing is modified in place: each step makes new tensors, so the query loss is differentiable w.r.t.
``params`` (and ``feedback_params``) by plain autograd through the unrolled loop.

The update protocol
-------------------
An *update object* exposes ``needs`` (a frozenset of base signal names, a subset of :data:`SIGNALS`), an
optional ``states`` tuple of state specs (``.name``, ``.role``, ``.init(signals)``, ``.step(prev, signals)``)
and ``__call__(signals, params) -> dW`` of shape ``(B, n_post, n_pre)``. For the layer with weights ``W``
``(B, n_post, n_pre)`` the signals are

========== ======================= =================================================================
name       shape                   meaning
========== ======================= =================================================================
pre        (B, n_pre)              ``y_{l-1}`` (the input ``x`` for the first layer)
post       (B, n_post)             ``y_l`` (softmax output for the last layer under CE)
err        (B, n_post)             ``e_l``
pre_err    (B, n_pre)              ``e_{l-1}`` (``e_0`` for the first layer)
w          (B, n_post, n_pre)      the current weights
fb         (B, n_post, n_pre)      the feedback matrix in W's layout (``W`` itself under bp; not under dfa)
reward     (B,)                    1.0 if the training sample is classified correctly (or ``-loss``)
loss       (B,)                    the training sample's loss
mod        (B,)                    a global modulator: ``reward`` or ``modulator(step, reward, loss)``
========== ======================= =================================================================

Examples
--------
>>> import torch
>>> from types import SimpleNamespace
>>> from rulesearch.networks import Network
>>> net = Network(sizes=(6, 5, 3), feedback="fa")
>>> g = torch.Generator().manual_seed(0)
>>> batch = SimpleNamespace(
...     x_train=torch.rand(2, 8, 6, generator=g), y_train=torch.randint(3, (2, 8), generator=g),
...     x_query=torch.rand(2, 4, 6, generator=g), y_query=torch.randint(3, (2, 4), generator=g))
>>> theta = torch.tensor(0.1, requires_grad=True)
>>> res = run_episodes(net, batch, f0, theta, seed=0)
>>> res.loss.shape, res.angles.shape, res.ew.shape
(torch.Size([2]), torch.Size([2, 1]), torch.Size([2, 2]))
>>> res.loss.sum().backward(); bool(theta.grad != 0)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..networks.base import AdjointNetwork, LayeredNetwork
from .adjoint import _SNAPSHOT_EVERY, _Adjoint, _fast_layers, _fast_params, _FastRun
from .native import NATIVE_G, NATIVE_U, NATIVE_V, native_ready, native_reason, run_native
from .plan import _make_plan
from .step import _run_checkpointed, _step, _Tracker

__all__ = ["InnerResult", "run_episodes", "METHODS"]

METHODS = ("auto", "adjoint", "autograd", "native")
"""How :func:`run_episodes` runs the steps and computes the meta-gradient (its ``method``)."""


@dataclass(frozen=True, eq=False)
class InnerResult:
    """What :func:`run_episodes` returns (``B`` episodes, ``L`` layers, ``N`` training steps).

    Attributes
    ----------
    loss : Tensor, shape (B,)
        Mean query loss after adaptation (differentiable w.r.t. the rule parameters).
    accuracy : Tensor, shape (B,)
        Query accuracy (argmax over all output units vs. raw labels; NaN for float MSE targets).
    angles : Tensor, shape (B, L-1)
        Alignment angles (degrees) of the hidden errors ``e_1..e_{L-1}``: angle between the query-means of
        the feedback-pathway and backprop errors (the paper's definition). Empty when ``metrics=False``.
    angles_per_sample : Tensor, shape (B, L-1)
        Mean over query samples of the per-sample angles.
    ew : Tensor, shape (B, L)
        Weight orthonormality ``E_W = ||z_l - W W^T y_l||^2`` per layer, averaged over query samples.
    weights, feedback : list of Tensor
        The final weights ``(B, n_post, n_pre)`` and stored feedback (see :mod:`rulesearch.networks.feedforward`).
    states : list of dict
        The final derived-signal states per layer (forward and feedback updates).
    diverged : BoolTensor, shape (B,)
        Whether weights/feedback exceeded ``divergence_bound`` or weights/errors became non-finite (all False
        unless ``raise_on_divergence=False``: by default the first divergence raises).
    diverged_step, diverged_layer : LongTensor, shape (B,)
        The check step (0-based, a multiple of ``check_every`` minus one, or the last step) and weight layer
        (0-based; ``e_0`` counts as layer 0) where divergence was first seen; ``-1`` if none.
    train_loss, train_accuracy : Tensor, shape (B, N), optional
        Per-step loss and correctness of the current training sample (before its update); ``curves=True``.
    method : str
        The path the steps took: ``"native"`` (the C kernel), ``"adjoint"`` (the torch fast path) or ``"autograd"``
        (what ``method="auto"`` resolved to).
    """

    loss: Tensor
    accuracy: Tensor
    angles: Tensor
    angles_per_sample: Tensor
    ew: Tensor
    weights: list[Tensor]
    feedback: list[Tensor]
    states: list[dict[str, Tensor]]
    diverged: Tensor
    diverged_step: Tensor
    diverged_layer: Tensor
    train_loss: Tensor | None = None
    train_accuracy: Tensor | None = None
    method: str = ""

    @property
    def n_episodes(self) -> int:
        return int(self.loss.shape[0])

    @classmethod
    def cat(cls, results: Sequence[InnerResult]) -> InnerResult:
        """The results of groups of episodes as one result (every per-episode field concatenated along ``B``, in
        order): what one call on all the episodes gives, up to rounding."""
        if len(results) == 1:
            return results[0]

        def cat(field):
            parts = [getattr(r, field) for r in results]
            return None if parts[0] is None else torch.cat(parts)

        def layers(field):
            return [torch.cat(ts) for ts in zip(*(getattr(r, field) for r in results))]

        states = [
            {k: torch.cat([r.states[i][k] for r in results]) for k in st} for i, st in enumerate(results[0].states)
        ]
        plain = ("loss", "accuracy", "angles", "angles_per_sample", "ew", "diverged", "diverged_step", "diverged_layer",
                 "train_loss", "train_accuracy")  # fmt: skip
        return cls(**{f: cat(f) for f in plain}, weights=layers("weights"), feedback=layers("feedback"), states=states,
                   method=results[0].method)  # fmt: skip


# ---- the loop ----------------------------------------------------------------------------------------------


def _unpack(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
        return tuple(batch)
    try:
        return batch.x_train, batch.y_train, batch.x_query, batch.y_query
    except AttributeError as err:
        raise ConfigError(
            f"batch must have attributes x_train (B, N, n_in), y_train, x_query (B, Nq, n_in), y_query (an "
            f"EpisodeBatch) or be a 4-tuple of them; received {type(batch).__name__}."
        ) from err


def _check_x(net, x, name, b=None, allow_empty=False):
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != net.n_in or (b is not None and x.shape[0] != b):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ShapeError(
            f"{name} has shape {shape}; expected (B, N, n_in) with n_in = {net.n_in} "
            f"(sizes[0] of {tuple(net.sizes)})" + (f" and B = {b}" if b is not None else "") + "."
        )
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor; received dtype {x.dtype}.")
    if x.shape[1] < 1 and not allow_empty:
        raise ShapeError(f"{name} holds no samples (shape {tuple(x.shape)}).")


def run_episodes(
    net: LayeredNetwork,
    batch,
    update,
    params,
    weights: Sequence[Tensor] | None = None,
    feedback: Sequence[Tensor] | None = None,
    *,
    seed: int | None = None,
    t: int | None = None,
    ks: Sequence[int] | None = None,
    feedback_update=None,
    feedback_params=None,
    observe: Callable | None = None,
    reward: str = "correct",
    modulator: Callable | None = None,
    divergence_bound: float = 1e3,
    check_every: int = 25,
    curves: bool = False,
    metrics: bool = True,
    raise_on_divergence: bool = True,
    method: str = "auto",
    checkpoint_every: int | None = None,
) -> InnerResult:
    """Adapt ``B`` networks online with ``update`` on their training samples, then score them on queries.

    .. math::

        W_l \\leftarrow W_l + \\Delta W_l, \\qquad
        \\Delta W_l = \\mathrm{update}_l(\\mathrm{signals}_l, \\theta_l),

    for every training sample in order (batch size 1 per episode), all layers from the same forward/backward
    pass; then the query loss (mean over the ``M*Q`` query samples) is returned, differentiable w.r.t. the
    parameters.

    Parameters
    ----------
    net : LayeredNetwork
        The network (:class:`~rulesearch.networks.Network`: architecture, activation, loss and feedback mode; or
        any :class:`~rulesearch.networks.LayeredNetwork`, which takes the autograd path unless it implements the
        fast path's VJPs).
    batch : EpisodeBatch-like
        ``x_train (B, N, n_in)``, ``y_train (B, N)`` int64 labels (or float ``(B, N, n_out)`` under MSE),
        ``x_query (B, Nq, n_in)``, ``y_query (B, Nq)``; or a 4-tuple of them. ``N = M*K`` steps.
    update : update object or sequence of ``L`` update objects
        One update applied to every layer, or one per layer (see the module docstring for the protocol).
    params : object or list/tuple of ``L`` objects
        Passed as ``update(signals, params)``; a list/tuple always means one entry per layer.
    weights, feedback : list of Tensor, optional
        Initial weights ``(B, n_post, n_pre)`` and stored feedback; drawn by
        :func:`~rulesearch.networks.feedforward.init_params` from ``(seed, t, ks)`` when omitted.
    seed, t, ks : int, int, sequence of int
        Episode identities for initialization. Default: the batch's own ``seed``, ``t``, ``ks`` attributes
        (an ``EpisodeBatch`` carries them), else ``t = 0`` and ``ks = range(B)``; ``seed`` has no default.
    feedback_update, feedback_params :
        Under ``feedback="plastic"`` only: the update of the feedback matrices (``dfb`` in W's layout), called
        with the same signal dict as the forward update of the layer; e.g. :data:`kolen_pollack`.
    observe : callable, optional
        ``observe(step, layer, signals, dW)`` for every step and layer, with detached tensors under
        ``torch.no_grad`` (``signals`` also holds ``"dfb"`` under plastic feedback). An optional
        ``observe.needs`` asks for more base signals to be computed.
    reward : str
        ``"correct"`` (1.0 if the sample is classified correctly else 0.0) or ``"neg_loss"``.
    modulator : callable, optional
        ``modulator(step, reward, loss) -> (B,)``, the ``mod`` signal (default: ``mod = reward``).
    divergence_bound : float
        An episode diverges when ``max |W|`` (or ``max |fb|`` if plastic) exceeds it or weights/errors become
        non-finite; checked every ``check_every`` steps and after the last step.
    curves : bool
        Record the per-step training loss and accuracy.
    metrics : bool
        Compute alignment angles and ``E_W`` (under ``no_grad``) after adaptation.
    raise_on_divergence : bool
        Raise :class:`~rulesearch.errors.DivergenceError` naming episode, step and layer (the default, for
        standalone use). ``False`` returns the per-episode flags instead (``diverged``, ``diverged_step``,
        ``diverged_layer``): the meta-trainer, evaluation and baselines skip or count diverged episodes.
    method : str
        How the steps run and how the meta-gradient is computed (all give the same values up to rounding):
        ``"auto"`` (default) takes ``"native"`` where it applies and a C compiler builds it, else the fast path
        where it applies, else ``"autograd"``. ``"adjoint"`` (the
        fast path; a :class:`~rulesearch.errors.ConfigError` if it does not apply) needs compiled rules of the
        form ``dW = a W + U diag(c) V^T`` (every rule of the paper pool) and no derived states, observer,
        modulator or plastic feedback: the online steps then run in place (one fused ``baddbmm_`` per layer),
        and when a gradient is needed it comes from a hand-written adjoint sweep that replays the recorded
        matrix-vector products and reverses the weights in place (memory ``O(N sum(n_l))`` per episode, plus
        the snapshots below, instead of ``O(N |W|)``). ``"autograd"``: plain autograd through the unrolled
        loop (any update object). ``"native"``: the same steps and adjoint in one C kernel
        (:mod:`rulesearch.inner.native`, built with the system's C compiler on first use): feedforward
        :class:`~rulesearch.networks.Network` (fa or bp feedback) on the CPU, rules whose terms are numbers times
        ``g u v^T`` with ``u`` in ``(1, post, err)``, ``v`` in ``(1, pre, pre_err, W^T post)`` and ``g`` 1, a
        layer sum or mean, or a bilinear form (:data:`~rulesearch.inner.native.NATIVE_G`), or ``W`` (the whole
        paper pool); a :class:`~rulesearch.errors.ConfigError` names what does not fit, and
        :class:`~rulesearch.errors.BackendUnavailableError` says when there is no compiler.
    checkpoint_every : int, optional
        Bound on meta-gradient memory. Autograd path: ``torch.utils.checkpoint`` over segments of this many
        online steps (only segment boundaries are stored; each segment is recomputed once in the backward
        pass). Adjoint path: the interval of exact weight snapshots that bound the rounding drift of the
        in-place reversal (default 50).

    Returns
    -------
    InnerResult

    Raises
    ------
    ShapeError, ConfigError, SignalError
        Bad inputs (wrong input dimension, label range, unknown options, signals unavailable under the mode).
    DivergenceError
        An episode diverged (unless ``raise_on_divergence=False``).
    """
    x_train, y_train, x_query, y_query = _unpack(batch)
    _check_x(net, x_train, "x_train")
    b, n_steps = int(x_train.shape[0]), int(x_train.shape[1])
    _check_x(net, x_query, "x_query", b, allow_empty=True)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ConfigError(f"check_every must be an integer >= 1; received {check_every!r}.")
    if not divergence_bound > 0:
        raise ConfigError(f"divergence_bound must be > 0; received {divergence_bound!r}.")
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}; allowed: {', '.join(map(repr, METHODS))}.")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ConfigError(f"checkpoint_every must be an integer >= 1 or None; received {checkpoint_every!r}.")
    dtype, device = x_train.dtype, x_train.device
    if x_query.dtype != dtype:
        raise ShapeError(f"x_query has dtype {x_query.dtype} but x_train has {dtype}; use one dtype.")
    target_train = net.targets(y_train, dtype, (b, n_steps))
    target_query = net.targets(y_query, dtype, (b, int(x_query.shape[1])))
    regression = y_train.is_floating_point()
    labels_train = None if regression else y_train
    plan = _make_plan(net, update, params, feedback_update, feedback_params, observe, reward, modulator, regression)

    seed = getattr(batch, "seed", None) if seed is None else seed
    t = getattr(batch, "t", 0) if t is None else t
    ks = getattr(batch, "ks", None) if ks is None else ks
    stored = bool(net.feedback_shapes)
    if weights is None or (stored and feedback is None):
        if seed is None:
            raise ConfigError(
                "Initial weights/feedback are drawn from (seed, t, ks): pass seed= (and optionally t=, "
                "ks=), or pass weights= and feedback= explicitly."
            )
        ks = list(range(b)) if ks is None else list(ks)
        if len(ks) != b:
            raise ConfigError(f"ks has {len(ks)} episode indices but the batch has B = {b} episodes.")
        w0, f0_ = net.init_episodes(seed, t, ks, dtype=dtype, device=device)
        weights = w0 if weights is None else weights
        feedback = f0_ if feedback is None else feedback
    if net.check_weights(weights) != b:
        raise ShapeError(f"weights hold {weights[0].shape[0]} episodes but the batch has B = {b}.")
    if any(w.dtype != dtype for w in weights):
        raise ShapeError(f"weights must have the batch's dtype {dtype}; received {[w.dtype for w in weights]}.")
    feedback = list(feedback) if stored else []
    if stored:
        net.check_feedback(feedback, b)
    ws, fbs = list(weights), feedback
    tracker = _Tracker(net, b, n_steps, device, check_every, divergence_bound, curves, raise_on_divergence, ks)
    states: list[dict] = [{} for _ in range(net.n_layers)]
    lows, why = None, ""
    if method not in ("autograd", "native"):
        lows, why = (
            _fast_layers(net, plan, observe, modulator, fbs)
            if isinstance(net, AdjointNetwork)
            else (None, f"{type(net).__name__} has no hand-written step VJP (an AdjointNetwork)")
        )
    if method == "adjoint" and lows is None:
        raise ConfigError(
            f"method='adjoint' needs compiled rules of the form dW = a W + U diag(c) V^T without derived states, "
            f"observers, modulators or plastic feedback; here: {why}. Use method='auto' or 'autograd'."
        )
    if method == "native" or (method == "auto" and lows is not None):
        why_not = native_reason(net, plan, observe, modulator, fbs, x_train)
        if method == "auto" and not why_not and native_ready(dtype):  # the kernel where a compiler builds it
            method = "native"
    if method == "native":
        if why_not:
            raise ConfigError(
                f"method='native' runs feedforward Networks (fa or bp feedback) on the CPU with linear rules whose "
                f"terms are numbers times g u v^T (u in {NATIVE_U}, v in {NATIVE_V}, g in {NATIVE_G}) or W; here: "
                f"{why_not}. Use method='auto'."
            )
        ws = run_native(
            net, plan, ws, x_train, target_train, labels_train, fbs, tracker, checkpoint_every or _SNAPSHOT_EVERY
        )
    elif lows is not None:
        method = "adjoint"
        run = _FastRun(
            net, plan, lows, x_train, target_train, labels_train, fbs, reward, tracker,
            checkpoint_every or _SNAPSHOT_EVERY,
        )  # fmt: skip
        run.set_params([_fast_params(low, p, b, x_train) for low, p in zip(lows, plan.params)])
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*run.param_tensors, *ws])
        if needs_grad:
            ws = list(_Adjoint.apply(run, len(run.param_tensors), *run.param_tensors, *ws))
        else:
            with torch.no_grad():
                ws = run.forward(ws, record=False)
    elif checkpoint_every is not None and checkpoint_every < n_steps and torch.is_grad_enabled():
        method = "autograd"
        ws, fbs, states = _run_checkpointed(
            net, plan, ws, fbs, x_train, target_train, labels_train, modulator, reward, observe, tracker,
            checkpoint_every,
        )  # fmt: skip
    else:
        method = "autograd"
        for s in range(n_steps):
            label = None if labels_train is None else labels_train[:, s]
            ws, fbs, states, es, loss_s, correct_s = _step(
                net,
                plan,
                ws,
                fbs,
                states,
                x_train[:, s],
                target_train[:, s],
                label,
                s,
                modulator,
                reward,
                observe,
                curves,
            )
            tracker.after_step(s, ws, fbs, es, loss_s, correct_s)
    diverged, div_step, div_layer = tracker.diverged, tracker.div_step, tracker.div_layer
    train_loss, train_acc = tracker.train_loss, tracker.train_acc

    act = net.forward(ws, x_query)
    loss = net.loss_per_sample(act, target_query).mean(-1)
    with torch.no_grad():
        if regression:
            accuracy = torch.full((b,), float("nan"), dtype=dtype, device=device)
        else:
            accuracy = (act.ys[-1].argmax(-1) == y_query).to(dtype).mean(-1)
        if metrics:
            detached = type(act)([y.detach() for y in act.ys], [None if z is None else z.detach() for z in act.zs])
            dws = [w.detach() for w in ws]
            angles, angles_ps, ew = net.diagnostics(dws, [f.detach() for f in fbs], detached, target_query)
        else:
            angles = angles_ps = torch.empty((b, 0), dtype=dtype, device=device)
            ew = torch.empty((b, 0), dtype=dtype, device=device)
    return InnerResult(
        loss=loss,
        accuracy=accuracy,
        angles=angles,
        angles_per_sample=angles_ps,
        ew=ew,
        weights=ws,
        feedback=fbs,
        states=states,
        diverged=diverged,
        diverged_step=div_step,
        diverged_layer=div_layer,
        train_loss=torch.stack(train_loss, dim=1) if curves else None,
        train_accuracy=torch.stack(train_acc, dim=1) if curves else None,
        method=method,
    )

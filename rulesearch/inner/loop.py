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
>>> from rulesearch.networks.feedforward import Network
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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compile.compiler import _col
from ..errors import ConfigError, DivergenceError, ShapeError, SignalError
from ..networks.feedforward import (
    Network,
    _activate_backward,
    _alignment,
    _check_feedback,
    _check_weights,
    _derivative,
    _derivative_backward,
    _feedback_mats,
    _forward,
    _input_derivative,
    _orthonormality,
    _output_backward,
    _propagate,
    _sample_loss,
    _vecmat,
    init_params,
    make_targets,
)

__all__ = [
    "SIGNALS",
    "REWARDS",
    "InnerResult",
    "run_episodes",
    "F0",
    "f0",
    "KolenPollack",
    "kolen_pollack",
    "run_baseline",
    "baselines",
]

SIGNALS = frozenset({"pre", "post", "err", "pre_err", "w", "fb", "mod", "reward", "loss"})
"""The base signals an update may declare in ``needs``."""
REWARDS = ("correct", "neg_loss")


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

    @property
    def n_episodes(self) -> int:
        return int(self.loss.shape[0])


class _Signals(dict):
    """A signal dict whose missing keys raise a :class:`SignalError` that says how to get them computed."""

    __slots__ = ()

    def __missing__(self, key):
        raise SignalError(
            f"Signal {key!r} was not computed at this step (computed: {sorted(self)}). The inner loop "
            f"computes only the signals an update declares: add {key!r} to the `needs` of the update (or "
            f"observer) that reads it. Base signals: {sorted(SIGNALS)}."
        )


# ---- plan: everything decided once per run -----------------------------------------------------------------


def _per_layer(obj, n: int, name: str) -> list:
    if isinstance(obj, (list, tuple)):
        if len(obj) != n:
            raise ConfigError(
                f"{name} is a {type(obj).__name__} of length {len(obj)}; a sequence means one entry per "
                f"layer and the network has {n} layers. Pass one shared object (not wrapped in a list/tuple) "
                f"or {n} entries."
            )
        return list(obj)
    return [obj] * n


def _needs(obj, what: str) -> frozenset:
    needs = getattr(obj, "needs", None)
    if needs is None:
        raise ConfigError(
            f"{what} {obj!r} has no `needs` attribute; an update object must expose `needs` (a frozenset of "
            f"signal names from {sorted(SIGNALS)}), optionally `states`, and `__call__(signals, params)`."
        )
    needs = frozenset(needs)
    for spec in getattr(obj, "states", ()):
        needs |= frozenset(getattr(spec, "needs", ()))
    unknown = needs - SIGNALS
    if unknown:
        raise SignalError(f"{what} needs unknown signal(s) {sorted(unknown)}; base signals are {sorted(SIGNALS)}.")
    return needs


@dataclass(frozen=True)
class _Plan:
    updates: list
    params: list
    specs: list  # per layer: tuple of state specs of the forward update
    fb_updates: list | None
    fb_params: list | None
    fb_specs: list
    needs: list  # per layer: frozenset of computed base signals
    err_layers: tuple  # error indices to compute below L (descending)
    mat_layers: tuple  # layers whose feedback matrix is needed
    any_err: bool
    need_loss: bool
    need_correct: bool
    need_reward: bool
    need_mod: bool


def _make_plan(net, update, params, feedback_update, feedback_params, observe, reward, modulator, regression):
    n = net.n_layers
    updates = _per_layer(update, n, "update")
    params_l = _per_layer(params, n, "params")
    for i, u in enumerate(updates):
        if not callable(u):
            raise ConfigError(f"update for layer {i} is not callable: {u!r}.")
    needs = [_needs(u, f"update of layer {i}") for i, u in enumerate(updates)]
    specs = [tuple(getattr(u, "states", ())) for u in updates]
    fb_updates = fb_params = None
    fb_specs = [()] * n
    if net.feedback == "plastic":
        if feedback_update is None:
            raise ConfigError(
                "feedback='plastic' needs a feedback_update (and feedback_params) that returns dfb in W's "
                "layout (B, n_post, n_pre), e.g. feedback_update=kolen_pollack, "
                "feedback_params=torch.tensor([lr, decay])."
            )
        fb_updates = _per_layer(feedback_update, n, "feedback_update")
        fb_params = _per_layer(feedback_params, n, "feedback_params")
        for i, u in enumerate(fb_updates):
            if not callable(u):
                raise ConfigError(f"feedback_update for layer {i} is not callable: {u!r}.")
            needs[i] = needs[i] | _needs(u, f"feedback_update of layer {i}")
        fb_specs = [tuple(getattr(u, "states", ())) for u in fb_updates]
    elif feedback_update is not None:
        raise ConfigError(
            f"feedback_update is only used with Network(feedback='plastic'); this network has feedback="
            f"{net.feedback!r}. Drop feedback_update or use dataclasses.replace(net, feedback='plastic')."
        )
    if observe is not None:
        obs = frozenset(getattr(observe, "needs", ()))
        if obs - SIGNALS:
            raise SignalError(f"observer needs unknown signal(s) {sorted(obs - SIGNALS)}; base: {sorted(SIGNALS)}.")
        needs = [nd | obs for nd in needs]
    for i in range(n):
        names = [s.name for s in specs[i] + fb_specs[i]]
        clash = {x for x in names if names.count(x) > 1} | (set(names) & SIGNALS)
        if clash:
            raise ConfigError(
                f"layer {i}: state name(s) {sorted(clash)} repeat or shadow a base signal; give every "
                f"derived signal a unique name outside {sorted(SIGNALS)}."
            )
    if net.feedback == "dfa":
        bad = [i for i, nd in enumerate(needs) if "fb" in nd]
        if bad:
            raise SignalError(
                f"An update needs the signal 'fb' (layers {bad}) but feedback mode 'dfa' has no per-layer "
                f"feedback matrix in W's layout (D_l maps e_L directly to e_l). Use feedback='fa', 'sign' or "
                f"'plastic', or a rule without fb terms."
            )
    wanted = set()
    for i, nd in enumerate(needs):
        if "err" in nd:
            wanted.add(i + 1)
        if "pre_err" in nd:
            wanted.add(i)
    any_err = bool(wanted)
    below = sorted((j for j in wanted if j < n), reverse=True)
    if net.feedback == "dfa":
        err_layers = tuple(below)
    else:
        err_layers = tuple(range(n - 1, below[-1] - 1, -1)) if below else ()
    fb_signal = tuple(i for i, nd in enumerate(needs) if "fb" in nd)
    mat_layers = tuple(sorted(set(err_layers) | set(fb_signal)))
    if reward not in REWARDS:
        raise ConfigError(f"Unknown reward {reward!r}; allowed: {', '.join(map(repr, REWARDS))}.")
    need_mod = any("mod" in nd for nd in needs)
    need_reward = any("reward" in nd for nd in needs) or need_mod
    if need_reward and reward == "correct" and regression:
        raise ConfigError(
            "reward='correct' is undefined for float regression targets; pass reward='neg_loss' (reward = -loss)."
        )
    need_loss = any("loss" in nd for nd in needs) or (need_reward and (reward == "neg_loss" or modulator is not None))
    need_correct = need_reward and reward == "correct"
    return _Plan(
        updates,
        params_l,
        specs,
        fb_updates,
        fb_params,
        fb_specs,
        needs,
        err_layers,
        mat_layers,
        any_err,
        need_loss,
        need_correct,
        need_reward,
        need_mod,
    )


# ---- one step ----------------------------------------------------------------------------------------------


def _step(net, plan, ws, fbs, states, x, target, label, s, modulator, reward_mode, observe, curves):
    """One online step for all episodes: returns new ``(ws, fbs, states)``, the errors and curve values."""
    n = net.n_layers
    ys, zs = _forward(net, ws, x)
    y_out = ys[-1]
    loss = correct = rew = mod = None
    if plan.need_loss or curves:
        loss = _sample_loss(net, zs[-1], y_out, target)
    if plan.need_correct or curves:
        correct = (
            (y_out.argmax(-1) == label).to(y_out.dtype)
            if label is not None
            else torch.full_like(y_out[:, 0], float("nan"))
        )
    if plan.need_reward:
        rew = correct if reward_mode == "correct" else -loss
        mod = rew if modulator is None else modulator(s, rew, loss)
    mats = _feedback_mats(net, ws, fbs, plan.mat_layers)
    if plan.any_err:
        es = _propagate(net, ys, zs, y_out - target, mats, plan.err_layers, net.feedback == "dfa")
    else:
        es = [None] * (n + 1)
    new_ws, new_fbs, new_states = [], [], []
    for i in range(n):
        nd = plan.needs[i]
        sig = _Signals()
        if "pre" in nd:
            sig["pre"] = ys[i]
        if "post" in nd:
            sig["post"] = ys[i + 1]
        if "err" in nd:
            sig["err"] = es[i + 1]
        if "pre_err" in nd:
            sig["pre_err"] = es[i]
        if "w" in nd:
            sig["w"] = ws[i]
        if "fb" in nd:
            sig["fb"] = mats[i]
        if "reward" in nd:
            sig["reward"] = rew
        if "loss" in nd:
            sig["loss"] = loss
        if "mod" in nd:
            sig["mod"] = mod
        st = {}
        prev = states[i]
        for spec in plan.specs[i] + plan.fb_specs[i]:
            old = prev.get(spec.name)
            new = spec.step(spec.init(sig) if old is None else old, sig)
            sig[spec.name] = new
            st[spec.name] = new
        new_states.append(st)
        dw = plan.updates[i](sig, plan.params[i])
        if s == 0 and (not torch.is_tensor(dw) or tuple(dw.shape) != tuple(ws[i].shape)):
            got = tuple(dw.shape) if torch.is_tensor(dw) else type(dw).__name__
            raise ShapeError(
                f"update of layer {i} returned dW of shape {got}; expected (B, n_post, n_pre) = {tuple(ws[i].shape)}."
            )
        new_ws.append(ws[i] + dw)
        dfb = None
        if plan.fb_updates is not None:
            dfb = plan.fb_updates[i](sig, plan.fb_params[i])
            if s == 0 and (not torch.is_tensor(dfb) or tuple(dfb.shape) != tuple(fbs[i].shape)):
                got = tuple(dfb.shape) if torch.is_tensor(dfb) else type(dfb).__name__
                raise ShapeError(
                    f"feedback_update of layer {i} returned dfb of shape {got}; expected W's "
                    f"layout {tuple(fbs[i].shape)}."
                )
            new_fbs.append(fbs[i] + dfb)
        if observe is not None:
            with torch.no_grad():
                seen = {k: v.detach() for k, v in sig.items()}
                if dfb is not None:
                    seen["dfb"] = dfb.detach()
                observe(s, i, seen, dw.detach())
    if plan.fb_updates is None:
        new_fbs = list(fbs)
    return new_ws, new_fbs, new_states, es, loss, correct


def _bad_layers(net, ws, fbs, es, bound) -> Tensor:
    """``(B, L)`` bool: weights/feedback beyond ``bound`` or non-finite, or errors non-finite, per layer."""
    cols = []
    for i, w in enumerate(ws):
        bad = ~(w.abs().amax(dim=(1, 2)) <= bound)
        if net.feedback == "plastic":
            bad = bad | ~(fbs[i].abs().amax(dim=(1, 2)) <= bound)
        for e in (es[i + 1], es[0] if i == 0 else None):
            if e is not None:
                bad = bad | ~torch.isfinite(e).all(-1)
        cols.append(bad)
    return torch.stack(cols, dim=1)


# ---- the fast path: low-rank compiled rules, in-place online steps, a hand-written adjoint ---------------------
#
# For compiled rules whose update is  dW = a W + U V^T  (a sum of outer products, plus an optional weight-decay
# term ``a W``; the whole paper pool), the online steps run in place (one ``baddbmm_`` per layer) and the
# meta-gradient is computed by a hand-written adjoint instead of autograd through the unrolled loop:
#
# * forward: the network's pass and errors run without autograd; the rule's tape runs under autograd from the
#   step's signal tensors (leaves), giving the distinct post and pre vectors ``[u]``, ``[v]`` and global factors
#   ``g`` of ``U V^T = [u] M [v]^T`` with ``M = g M_j`` (the ``M_j`` depend on the parameters only: once per run);
#   ``U`` and ``V`` themselves are formed without autograd (:class:`_Factors`). That small vector graph is kept
#   with the signals (a few vectors per step); exact weight snapshots are kept every ``checkpoint_every`` steps.
# * backward, step ``s = N-1 .. 0``: the weights are reversed, ``W_s = (W_{s+1} - U V^T) / (1 + a)`` (or restored
#   from a snapshot; large layers lazily, :class:`_ReverseW`); with ``G = dL/dW_{s+1}``: ``dU = G V``,
#   ``dV = G^T U``, ``da = <G, W_s>`` (large layers: ``dU``, ``dV`` of 8 steps from one pass, :class:`_SegmentG`).
#   The cotangents of ``[u]``, ``[v]``, ``g`` and ``M`` follow by hand (:meth:`_Factors.vector_cotangents`;
#   ``dL/dM_j`` summed over many steps by one bmm, :class:`_CoefGrad`); a global factor of leaves (a layer sum or
#   bilinear form of signals) by its tape instruction's hand VJP (``TorchCompiler.vjps``); autograd carries only the
#   other tape expressions' cotangents to the signals, whose gradients are carried back through the errors and the
#   forward pass by hand (:meth:`_FastRun.network_vjp`). Every product of a weight matrix with a vector (``W y``,
#   ``W^T e`` under bp, ``W^T y`` inside the rule) sends its weight gradient as a rank-1 factor, so
#   ``dL/dW_s = (1 + a) G + P Q^T`` is one more ``baddbmm_``.
# * ``da = <G, W_s>`` on large layers needs no pass over ``G`` and ``W``: with ``c = <G_{s+1}, W_{s+1}>``,
#   ``da_s = (c - <dV, V>) / (1 + a_s)`` (``dV = G^T U`` is at hand), and ``<G_s, W_s> = (1 + a_s) da_s +
#   sum_r p_r^T W_s q_r``, where each rank-1 factor's ``p^T W_s q`` is a dot product of vectors the step already
#   has (``dL/dz . z`` for ``z = W y``). It is computed exactly at the end weights and at every snapshot, so
#   rounding cannot build up.
#
# Memory: O(B (N * sum(n_l) + N / checkpoint_every * |W|)) instead of O(B N |W|) for autograd.


class _Unsupported(Exception):
    """Raised inside a rule's tape when the weight matrix is used other than by a matrix-vector product."""


class _MatRef:
    """The ``w`` signal (and ``fb`` under bp) of a compiled rule's tape on the fast path: the weights
    ``(B, n_post, n_pre)``, seen only through the products ``mv`` (``M v``) and ``vm`` (``M^T u``) that the tape's
    contractions call; any torch function on it raises :class:`_Unsupported` (such rules take the autograd path).

    While the forward sweep keeps the rule's graph (``log`` set, grad enabled), a product of a vector without a graph
    (a signal) is a leaf, logged for :meth:`backward` by hand; a product of an expression is a :class:`_Product`
    node. Both read ``M`` as reversed to the product's step by then, and send ``dL/dM`` as a rank-1 factor
    ``(post, pre)`` to ``sink``, with two vectors whose dot product is ``post^T M pre`` (for the decay's gradient).
    """

    __slots__ = ("mat", "matT", "rev", "sink", "log", "pre", "z")

    def __init__(self, mat, sink=None, log=None):
        self.sink, self.log, self.rev = sink, log, None  # rev: the adjoint's reversed weights (_ReverseW)
        self.read(mat)
        self.pre = self.z = None  # the step's input x and pre-activation z = W x (set per step)

    def read(self, mat: Tensor) -> None:
        """Read the weights ``mat`` (and their transposed view) from now on."""
        self.mat, self.matT = mat, mat.transpose(1, 2)

    def mv(self, v: Tensor) -> Tensor:
        """``M v`` for ``v`` of shape ``(B, n_pre)``; ``W x`` is the step's pre-activation ``z``, not recomputed (its
        gradient joins ``dL/dz`` in the adjoint)."""
        if v is self.pre:
            if self.log is not None and torch.is_grad_enabled() and not self.z.requires_grad:
                self.z.requires_grad_()
            return self.z
        return self._product(v, False)

    def vm(self, u: Tensor) -> Tensor:
        """``M^T u`` (= ``u^T M``) for ``u`` of shape ``(B, n_post)``."""
        return self._product(u, True)

    def _product(self, v: Tensor, transpose: bool) -> Tensor:
        if self.log is None or not torch.is_grad_enabled():
            return _vecmat(v, self.mat if transpose else self.matT)
        if v.grad_fn is not None:
            return _Product.apply(v, self, transpose)
        x = v.detach()
        out = _vecmat(x, self.mat if transpose else self.matT).requires_grad_()
        self.log.append((self, v, out, transpose))
        return out

    def backward(self, v: Tensor, out: Tensor, g: Tensor, transpose: bool, need_v: bool) -> Tensor | None:
        """Send the weight gradient of the product ``out`` of ``v`` (output gradient ``g``) to the sink; returns
        the gradient w.r.t. ``v`` if ``need_v``. Runs under no-grad (the adjoint sweep or autograd's backward)."""
        self.sink.append((v, g, out, g) if transpose else (g, v, g, out))
        if not need_v:
            return None
        return self.rev.vecmat(g, transpose)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise _Unsupported(getattr(func, "__name__", str(func)))


@dataclass(eq=False, slots=True)
class _Factors:
    """One layer's update ``dW = a W + U Vt`` of one step (fast path), with what its hand-written backward needs:
    the distinct post and pre vectors ``us``, ``vs`` (values of the rule's tape, whose graph the adjoint enters)
    and their coefficient matrix ``M`` (``(B, J, D)``), folded into ``Vt = M [v]`` (``post_side`` False) or into
    ``U = [u] M``; ``U`` and ``Vt`` themselves carry no graph."""

    a: Tensor | None
    U: Tensor | None = None
    Vt: Tensor | None = None
    us: list | None = None
    vs: list | None = None
    M: Tensor | None = None
    post_side: bool = False
    g: Tensor | None = None  # with global factors: M = g M_j, g = [1, g_1, ...] (B, n_g + 1), g_j the tape's
    gv: list | None = None
    Mj: Tensor | None = None
    gvjp: list | None = None  # per g_j: (hand vjp, its arguments) if they are leaves (see _LowRank.hand_vjps)

    @property
    def m_requires_grad(self) -> bool:
        if self.gv is None:
            return self.M.requires_grad
        return self.Mj.requires_grad or any(v.requires_grad for v in self.gv)

    def vector_cotangents(self, dUt, dV, need_x: bool, need_m: bool, MT: Tensor | None = None):
        """``(d[u], d[v], dM)`` from ``dUt = (dL/dU)^T`` and ``dV = dL/dVt`` (None where not needed; ``MT``:
        ``M^T`` if at hand): for ``Vt = M X`` (``X = [v]``), ``dX = M^T dV`` and ``dM = dV X^T``; for ``U = X M``
        (``X = [u]``), ``dX^T = M dU^T`` and ``dM = X^T dU``. ``need_x``: the folded side's vectors need theirs."""
        if self.post_side:  # U = X M
            dX = torch.bmm(self.M, dUt).unbind(1) if need_x else None
            dM = torch.bmm(torch.stack(self.us, 1), dUt.transpose(1, 2)) if need_m else None
            return dX, None if dV is None else dV.unbind(1), dM
        dX = torch.bmm(self.M.transpose(1, 2) if MT is None else MT, dV).unbind(1) if need_x else None
        dM = torch.bmm(dV, torch.stack(self.vs, -1)) if need_m else None
        return None if dUt is None else dUt.unbind(1), dX, dM

    def global_cotangents(self, dM: Tensor, coef_grad, MjT: Tensor | None) -> tuple:
        """For ``M = g M_j``: ``dg = dM M_j^T`` (the global factors' cotangents, ``(B, 1)`` columns), and
        ``g^T dM`` sent to ``coef_grad`` (``dL/dM_j``, None if not needed); ``MjT``: ``M_j^T`` of a shared
        ``M_j``."""
        dM = dM.flatten(1)
        if coef_grad is not None:
            coef_grad.add(self.g, dM)
        dg = torch.mm(dM, MjT).unsqueeze(-1) if MjT is not None else torch.bmm(self.Mj, dM.unsqueeze(-1))
        return dg.unbind(1)[1:]


class _Product(torch.autograd.Function):
    """A product ``M v`` (or ``M^T u``) of an expression ``v`` in a rule's graph; its backward (in the adjoint sweep)
    is :meth:`_MatRef.backward`."""

    @staticmethod
    def forward(ctx, v, ref, transpose):
        ctx.ref, ctx.transpose = ref, transpose
        out = _vecmat(v, ref.mat if transpose else ref.matT)
        ctx.save_for_backward(v, out)
        return out

    @staticmethod
    def backward(ctx, g):
        v, out = ctx.saved_tensors
        return ctx.ref.backward(v, out, g, ctx.transpose, ctx.needs_input_grad[0]), None, None


class _LowRank:
    """The factored form ``dW = a W + U V^T`` of one layer's compiled rule (fast path only).

    The rule's structure is analysed once: ``U V^T = U_d M V_d^T`` with the distinct post and pre vectors ``U_d``,
    ``V_d`` and their coefficient matrix ``M`` (folded into the side with more distinct vectors; on a tie, into the
    shorter one), and ``M = sum_j g_j M_j`` over the distinct global factors ``g = [1, g_1, ...]``; likewise
    ``a = sum_j g_j a_j``. The ``M_j, a_j`` depend on the parameters only: :meth:`coefficients` computes them once
    per run, and a call (:meth:`factors`) runs the tape and a handful of batched ops; no per-call validation (the
    inner loop validated shapes and parameters once per run). Raises :class:`_Unsupported` for other shapes of rules.
    """

    __slots__ = ("rule", "consts", "g_refs", "g_vjps", "E", "decay", "decay_global", "u_keys", "v_keys", "T")

    def __init__(self, rule):
        self.rule, self.consts = rule, {}
        A = rule._A  # (products, columns): which products feed which (u, v) column
        self.g_refs = list(dict.fromkeys(ref for _, ref in rule._g))  # the distinct global factors
        tape, vjps = rule._comp.tape, rule._comp.vjps  # per g_j: its instruction's hand VJP and argument slots
        self.g_vjps = [(vjps[k], tape[k][1]) if kind == "slot" and vjps[k] is not None else None
                       for kind, k in self.g_refs]  # fmt: skip
        g_of = [0] * A.shape[0]  # per product: 0 (none) or 1 + its global factor's index
        for k, ref in rule._g:
            g_of[k] = 1 + self.g_refs.index(ref)
        self.E = torch.zeros(len(self.g_refs) + 1, A.shape[0], dtype=torch.float64)  # which products g_j scales
        self.E[g_of, range(A.shape[0])] = 1.0
        self.decay = self.u_keys = self.v_keys = self.T = None
        self.decay_global = False
        for s_ref, cols, us, vs, consts in rule._groups:
            if consts is not None:  # no vectors: a W when the synapse factor is the weights (checked per call)
                if s_ref is None or self.decay is not None:
                    raise _Unsupported("a synapse factor other than the weights")
                self.decay = (s_ref, A[:, cols] @ consts)
                self.decay_global = bool((self.E[1:] @ self.decay[1]).any())
            elif s_ref is not None:
                raise _Unsupported("a synapse factor times outer products")
            else:
                self.u_keys, self.v_keys = list(dict.fromkeys(us)), list(dict.fromkeys(vs))
                T = torch.zeros(A.shape[0], len(self.u_keys), len(self.v_keys), dtype=torch.float64)
                for col, u, v in zip(cols, us, vs):
                    T[:, self.u_keys.index(u), self.v_keys.index(v)] = A[:, col]
                self.T = T.flatten(1)

    def coefficients(self, params, b: int, like: Tensor):
        """The run's constant coefficients ``(M, a)`` from ``theta`` (or ``c`` for a general rule, whose constants
        enter through the tape): ``M_j`` ``(n_g + 1, J * D)`` (per episode ``(B, n_g + 1, J * D)``) and ``a_j``
        ``(..., n_g + 1)``; without global factors ``M`` itself ``(B, J, D)``, and without a global factor of the
        decay ``a`` itself (one number or ``(B,)``). None for an absent part."""
        r, f = self.rule, {"dtype": like.dtype, "device": like.device}
        base = r._c.to(**f)  # per product: theta[r] * c
        if r._linear:
            base = params.index_select(-1, r._r_idx.to(like.device)) * base
        per = base.unsqueeze(-2) * self.E.to(**f)  # (..., n_g + 1, products)
        M = a = None
        if self.T is not None:
            M = per @ self.T.to(**f)
            if not self.g_refs:
                M = M[..., 0, :].unflatten(-1, (len(self.u_keys), len(self.v_keys))).expand(b, -1, -1)
        if self.decay is not None:
            a = per @ self.decay[1].to(**f)
            if not self.decay_global:
                a = a[..., 0]
        return M, a

    def _vec(self, ref, vals, shape, like):
        """A global ``(B,)``, post or pre value of the tape at ``shape`` (constants cached)."""
        if ref[0] != "const":
            return _col(ref, vals, shape, like)
        key = (shape, ref[1], like.dtype, like.device)
        hit = self.consts.get(key)
        if hit is None:
            hit = self.consts[key] = torch.full(shape, ref[1], dtype=like.dtype, device=like.device)
        return hit

    def hand_vjps(self, vals) -> list:
        """Per global factor ``g_j``, ``(vjp, args)`` if its instruction has a hand VJP (``TorchCompiler.vjps``) and
        its arguments are leaves of the step's graph (signals, logged products), else None (autograd carries it)."""
        out = []
        for hv in self.g_vjps:
            args = None if hv is None else [vals[k] for k in hv[1]]
            leaves = args is not None and all(torch.is_tensor(x) and x.grad_fn is None for x in args)
            out.append((hv[0], args) if leaves else None)
        return out

    def factors(self, signals, params, coef, wref, b, n_post, n_pre, like):
        """:class:`_Factors` of ``dW = a W + U Vt`` from the run's ``coef = coefficients(...)``: ``a``
        ``(B,)``/``()``/None, ``U`` ``(B, n_post, k)`` and ``Vt`` ``(B, k, n_pre)`` contiguous (or None); raises
        _Unsupported."""
        M, a = coef
        vals = self.rule._comp.run({"signals": signals, "params": params})
        if self.decay is not None and vals[self.decay[0][1]] is not wref:
            raise _Unsupported("a synapse factor other than the weights")
        f = _Factors(a)
        g = None
        if self.g_refs:
            g = [self._vec(ref, vals, (b,), like) for ref in [("const", 1.0), *self.g_refs]]
            if self.decay_global:
                f.a = torch.linalg.vecdot(torch.stack(g, -1), a)
            if torch.is_grad_enabled():
                f.gvjp = self.hand_vjps(vals)
        if M is None:
            return f
        f.us = [self._vec(u, vals, (b, n_post), like) for u in self.u_keys]
        f.vs = [self._vec(v, vals, (b, n_pre), like) for v in self.v_keys]
        J, D = len(f.us), len(f.vs)
        f.post_side = J > D or (J == D and n_pre > n_post)  # fold M into the cheaper side
        with torch.no_grad():  # the adjoint differentiates M = g M_j, U and Vt by hand (_Factors)
            if g is not None:
                f.gv, f.Mj, f.g = g[1:], M, torch.stack(g, -1)
                M = (f.g @ M if M.dim() == 2 else torch.bmm(f.g.unsqueeze(1), M).squeeze(1)).unflatten(-1, (J, D))
            f.M = M
            if f.post_side:
                f.U, f.Vt = torch.bmm(torch.stack(f.us, -1), M), torch.stack(f.vs, 1)
            else:
                f.U, f.Vt = torch.stack(f.us, -1), torch.bmm(M, torch.stack(f.vs, 1))
        return f


_ELIGIBLE: dict = {}  # id(compiled rule) -> (rule, bool, reason)


def _low_rank_of(update) -> tuple[_LowRank | None, str]:
    """The fast factored form of ``update`` if it is a compiled rule of the supported shape, else a reason."""
    from ..compile.compiler import CompiledRule

    if not isinstance(update, CompiledRule):
        return None, f"update {type(update).__name__} is not a CompiledRule"
    hit = _ELIGIBLE.get(id(update))
    if hit is not None and hit[0] is update:
        return hit[1], hit[2]
    try:
        if update.states:
            raise _Unsupported("stateful derived signals")
        for attr in ("_comp", "_groups", "_g", "_A", "_r_idx", "_c", "_linear"):
            if not hasattr(update, attr):
                raise _Unsupported(f"compiled rule without {attr}")
        lr, why = _LowRank(update), ""
        g = torch.Generator().manual_seed(0)
        b, n_post, n_pre = 2, 3, 4
        roles = {"pre": (b, n_pre), "pre_err": (b, n_pre), "post": (b, n_post), "err": (b, n_post),
                 "fb": (b, n_post, n_pre), "reward": (b,), "loss": (b,), "mod": (b,)}  # fmt: skip
        wref = _MatRef(torch.rand(b, n_post, n_pre, generator=g, dtype=torch.float64))
        sig = {k: torch.rand(shape, generator=g, dtype=torch.float64) for k, shape in roles.items()}
        sig["w"] = wref
        like = sig["pre"]
        if update._linear:
            params = torch.rand(update.n_params, generator=g, dtype=torch.float64)
        else:
            params = {n: torch.tensor(0.5, dtype=torch.float64) for n in update._const_names}
        with torch.no_grad():
            lr.factors(sig, params, lr.coefficients(params, b, like), wref, b, n_post, n_pre, like)
    except Exception as err:  # noqa: BLE001 - any failure means: use the general autograd path
        lr, why = None, f"{type(err).__name__}: {err}"
    _ELIGIBLE[id(update)] = (update, lr, why)
    return lr, why


class _Tracker:
    """Per-step bookkeeping shared by every path: curves and divergence checks."""

    def __init__(self, net, b, n_steps, device, check_every, bound, curves, raise_on_divergence, ks):
        self.net, self.n_steps, self.check_every, self.bound = net, n_steps, check_every, bound
        self.curves, self.raise_on_divergence, self.ks = curves, raise_on_divergence, ks
        self.diverged = torch.zeros(b, dtype=torch.bool, device=device)
        self.div_step = torch.full((b,), -1, dtype=torch.long, device=device)
        self.div_layer = torch.full((b,), -1, dtype=torch.long, device=device)
        self.train_loss: list = []
        self.train_acc: list = []

    def is_check(self, s: int) -> bool:
        return (s + 1) % self.check_every == 0 or s == self.n_steps - 1

    def after_step(self, s, ws, fbs, es, loss_s, correct_s) -> None:
        if self.curves:
            self.train_loss.append(loss_s.detach())
            self.train_acc.append(correct_s.detach())
        if self.is_check(s):
            with torch.no_grad():
                self.record_bad(s, _bad_layers(self.net, ws, fbs, es, self.bound))

    def record_bad(self, s, bad) -> None:
        newly = bad.any(dim=1) & ~self.diverged
        first = bad.to(torch.int8).argmax(dim=1)
        self.div_step = torch.where(newly, torch.full_like(self.div_step, s), self.div_step)
        self.div_layer = torch.where(newly, first, self.div_layer)
        self.diverged = self.diverged | newly
        if self.raise_on_divergence and bool(newly.any()):
            e = int(newly.nonzero()[0, 0])
            k = f" (k = {self.ks[e]})" if self.ks is not None else ""
            raise DivergenceError(
                f"Episode {e}{k} diverged by step {s}, layer {int(first[e])}: weights exceeded "
                f"divergence_bound = {self.bound:g} or weights/errors became non-finite. Lower the "
                f"rule's coefficients (learning rate), raise divergence_bound, or pass raise_on_divergence=False "
                f"to get per-episode flags (InnerResult.diverged) instead."
            )


def _beta(a) -> float | None:
    """``1 + a`` as a Python number when the decay ``a`` is one number on the CPU (it then fuses into
    ``baddbmm_``'s ``beta``), else None (no decay, a per-episode decay, or a GPU tensor: no host sync)."""
    if a is None or a.dim() != 0 or a.device.type != "cpu":
        return None
    return 1.0 + float(a)


def _one_plus(a: Tensor, beta: float | None):
    """``1 + a``: the Python number ``beta`` where :func:`_beta` gave one, else a tensor."""
    return beta if beta is not None else 1.0 + a


@dataclass(eq=False)
class _Trace:
    """What the forward sweep keeps of one online step for the adjoint: activities ``ys``, pre-activations ``zs``,
    errors ``es`` (those that are signals are leaves of the rule's graph), per error index the feedback product
    ``backs`` (not for ``e_0`` but under bp) and derivative ``ds`` it was made of, the sample loss, every layer's
    factors ``(a, U, Vt)`` and the rule's logged products of signals (:class:`_MatRef`)."""

    ys: list
    zs: list
    es: list
    backs: dict
    ds: dict
    loss: Tensor | None
    facs: list | None = None
    products: list = dataclasses.field(default_factory=list)


def _backward(outs: list, cots: list) -> None:
    """``torch.autograd.backward(outs, cots)`` straight into the engine: its per-pair Python validation costs more
    than a step's small backward (the pairs are built here to match)."""
    torch.autograd.Variable._execution_engine.run_backward(tuple(outs), tuple(cots), False, False, (), True, True)


def _leaf(t: Tensor | None) -> Tensor | None:
    """A contiguous leaf with ``t``'s value (and ``requires_grad``) for the step graphs to start at."""
    return None if t is None else t.detach().contiguous().requires_grad_(t.requires_grad)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where None is zero."""
    return b if a is None else a if b is None else a + b


def _dot(A: Tensor, B: Tensor) -> Tensor:
    """``<A_b, B_b>`` per episode ``b`` of two contiguous ``(B, m, n)`` tensors, by one bmm of rows (``vecdot`` makes
    an ``A * B`` temporary, a page-faulting allocation on a large layer; a column view ``(B, mn, 1)`` is slow)."""
    b = A.shape[0]
    return torch.bmm(A.view(b, 1, -1), B.view(b, 1, -1).transpose(1, 2)).view(b)


def _cat(ts: list, dim: int) -> Tensor:
    """``torch.cat(ts, dim)``, without a copy for one tensor."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _add_low_rank(T: Tensor, P: list, Q: list, c, alpha: float) -> None:
    """``T <- c (T + alpha P Q)`` in place, with ``P``, ``Q`` the lists of factors (one ``baddbmm_``)."""
    if P:
        T.baddbmm_(_cat(P, -1), _cat(Q, 1), alpha=alpha)
    if _scaled(c):
        T.mul_(_scale_of(c))


def _coef_grad_of(f: _Factors) -> tuple:
    """A layer's ``(M^T or M_j^T, _CoefGrad)`` for the sweep (either None where not needed): the run's constant
    ``M`` (no global factors) or ``M_j`` (``M = g M_j``; ``M_j^T`` only if shared by the episodes)."""
    if f.U is None:
        return None, None
    if f.gv is None:
        cg = _CoefGrad(f.M, "T" if f.post_side else "") if f.M.requires_grad else None
        return f.M.transpose(1, 2), cg
    shared = f.Mj.dim() == 2
    cg = _CoefGrad(f.Mj, "sum" if shared else "") if f.Mj.requires_grad else None
    return (f.Mj.t() if shared else None), cg


def _cotangents_needed(f: _Factors, big: bool) -> tuple:
    """Which cotangents a layer's factors ``f`` need: ``(da, dU, dV, the folded side's vectors, dM)``; ``dV``
    also for a large layer's decay (its ``<G, W>`` recursion)."""
    need_a = f.a is not None and f.a.requires_grad
    if f.U is None:
        return need_a, False, False, False, False
    u_req, v_req, m_req = any(u.requires_grad for u in f.us), any(v.requires_grad for v in f.vs), f.m_requires_grad
    if f.post_side:
        return need_a, u_req or m_req, v_req or (need_a and big), u_req, m_req
    return need_a, u_req, v_req or m_req or (need_a and big), v_req, m_req


class _CoefGrad:
    """The gradient of a coefficient leaf (the run's constant), ``sum_s A_s X_s`` over the steps by one bmm:
    ``A_s`` ``(B, k, n)``, ``X_s`` ``(B, n, m)`` or its ``m`` columns ``(B, n)``, or (``A_s`` ``(B, k)``, ``X_s``
    ``(B, m)``) per episode the outer product ``A_s^T X_s``; ``form`` "T" adds the sum transposed, "sum" summed over
    episodes. So ``dL/dM = sum_s dV_s X_s^T`` for ``Vt = M X`` (``X = [v]``), ``(sum_s dU_s^T X_s)^T`` for
    ``U = X M`` (``X = [u]``), and ``dL/dM_j = sum_s g_s^T dM_s`` for ``M = g M_j``. Steps are kept until they
    hold ``_COEF_BUFFER`` numbers, then summed into ``leaf.grad``."""

    __slots__ = ("leaf", "form", "As", "Xs", "size")

    def __init__(self, leaf: Tensor, form: str = ""):
        self.leaf, self.form, self.As, self.Xs, self.size = leaf, form, [], [], 0

    def add(self, A: Tensor, X) -> None:
        self.As.append(A)
        self.Xs.append(X)
        self.size += A.numel() + (X.numel() if torch.is_tensor(X) else A.numel() // A.shape[1] * len(X))
        if self.size >= _COEF_BUFFER:
            self.flush()

    def flush(self) -> None:
        if not self.As:
            return
        if self.As[0].dim() == 2:  # outer products: (L B, k)^T (L B, m), or per episode (B, k, L) (B, L, m)
            if self.form == "sum":
                g = torch.mm(_cat(self.As, 0).t(), _cat(self.Xs, 0))
            else:
                g = torch.bmm(torch.stack(self.As, -1), torch.stack(self.Xs, 1))
        else:  # (B, k, L n) (B, L n, m): the steps side by side
            if torch.is_tensor(self.Xs[0]):
                X = _cat(self.Xs, 1)
            else:
                X = torch.stack([_cat(list(col), -1) for col in zip(*self.Xs)], -1)
            g = torch.bmm(_cat(self.As, -1), X)
            g = g.transpose(1, 2) if self.form == "T" else g.sum(0) if self.form == "sum" else g
        self.leaf.grad = _add(self.leaf.grad, g)
        self.As, self.Xs, self.size = [], [], 0


class _ReverseW:
    """``W_s`` of one layer in the adjoint sweep, reversed step by step from ``W_N``:
    ``W_s = (W_{s+1} - U_s Vt_s) / (1 + a_s)``. With ``length`` L > 1 (large layers) lazily, as
    ``W_s = c (W_d - P Q)`` with the dense ``W_d`` updated in place once per L steps::

        c <- c / (1 + a_s),   P <- [P, U_s / c_{s+1}],   Q <- [Q, Vt_s],

    so a product ``g^T W_s = c (g^T W_d - (g^T P) Q)`` costs two small bmms instead of a pass over ``W`` per
    step to reverse it. With length 1 every step is reversed at once (one ``baddbmm_``)."""

    __slots__ = ("W", "WT", "length", "c", "P", "Q", "PQ")

    def __init__(self, W: Tensor, length: int):
        self.W, self.WT, self.length, self.c, self.P, self.Q, self.PQ = W, W.transpose(1, 2), length, 1.0, [], [], None

    def undo(self, f: _Factors, beta: float | None) -> None:
        """Reverse the step of factors ``f`` (``beta``: the run's constant ``1 + a`` or None)."""
        a, U, Vt = f.a, f.U, f.Vt
        if self.length == 1:
            if U is not None and (a is None or beta is not None):
                inv = 1.0 if beta is None else 1.0 / beta
                self.W.baddbmm_(U, Vt, beta=inv, alpha=-inv)
                return
            if U is not None:
                self.W.baddbmm_(U, Vt, alpha=-1)
            self.W.div_(beta if beta is not None else (1.0 + a).reshape(-1, 1, 1))
            return
        if U is not None:
            self.P.append(U / _scale_of(self.c) if _scaled(self.c) else U)
            self.Q.append(Vt)
            self.PQ = None
        if a is not None:
            self.c = self.c / _one_plus(a, beta)
        if len(self.P) >= self.length:
            self.dense()

    def dense(self) -> Tensor:
        """``W_s`` itself: the pending steps applied to ``W_d`` (one ``baddbmm_``)."""
        _add_low_rank(self.W, self.P, self.Q, self.c, -1.0)
        self.c, self.P, self.Q, self.PQ = 1.0, [], [], None
        return self.W

    def reset(self, W: Tensor) -> None:
        """``W_s = W`` (a snapshot)."""
        self.W.copy_(W)
        self.c, self.P, self.Q, self.PQ = 1.0, [], [], None

    def vecmat(self, g: Tensor, transpose: bool) -> Tensor:
        """``g^T W_s`` for ``g`` ``(B, n_post)``, or ``g^T W_s^T`` (``transpose``) for ``g`` ``(B, n_pre)``."""
        out = _vecmat(g, self.WT if transpose else self.W)
        if self.P:
            if self.PQ is None:
                self.PQ = _cat(self.P, -1), _cat(self.Q, 1)
            P, Q = self.PQ
            if transpose:  # g^T Q^T P^T
                low = torch.bmm(torch.bmm(g.unsqueeze(1), Q.transpose(1, 2)), P.transpose(1, 2))
            else:
                low = torch.bmm(torch.bmm(g.unsqueeze(1), P), Q)
            out = out - low.squeeze(1)
        if _scaled(self.c):
            out = out * (self.c if isinstance(self.c, float) else self.c.reshape(-1, 1))
        return out


class _SegmentG:
    """``G = dL/dW`` of one layer in the adjoint sweep, over a segment of steps ``hi, hi - 1, ..., lo``:
    ``G_{j+1} = c (G_d + P Q)`` with the dense ``G_d = G_{hi+1}``, the scale ``c`` and the rank-1 factors ``P Q``
    that the segment's steps added so far. So the factors' cotangents of the whole segment come from one pass over
    ``G_d`` each (bmms with ``L k`` rows for ``L = hi - lo + 1``: far faster than ``L`` passes with ``k`` rows on a
    large layer) plus low-rank corrections, and ``G_d`` is updated once, after step ``lo`` (one ``baddbmm_``)::

        G_{j+1} V_j = c (G_d V_j + P (Q V_j)),    U_j^T G_{j+1} = c (U_j^T G_d + (U_j^T P) Q),
        G_j = (1 + a_j) G_{j+1} + P_j Q_j:    c <- (1 + a_j) c,  P <- [P, P_j / c],  Q <- [Q, Q_j].

    With ``length`` 1 it is the plain sweep (every step's ``G`` dense)."""

    __slots__ = ("G", "GT", "length", "c", "P", "Q", "dU", "dV", "k", "hi", "lo")

    def __init__(self, G: Tensor, length: int):
        self.G, self.length, self.c, self.P, self.Q, self.lo = G, length, 1.0, [], [], None
        self.GT = G.transpose(1, 2)  # a view: follows G's in-place updates

    def begin(self, hi: int, factors: list, need_u: bool, need_v: bool) -> None:
        """Start the segment of steps ``hi .. hi - len(factors) + 1``, their ``(a, U, Vt)`` in that order: the
        cotangents of all of them at ``G_d``."""
        self.hi, self.lo = hi, hi - len(factors) + 1
        self.dU = self.dV = None
        if factors[0].U is None:  # a decay only: no factor cotangents
            return
        self.k = factors[0].U.shape[-1]
        if need_u:  # (B, L k, n_post): row j k + r is V_j[r]^T G_d^T
            self.dU = torch.bmm(_cat([f.Vt for f in factors], 1), self.GT)
        if need_v:  # (B, L k, n_pre)
            self.dV = torch.bmm(_cat([f.U for f in factors], -1).transpose(1, 2), self.G)

    def factor_cotangents(self, j: int, U: Tensor, Vt: Tensor, need_u: bool, need_v: bool):
        """``((G_{j+1} V_j)^T, U_j^T G_{j+1})`` (None where not needed) for step ``j`` of the segment."""
        dU, dV = self.dU, self.dV
        if self.hi != self.lo:
            rows = slice((self.hi - j) * self.k, (self.hi - j + 1) * self.k)
            dU = dU[:, rows] if need_u else None
            dV = dV[:, rows] if need_v else None
        if self.P:
            P, Q = _cat(self.P, -1), _cat(self.Q, 1)
            if need_u:  # (P Q V^T)^T = (V Q^T) P^T
                dU = dU + torch.bmm(torch.bmm(Vt, Q.transpose(1, 2)), P.transpose(1, 2))
            if need_v:
                dV = dV + torch.bmm(torch.bmm(U.transpose(1, 2), P), Q)
        if _scaled(self.c):
            c = _scale_of(self.c)
            dU = None if dU is None else dU * c
            dV = None if dV is None else dV * c
        return dU, dV

    def step(self, j: int, one_a, P: Tensor | None, Q: Tensor | None) -> None:
        """Step ``j``'s ``G_j = (1 + a_j) G_{j+1} + P Q`` (``one_a`` None: no decay; ``P`` None: no factors);
        after the segment's last step, ``G_d`` becomes ``G_j``."""
        c = self.c = self.c if one_a is None else one_a * self.c
        if j == self.lo and P is not None and not self.P and isinstance(c, float):  # one step: G <- c G + P Q
            self.G.baddbmm_(P, Q, beta=c)
        else:
            if P is not None:
                self.P.append(P / _scale_of(c) if _scaled(c) else P)
                self.Q.append(Q)
            if j > self.lo:
                return
            _add_low_rank(self.G, self.P, self.Q, c, 1.0)
        self.c, self.P, self.Q, self.lo, self.dU, self.dV = 1.0, [], [], None, None, None


def _scaled(c) -> bool:
    """Whether the scale ``c`` (a Python number or a tensor) is other than the number 1."""
    return not (isinstance(c, float) and c == 1.0)


def _scale_of(c):
    """A scale (a number, ``()`` or ``(B,)``) shaped to multiply ``(B, m, n)`` tensors."""
    return c if isinstance(c, float) else c.reshape(-1, 1, 1)


class _FastRun:
    """The in-place online loop of low-rank compiled rules and its hand-written adjoint (see above)."""

    def __init__(self, net, plan, lows, x, target, labels, fbs, reward, tracker, snap_every):
        self.net, self.plan, self.lows, self.x, self.target, self.labels = net, plan, lows, x, target, labels
        self.fbs, self.reward, self.tracker, self.snap_every = fbs, reward, tracker, snap_every
        self.b, self.n_steps = int(x.shape[0]), int(x.shape[1])
        self.dx = _input_derivative(net, x) if 0 in plan.err_layers else None
        self.param_slots: list = []  # per layer: ("t", j) tensor, ("d", {name: j}) dict, ("v", value) other
        self.param_tensors: list[Tensor] = []
        nds = list(enumerate(plan.needs))  # the activities, errors and loss that are some layer's signal
        self.leaf_ys = sorted({i for i, nd in nds if "pre" in nd and i > 0} | {i + 1 for i, nd in nds if "post" in nd})
        self.leaf_es = sorted({i + 1 for i, nd in nds if "err" in nd} | {i for i, nd in nds if "pre_err" in nd})

    # ---- parameters: unique tensors (the autograd.Function's inputs) and per-layer structure ----------------
    def set_params(self, params_per_layer) -> None:
        index: dict[int, int] = {}

        def slot(t):
            if id(t) not in index:
                index[id(t)] = len(self.param_tensors)
                self.param_tensors.append(t)
            return index[id(t)]

        for p in params_per_layer:
            if torch.is_tensor(p):
                self.param_slots.append(("t", slot(p)))
            elif isinstance(p, dict):
                self.param_slots.append(("d", {k: slot(v) for k, v in p.items()}))
            else:
                self.param_slots.append(("v", p))

    def layer_params(self, tensors) -> list:
        out = []
        for kind, v in self.param_slots:
            if kind == "t":
                out.append(tensors[v])
            elif kind == "d":
                out.append({k: tensors[j] for k, j in v.items()})
            else:
                out.append(v)
        return out

    # ---- one step, all layers ------------------------------------------------------------------------------
    def _network(self, s, ws) -> tuple[_Trace, Tensor | None]:
        """The step's forward pass, loss and errors, without autograd (their adjoint is :meth:`network_vjp`);
        also returns the correctness of the step's sample."""
        net, plan, n = self.net, self.plan, self.net.n_layers
        ys, zs = _forward(net, ws, self.x[:, s])
        y_out, target = ys[-1], self.target[:, s]
        loss = correct = None
        if plan.need_loss or self.tracker.curves:
            loss = _sample_loss(net, zs[-1], y_out, target)
        if plan.need_correct or self.tracker.curves:
            label = None if self.labels is None else self.labels[:, s]
            correct = (
                (y_out.argmax(-1) == label).to(y_out.dtype)
                if label is not None
                else torch.full_like(y_out[:, 0], float("nan"))
            )
        t = _Trace(ys, zs, [None] * (n + 1), {}, {}, loss)
        if plan.any_err:
            es = t.es
            es[n] = y_out - target
            mats = _feedback_mats(net, ws, self.fbs, plan.err_layers)
            for i in plan.err_layers:
                back = _vecmat(es[n] if net.feedback == "dfa" else es[i + 1], mats[i])
                t.ds[i] = self.dx[:, s] if i == 0 else _derivative(net, ys[i], zs[i])
                es[i] = back * t.ds[i]
                if i > 0 or net.feedback == "bp":  # the adjoint's derivative backward (and bp's p^T W q)
                    t.backs[i] = back
        return t, correct

    def _factors(self, t: _Trace, correct, wrefs, params, coefs, record: bool) -> list:
        """Every layer's ``(a, U, Vt)``; under ``record`` the step's signal tensors become leaves of the rule's graph,
        which is kept (in the factors) for the adjoint."""
        net, plan, b, x = self.net, self.plan, self.b, self.x
        with torch.set_grad_enabled(record):
            if record:
                for v in [t.ys[i] for i in self.leaf_ys] + [t.es[i] for i in self.leaf_es]:
                    v.requires_grad_()
                if plan.need_loss:  # a signal, or the reward -loss (the fast path has no modulator)
                    t.loss.requires_grad_()
                for ref in wrefs:
                    ref.log = t.products
            rew = None
            if plan.need_reward:
                rew = correct if self.reward == "correct" else -t.loss
            facs = []
            for i in range(net.n_layers):
                nd = plan.needs[i]
                sig = {}
                if "pre" in nd:
                    sig["pre"] = t.ys[i]
                if "post" in nd:
                    sig["post"] = t.ys[i + 1]
                if "err" in nd:
                    sig["err"] = t.es[i + 1]
                if "pre_err" in nd:
                    sig["pre_err"] = t.es[i]
                if "w" in nd:
                    sig["w"] = wrefs[i]
                    wrefs[i].pre, wrefs[i].z = t.ys[i], t.zs[i + 1]
                if "fb" in nd:
                    sig["fb"] = wrefs[i] if net.feedback == "bp" else self.fbs[i]
                if "reward" in nd:
                    sig["reward"] = rew
                if "loss" in nd:
                    sig["loss"] = t.loss
                if "mod" in nd:
                    sig["mod"] = rew
                n_post, n_pre = net.sizes[i + 1], net.sizes[i]
                facs.append(self.lows[i].factors(sig, params[i], coefs[i], wrefs[i], b, n_post, n_pre, x))
        return facs

    def network_vjp(self, s, t: _Trace, revs, sinks) -> None:
        """Carry the gradients of step ``s``'s signal leaves (filled by the backward of its rule graph) back through
        its errors and forward pass, by hand, at the weights ``revs`` of that step; each weight product sends its
        weight gradient to ``sinks`` as a rank-1 factor ``(post, pre)`` and two vectors whose dot product is
        ``post^T W pre``."""
        net, plan, n = self.net, self.plan, self.net.n_layers
        gy = [None] + [y.grad for y in t.ys[1:]]
        ge = [None if e is None else e.grad for e in t.es]
        # a rule's W x (see _MatRef.mv); an activity that is its pre-activation (linear) has it in gy already
        gz: list = [None] + [None if z is y else z.grad for z, y in zip(t.zs[1:], t.ys[1:])]
        if plan.any_err:
            fb_t = self.fb_t
            if net.feedback == "sign":
                ws = [r.dense() for r in revs]
                fb_t = [
                    None if m is None else m.transpose(1, 2) for m in _feedback_mats(net, ws, self.fbs, plan.err_layers)
                ]
            for i in reversed(plan.err_layers):  # ascending: e_i's gradient is complete (e_i feeds e_{i-1} only)
                if ge[i] is None:
                    continue
                src = n if net.feedback == "dfa" else i + 1
                g_back = ge[i] * t.ds[i]
                ge[src] = _add(ge[src], revs[i].vecmat(g_back, True) if fb_t is None else _vecmat(g_back, fb_t[i]))
                if net.feedback == "bp":
                    sinks[i].append((t.es[src], g_back, t.backs[i], g_back))
                if i > 0:
                    dy, dz = _derivative_backward(net, ge[i], t.backs[i], t.ys[i], t.zs[i], t.ds[i], g_back)
                    gy[i], gz[i] = _add(gy[i], dy), _add(gz[i], dz)
            gy[n] = _add(gy[n], ge[n])
        if gy[n] is not None:
            gz[n] = _add(gz[n], _output_backward(net, gy[n], t.ys[n]))
        if t.loss is not None and t.loss.grad is not None:  # the loss' gradient w.r.t. the logits (CE) or outputs
            gz[n] = _add(gz[n], t.loss.grad.unsqueeze(-1) * (t.ys[n] - self.target[:, s]))
        for i in range(n, 0, -1):
            if i < n and gy[i] is not None:
                gz[i] = _add(gz[i], _activate_backward(net, gy[i], t.ys[i], t.zs[i]))
            if gz[i] is None:
                continue
            sinks[i - 1].append((gz[i], t.ys[i - 1], gz[i], t.zs[i]))
            if i > 1:
                gy[i - 1] = _add(gy[i - 1], revs[i - 1].vecmat(gz[i], False))

    # ---- forward sweep -------------------------------------------------------------------------------------
    def forward(self, ws0, record: bool):
        """Run the online steps in place on copies of ``ws0``; returns the final weights. ``record`` keeps what
        :meth:`adjoint` needs: each step's trace and rule graph, and the weight snapshots."""
        ws = [w.detach().clone(memory_format=torch.contiguous_format) for w in ws0]
        self.leaves = [p.detach().requires_grad_(p.requires_grad and record) for p in self.param_tensors]
        params = self.layer_params(self.leaves)
        with torch.set_grad_enabled(record):  # the coefficients once per run: the step graphs start at their leaves
            self.coefs = [low.coefficients(p, self.b, self.x) for low, p in zip(self.lows, params)]
        coefs = self.coef_leaves = [tuple(map(_leaf, cs)) for cs in self.coefs]
        self.betas = [_beta(a) for _, a in coefs]  # a decay that is one number is the run's constant
        self.sinks = [[] for _ in ws]
        self.wrefs = [_MatRef(w, sink) for w, sink in zip(ws, self.sinks)]
        traces, snaps = [], {}
        for s in range(self.n_steps):
            if record and s % self.snap_every == 0:
                snaps[s] = [w.clone() for w in ws]
            t, correct = self._network(s, ws)
            t.facs = self._factors(t, correct, self.wrefs, params, coefs, record)
            for w, f, beta in zip(ws, t.facs, self.betas):  # W <- (1 + a) W + U Vt (one pass if beta)
                a, U, Vt = f.a, f.U, f.Vt
                if beta is None and a is not None:
                    w.mul_((1.0 + a).reshape(-1, 1, 1))
                if U is not None:
                    w.baddbmm_(U, Vt, beta=1.0 if beta is None else beta)
                elif beta is not None:
                    w.mul_(beta)
            self.tracker.after_step(s, ws, self.fbs, t.es, t.loss, correct)
            if record:
                traces.append(t)
        self.traces, self.snaps = (traces, snaps) if record else (None, None)
        return ws

    # ---- adjoint sweep -------------------------------------------------------------------------------------
    def adjoint(self, ws_final, grads):
        """``dL/dparams`` (one per param tensor) and ``dL/dW_0`` from ``grads = dL/dW_N``; runs under autograd's
        backward (no grad mode), so the graph's tensors enter the sweep's products as they are."""
        traces, snaps, sinks = self.traces, self.snaps, self.sinks
        self.traces = self.snaps = None
        if traces is None:
            raise RuntimeError("run_episodes' adjoint was already used; backward through it only once.")
        big = [w.numel() >= _BIG_LAYER for w in ws_final]
        revs = [_ReverseW(w.detach().clone(), _SEGMENT if b else 1) for w, b in zip(ws_final, big)]
        for ref, rev in zip(self.wrefs, revs):  # the graphs' products read the weights as reversed below
            ref.rev = rev
        self.fb_t = None  # fa, dfa: the feedback matrices transposed (views); bp and sign: from the weights
        if self.plan.any_err and self.net.feedback not in ("bp", "sign"):
            self.fb_t = [f.transpose(1, 2) if i in self.plan.err_layers else None for i, f in enumerate(self.fbs)]
        n = len(revs)
        G = [_SegmentG(torch.zeros_like(r.W) if g is None else g.detach().clone(memory_format=torch.contiguous_format),
                       _SEGMENT if b else 1) for r, g, b in zip(revs, grads, big)]  # fmt: skip
        gw: list = [None] * n  # per layer <G, W_{s+1}> where the decay needs da (None: compute it exactly)
        # per layer, the same every step: which cotangents the graph needs, M^T (or M_j^T) and its _CoefGrad
        needs, MT, coef_grads = [None] * n, [None] * n, [None] * n
        da_sums: dict = {}  # per layer whose decay a is the run's constant: (a, the steps' da)
        outs, cots, hand = [], [], {}  # per step (rebound below): the engine's pairs, leaf -> its cotangent

        def route(v: Tensor, g: Tensor) -> None:
            """The cotangent ``g`` of a tape value ``v``: to autograd's engine (an expression) or summed (a leaf)."""
            if v.grad_fn is not None:
                outs.append(v)
                cots.append(g)
            elif v.requires_grad:
                hand[v] = _add(hand.get(v), g)

        for s in range(self.n_steps - 1, -1, -1):
            t, traces[s] = traces[s], None
            facs = t.facs
            snap = snaps.pop(s, None)
            for i, f in enumerate(facs):  # W_{s+1} -> W_s
                if snap is not None:
                    revs[i].reset(snap[i])
                    gw[i] = None
                else:
                    revs[i].undo(f, self.betas[i])
            outs, cots, hand, vjps, das = [], [], {}, [], [None] * len(facs)  # vjps: (hand VJP, dg_j) to apply
            for i, f in enumerate(facs):  # cotangents of the factors from G = dL/dW_{s+1}
                a, U, Vt = f.a, f.U, f.Vt
                if needs[i] is None:
                    needs[i], (MT[i], coef_grads[i]) = _cotangents_needed(f, big[i]), _coef_grad_of(f)
                need_a, need_u, need_v, need_x, need_m = needs[i]
                if G[i].lo is None:  # a new segment: down to the step above the next snapshot (exact da there)
                    lo = max(s - G[i].length + 1, (s - 1) // self.snap_every * self.snap_every + 1, 0)
                    later = [traces[j].facs[i] for j in range(s - 1, lo - 1, -1)]
                    G[i].begin(s, [facs[i], *later], need_u, need_v)
                dU = dV = None
                if U is not None:
                    dU, dV = G[i].factor_cotangents(s, U, Vt, need_u, need_v)
                    constant_m = f.gv is None
                    if need_m and constant_m:  # dL/dM summed over many steps
                        coef_grads[i].add(dU if f.post_side else dV, f.us if f.post_side else f.vs)
                    du, dv, dM = f.vector_cotangents(
                        dU, dV, need_x, need_m and not constant_m, MT[i] if constant_m else None
                    )
                    for vecs, gs in ((f.us, du), (f.vs, dv)):
                        for v, g in zip(vecs, gs or ()):
                            route(v, g)
                    if dM is not None:  # M = g M_j: g_j by its hand VJP (below) or as a tape value
                        for v, g, hv in zip(f.gv, f.global_cotangents(dM, coef_grads[i], MT[i]), f.gvjp):
                            if hv is not None:
                                vjps.append((hv, g))
                            else:
                                route(v, g.view(-1))
                if need_a:  # da = <G, W_s> (see above)
                    if gw[i] is None:  # G is dense here (a segment's first step)
                        da = _dot(G[i].G, revs[i].dense())
                    else:
                        da = gw[i] if dV is None else gw[i] - torch.linalg.vecdot(dV.flatten(1), Vt.flatten(1))
                        da = da / _one_plus(a, self.betas[i])
                    das[i] = da
                    if a.grad_fn is None:  # the run's constant: summed once, after the sweep
                        da_sums.setdefault(i, (a, []))[1].append(da)
                    else:
                        outs.append(a)
                        cots.append(da if a.dim() else da.sum())
            if outs:  # the rule's graph: tape expressions, global factors
                _backward(outs, cots)
            for (vjp, args), g in vjps:  # accumulating into the leaves' cotangents (fused multiply-adds)
                cs = vjp(g, args, [hand.get(x) for x in args])
                hand.update((x, c) for x, c in zip(args, cs) if x.requires_grad)
            for v, g in hand.items():  # leaves (signals) after the engine's accumulation
                v.grad = _add(v.grad, g)
            for ref, v, out, transpose in reversed(t.products):  # the logged products of signals, last first
                if out.grad is not None:
                    gv = ref.backward(v, out, out.grad, transpose, v.requires_grad)
                    v.grad = _add(v.grad, gv)
            self.network_vjp(s, t, revs, sinks)
            for i, f in enumerate(facs):  # G <- (1 + a) G + P Q; <G, W_s> for the next step's da
                a = f.a
                one_a = None if a is None else _one_plus(a, self.betas[i])
                if das[i] is not None and big[i]:
                    gw[i] = das[i] * one_a
                    for _, _, o1, o2 in sinks[i]:  # p^T W_s q
                        gw[i] = gw[i] + torch.linalg.vecdot(o1, o2)
                P = Q = None
                if sinks[i]:
                    P = torch.stack([p for p, *_ in sinks[i]], -1)
                    Q = torch.stack([q for _, q, *_ in sinks[i]], -2)
                    sinks[i].clear()
                G[i].step(s, one_a, P, Q)
        for cg in coef_grads:
            if cg is not None:
                cg.flush()
        for a, das in da_sums.values():
            da = torch.stack(das).sum(0)
            a.grad = _add(a.grad, da if a.dim() else da.sum())
        G = [g.G for g in G]
        done = [(c, leaf.grad) for cs, leaves in zip(self.coefs, self.coef_leaves) for c, leaf in zip(cs, leaves)
                if leaf is not None and leaf.grad is not None]  # fmt: skip
        if done:
            torch.autograd.backward(*zip(*done))
        return [leaf.grad for leaf in self.leaves], G


class _Adjoint(torch.autograd.Function):
    """``(params..., W_0...) -> W_N`` by the fast in-place loop, with the hand-written adjoint as backward."""

    @staticmethod
    def forward(ctx, run, n_params, *tensors):
        ws = run.forward(tensors[n_params:], record=True)
        ctx.run, ctx.n_params = run, n_params
        ctx.save_for_backward(*ws)
        return tuple(ws)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "run_episodes' hand-written adjoint gives first-order meta-gradients only (no create_graph=True); "
                "pass method='autograd' to differentiate through the meta-gradient."
            )
        run, n_params = ctx.run, ctx.n_params
        ctx.run = None
        if run is None:
            raise RuntimeError("run_episodes' adjoint was already used; backward through it only once.")
        pgrads, wgrads = run.adjoint(ctx.saved_tensors, grads)
        wg = [g if ctx.needs_input_grad[2 + n_params + i] else None for i, g in enumerate(wgrads)]
        return (None, None, *pgrads, *wg)


_SNAPSHOT_EVERY = 50
"""Default interval of exact weight snapshots in the adjoint (``checkpoint_every=None``)."""

_BIG_LAYER = 1 << 18
"""Weights per layer (``B n_post n_pre``) from which the adjoint trades passes over ``G`` and ``W`` for a few small
ops per step: the decay's ``<G, W_s>`` by its recursion, the factors' cotangents by segments, the weights reversed
lazily (measured on CPU)."""

_SEGMENT = 8
"""Steps per segment of a large layer's ``dL/dW`` (:class:`_SegmentG`) and its lazily reversed weights
(:class:`_ReverseW`) in the adjoint."""

_COEF_BUFFER = 1 << 18
"""Numbers (cotangents and vectors) that :class:`_CoefGrad` keeps before it sums them into ``dL/dM``."""


def _fast_layers(net, plan, observe, modulator, fbs):
    """Per-layer :class:`_LowRank` forms if the whole run can take the fast path, else ``(None, reason)``."""
    if observe is not None:
        return None, "an observer needs every dW"
    if modulator is not None:
        return None, "a modulator may hold its own parameters"
    if plan.fb_updates is not None:
        return None, "plastic feedback"
    if any(f.requires_grad for f in fbs):
        return None, "the feedback matrices require grad"
    lows = []
    for i, u in enumerate(plan.updates):
        low, why = _low_rank_of(u)
        if low is None:
            return None, f"layer {i}: {why}"
        if "fb" in plan.needs[i] and net.feedback not in ("fa", "bp"):
            return None, f"layer {i} reads 'fb' under feedback={net.feedback!r}"
        lows.append(low)
    return lows, ""


def _fast_params(low, params, b, like):
    """Validate a layer's parameters once per run (the fast path skips the per-call checks)."""
    return low.rule._params(params, b, like)


def _run_checkpointed(net, plan, ws, fbs, x, target, labels, modulator, reward, observe, tracker, every):
    """The autograd loop with ``torch.utils.checkpoint`` over segments of ``every`` online steps: only the
    segment boundaries are kept for the backward pass, each segment is recomputed once during it."""
    from torch.utils.checkpoint import checkpoint

    n_steps, n, n_fb = int(x.shape[1]), net.n_layers, len(fbs)
    states: list[dict] = [{} for _ in range(n)]
    for s0 in range(0, n_steps, every):
        s1 = min(n_steps, s0 + every)
        keys_in = [list(st) for st in states]
        keys_out: list = []
        first = [True]

        def segment(*flat, s0=s0, s1=s1, keys_in=keys_in, keys_out=keys_out, first=first):
            it = iter(flat)
            w = [next(it) for _ in range(n)]
            f = [next(it) for _ in range(n_fb)]
            st = [{k: next(it) for k in keys} for keys in keys_in]
            obs = observe if first[0] else None
            first[0] = False
            losses, corrects, bads = [], [], []
            for s in range(s0, s1):
                label = None if labels is None else labels[:, s]
                w, f, st, es, loss_s, correct_s = _step(
                    net, plan, w, f, st, x[:, s], target[:, s], label, s, modulator, reward, obs, tracker.curves
                )
                if tracker.curves:
                    losses.append(loss_s.detach())
                    corrects.append(correct_s.detach())
                if tracker.is_check(s):
                    with torch.no_grad():
                        bads.append(_bad_layers(net, w, f, es, tracker.bound))
            keys_out[:] = [list(d) for d in st]
            extra = [torch.stack(v, 1) for v in (losses, corrects, bads) if v]
            return (*w, *f, *[d[k] for d in st for k in d], *extra)

        flat = [*ws, *fbs, *[st[k] for st, keys in zip(states, keys_in) for k in keys]]
        out = checkpoint(segment, *flat, use_reentrant=False, preserve_rng_state=False)
        it = iter(out)
        ws = [next(it) for _ in range(n)]
        fbs = [next(it) for _ in range(n_fb)]
        states = [{k: next(it) for k in keys} for keys in keys_out]
        if tracker.curves:
            tracker.train_loss.extend(next(it).unbind(1))
            tracker.train_acc.extend(next(it).unbind(1))
        checks = [s for s in range(s0, s1) if tracker.is_check(s)]
        if checks:
            bads = next(it)
            for j, s in enumerate(checks):
                tracker.record_bad(s, bads[:, j])
    return ws, fbs, states


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
            f"(sizes[0] of {net.sizes})" + (f" and B = {b}" if b is not None else "") + "."
        )
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor; received dtype {x.dtype}.")
    if x.shape[1] < 1 and not allow_empty:
        raise ShapeError(f"{name} holds no samples (shape {tuple(x.shape)}).")


def run_episodes(
    net: Network,
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
    net : Network
        Architecture, activation, loss and feedback mode.
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
        ``"auto"`` (default) takes the fast path whenever it applies, else ``"autograd"``. ``"adjoint"`` (the
        fast path; a :class:`~rulesearch.errors.ConfigError` if it does not apply) needs compiled rules of the
        form ``dW = a W + U diag(c) V^T`` (every rule of the paper pool) and no derived states, observer,
        modulator or plastic feedback: the online steps then run in place (one fused ``baddbmm_`` per layer),
        and when a gradient is needed it comes from a hand-written adjoint sweep that replays the recorded
        matrix-vector products and reverses the weights in place (memory ``O(N sum(n_l))`` per episode, plus
        the snapshots below, instead of ``O(N |W|)``). ``"autograd"``: plain autograd through the unrolled
        loop (any update object).
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
    if method not in ("auto", "adjoint", "autograd"):
        raise ConfigError(f"Unknown method {method!r}; allowed: 'auto', 'adjoint', 'autograd'.")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ConfigError(f"checkpoint_every must be an integer >= 1 or None; received {checkpoint_every!r}.")
    dtype, device = x_train.dtype, x_train.device
    if x_query.dtype != dtype:
        raise ShapeError(f"x_query has dtype {x_query.dtype} but x_train has {dtype}; use one dtype.")
    target_train = make_targets(net, y_train, dtype, (b, n_steps))
    target_query = make_targets(net, y_query, dtype, (b, int(x_query.shape[1])))
    regression = y_train.is_floating_point()
    labels_train = None if regression else y_train
    plan = _make_plan(net, update, params, feedback_update, feedback_params, observe, reward, modulator, regression)

    seed = getattr(batch, "seed", None) if seed is None else seed
    t = getattr(batch, "t", 0) if t is None else t
    ks = getattr(batch, "ks", None) if ks is None else ks
    stored = net.feedback in ("fa", "dfa", "plastic")
    if weights is None or (stored and feedback is None):
        if seed is None:
            raise ConfigError(
                "Initial weights/feedback are drawn from (seed, t, ks): pass seed= (and optionally t=, "
                "ks=), or pass weights= and feedback= explicitly."
            )
        ks = list(range(b)) if ks is None else list(ks)
        if len(ks) != b:
            raise ConfigError(f"ks has {len(ks)} episode indices but the batch has B = {b} episodes.")
        w0, f0_ = init_params(net, seed, t, ks, dtype=dtype, device=device)
        weights = w0 if weights is None else weights
        feedback = f0_ if feedback is None else feedback
    if _check_weights(net, weights) != b:
        raise ShapeError(f"weights hold {weights[0].shape[0]} episodes but the batch has B = {b}.")
    if any(w.dtype != dtype for w in weights):
        raise ShapeError(f"weights must have the batch's dtype {dtype}; received {[w.dtype for w in weights]}.")
    feedback = list(feedback) if stored else []
    if stored:
        _check_feedback(net, feedback, b)
    ws, fbs = list(weights), feedback
    tracker = _Tracker(net, b, n_steps, device, check_every, divergence_bound, curves, raise_on_divergence, ks)
    states: list[dict] = [{} for _ in range(net.n_layers)]
    lows, why = _fast_layers(net, plan, observe, modulator, fbs) if method != "autograd" else (None, "")
    if method == "adjoint" and lows is None:
        raise ConfigError(
            f"method='adjoint' needs compiled rules of the form dW = a W + U diag(c) V^T without derived states, "
            f"observers, modulators or plastic feedback; here: {why}. Use method='auto' or 'autograd'."
        )
    if lows is not None:
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
        ws, fbs, states = _run_checkpointed(
            net, plan, ws, fbs, x_train, target_train, labels_train, modulator, reward, observe, tracker,
            checkpoint_every,
        )  # fmt: skip
    else:
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

    ys, zs = _forward(net, ws, x_query)
    loss = _sample_loss(net, zs[-1], ys[-1], target_query).mean(-1)
    with torch.no_grad():
        if regression:
            accuracy = torch.full((b,), float("nan"), dtype=dtype, device=device)
        else:
            accuracy = (ys[-1].argmax(-1) == y_query).to(dtype).mean(-1)
        if metrics:
            dws = [w.detach() for w in ws]
            dys = [y.detach() for y in ys]
            dzs = [None if z is None else z.detach() for z in zs]
            angles, angles_ps = _alignment(net, dws, [f.detach() for f in fbs], dys, dzs, target_query)
            ew = _orthonormality(dws, dys, dzs)
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
    )


# ---- baselines ---------------------------------------------------------------------------------------------


def _per_episode(p, vec: Tensor):
    """A scalar, 0-d tensor or per-episode ``(B,)`` coefficient shaped to scale a ``(B, n)`` vector."""
    if torch.is_tensor(p) and p.dim() == 1:
        return p.unsqueeze(-1)
    return p


class F0:
    """The pseudo-gradient rule ``F^0`` at a learning rate: ``dW = -lr e_l y_{l-1}^T``.

    ``params`` is the learning rate: a float, a 0-d tensor, or a ``(B,)`` tensor (one per episode). Under
    ``bp`` this is online SGD on the per-sample loss; under ``fa`` it is feedback alignment.
    """

    needs = frozenset({"pre", "err"})
    states = ()

    def __call__(self, signals, params) -> Tensor:
        err = signals["err"]
        return (err * _per_episode(-params, err)).unsqueeze(2) * signals["pre"].unsqueeze(1)

    def __repr__(self) -> str:
        return "F0()"


f0 = F0()
"""The shared :class:`F0` instance."""


class KolenPollack:
    """Kolen-Pollack plastic feedback: ``dfb = -lr e_l y_{l-1}^T - decay fb`` (in W's layout).

    ``params`` holds ``(lr, decay)``: a tensor of shape ``(2,)`` or per episode ``(B, 2)``. With the same
    ``lr`` for the weights (and the same decay), ``W - fb`` decays geometrically, so ``fb`` aligns with ``W``.
    """

    needs = frozenset({"pre", "err", "fb"})
    states = ()

    def __call__(self, signals, params) -> Tensor:
        p = torch.as_tensor(params)
        lr, decay = p[..., 0], p[..., 1]
        err = signals["err"]
        outer = (err * _per_episode(-lr, err)).unsqueeze(2) * signals["pre"].unsqueeze(1)
        d = decay.reshape(-1, 1, 1) if decay.dim() == 1 else decay
        return outer - d * signals["fb"]

    def __repr__(self) -> str:
        return "KolenPollack()"


kolen_pollack = KolenPollack()
"""The shared :class:`KolenPollack` instance."""


def run_baseline(
    net: Network,
    batch,
    lr: float | Tensor,
    *,
    feedback: str | None = None,
    seed: int | None = None,
    t: int | None = None,
    ks=None,
    **kwargs,
) -> InnerResult:
    """Run ``F0`` at a fixed learning rate ``lr`` under ``feedback`` (default: the network's own mode).

    ``seed, t, ks`` default to the batch's own (see :func:`run_episodes`). Extra keyword arguments go to
    :func:`run_episodes` (e.g. ``curves=True``; ``feedback_update`` under plastic feedback).
    """
    if feedback is not None:
        net = dataclasses.replace(net, feedback=feedback)
    x = _unpack(batch)[0]
    theta = torch.as_tensor(lr, dtype=x.dtype, device=x.device)
    return run_episodes(net, batch, f0, theta, seed=seed, t=t, ks=ks, **kwargs)


def baselines(
    net: Network,
    batch,
    lr: float | Tensor,
    *,
    seed: int | None = None,
    t: int | None = None,
    ks=None,
    modes=("bp", "fa"),
    **kwargs,
) -> dict[str, InnerResult]:
    """``F0`` at learning rate ``lr`` under each feedback mode in ``modes`` on the same episodes and initial
    weights (the weights are drawn before the feedback, so they coincide across modes)."""
    return {m: run_baseline(net, batch, lr, feedback=m, seed=seed, t=t, ks=ks, **kwargs) for m in modes}

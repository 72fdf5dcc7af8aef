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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError, DivergenceError, ShapeError, SignalError
from .networks import (
    Network,
    _alignment,
    _check_feedback,
    _check_weights,
    _feedback_mats,
    _forward,
    _orthonormality,
    _propagate,
    _sample_loss,
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
        The final weights ``(B, n_post, n_pre)`` and stored feedback (see :mod:`rulesearch.networks`).
    states : list of dict
        The final derived-signal states per layer (forward and feedback updates).
    diverged : BoolTensor, shape (B,)
        Whether weights/feedback exceeded ``divergence_bound`` or weights/errors became non-finite.
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
        raise SignalError(
            f"{what} needs unknown signal(s) {sorted(unknown)}; base signals are {sorted(SIGNALS)}."
        )
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
            raise SignalError(
                f"observer needs unknown signal(s) {sorted(obs - SIGNALS)}; base: {sorted(SIGNALS)}."
            )
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
            "reward='correct' is undefined for float regression targets; pass reward='neg_loss' "
            "(reward = -loss)."
        )
    need_loss = any("loss" in nd for nd in needs) or (
        need_reward and (reward == "neg_loss" or modulator is not None)
    )
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
                f"update of layer {i} returned dW of shape {got}; expected (B, n_post, n_pre) = "
                f"{tuple(ws[i].shape)}."
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
    if (
        not torch.is_tensor(x)
        or x.dim() != 3
        or x.shape[-1] != net.n_in
        or (b is not None and x.shape[0] != b)
    ):
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
    raise_on_divergence: bool = False,
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
        :func:`~rulesearch.networks.init_params` from ``(seed, t, ks)`` when omitted.
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
        Raise :class:`~rulesearch.errors.DivergenceError` naming episode, step and layer (standalone use).

    Returns
    -------
    InnerResult

    Raises
    ------
    ShapeError, ConfigError, SignalError
        Bad inputs (wrong input dimension, label range, unknown options, signals unavailable under the mode).
    DivergenceError
        Only with ``raise_on_divergence=True``.
    """
    x_train, y_train, x_query, y_query = _unpack(batch)
    _check_x(net, x_train, "x_train")
    b, n_steps = int(x_train.shape[0]), int(x_train.shape[1])
    _check_x(net, x_query, "x_query", b, allow_empty=True)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ConfigError(f"check_every must be an integer >= 1; received {check_every!r}.")
    if not divergence_bound > 0:
        raise ConfigError(f"divergence_bound must be > 0; received {divergence_bound!r}.")
    dtype, device = x_train.dtype, x_train.device
    if x_query.dtype != dtype:
        raise ShapeError(f"x_query has dtype {x_query.dtype} but x_train has {dtype}; use one dtype.")
    target_train = make_targets(net, y_train, dtype, (b, n_steps))
    target_query = make_targets(net, y_query, dtype, (b, int(x_query.shape[1])))
    regression = y_train.is_floating_point()
    labels_train = None if regression else y_train
    plan = _make_plan(
        net, update, params, feedback_update, feedback_params, observe, reward, modulator, regression
    )

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
        raise ShapeError(
            f"weights must have the batch's dtype {dtype}; received {[w.dtype for w in weights]}."
        )
    feedback = list(feedback) if stored else []
    if stored:
        _check_feedback(net, feedback, b)
    ws, fbs = list(weights), feedback
    states: list[dict] = [{} for _ in range(net.n_layers)]

    diverged = torch.zeros(b, dtype=torch.bool, device=device)
    div_step = torch.full((b,), -1, dtype=torch.long, device=device)
    div_layer = torch.full((b,), -1, dtype=torch.long, device=device)
    train_loss, train_acc = [], []
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
        if curves:
            train_loss.append(loss_s.detach())
            train_acc.append(correct_s.detach())
        if (s + 1) % check_every == 0 or s == n_steps - 1:
            with torch.no_grad():
                bad = _bad_layers(net, ws, fbs, es, divergence_bound)
                newly = bad.any(dim=1) & ~diverged
                first = bad.to(torch.int8).argmax(dim=1)
                div_step = torch.where(newly, torch.full_like(div_step, s), div_step)
                div_layer = torch.where(newly, first, div_layer)
                diverged = diverged | newly
            if raise_on_divergence and bool(newly.any()):
                e = int(newly.nonzero()[0, 0])
                k = f" (k = {ks[e]})" if ks is not None else ""
                raise DivergenceError(
                    f"Episode {e}{k} diverged by step {s}, layer {int(first[e])}: weights exceeded "
                    f"divergence_bound = {divergence_bound:g} or weights/errors became non-finite. Lower the "
                    f"rule's coefficients (learning rate), or raise divergence_bound."
                )

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

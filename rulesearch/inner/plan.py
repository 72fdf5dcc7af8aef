"""The plan of an inner-loop run: what every layer's updates need, decided once per run.

The signals a step computes are those some update (or observer) declares in ``needs``; errors are propagated only
as deep as some update reads them. A missing signal raises a :class:`~rulesearch.errors.SignalError` that says how to
get it computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, SignalError
from ..lang.signals import RECURRENT_SIGNALS

__all__ = ["SIGNALS", "REWARDS"]


SIGNALS = frozenset({"pre", "post", "err", "pre_err", "w", "fb", "mod", "reward", "loss"})
"""The base signals an update may declare in ``needs``."""


REWARDS = ("correct", "neg_loss")


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
    if "reindex" in getattr(obj, "paths", ()):
        raise ConfigError(
            f"{what} reads a vector with the other index (as_pre/as_post), which needs a recurrent layer whose "
            f"pre- and post-synaptic neurons are one population; the feedforward inner loop has none. Train such "
            f"rules with rulesearch.fixedpoint.train_fixed_point on a FixedPointNetwork."
        )
    unknown = needs - SIGNALS
    if unknown & set(RECURRENT_SIGNALS):
        raise SignalError(
            f"{what} needs {sorted(unknown & set(RECURRENT_SIGNALS))}, signals of recurrent networks at a fixed point; "
            f"the feedforward inner loop computes only {sorted(SIGNALS)}. Train such rules with "
            f"rulesearch.fixedpoint.train_fixed_point on a FixedPointNetwork."
        )
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
    if net.plastic_feedback:
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
            f"feedback_update is only used with Network(feedback='plastic') (plastic feedback); this network has "
            f"none ({net!r}). Drop feedback_update or use dataclasses.replace(net, feedback='plastic')."
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
    net.check_needs(needs)
    wanted = set()
    for i, nd in enumerate(needs):
        if "err" in nd:
            wanted.add(i + 1)
        if "pre_err" in nd:
            wanted.add(i)
    any_err = bool(wanted)
    err_layers = net.error_layers(wanted)
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


# ---- a step's signals: shared by the autograd step and the fast path ----------------------------------------


def fill_signals(sig: dict, nd: frozenset, i: int, ys, es, w, fb, reward, loss, mod) -> dict:
    """Layer ``i``'s base signals named in ``nd`` into ``sig``: ``pre = y_i``, ``post = y_{i+1}``, ``err = e_{i+1}``,
    ``pre_err = e_i``, ``w``, ``fb`` and the globals ``reward``, ``loss``, ``mod``."""
    if "pre" in nd:
        sig["pre"] = ys[i]
    if "post" in nd:
        sig["post"] = ys[i + 1]
    if "err" in nd:
        sig["err"] = es[i + 1]
    if "pre_err" in nd:
        sig["pre_err"] = es[i]
    if "w" in nd:
        sig["w"] = w
    if "fb" in nd:
        sig["fb"] = fb
    if "reward" in nd:
        sig["reward"] = reward
    if "loss" in nd:
        sig["loss"] = loss
    if "mod" in nd:
        sig["mod"] = mod
    return sig


def correct_of(y_out: Tensor, label: Tensor | None) -> Tensor:
    """``1.0`` where the output's argmax is the label, per episode (NaN without labels: regression targets)."""
    if label is None:
        return torch.full_like(y_out[:, 0], float("nan"))
    return (y_out.argmax(-1) == label).to(y_out.dtype)

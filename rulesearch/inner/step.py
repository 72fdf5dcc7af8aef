"""One online step of every episode by plain autograd (any update object), divergence tracking, and the
checkpointed variant of the loop.

.. math::

    W_l \\leftarrow W_l + \\mathrm{update}_l(\\mathrm{signals}_l, \\theta_l)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DivergenceError, ShapeError
from .plan import _Signals, correct_of, fill_signals

# ---- one step ----------------------------------------------------------------------------------------------


def _step(net, plan, ws, fbs, states, x, target, label, s, modulator, reward_mode, observe, curves):
    """One online step for all episodes: returns new ``(ws, fbs, states)``, the errors and curve values."""
    n = net.n_layers
    act = net.forward(ws, x)
    ys = act.ys
    loss = correct = rew = mod = None
    if plan.need_loss or curves:
        loss = net.loss_per_sample(act, target)
    if plan.need_correct or curves:
        correct = correct_of(ys[-1], label)
    if plan.need_reward:
        rew = correct if reward_mode == "correct" else -loss
        mod = rew if modulator is None else modulator(s, rew, loss)
    mats = net.feedback_matrices(ws, fbs, plan.mat_layers)
    if plan.any_err:
        es = net.propagate(act, net.output_error(act, target), mats, plan.err_layers)
    else:
        es = [None] * (n + 1)
    new_ws, new_fbs, new_states = [], [], []
    for i in range(n):
        sig = fill_signals(_Signals(), plan.needs[i], i, ys, es, ws[i], mats[i], rew, loss, mod)
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
        if net.plastic_feedback:
            bad = bad | ~(fbs[i].abs().amax(dim=(1, 2)) <= bound)
        for e in (es[i + 1], es[0] if i == 0 else None):
            if e is not None:
                bad = bad | ~torch.isfinite(e).all(-1)
        cols.append(bad)
    return torch.stack(cols, dim=1)


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

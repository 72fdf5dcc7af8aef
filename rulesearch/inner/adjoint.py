"""The fast path: low-rank compiled rules run in place, and the meta-gradient by a hand-written adjoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batched import add
from ..compile.lowrank import WeightRef, low_rank_of
from ..networks.base import StepTrace
from .matrices import (
    _backward,
    _beta,
    _coef_grad_of,
    _cotangents_needed,
    _dot,
    _first_order_only,
    _leaf,
    _one_plus,
    _ReverseW,
    _SegmentG,
)
from .plan import correct_of, fill_signals

# ---- the fast path: low-rank compiled rules, in-place online steps, a hand-written adjoint ---------------------
#
# For compiled rules whose update is  dW = a W + U V^T  (a sum of outer products, plus an optional weight-decay
# term ``a W``; the whole paper pool), the online steps run in place (one ``baddbmm_`` per layer) and the
# meta-gradient is computed by a hand-written adjoint instead of autograd through the unrolled loop:
#
# * forward: the network's pass and errors run without autograd; the rule's tape runs under autograd from the
#   step's signal tensors (leaves), giving the distinct post and pre vectors ``[u]``, ``[v]`` and global factors
#   ``g`` of ``U V^T = [u] M [v]^T`` with ``M = g M_j`` (the ``M_j`` depend on the parameters only: once per run);
#   ``U`` and ``V`` themselves are formed without autograd (:class:`Factors`). That small vector graph is kept
#   with the signals (a few vectors per step); exact weight snapshots are kept every ``checkpoint_every`` steps.
# * backward, step ``s = N-1 .. 0``: the weights are reversed, ``W_s = (W_{s+1} - U V^T) / (1 + a)`` (or restored
#   from a snapshot; large layers lazily, :class:`_ReverseW`); with ``G = dL/dW_{s+1}``: ``dU = G V``,
#   ``dV = G^T U``, ``da = <G, W_s>`` (large layers: ``dU``, ``dV`` of 8 steps from one pass, :class:`_SegmentG`).
#   The cotangents of ``[u]``, ``[v]``, ``g`` and ``M`` follow by hand (:meth:`Factors.vector_cotangents`;
#   ``dL/dM_j`` summed over many steps by one bmm, :class:`_CoefGrad`); a global factor of leaves (a layer sum or
#   bilinear form of signals) by its tape instruction's hand VJP (``TorchCompiler.vjps``); autograd carries only the
#   other tape expressions' cotangents to the signals, whose gradients are carried back through the errors and the
#   forward pass by hand (the network's ``step_vjp``, :class:`~rulesearch.networks.AdjointNetwork`). Every product
#   of a weight matrix with a vector (``W y``, ``W^T e`` under bp, ``W^T y`` inside the rule) sends its weight
#   gradient as a rank-1 factor, so ``dL/dW_s = (1 + a) G + P Q^T`` is one more ``baddbmm_``.
# * ``da = <G, W_s>`` on large layers needs no pass over ``G`` and ``W``: with ``c = <G_{s+1}, W_{s+1}>``,
#   ``da_s = (c - <dV, V>) / (1 + a_s)`` (``dV = G^T U`` is at hand), and ``<G_s, W_s> = (1 + a_s) da_s +
#   sum_r p_r^T W_s q_r``, where each rank-1 factor's ``p^T W_s q`` is a dot product of vectors the step already
#   has (``dL/dz . z`` for ``z = W y``). It is computed exactly at the end weights and at every snapshot, so
#   rounding cannot build up.
#
# Memory: O(B (N * sum(n_l) + N / checkpoint_every * |W|)) instead of O(B N |W|) for autograd.


@dataclass(eq=False)
class _Record:
    """What the forward sweep keeps of one online step for the adjoint: the network's trace (its signal tensors are
    the leaves of the rule's graph), every layer's factors ``(a, U, Vt)`` and the rule's logged products of signals
    (:class:`WeightRef`)."""

    step: StepTrace
    facs: list
    products: list = dataclasses.field(default_factory=list)


class _FastRun:
    """The in-place online loop of low-rank compiled rules and its hand-written adjoint (see above)."""

    def __init__(self, net, plan, lows, x, target, labels, fbs, reward, tracker, snap_every):
        self.net, self.plan, self.lows, self.x, self.target, self.labels = net, plan, lows, x, target, labels
        self.fbs, self.reward, self.tracker, self.snap_every = fbs, reward, tracker, snap_every
        self.b, self.n_steps = int(x.shape[0]), int(x.shape[1])
        self.param_slots: list = []  # per layer: ("t", j) tensor, ("d", {name: j}) dict, ("v", value) other
        self.param_tensors: list[Tensor] = []
        nds = list(enumerate(plan.needs))  # the activities, errors and loss that are some layer's signal
        self.leaf_ys = sorted({i for i, nd in nds if "pre" in nd and i > 0} | {i + 1 for i, nd in nds if "post" in nd})
        self.leaf_es = sorted({i + 1 for i, nd in nds if "err" in nd} | {i for i, nd in nds if "pre_err" in nd})
        self.fb_is_weight = [net.fb_source(i) == "weight" for i in range(net.n_layers)]  # else the stored matrix

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
    def _factors(self, t: StepTrace, correct, wrefs, params, coefs, products, record: bool) -> list:
        """Every layer's ``(a, U, Vt)``; under ``record`` the step's signal tensors become leaves of the rule's graph,
        which is kept (in the factors) for the adjoint, and the rule's products of signals are logged to
        ``products``."""
        net, plan, b, x = self.net, self.plan, self.b, self.x
        with torch.set_grad_enabled(record):
            if record:
                for v in [t.ys[i] for i in self.leaf_ys] + [t.es[i] for i in self.leaf_es]:
                    v.requires_grad_()
                if plan.need_loss:  # a signal, or the reward -loss (the fast path has no modulator)
                    t.loss.requires_grad_()
                for ref in wrefs:
                    ref.log = products
            rew = None
            if plan.need_reward:
                rew = correct if self.reward == "correct" else -t.loss
            facs = []
            for i in range(net.n_layers):
                nd = plan.needs[i]
                if "w" in nd:
                    wrefs[i].pre, wrefs[i].z = t.ys[i], t.zs[i + 1]
                fb = (wrefs[i] if self.fb_is_weight[i] else self.fbs[i]) if "fb" in nd else None
                sig = fill_signals({}, nd, i, t.ys, t.es, wrefs[i], fb, rew, t.loss, rew)
                n_post, n_pre = net.sizes[i + 1], net.sizes[i]
                facs.append(self.lows[i].factors(sig, params[i], coefs[i], wrefs[i], b, n_post, n_pre, x))
        return facs

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
        self.wrefs = [WeightRef(w, sink) for w, sink in zip(ws, self.sinks)]
        plan = self.plan
        err_layers = plan.err_layers if plan.any_err else None
        need_loss = plan.need_loss or self.tracker.curves
        traces, snaps = [], {}
        for s in range(self.n_steps):
            if record and s % self.snap_every == 0:
                snaps[s] = [w.clone() for w in ws]
            t = self.net.trace_step(ws, self.fbs, self.x[:, s], self.target[:, s], err_layers, need_loss)
            correct = None
            if plan.need_correct or self.tracker.curves:
                correct = correct_of(t.ys[-1], None if self.labels is None else self.labels[:, s])
            products: list = []
            facs = self._factors(t, correct, self.wrefs, params, coefs, products, record)
            for w, f, beta in zip(ws, facs, self.betas):  # W <- (1 + a) W + U Vt (one pass if beta)
                a, U, Vt = f.a, f.U, f.Vt
                if beta is None and a is not None:
                    w.mul_((1.0 + a).reshape(-1, 1, 1))
                if U is not None:
                    w.baddbmm_(U, Vt, beta=1.0 if beta is None else beta)
                elif beta is not None:
                    w.mul_(beta)
            self.tracker.after_step(s, ws, self.fbs, t.es, t.loss, correct)
            if record:
                traces.append(_Record(t, facs, products))
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
                hand[v] = add(hand.get(v), g)

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
                v.grad = add(v.grad, g)
            for ref, v, out, transpose in reversed(t.products):  # the logged products of signals, last first
                if out.grad is not None:
                    gv = ref.backward(v, out, out.grad, transpose, v.requires_grad)
                    v.grad = add(v.grad, gv)
            self.net.step_vjp(t.step, revs, self.fbs, self.target[:, s], sinks)
            for i, f in enumerate(facs):  # G <- (1 + a) G + P Q; <G, W_s> for the next step's da
                a = f.a
                one_a = None if a is None else _one_plus(a, self.betas[i])
                if das[i] is not None and big[i]:
                    gw[i] = das[i] * one_a
                    for r in sinks[i]:  # p^T W_s q
                        gw[i] = gw[i] + torch.linalg.vecdot(r.o1, r.o2)
                P = Q = None
                if sinks[i]:
                    P = torch.stack([r.p for r in sinks[i]], -1)
                    Q = torch.stack([r.q for r in sinks[i]], -2)
                    sinks[i].clear()
                G[i].step(s, one_a, P, Q)
        for cg in coef_grads:
            if cg is not None:
                cg.flush()
        for a, das in da_sums.values():
            da = torch.stack(das).sum(0)
            a.grad = add(a.grad, da if a.dim() else da.sum())
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
        _first_order_only("hand-written adjoint")
        run, n_params = ctx.run, ctx.n_params
        ctx.run = None
        if run is None:
            raise RuntimeError("run_episodes' adjoint was already used; backward through it only once.")
        pgrads, wgrads = run.adjoint(ctx.saved_tensors, grads)
        wg = [g if ctx.needs_input_grad[2 + n_params + i] else None for i, g in enumerate(wgrads)]
        return (None, None, *pgrads, *wg)


_BIG_LAYER = 1 << 18
"""Weights per layer (``B n_post n_pre``) from which the adjoint trades passes over ``G`` and ``W`` for a few small
ops per step: the decay's ``<G, W_s>`` by its recursion, the factors' cotangents by segments, the weights reversed
lazily (measured on CPU)."""


_SEGMENT = 8
"""Steps per segment of a large layer's ``dL/dW`` (:class:`_SegmentG`) and its lazily reversed weights
(:class:`_ReverseW`) in the adjoint."""


_SNAPSHOT_EVERY = 50
"""Default interval of exact weight snapshots in the adjoint (``checkpoint_every=None``)."""


def _fast_layers(net, plan, observe, modulator, fbs):
    """Per-layer :class:`LowRank` forms if the whole run can take the fast path, else ``(None, reason)``."""
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
        low, why = low_rank_of(u)
        if low is None:
            return None, f"layer {i}: {why}"
        if "fb" in plan.needs[i] and net.fb_source(i) is None:
            return None, f"layer {i} reads 'fb', which the network's fast path does not provide"
        lows.append(low)
    return lows, ""


def _fast_params(low, params, b, like):
    """Validate a layer's parameters once per run (the fast path skips the per-call checks)."""
    return low.check_params(params, b, like)

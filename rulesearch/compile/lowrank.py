r"""The low-rank form of a compiled rule: what the inner loop's fast path (its in-place steps and hand-written
adjoint) needs of a rule.

For a compiled rule whose products have no synapse factor other than the weights (the whole paper pool), one
layer's update of one step is

.. math:: \Delta W = a W + U V^\top, \qquad U V^\top = [u]\, M\, [v]^\top, \qquad M = \sum_j g_j M_j,

with ``[u]``, ``[v]`` the distinct post and pre vectors of the rule's tape, ``g = [1, g_1, ...]`` its distinct global
factors (per episode) and ``a = sum_j g_j a_j`` the weight decay. The ``M_j`` and ``a_j`` depend on the parameters
only (:meth:`LowRank.coefficients`, once per run); :meth:`LowRank.factors` runs the tape on a step's signals and
returns the step's :class:`Factors`. The weights enter the tape as a :class:`WeightRef`, seen only through
matrix-vector products; a rule of another shape raises :class:`NotLowRank`, and :func:`low_rank_of` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..batched import RankOne, vecmat
from .compiler import CompiledRule, _col

__all__ = ["LowRank", "Factors", "WeightRef", "NotLowRank", "low_rank_of"]


class NotLowRank(Exception):
    """Raised inside a rule's tape when the weight matrix is used other than by a matrix-vector product (and by
    :class:`LowRank` for a rule of another shape)."""


class WeightRef:
    """The ``w`` signal (and ``fb`` under bp) of a compiled rule's tape on the fast path: the weights
    ``(B, n_post, n_pre)``, seen only through the products ``mv`` (``M v``) and ``vm`` (``M^T u``) that the tape's
    contractions call; any torch function on it raises :class:`NotLowRank` (such rules take the autograd path).

    While the forward sweep keeps the rule's graph (``log`` set, grad enabled), a product of a vector without a graph
    (a signal) is a leaf, logged for :meth:`backward` by hand; a product of an expression is a :class:`_WeightProduct`
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
            return vecmat(v, self.mat if transpose else self.matT)
        if v.grad_fn is not None:
            return _WeightProduct.apply(v, self, transpose)
        x = v.detach()
        out = vecmat(x, self.mat if transpose else self.matT).requires_grad_()
        self.log.append((self, v, out, transpose))
        return out

    def backward(self, v: Tensor, out: Tensor, g: Tensor, transpose: bool, need_v: bool) -> Tensor | None:
        """Send the weight gradient of the product ``out`` of ``v`` (output gradient ``g``) to the sink; returns
        the gradient w.r.t. ``v`` if ``need_v``. Runs under no-grad (the adjoint sweep or autograd's backward)."""
        self.sink.append(RankOne(v, g, out, g) if transpose else RankOne(g, v, g, out))
        if not need_v:
            return None
        return self.rev.vecmat(g, transpose)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise NotLowRank(getattr(func, "__name__", str(func)))


@dataclass(eq=False, slots=True)
class Factors:
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
    gvjp: list | None = None  # per g_j: (hand vjp, its arguments) if they are leaves (see LowRank.hand_vjps)

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


class _WeightProduct(torch.autograd.Function):
    """A product ``M v`` (or ``M^T u``) of an expression ``v`` in a rule's graph; its backward (in the adjoint sweep)
    is :meth:`WeightRef.backward`."""

    @staticmethod
    def forward(ctx, v, ref, transpose):
        ctx.ref, ctx.transpose = ref, transpose
        out = vecmat(v, ref.mat if transpose else ref.matT)
        ctx.save_for_backward(v, out)
        return out

    @staticmethod
    def backward(ctx, g):
        v, out = ctx.saved_tensors
        return ctx.ref.backward(v, out, g, ctx.transpose, ctx.needs_input_grad[0]), None, None


class LowRank:
    """The factored form ``dW = a W + U V^T`` of one layer's compiled rule (fast path only).

    The rule's structure is analysed once: ``U V^T = U_d M V_d^T`` with the distinct post and pre vectors ``U_d``,
    ``V_d`` and their coefficient matrix ``M`` (folded into the side with more distinct vectors; on a tie, into the
    shorter one), and ``M = sum_j g_j M_j`` over the distinct global factors ``g = [1, g_1, ...]``; likewise
    ``a = sum_j g_j a_j``. The ``M_j, a_j`` depend on the parameters only: :meth:`coefficients` computes them once
    per run, and a call (:meth:`factors`) runs the tape and a handful of batched ops; no per-call validation (the
    inner loop validated shapes and parameters once per run). Raises :class:`NotLowRank` for other shapes of rules.
    """

    __slots__ = ("rule", "consts", "g_refs", "g_vjps", "E", "decay", "decay_global", "u_keys", "v_keys", "T")

    def __init__(self, rule: CompiledRule):
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
        for s_ref, cols, us, vs, consts in rule._groups:  # FactorGroup records
            if consts is not None:  # no vectors: a W when the synapse factor is the weights (checked per call)
                if s_ref is None or self.decay is not None:
                    raise NotLowRank("a synapse factor other than the weights")
                self.decay = (s_ref, A[:, cols] @ consts)
                self.decay_global = bool((self.E[1:] @ self.decay[1]).any())
            elif s_ref is not None:
                raise NotLowRank("a synapse factor times outer products")
            else:
                self.u_keys, self.v_keys = list(dict.fromkeys(us)), list(dict.fromkeys(vs))
                T = torch.zeros(A.shape[0], len(self.u_keys), len(self.v_keys), dtype=torch.float64)
                for col, u, v in zip(cols, us, vs):
                    T[:, self.u_keys.index(u), self.v_keys.index(v)] = A[:, col]
                self.T = T.flatten(1)

    @property
    def global_vjps(self) -> list:
        """Per distinct global factor ``g_j`` (in the order of ``g_refs``), its tape instruction's hand VJP
        (``TorchCompiler.vjps``), or None where autograd carries its cotangent."""
        return [None if hv is None else hv[0] for hv in self.g_vjps]

    def check_params(self, params, b: int, like: Tensor):
        """The rule's validated ``params`` (``theta`` ``(R,)`` or ``(b, R)``, or a general rule's constants) in the
        dtype and device of ``like``, as a call of the compiled rule checks them; raises ``ShapeError``,
        ``SignalError`` or ``InvalidRuleError``. The fast path calls it once per run, as :meth:`coefficients` and
        :meth:`factors` check nothing."""
        return self.rule._params(params, b, like)

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
        """:class:`Factors` of ``dW = a W + U Vt`` from the run's ``coef = coefficients(...)``: ``a``
        ``(B,)``/``()``/None, ``U`` ``(B, n_post, k)`` and ``Vt`` ``(B, k, n_pre)`` contiguous (or None); raises
        NotLowRank."""
        M, a = coef
        vals = self.rule._comp.run({"signals": signals, "params": params})
        if self.decay is not None and vals[self.decay[0][1]] is not wref:
            raise NotLowRank("a synapse factor other than the weights")
        f = Factors(a)
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
        with torch.no_grad():  # the adjoint differentiates M = g M_j, U and Vt by hand (Factors)
            if g is not None:
                f.gv, f.Mj, f.g = g[1:], M, torch.stack(g, -1)
                M = (f.g @ M if M.dim() == 2 else torch.bmm(f.g.unsqueeze(1), M).squeeze(1)).unflatten(-1, (J, D))
            f.M = M
            if f.post_side:
                f.U, f.Vt = torch.bmm(torch.stack(f.us, -1), M), torch.stack(f.vs, 1)
            else:
                f.U, f.Vt = torch.stack(f.us, -1), torch.bmm(M, torch.stack(f.vs, 1))
        return f


_ELIGIBLE: dict = {}  # id(compiled rule) -> (rule, LowRank or None, reason)


def low_rank_of(update) -> tuple[LowRank | None, str]:
    """``(LowRank, "")`` if ``update`` is a :class:`CompiledRule` of the form ``dW = a W + U V^T`` without stateful
    derived signals, else ``(None, reason)``; the form is probed once on small float64 signals and cached per rule.
    """
    if not isinstance(update, CompiledRule):
        return None, f"update {type(update).__name__} is not a CompiledRule"
    hit = _ELIGIBLE.get(id(update))
    if hit is not None and hit[0] is update:
        return hit[1], hit[2]
    try:
        if update.states:
            raise NotLowRank(f"stateful derived signals (states {[st.name for st in update.states]})")
        for attr in ("_comp", "_groups", "_g", "_A", "_r_idx", "_c", "_linear"):
            if not hasattr(update, attr):
                raise NotLowRank(f"compiled rule without {attr}")
        lr, why = LowRank(update), ""
        g = torch.Generator().manual_seed(0)
        b, n_post, n_pre = 2, 3, 4
        roles = {"pre": (b, n_pre), "pre_err": (b, n_pre), "post": (b, n_post), "err": (b, n_post),
                 "fb": (b, n_post, n_pre), "reward": (b,), "loss": (b,), "mod": (b,)}  # fmt: skip
        wref = WeightRef(torch.rand(b, n_post, n_pre, generator=g, dtype=torch.float64))
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

"""Matrix helpers of the hand-written adjoint: lazily reversed weights, segmented dL/dW, summed coefficient
gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ..batched import add, vecmat
from ..compile.lowrank import Factors


def _beta(a) -> float | None:
    """``1 + a`` as a Python number when the decay ``a`` is one number on the CPU (it then fuses into
    ``baddbmm_``'s ``beta``), else None (no decay, a per-episode decay, or a GPU tensor: no host sync)."""
    if a is None or a.dim() != 0 or a.device.type != "cpu":
        return None
    return 1.0 + float(a)


def _one_plus(a: Tensor, beta: float | None):
    """``1 + a``: the Python number ``beta`` where :func:`_beta` gave one, else a tensor."""
    return beta if beta is not None else 1.0 + a


def _backward(outs: list, cots: list) -> None:
    """``torch.autograd.backward(outs, cots)`` straight into the engine: its per-pair Python validation costs more
    than a step's small backward (the pairs are built here to match)."""
    torch.autograd.Variable._execution_engine.run_backward(tuple(outs), tuple(cots), False, False, (), True, True)


def _first_order_only(what: str) -> None:
    """Refuse a backward pass that would build a graph (``create_graph=True``): the adjoints are first-order."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"run_episodes' {what} gives first-order meta-gradients only (no create_graph=True); "
            "pass method='autograd' to differentiate through the meta-gradient."
        )


def _leaf(t: Tensor | None) -> Tensor | None:
    """A contiguous leaf with ``t``'s value (and ``requires_grad``) for the step graphs to start at."""
    return None if t is None else t.detach().contiguous().requires_grad_(t.requires_grad)


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


def _coef_grad_of(f: Factors) -> tuple:
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


def _cotangents_needed(f: Factors, big: bool) -> tuple:
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
        self.leaf.grad = add(self.leaf.grad, g)
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

    def undo(self, f: Factors, beta: float | None) -> None:
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
        out = vecmat(g, self.WT if transpose else self.W)
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


_COEF_BUFFER = 1 << 18
"""Numbers (cotangents and vectors) that :class:`_CoefGrad` keeps before it sums them into ``dL/dM``."""

r"""A recurrent rate network learned at its fixed points (Zhu & Rosenbaum 2024, Neural Computation 36(8)).

Dynamics (column vectors, batch rows in code): :math:`\tau \dot r = -r + f(W r + u)` with the input drive
:math:`u = W_x x`, :math:`f = \tanh`; the readout is :math:`\hat y = R r^*` at the fixed point
:math:`r^* = f(W r^* + u)`. Only the recurrent weights ``W`` (``N x N``) learn; ``W_x`` and ``R`` are fixed. Loss:
softmax cross-entropy of :math:`R r^*`. The signals a rule reads at the fixed point (per sample):

==========  ======  ==================================================================================
signal      role    value
==========  ======  ==================================================================================
``pre``     pre     :math:`r^*_j`
``post``    post    :math:`r^*_i`
``w``       synapse :math:`W_{ij}` (shared by the batch: an expanded view)
``gain``    post    :math:`g_i = f'(z^*_i) = 1 - r^{*2}_i`, :math:`G = \mathrm{diag}(g)`
``delta``   post    :math:`\delta = \partial J/\partial r^* = R^\top(\mathrm{softmax}(R r^*) - \mathrm{onehot}(y))`
``err``     post    the implicit error :math:`\partial J/\partial z^* = (I - G W^\top)^{-1} G \delta
                    = (G^{-1} - W^\top)^{-1}\delta` (one batched solve; only when a rule reads it)
``loss``    global  the sample's cross-entropy; ``reward`` and ``mod``: 1 if classified correctly
==========  ======  ==================================================================================

Implicit differentiation of :math:`r^* = f(W r^* + u)` gives :math:`dr^* = (I - G W)^{-1} G\, dW\, r^*`, so
:math:`\nabla_W J = \mathrm{err}\; r^{*\top}` (the paper's :math:`A^\top \delta r^\top`, :math:`A = (G^{-1}-W)^{-1}`).
The Jacobian of the dynamics at the fixed point is :math:`-I + G W`: the fixed point is stable iff
:math:`\max \mathrm{Re}\,\lambda(G W) < 1` (:func:`stability`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError, SignalError

__all__ = [
    "FixedPointNetwork",
    "FixedPointParams",
    "FixedPointResult",
    "SOLVERS",
    "FIXED_POINT_SIGNALS",
    "solve_fixed_point",
    "implicit_error",
    "stability",
    "max_real_eig",
]

SOLVERS = ("anderson", "picard", "newton")
FIXED_POINT_SIGNALS = frozenset({"pre", "post", "w", "gain", "delta", "err", "loss", "reward", "mod"})
"""The signals :meth:`FixedPointNetwork.signals` provides."""


@dataclass(frozen=True)
class FixedPointResult:
    r"""A batched fixed-point solve: ``r`` ``(B, N)`` (per sample the iterate of least residual), the residuals
    :math:`\|r - f(W r + u)\|_2` ``(B,)``, the iterations run and ``converged`` ``(B,)`` (residual <= tol)."""

    r: Tensor
    residual: Tensor
    iterations: int
    converged: Tensor

    @property
    def n_failed(self) -> int:
        """Samples whose residual stayed above the tolerance."""
        return int((~self.converged).sum())


def _residual(r: Tensor, W: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``(T(r) - r, ||T(r) - r||_2)`` with the fixed-point map ``T(r) = tanh(W r + u)`` on batch rows."""
    g = torch.tanh(r @ W.T + u) - r
    return g, torch.linalg.vector_norm(g, dim=-1)


def solve_fixed_point(
    W: Tensor,
    u: Tensor,
    tol: float = 1e-6,
    max_iter: int = 300,
    method: Literal["anderson", "picard", "newton"] = "anderson",
    damping: float = 0.5,
    memory: int = 5,
    r0: Tensor | None = None,
) -> FixedPointResult:
    r"""Solve :math:`r = \tanh(W r + u)` for every row of ``u`` ``(B, N)`` to :math:`\|r - \tanh(W r + u)\|_2 \le`
    ``tol``, from ``r0`` (default 0).

    * ``picard``: damped iteration :math:`r \leftarrow r + \beta (\tanh(W r + u) - r)`, the Euler step
      :math:`\beta = dt/\tau` of the rate dynamics (``damping=0.01, max_iter=500, tol=0`` is the paper's simulation
      to :math:`t = 5\tau`); converges when the fixed point is stable and :math:`\beta` is small enough.
    * ``anderson``: Anderson acceleration of that map (type II, mixing :math:`\beta` = ``damping``):
      :math:`r \leftarrow r + \beta g - (\Delta R + \beta \Delta G)\gamma`,
      :math:`\gamma = \arg\min \|g - \Delta G \gamma\|_2` with :math:`g = \tanh(W r + u) - r` and
      :math:`\Delta R, \Delta G` the differences of the last ``memory`` iterates and of their :math:`g`; the history
      restarts where an iterate is not finite.
    * ``newton``: :math:`r \leftarrow r - (I - G W)^{-1}(r - \tanh(W r + u))`, one batched solve per iteration.

    Returns a :class:`FixedPointResult`; samples above ``tol`` after ``max_iter`` iterations are flagged in
    ``converged`` (never silently): their ``r`` is the iterate of least residual.
    """
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ShapeError(f"W must be a square (N, N) matrix, got shape {tuple(W.shape)}.")
    if u.dim() != 2 or u.shape[1] != W.shape[0]:
        raise ShapeError(f"u must have shape (B, {W.shape[0]}) to match W, got {tuple(u.shape)}.")
    if method not in SOLVERS:
        raise ConfigError(f"Unknown fixed-point solver {method!r}; use one of {SOLVERS}.")
    if not (0 < damping <= 1) or max_iter < 0 or memory < 1 or not tol >= 0:
        raise ConfigError(
            f"Solver settings out of range: damping={damping} (need 0 < damping <= 1), max_iter={max_iter} (>= 0), "
            f"memory={memory} (>= 1), tol={tol} (>= 0)."
        )
    r = torch.zeros_like(u) if r0 is None else r0.clone()
    g, res = _residual(r, W, u)
    best_r, best_res = r, res
    dX: list[Tensor] = []
    dG: list[Tensor] = []
    it = 0
    while it < max_iter and not bool((best_res <= tol).all()):
        it += 1
        if method == "picard":
            r_new = r + damping * g
        elif method == "newton":
            gain = 1 - torch.tanh(r @ W.T + u) ** 2
            J = torch.eye(W.shape[0], dtype=W.dtype, device=W.device) - gain.unsqueeze(-1) * W  # I - G W
            r_new = r + _solve_or(J, g, damping * g)  # a damped Picard step where I - G W is singular
        else:
            r_new = r + damping * g
            if dX:
                DX, DG = torch.stack(dX, -1), torch.stack(dG, -1)  # (B, N, m)
                H = DG.transpose(1, 2) @ DG
                eps = torch.finfo(W.dtype).eps
                reg = 10 * eps * H.diagonal(dim1=1, dim2=2).sum(-1).reshape(-1, 1, 1) + torch.finfo(W.dtype).tiny
                eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
                rhs = (DG.transpose(1, 2) @ g[..., None]).squeeze(-1)
                gamma = _solve_or(H + reg * eye, rhs, torch.zeros_like(rhs))  # no mixing where H is singular
                r_new = r_new - ((DX + damping * DG) @ gamma[..., None]).squeeze(-1)
        g_new, res_new = _residual(r_new, W, u)
        ok = torch.isfinite(res_new)
        if method == "anderson":
            if not bool(ok.all()):  # restart the history where it broke down
                r_new = torch.where(ok[:, None], r_new, best_r)
                g_new, res_new = _residual(r_new, W, u)
                dX, dG = [], []
            else:
                dX.append(r_new - r)
                dG.append(g_new - g)
                dX, dG = dX[-memory:], dG[-memory:]
        r, g = r_new, g_new
        better = res_new < best_res
        best_r = torch.where(better[:, None], r, best_r)
        best_res = torch.where(better, res_new, best_res)
    return FixedPointResult(best_r, best_res, it, best_res <= tol)


def _solve_or(A: Tensor, b: Tensor, fallback: Tensor) -> Tensor:
    """``A^{-1} b`` per batch row (``A`` ``(B, n, n)``, ``b`` ``(B, n)``); the row of ``fallback`` where ``A`` is
    singular or the solution not finite."""
    x, info = torch.linalg.solve_ex(A, b)
    return torch.where((info == 0)[:, None] & torch.isfinite(x).all(-1, keepdim=True), x, fallback)


def implicit_error(W: Tensor, gain: Tensor, delta: Tensor) -> Tensor:
    r"""The error at the pre-activation through the fixed point, :math:`e = (I - G W^\top)^{-1} G \delta`
    (``(B, N)``; one batched solve), so that :math:`\nabla_W J = e\, r^{*\top}` (per sample)."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    M = eye - gain.unsqueeze(-1) * W.T  # I - G W^T, (B, N, N)
    return torch.linalg.solve(M, (gain * delta).unsqueeze(-1)).squeeze(-1)


def max_real_eig(M: Tensor) -> Tensor:
    r""":math:`\max \mathrm{Re}\,\lambda(M)` of a square matrix or a batch of them."""
    return torch.linalg.eigvals(M).real.amax(-1)


def stability(W: Tensor, gain: Tensor | None = None) -> dict[str, float]:
    r"""Stability diagnostics: ``max_re_W`` and ``radius_W`` (:math:`\max|\lambda(W)|`), and with ``gain``
    ``(B, N)`` the fixed points' :math:`\max \mathrm{Re}\,\lambda(G W)` over the batch (``max_re_GW``; the Jacobian
    of the dynamics is :math:`-I + G W`, stable below 1) and the fraction of samples at or above 1 (``unstable``)."""
    lam = torch.linalg.eigvals(W.detach())
    out = {"max_re_W": float(lam.real.max()), "radius_W": float(lam.abs().max())}
    if gain is not None:
        gw = max_real_eig(gain.detach().unsqueeze(-1) * W.detach())
        out.update(max_re_GW=float(gw.max()), unstable=float((gw >= 1).double().mean()))
    return out


@dataclass(frozen=True)
class FixedPointParams:
    """The weights of one network: recurrent ``W`` ``(N, N)`` (plastic), input ``W_x`` ``(N, n_in)`` and readout
    ``R`` ``(n_out, N)`` (fixed)."""

    W: Tensor
    W_x: Tensor
    R: Tensor


@dataclass(frozen=True)
class FixedPointNetwork:
    r"""The recurrent tanh rate network at its fixed points (module docstring) with its solver settings.

    ``rho`` scales the initial :math:`W = \rho\, \mathcal N(0, 1/N)`; :math:`W_x \sim \mathcal N(0, 1/n_{in})`,
    :math:`R \sim \mathcal N(0, 1/N)` (the paper: N=300, rho=0.5). ``tol``, ``max_iter``, ``method``,
    ``damping``, ``memory``: :func:`solve_fixed_point`.
    """

    n_in: int
    n_hidden: int = 300
    n_out: int = 10
    rho: float = 0.5
    tol: float = 1e-5
    max_iter: int = 300
    method: str = "anderson"
    damping: float = 0.5
    memory: int = 5

    def __post_init__(self):
        if min(self.n_in, self.n_hidden, self.n_out) < 1:
            raise ConfigError(f"FixedPointNetwork sizes must be >= 1, got {self.n_in, self.n_hidden, self.n_out}.")
        if self.method not in SOLVERS:
            raise ConfigError(f"Unknown fixed-point solver {self.method!r}; use one of {SOLVERS}.")

    def init_params(self, seed: int, dtype=torch.float32) -> FixedPointParams:
        """Initial weights drawn from ``seed`` (W, then W_x, then R)."""
        gen = torch.Generator().manual_seed(seed)
        N = self.n_hidden

        def randn(*shape, scale):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)

        return FixedPointParams(
            W=randn(N, N, scale=self.rho / math.sqrt(N)),
            W_x=randn(N, self.n_in, scale=1 / math.sqrt(self.n_in)),
            R=randn(self.n_out, N, scale=1 / math.sqrt(N)),
        )

    def solve(self, params: FixedPointParams, x: Tensor, W: Tensor | None = None) -> FixedPointResult:
        """The fixed points ``r*`` of the inputs ``x`` ``(B, n_in)`` under ``W`` (default ``params.W``)."""
        if x.dim() != 2 or x.shape[1] != self.n_in:
            raise ShapeError(f"x must have shape (B, {self.n_in}), got {tuple(x.shape)}.")
        W = params.W if W is None else W
        return solve_fixed_point(
            W,
            x @ params.W_x.T,
            self.tol,
            self.max_iter,
            self.method,
            self.damping,
            self.memory,
        )

    @staticmethod
    def readout(params: FixedPointParams, r: Tensor) -> Tensor:
        """Logits :math:`R r^*` ``(B, n_out)``."""
        return r @ params.R.T

    def signals(
        self, params: FixedPointParams, W: Tensor, r: Tensor, y: Tensor, needs: frozenset | set
    ) -> dict[str, Tensor]:
        """The signals named in ``needs`` at the fixed points ``r`` ``(B, N)`` of the samples with labels ``y``
        (module docstring); ``loss``, ``reward`` and ``delta`` always."""
        logits = self.readout(params, r)
        p = torch.softmax(logits, -1)
        onehot = torch.nn.functional.one_hot(y, self.n_out).to(r.dtype)
        sig = {
            "delta": (p - onehot) @ params.R,
            "loss": torch.nn.functional.cross_entropy(logits, y, reduction="none"),
            "reward": (logits.argmax(-1) == y).to(r.dtype),
        }
        sig["mod"] = sig["reward"]
        if needs & {"pre", "post"}:
            sig["pre"] = sig["post"] = r
        if needs & {"gain", "err"}:
            sig["gain"] = 1 - r * r
        if "w" in needs:
            sig["w"] = W.expand(r.shape[0], *W.shape)
        if "err" in needs:
            sig["err"] = implicit_error(W, sig["gain"], sig["delta"])
        missing = sorted(set(needs) - set(sig))
        if missing:
            raise SignalError(
                f"FixedPointNetwork has no signal(s) {missing}: a recurrent layer has no feedback matrix (fb) and no "
                f"separate pre-synaptic error (use as_pre(err)). Available: {sorted(FIXED_POINT_SIGNALS)}."
            )
        return sig

r"""Recursive least squares (RLS), the solver behind FORCE learning and SUPER-TREX's mastery pathway.

With :math:`P_0 = I/\gamma`, each update with a rate vector :math:`r` and a gate :math:`g \in [0, 1]` does

.. math::

    k = P r, \qquad c = \frac{1}{1 + r^\top k}, \qquad P \leftarrow P - g\, c\, k k^\top, \qquad
    W \leftarrow W - g\, c\, e\, k^\top,

where :math:`e` is the readout's a-priori error :math:`W r - y`. With :math:`g = 1` throughout, after rows
:math:`r_1..r_n` (stacked as :math:`X`) with targets :math:`Y`, :math:`P = (\gamma I + X^\top X)^{-1}` and
:math:`W = Y^\top X (\gamma I + X^\top X)^{-1}`: the ridge (least-squares) solution, exactly
(:func:`rls_solve`; ``tests/test_reservoir.py`` checks it against the closed form). FORCE uses
:math:`e = z - f`; SUPER-TREX's mastery pathway uses :math:`e = -u` with :math:`u` the exploratory output it
absorbs, scaled by ``s`` and gated by the running error (:mod:`rulesearch.reservoir.loop`).

All functions are batched over a leading ``B``: ``P`` ``(B, N, N)``, ``r`` ``(B, N)``, ``W`` ``(B, d, N)``.
:class:`SymmetricRLS` is the same update on one triangle of ``P`` (BLAS ``symv`` and ``syr``): half the memory
traffic, rounded differently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..batched import matvec
from ..errors import ConfigError, ShapeError

__all__ = ["rls_init", "rls_gain_", "rls_delta", "rls_solve", "SymmetricRLS"]


def rls_init(B: int, n: int, gamma: float = 10.0, dtype=torch.float64) -> Tensor:
    """:math:`P_0 = I / \\gamma`, shape ``(B, n, n)``."""
    if not gamma > 0:
        raise ConfigError(f"RLS gamma={gamma}: the regulariser must be > 0 (P0 = I/gamma).")
    return (torch.eye(n, dtype=dtype) / gamma).expand(B, n, n).clone()


def rls_gain_(P: Tensor, r: Tensor, gate: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    r"""Update ``P`` in place, :math:`P \leftarrow P - g c k k^\top`; return ``k`` ``(B, N)`` and ``c`` ``(B,)``.

    ``gate`` is a number or ``(B,)``. In place because ``P`` is the one ``(B, N, N)`` state of the solver.
    """
    if P.dim() != 3 or r.shape != P.shape[:2]:
        raise ShapeError(f"RLS: P {tuple(P.shape)} and r {tuple(r.shape)}; expected (B, N, N) and (B, N).")
    k = matvec(P, r)
    c = 1.0 / (1.0 + (r * k).sum(-1))
    a = -c * gate if isinstance(gate, Tensor) else -c * float(gate)
    torch.baddbmm(P, (a.unsqueeze(-1) * k).unsqueeze(-1), k.unsqueeze(-2), out=P)
    return k, c


def rls_delta(k: Tensor, c: Tensor, e: Tensor, gate: Tensor | float = 1.0) -> Tensor:
    r""":math:`\Delta W = -g\, c\, e\, k^\top`, shape ``(B, d, N)``, for the a-priori error ``e`` ``(B, d)``."""
    a = (c * gate).unsqueeze(-1) * e
    return -a.unsqueeze(-1) * k.unsqueeze(-2)


def rls_solve(X: Tensor, Y: Tensor, gamma: float = 10.0) -> Tensor:
    """Run RLS over the rows of ``X`` ``(B, n, N)`` with targets ``Y`` ``(B, n, d)`` from ``W = 0``; return ``W``
    ``(B, d, N)`` (equal to the ridge solution ``Y^T X (gamma I + X^T X)^{-1}``)."""
    if X.dim() != 3 or Y.dim() != 3 or X.shape[:2] != Y.shape[:2]:
        raise ShapeError(f"rls_solve: X {tuple(X.shape)} and Y {tuple(Y.shape)}; expected (B, n, N) and (B, n, d).")
    B, n, N = X.shape
    P = rls_init(B, N, gamma, X.dtype)
    W = X.new_zeros(B, Y.shape[-1], N)
    for t in range(n):
        r = X[:, t]
        e = matvec(W, r) - Y[:, t]
        k, c = rls_gain_(P, r)
        W = W + rls_delta(k, c, e)
    return W


class SymmetricRLS:
    r"""RLS with ``P`` stored as its upper triangle, packed (exactly symmetric): :func:`rls_gain_`'s update through
    BLAS (SciPy's ``spmv`` for :math:`k = P r` and ``spr`` for :math:`P \leftarrow P - g c k k^\top`), each a
    pass over the :math:`N(N+1)/2` stored entries: about half the memory traffic of the two passes over the full
    ``(N, N)`` matrix, the cost of an update at large ``N`` (at N = 1000 an update is 1.5x faster with ``P`` in
    the cache, 1.7x with ``P`` in main memory, as for 8 networks).

    The same equations, rounded differently: ``spmv`` sums :math:`P r` in another order, ``spr`` forms
    :math:`k_i (a k_j)` where :func:`rls_gain_` forms :math:`(a k_i) k_j` (so its ``P`` is symmetric only to
    rounding), and a zero gate skips its row's update. :attr:`P` holds the ``B`` packed triangles (NumPy, column
    by column); :meth:`matrix` gives the full ``(B, N, N)`` tensor. CPU, float32 or float64. SciPy's BLAS may
    split a product over threads (``OPENBLAS_NUM_THREADS``), and the rounding can change with their number.
    """

    def __init__(self, B: int, n: int, gamma: float = 10.0, dtype=torch.float64):
        import numpy as np
        from scipy.linalg import blas  # here, not at import: only this solver needs it

        if not gamma > 0:
            raise ConfigError(f"RLS gamma={gamma}: the regulariser must be > 0 (P0 = I/gamma).")
        np_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(dtype)
        if np_dtype is None:
            raise ConfigError(f"SymmetricRLS: dtype {dtype}; expected torch.float32 or torch.float64.")
        self.n = n
        self._triu = np.triu_indices(n)  # row, column of each packed entry (column-major: sorted by column)
        order = np.lexsort((self._triu[0], self._triu[1]))
        self._triu = (self._triu[0][order], self._triu[1][order])
        P0 = (torch.eye(n, dtype=dtype) / gamma).numpy()  # the values of rls_init
        self.P = [P0[self._triu].copy() for _ in range(B)]
        self._spmv, self._spr = blas.get_blas_funcs(("spmv", "spr"), dtype=np_dtype)
        self._stack = np.stack

    def gain_(self, r: Tensor, gate: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        """As :func:`rls_gain_` (``P`` updated in place): ``k`` ``(B, N)`` and ``c`` ``(B,)`` for ``r`` ``(B, N)``."""
        if r.shape != (len(self.P), self.n):
            raise ShapeError(f"SymmetricRLS: r {tuple(r.shape)}; expected {(len(self.P), self.n)}.")
        n = self.n
        k = torch.from_numpy(self._stack([self._spmv(n, 1.0, P, x) for P, x in zip(self.P, r.numpy())]))
        c = 1.0 / (1.0 + (r * k).sum(-1))
        a = -c * gate if isinstance(gate, Tensor) else -c * float(gate)
        for P, x, ab in zip(self.P, k.numpy(), a.tolist()):
            if ab != 0.0:
                self._spr(n, ab, x, P, overwrite_ap=True)  # in place: P is contiguous, of spr's dtype
        return k, c

    def matrix(self) -> Tensor:
        """The full symmetric ``P`` ``(B, N, N)`` (a copy), the lower triangle mirrored from the upper."""
        import numpy as np

        out = np.zeros((len(self.P), self.n, self.n), dtype=self.P[0].dtype)
        i, j = self._triu
        for M, P in zip(out, self.P):
            M[i, j] = P
            M[j, i] = P
        return torch.from_numpy(out)

r"""The chaotic rate reservoir of Pyle & Rosenbaum (2019), batched over ``B`` independent networks (one per seed).

Forward Euler with step :math:`\Delta t` and time constant :math:`\tau`:

.. math::

    x \leftarrow x + \frac{\Delta t}{\tau}\left(-x + J r + Q z\right), \qquad r = \tanh(x) + \xi,
    \quad \xi \sim U(-\alpha, \alpha)^N,

with :math:`J` sparse (each entry nonzero with probability ``p``, normal, scaled by :math:`\lambda / \sqrt{pN}`;
:math:`\lambda > 1` is chaotic), feedback :math:`Q \sim U(-1, 1)^{N \times d}` fixed, and
:math:`x_0 \sim U(-0.5, 0.5)^N`. Row ``b`` of every tensor depends only on ``seeds[b]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batched import matvec
from ..errors import ConfigError

__all__ = ["Reservoir", "ReservoirParams", "NoiseStream", "recurrent_input", "reservoir_step"]


@dataclass(frozen=True)
class ReservoirParams:
    """Fixed parameters of ``B`` reservoirs: ``J`` (a ``(B*N, B*N)`` block-diagonal sparse CSR matrix, or dense
    ``(B, N, N)``), ``Q`` ``(B, N, d)`` and the initial state ``x0`` ``(B, N)``."""

    J: Tensor
    Q: Tensor
    x0: Tensor


@dataclass(frozen=True)
class Reservoir:
    """Reservoir hyper-parameters (the paper's defaults). ``sparse``: store ``J`` as one block-diagonal CSR matrix
    (fewer flops at ``p = 0.1``); None chooses it for ``n >= 500``."""

    n: int = 1000
    p: float = 0.1
    lam: float = 1.5
    dt: float = 0.2
    tau: float = 10.0
    alpha: float = 0.025
    sparse: bool | None = None

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 2):
            raise ConfigError(f"Reservoir n={self.n!r}: expected an int >= 2 (the number of rate units).")
        if not 0 < self.p <= 1:
            raise ConfigError(f"Reservoir p={self.p}: the connection probability must be in (0, 1].")
        if not (self.dt > 0 and self.tau >= self.dt):
            raise ConfigError(f"Reservoir dt={self.dt}, tau={self.tau}: expected 0 < dt <= tau (Euler stability).")
        if self.alpha < 0 or self.lam < 0:
            raise ConfigError(f"Reservoir alpha={self.alpha}, lam={self.lam}: both must be >= 0.")

    @property
    def leak(self) -> float:
        """The Euler step :math:`\\Delta t / \\tau`."""
        return self.dt / self.tau

    def init(self, seeds: Sequence[int], n_out: int, dtype=torch.float64) -> ReservoirParams:
        """Draw ``J``, ``Q`` and ``x0`` for each seed from ``torch.Generator().manual_seed(2 * seed)``."""
        seeds = _check_seeds(seeds)
        Js, Qs, xs = [], [], []
        for s in seeds:
            g = torch.Generator().manual_seed(2 * s)
            mask = torch.rand(self.n, self.n, generator=g, dtype=torch.float64) < self.p
            vals = torch.randn(self.n, self.n, generator=g, dtype=torch.float64)
            Js.append((mask * vals * (self.lam / (self.p * self.n) ** 0.5)).to(dtype))
            Qs.append((2 * torch.rand(self.n, n_out, generator=g, dtype=torch.float64) - 1).to(dtype))
            xs.append((torch.rand(self.n, generator=g, dtype=torch.float64) - 0.5).to(dtype))
        sparse = self.n >= 500 if self.sparse is None else self.sparse
        J = _block_diagonal_csr(Js) if sparse else torch.stack(Js)
        return ReservoirParams(J, torch.stack(Qs), torch.stack(xs))


def _block_diagonal_csr(Js: list[Tensor]) -> Tensor:
    """The block-diagonal ``(B*N, B*N)`` CSR matrix of the ``(N, N)`` blocks ``Js``, built from their nonzeros."""
    n = Js[0].shape[0]
    idx = [J.nonzero().T + b * n for b, J in enumerate(Js)]
    vals = [J[J != 0] for J in Js]
    coo = torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(vals), (n * len(Js),) * 2, check_invariants=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matrix-vector products are all we use
        warnings.simplefilter("ignore", UserWarning)
        csr = coo.coalesce().to_sparse_csr()
        # int32 indices: the CPU kernel is about 1.5x faster than with int64
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)


def recurrent_input(J: Tensor, r: Tensor) -> Tensor:
    """:math:`J r` per row, ``r`` ``(B, N)``, for ``J`` dense ``(B, N, N)`` or block-diagonal CSR ``(BN, BN)``."""
    if J.layout == torch.sparse_csr:
        return (J @ r.reshape(-1, 1)).reshape(r.shape)
    return matvec(J, r)


def reservoir_step(x: Tensor, r: Tensor, z_fb: Tensor, params: ReservoirParams, leak: float) -> Tensor:
    r""":math:`x + \frac{\Delta t}{\tau}(-x + J r + Q z_{fb})` for ``x``, ``r`` ``(B, N)`` and ``z_fb`` ``(B, d)``."""
    drive = recurrent_input(params.J, r).add_(matvec(params.Q, z_fb))  # in place on fresh temporaries: no copies
    return drive.sub_(x).mul_(leak).add_(x)


class NoiseStream:
    """Uniform noise :math:`U(-1, 1)^{w}` per step and row, row ``b`` from its own generator (seeded
    ``2 * seeds[b] + 1``), drawn ``chunk`` steps at a time so a step costs one slice."""

    def __init__(self, seeds: Sequence[int], width: int, dtype=torch.float64, chunk: int = 256):
        self._gens = [torch.Generator().manual_seed(2 * s + 1) for s in _check_seeds(seeds)]
        self._width, self._dtype, self._chunk = width, dtype, chunk
        self._buf, self._i = None, chunk

    def next(self) -> Tensor:
        """The next ``(B, width)`` draw."""
        if self._i == self._chunk:
            draws = [torch.rand(self._chunk, self._width, generator=g, dtype=torch.float64) for g in self._gens]
            self._buf, self._i = (2 * torch.stack(draws, 1) - 1).to(self._dtype), 0
        self._i += 1
        return self._buf[self._i - 1]


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds={seeds!r}: expected a non-empty sequence of non-negative ints (one per network).")
    return seeds

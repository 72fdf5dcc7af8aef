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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batched import matvec
from ..errors import ConfigError

__all__ = ["Reservoir", "ReservoirParams", "NoiseStream", "recurrent_input", "recurrent_matvec", "reservoir_step"]


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


def recurrent_matvec(J: Tensor) -> Callable[[Tensor], Tensor]:
    """A function ``r -> J r`` equal to :func:`recurrent_input` ``(J, r)``, for the steps of a loop.

    For a CSR ``J`` (CPU, float32 or float64) it is SciPy's CSR matrix-vector kernel on the same arrays (no copy),
    about 1.3x faster than torch's sparse product at N = 1000; both add each row's products in order, one at a
    time, so the results are bitwise equal (``tests/test_reservoir.py`` checks it). The result is written to one of
    two buffers in turn: it stays valid until the next call but one (a loop's ``x`` that is overwritten each step,
    the previous ``x`` read while the new one is formed). ``r`` must be ``(B, N)`` of ``J``'s dtype. Otherwise
    (dense ``J``) it is :func:`recurrent_input` (a fresh tensor each call).
    """
    if J.layout != torch.sparse_csr or J.device.type != "cpu" or J.dtype not in (torch.float32, torch.float64):
        return lambda r: recurrent_input(J, r)
    import numpy as np
    import scipy.sparse  # here, not at import: only the reservoir's loops need it

    crow, col, val = J.crow_indices().numpy(), J.col_indices().numpy(), J.values().numpy()
    n = J.shape[0]
    bufs = [np.zeros(n, dtype=val.dtype) for _ in range(2)]
    outs, shape, turn = None, None, 0
    try:  # the kernel behind csr_array @ vector (y += J r), without the dispatch and the new output array
        from scipy.sparse._sparsetools import csr_matvec
    except ImportError:  # pragma: no cover - a SciPy without it: the public product (the same kernel)
        S = scipy.sparse.csr_array((val, col, crow), J.shape)

        def csr_matvec(_m, _n, _crow, _col, _val, x, y):
            y += S @ x

    def jr(r: Tensor) -> Tensor:
        nonlocal outs, shape, turn
        if r.shape != shape:
            shape, outs = r.shape, [torch.from_numpy(b).view(r.shape) for b in bufs]
        turn = 1 - turn
        y = bufs[turn]
        y.fill(0)
        csr_matvec(n, n, crow, col, val, r.numpy().reshape(-1), y)
        return outs[turn]

    return jr


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
        self._buf, self._i, self._split = None, chunk, None

    def next(self) -> Tensor:
        """The next ``(B, width)`` draw."""
        self._advance()
        return self._buf[self._i - 1]

    def next_split(self, n: int, scale: float) -> tuple[Tensor, Tensor]:
        """``(scale * xi[:, :n], xi[:, n:])`` for the next draw ``xi`` (the stream advances as with :meth:`next`):
        the product is taken once per chunk, elementwise, so its values are those of the per-step product."""
        self._advance()
        if self._split is None or self._split[0] != (n, scale):
            a, b = scale * self._buf[..., :n], self._buf[..., n:]
            self._split = ((n, scale), a.unbind(0), b.unbind(0))
        return self._split[1][self._i - 1], self._split[2][self._i - 1]

    def take(self, n: int) -> Tensor:
        """The next ``m`` draws at once, ``(m, B, width)``, ``m = min(n, what is left of the current chunk)``: the
        stream advances as with ``m`` calls of :meth:`next` (the same values)."""
        if self._i == self._chunk:
            self._advance()
            self._i -= 1
        m = min(n, self._chunk - self._i)
        self._i += m
        return self._buf[self._i - m : self._i]

    def _advance(self) -> None:
        if self._i == self._chunk:
            draws = [torch.rand(self._chunk, self._width, generator=g, dtype=torch.float64) for g in self._gens]
            self._buf, self._i, self._split = (2 * torch.stack(draws, 1) - 1).to(self._dtype), 0, None
        self._i += 1


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds={seeds!r}: expected a non-empty sequence of non-negative ints (one per network).")
    return seeds

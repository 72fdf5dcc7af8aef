"""Batched linear algebra shared by the networks, the compiler's low-rank forms and the adjoint: tensors carry the
episode dimension ``B`` first, and each product is one ``bmm``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["matvec", "vecmat", "add", "RankOne"]


def matvec(w: Tensor, v: Tensor) -> Tensor:
    """``W v`` for ``v`` of shape ``(B, n_pre)`` or ``(B, N, n_pre)``; one bmm.

    Always as ``v^T W^T`` (row vectors times the transposed weights): on CPU the batched matrix-vector form
    ``bmm(W, v[..., None])`` takes a kernel about 10x slower for these shapes.
    """
    if v.dim() == 2:
        return torch.bmm(v.unsqueeze(1), w.transpose(1, 2)).squeeze(1)
    return torch.bmm(v, w.transpose(1, 2))


def vecmat(e: Tensor, m: Tensor) -> Tensor:
    """``m^T e`` (= ``e^T m``) for ``e`` of shape ``(B, n_post)`` or ``(B, N, n_post)``; one bmm."""
    if e.dim() == 2:
        return torch.bmm(e.unsqueeze(1), m).squeeze(1)
    return torch.bmm(e, m)


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where None is zero."""
    return b if a is None else a if b is None else a + b


class RankOne(NamedTuple):
    """A rank-1 term ``p q^T`` of a weight gradient ``dL/dW``, with two vectors ``o1``, ``o2`` whose dot product is
    ``p^T W q`` (the adjoint's decay gradient ``<G, W>`` needs it without a pass over ``W``). All ``(B, n)``."""

    p: Tensor
    q: Tensor
    o1: Tensor
    o2: Tensor

"""Episodes: M-way K-shot Q-query tasks, each a pure function of (seed, t, k).

An *episode* is one task = one inner-loop run. Episode ``k`` of meta-step ``t`` of a run with seed ``seed``
draws its classes, images, order, initial weights and feedback from generators seeded by ``(seed, t, k)``,
so batching, resuming and sharding across processes see identical episodes.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["episode_seed", "episode_generator"]


def episode_seed(seed: int, t: int, k: int, stream: str) -> int:
    """A 63-bit seed derived from ``(seed, t, k, stream)`` by hashing (stable across platforms)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(t)}/{int(k)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_generator(seed: int, t: int, k: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for one random stream of episode ``(seed, t, k)``.

    Streams in use: ``"task"`` (classes, images, order) and ``"init"`` (initial weights, feedback).
    """
    return torch.Generator().manual_seed(episode_seed(seed, t, k, stream))

"""Data-parallel meta-gradients with ``torch.distributed`` (torchrun; gloo on CPU, nccl on GPU).

Episodes are pure functions of ``(seed, t, k)``, so a meta-batch splits across ``W`` processes without
communication: rank ``r`` runs the episodes :func:`rank_episodes` gives it, computes its part of the meta-loss
*already divided by the global* meta-batch size, and :func:`all_reduce_sum` sums the gradients: every rank then
holds the meta-gradient of the full meta-batch and takes the same optimizer step. :class:`rulesearch.RuleSearch`
does this by itself when launched by ``torchrun`` (only rank 0 writes the run directory).

Everything here also works without ``torch.distributed`` (a single process is rank 0 of a world of size 1).

Examples
--------
>>> rank_episodes(10, rank=1, world_size=3)
[4, 5, 6]
>>> sorted(sum((rank_episodes(10, r, 3) for r in range(3)), [])) == list(range(10))
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = [
    "world",
    "is_rank0",
    "init_distributed",
    "rank_episodes",
    "all_reduce_sum",
    "gather_objects",
    "broadcast_object",
    "shutdown",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    if _active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    """True in the process that writes (rank 0, or the only process)."""
    return world()[0] == 0


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment and return this rank's device.

    Without ``WORLD_SIZE`` > 1 in the environment nothing is initialized (single process). ``backend`` defaults
    to ``nccl`` for CUDA devices and ``gloo`` otherwise; under CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device or "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not _active():
        if not dist.is_available():
            raise ConfigError("torch.distributed is not available in this torch build; run a single process.")
        dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def rank_episodes(n_episodes: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The episode indices ``k`` of the meta-batch ``0..n_episodes-1`` that ``rank`` runs: contiguous blocks,
    disjoint across ranks and covering the meta-batch (sizes differ by at most one; a rank may get none)."""
    if rank is None or world_size is None:
        r, w = world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size); received rank={rank}, world_size={world_size}.")
    if n_episodes < 0:
        raise ConfigError(f"n_episodes must be >= 0; received {n_episodes}.")
    base, extra = divmod(int(n_episodes), int(world_size))
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Sum tensors over all ranks in place (one collective: flattened into one buffer per dtype/device)."""
    tensors = list(tensors)
    if not _active() or not tensors:
        return tensors
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return tensors


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group (no-op in a single process)."""
    if _active():
        dist.destroy_process_group()

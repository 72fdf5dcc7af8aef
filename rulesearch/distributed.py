"""Data-parallel meta-gradients with ``torch.distributed`` (torchrun; gloo on CPU, nccl on GPU).

Episodes are pure functions of ``(seed, t, k)``, so a meta-batch of ``B`` episodes splits across ``W`` processes
without communication: rank ``r`` runs the episode indices :func:`rank_episodes` gives it, computes its part of
the meta-loss *already divided by the global* ``B`` (a sum over its episodes of ``loss_k / B``), backpropagates,
and :func:`all_reduce_grads` sums the gradients: every rank then holds the meta-gradient of the full meta-batch
and takes the same optimizer step. Only rank 0 writes (:func:`is_rank0`, :func:`rank0_only`).

Everything here also works without ``torch.distributed`` (a single process is rank 0 of a world of size 1), so
the same training script runs standalone and under ``torchrun``.

Examples
--------
>>> rank_episodes(10, rank=1, world_size=3)
[4, 5, 6]
>>> sorted(sum((rank_episodes(10, r, 3) for r in range(3)), [])) == list(range(10))
True
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = [
    "world",
    "is_rank0",
    "rank0_only",
    "init_distributed",
    "rank_episodes",
    "all_reduce_grads",
    "all_reduce_sum",
    "gather_objects",
    "data_parallel_backward",
    "barrier",
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


def rank0_only(fn: Callable) -> Callable:
    """Decorator: run ``fn`` on rank 0 only (other ranks get ``None``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_rank0() else None

    return wrapper


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


def _flat_grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


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


def all_reduce_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``p.grad`` over ranks for every parameter (a missing grad counts as zeros). Each rank's loss must
    already be divided by the *global* meta-batch size, so the sum is the meta-gradient of the mean."""
    return all_reduce_sum(_flat_grads(list(params)))


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def data_parallel_backward(
    loss_fn: Callable[[list[int]], torch.Tensor], params: Sequence[torch.Tensor], n_episodes: int
) -> float:
    """One data-parallel meta-gradient: ``loss_fn(ks)`` returns the *sum* of the per-episode meta-losses of the
    episode indices ``ks`` (this rank's share); the gradients of ``sum / n_episodes`` are summed over ranks
    into ``p.grad`` (zeroed first). Returns the mean meta-loss of the whole meta-batch (on every rank)."""
    params = list(params)
    for p in params:
        p.grad = None
    ks = rank_episodes(n_episodes)
    ref = params[0] if params else torch.zeros(())
    if ks:
        loss = loss_fn(ks) / n_episodes
        loss.backward()
        total = loss.detach().reshape(1).to(ref.dtype)
    else:
        total = torch.zeros(1, dtype=ref.dtype, device=ref.device)
    all_reduce_grads(params)
    all_reduce_sum([total])
    return float(total)


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op in a single process)."""
    if _active():
        dist.destroy_process_group()

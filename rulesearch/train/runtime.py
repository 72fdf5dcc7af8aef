"""Where a fit runs: the torch device, the CPU thread count and the data-parallel process group."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ..errors import ConfigError
from .distributed import (
    init_distributed,
    shutdown,
    world,
)

__all__ = ["process_group", "resolve_device", "threads", "MAX_THREADS"]

MAX_THREADS = 1024


@contextlib.contextmanager
def threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (no change for None), restoring the old count after.

    More than :data:`MAX_THREADS` threads is a :class:`ConfigError` (thousands of threads exhaust memory); more than
    the CPU cores this process may use is allowed with a warning (a run resumed on a smaller machine keeps its
    config)."""
    if n is not None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n > MAX_THREADS:
            raise ConfigError(
                f"Config key 'meta.threads' is {n}; at most {MAX_THREADS} threads are allowed, and this process may "
                f"use {cpus} CPU cores. Use --threads {min(cpus, 8)} (threads beyond the cores only slow the fit)."
            )
        if n > cpus:
            warnings.warn(
                f"meta.threads is {n} but this process may use {cpus} CPU cores; the extra threads slow the fit.",
                RuntimeWarning,
                stacklevel=3,
            )
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old)


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"Config key 'meta.device' is {name!r} but CUDA is not available (torch {torch.__version__}, "
            f"cuda {torch.version.cuda}). Install a CUDA build of torch (pip install torch without "
            f"-c constraints.txt) on a machine with a GPU, or use --device cpu."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"Config key 'meta.device' is {name!r} but MPS is not available; use cpu.")
    return dev


@contextlib.contextmanager
def process_group(distributed: bool | None, device: str):
    """``(device, (rank, world_size))`` of this process for a fit: data-parallel under torchrun (``WORLD_SIZE`` > 1)
    or in an initialized process group unless ``distributed`` is False; a group joined here is left on exit."""
    dev = resolve_device(device)
    active = world()[1] > 1
    if distributed is False or not (active or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        if distributed:
            raise ConfigError(
                "distributed=True (--distributed) needs several processes, but this one runs alone (WORLD_SIZE "
                "unset or 1). Launch it with torchrun --nproc_per_node=N, or leave distributed unset."
            )
        yield dev, (0, 1)
        return
    dev = init_distributed(device=dev)
    try:
        yield dev, world()
    finally:
        if not active:
            shutdown()

"""Small C kernels compiled on first use with the system's C compiler and loaded with :mod:`ctypes`.

A kernel's source is generated (e.g. :mod:`rulesearch.reservoir.native`, a rule's update fused into a loop), built
once into a shared library under the cache folder (``$RULESEARCH_CACHE/native``, default
``~/.cache/rulesearch/native``), named by a hash of its source, the flags and the compiler, and reused by every later
process. Nothing is compiled at import; :func:`available` tells cheaply whether a compiler is there (``$CC``, else
``cc``, ``gcc`` or ``clang`` on the ``PATH``). The flags keep IEEE arithmetic (no ``-ffast-math``, no contraction
of ``a * b + c`` into one rounding), so a kernel rounds as the straightforward C of its equations, except in loops
marked ``#pragma omp simd reduction``, whose sums may be split into vector lanes. A kernel whose rounding does not
depend on the vector width (no such loops) may ask for the machine's wider vector unit (``load(..., simd=True)``:
AVX2 on x86-64 CPUs that have it, :func:`simd_flags`); the cache key holds the flags, so a library built for one kind
of CPU is never loaded on another.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .errors import BackendUnavailableError

__all__ = ["available", "compiler", "cache_dir", "load", "simd_flags", "FLAGS"]

FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd")


@functools.cache
def simd_flags() -> tuple[str, ...]:
    """Flags for this machine's wider vector unit: ``("-mavx2",)`` on an x86-64 Linux CPU that lists ``avx2`` in
    ``/proc/cpuinfo``, else none (the compiler's baseline, e.g. SSE2). ``RULESEARCH_NATIVE_SIMD=0`` turns it off."""
    if os.environ.get("RULESEARCH_NATIVE_SIMD", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return ()
    return ("-mavx2",) if "avx2" in flags else ()


def compiler() -> str | None:
    """The C compiler's path (``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on the ``PATH``), or
    None."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def available() -> bool:
    """Whether a C compiler is there to build kernels (a lookup on the ``PATH``; nothing is run)."""
    return compiler() is not None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$RULESEARCH_CACHE/native``, default ``~/.cache/rulesearch/native``."""
    root = os.environ.get("RULESEARCH_CACHE") or Path.home() / ".cache" / "rulesearch"
    return Path(root) / "native"


@functools.cache
def _version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout


def _writable(folder: Path) -> Path:
    """``folder``, created if needed, or a folder of this user's under the system's temporary folder when
    ``folder`` cannot be written (a read-only home, a cache path that is a file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"rulesearch-native-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if fallback.stat().st_uid != os.getuid():  # never load libraries from a folder someone else made
        raise BackendUnavailableError(f"{folder} cannot be written and {fallback} belongs to another user; set "
                                      "RULESEARCH_CACHE to a folder of yours.")  # fmt: skip
    return fallback


def load(source: str, name: str = "kernel", simd: bool = False) -> ctypes.CDLL:
    """Build ``source`` (C99) into a shared library, or reuse the one built before, and load it.

    With ``simd``, the build adds :func:`simd_flags` (for kernels whose rounding does not depend on the vector width:
    the inner-loop kernel's sums run over a fixed number of partial sums, so its results are the same bits with and
    without); where the compiler refuses them, a warning names the error and the baseline build is used.

    Libraries go to :func:`cache_dir`, or, where it cannot be written, to a folder of the user's under the system's
    temporary folder. A library is written under a temporary name and renamed into place, so processes building the
    same kernel at once do not read a half-written file. Raises :class:`~rulesearch.errors.BackendUnavailableError`
    when there is no compiler or the build fails (the compiler's message included).
    """
    cc = compiler()
    if cc is None:
        raise BackendUnavailableError(
            "No C compiler found (looked for $CC, cc, gcc, clang on the PATH): the native backend builds its kernels "
            "with one. Install gcc (Debian: apt install gcc) or use the torch backend."
        )
    if simd and simd_flags():
        try:
            return _build(source, name, cc, FLAGS + simd_flags())
        except BackendUnavailableError as e:
            wide = " ".join(simd_flags())
            warnings.warn(f"{e}\nBuilding {name!r} without {wide} instead (the same results, slower).", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
    return _build(source, name, cc, FLAGS)


def _build(source: str, name: str, cc: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """:func:`load` with these flags."""
    key = hashlib.sha256("\0".join((source, *flags, _version(cc))).encode()).hexdigest()[:20]
    out = _writable(cache_dir()) / f"{name}-{key}.so"
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            res = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                raise BackendUnavailableError(
                    f"Building the native kernel {name!r} with {cc} failed:\n{res.stderr.strip()[-2000:]}\n"
                    "Use the torch backend, or report this with the message above."
                )
            os.replace(lib, out)
    return ctypes.CDLL(str(out))

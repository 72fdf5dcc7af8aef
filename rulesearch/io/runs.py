"""The run directory: the only place where rulesearch state hits the disk.

A run lives in ``./runs/<name>/`` (relative to the working directory; ``--out`` overrides, see
:func:`run_path`) and holds::

    config.yaml          fully resolved configuration (written once, at creation)
    manifest.json        versions, git commit, seed, threads, device, host, start time (and resumes)
    metrics.csv          one row per logged step; columns may grow over time
    checkpoints/         step_000100.pt, ... : state dicts, loaded with torch.load(weights_only=True)
    finished.json        written last, by mark_finished() only
    rule.json, rule.tex, summary.md, figures/ ...   (write_text / write_json / atomic_open)
    .lock                the exclusive lock of the process writing the run (pid, host, start time inside)

Creation writes ``manifest.json`` first and ``config.yaml`` second: a directory left holding only a manifest by a
process killed in between is taken over by the next start, fresh or ``--resume``.

Every write is atomic: data goes to a hidden temporary file in the same directory (``.<name>.<random>.tmp``),
is flushed and fsync'ed, then moved over the target with ``os.replace``. A crash leaves either the old file or
the new one, never half of one (a killed process may leave its temporary file behind: the next process to
lock the run deletes it). ``metrics.csv`` is the exception that keeps appends cheap: rows are appended
with one ``write`` and fsync'ed; a torn last line (no trailing newline) is ignored on read and cut on the next
append, and any change of columns rewrites the file atomically. One process (rank 0) writes a run.

Locking: ``RunDir.create(..., lock=True)`` (what :meth:`RuleSearch.fit <rulesearch.train.RuleSearch.fit>` does)
takes an exclusive ``flock`` on ``<run>/.lock`` before touching anything and holds it until :meth:`RunDir.unlock`
or the process ends. A second process (the same ``--name`` twice, or ``--resume`` while the first still runs)
gets a :class:`RunDirectoryError` naming the holder's pid, host and start time. The kernel drops the lock when
its holder dies (``kill -9`` included), so a lock never outlives its process; the pid left in the file is then
ignored.

Resuming: ``RunDir.create(path, config, resume=True)`` reopens the run, then :meth:`RunDir.resume` loads the
newest readable checkpoint and drops metric rows logged after it, so metrics and state agree.

>>> import tempfile, torch
>>> with tempfile.TemporaryDirectory() as tmp:
...     run = RunDir.create(f"{tmp}/demo", {"seed": 0, "inner": {"lr": 0.1}})
...     run.append_metrics([{"step": 1, "meta_accuracy": 0.5}, {"step": 2, "meta_accuracy": 0.6}])
...     _ = run.save_checkpoint(1, {"theta": torch.zeros(3)})
...     step, state = run.resume()
...     (step, len(run.read_metrics()), run.is_finished)
(1, 1, False)
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import io
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rulesearch.errors import RunDirectoryError, StorageError
from rulesearch.io.files import read_json

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that save and load checkpoints and record the environment: writing text files
# and reading a finished run's files (rulesearch export) do not load it.

__all__ = [
    "RunDir",
    "run_path",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "EXECUTION_KEYS",
]

_DAMAGED = "The run directory is damaged: restore the file, or start the run afresh under another --name / --out."
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.csv"
FINISHED = "finished.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
_TEMP_RE = re.compile(r"^\..+\.tmp$")  # atomic_open's temporary files
_CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
_CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------- atomic writes

_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Turn a failed write for lack of room or permission into a :class:`StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        if err.errno not in _STORAGE_ERRNOS:
            raise
        fix = {
            errno.ENOSPC: "Free space on that disk (or write elsewhere with --out)",
            errno.EDQUOT: "Free space within your quota (or write elsewhere with --out)",
        }.get(err.errno, "Make the directory writable (or write elsewhere with --out)")
        raise StorageError(
            f"Cannot write {path}: {err.strerror or err}. {fix}; the run keeps its last complete files and continues "
            "with --resume."
        ) from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on clean exit fsync it and move it over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its old content (or stays absent).

    >>> # with atomic_open(run.path / "figures" / "acc.png") as f: fig.savefig(f, format="png")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', received {mode!r}.")
    path = Path(path)
    with _storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- manifest


def run_path(name: str, out: str | os.PathLike | None = None) -> Path:
    """Where a run goes: ``out`` if given (the CLI's ``--out``), else ``./runs/<name>`` under the cwd."""
    if out is not None:
        return Path(out)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise RunDirectoryError(
            f"Run name {name!r} must be a plain directory name (no '/', not empty, not '.' or '..'); use --out to "
            "choose a full path."
        )
    return Path.cwd() / "runs" / name


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _find_key(data: Any, key: str) -> Any:
    """The value of ``key`` at the top of ``data``, else in the first nested section holding it."""
    if isinstance(data, Mapping):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _environment() -> dict[str, Any]:
    import numpy
    import torch

    import rulesearch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "time": _now(),
        "hostname": socket.gethostname(),
        "rulesearch_version": rulesearch.__version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "argv": list(sys.argv),
    }


def _loaded_torch():
    """torch if it is imported, else None: a tensor, device or dtype exists only once it is."""
    return sys.modules.get("torch")


def _json_default(obj: Any) -> Any:
    torch = _loaded_torch()
    if isinstance(obj, Path):
        return str(obj)
    if (torch is not None and isinstance(obj, torch.Tensor)) or type(obj).__module__ == "numpy":
        return obj.tolist() if hasattr(obj, "tolist") else obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if torch is not None and isinstance(obj, (torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable; convert it to plain "
        "numbers, strings, lists or dicts first."
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _plain_config(config: Any) -> dict[str, Any]:
    import dataclasses

    from rulesearch.io.config import to_dict

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return to_dict(config)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=_json_default))
    raise TypeError(
        f"RunDir.create expects the config as a dict or a config dataclass, received {type(config).__name__}."
    )


EXECUTION_KEYS = ("meta.threads", "meta.checkpoint_every", "meta.chunk")
"""Config keys a resume may change: CPU threads, checkpoint spacing and the grouping of episodes into inner loops
change how a run executes (at most its rounding), not its meta-steps."""


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(name)
            else:
                out.extend(_diff_keys(a[key], b[key], name))
        return out
    return [] if a == b or (_isnan(a) and _isnan(b)) else [prefix or "<root>"]


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ------------------------------------------------------------------------------------------- checkpoints


def _check_state(obj: Any, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load time."""
    import torch

    if (
        isinstance(obj, (torch.Tensor, int, float, bool, str, bytes, type(None))) and type(obj).__module__ != "numpy"
    ):  # np.float64 subclasses float
        if isinstance(obj, torch.Tensor) and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(
                f"Checkpoint entry {where} is a {type(obj).__name__} (a tensor subclass); "
                "store a plain tensor (.detach().clone() or torch.Tensor(x))."
            )
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_state(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(
                    f"Checkpoint entry {where} has key {key!r} ({type(key).__name__}); keys must be str or int."
                )
            _check_state(value, f"{where}[{key!r}]")
        return
    hint = {
        "ndarray": " Convert numpy arrays with torch.from_numpy(x).",
        "Generator": " Store generator.get_state() (a tensor) instead of the generator.",
    }.get(type(obj).__name__, "")
    if type(obj).__module__ == "numpy" and not hint:
        hint = " Convert numpy scalars with .item()."
    if isinstance(obj, torch.nn.Module) or isinstance(obj, torch.optim.Optimizer):
        hint = " Store .state_dict() instead of the object."
    raise TypeError(
        f"Checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold "
        "only tensors, numbers, strings, bytes, None, lists, tuples and dicts (loaded with "
        f"weights_only=True).{hint}"
    )


def _step_of(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------- metrics


def _csv_value(value: Any, column: str) -> Any:
    if value is None:
        return ""
    torch = _loaded_torch()
    if (torch is not None and isinstance(value, torch.Tensor)) or type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0) != 0:
            raise TypeError(
                f"Metric {column!r} has shape {tuple(value.shape)}; metrics are scalars "
                "(log one column per element, e.g. 'angle.0', 'angle.1')."
            )
        value = value.item()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"Metric {column!r} is a {type(value).__name__}; metrics are numbers, strings, bools or None.")


def _encode_rows(header: Sequence[str], rows: Sequence[Mapping[str, Any]], with_header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if with_header:
        writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(row.get(col), col) for col in header])
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------------------------------ locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _holder_text(raw: bytes) -> str:
    """Who holds a lock, from the lock file's content (written by :meth:`RunDir.lock`)."""
    try:
        info = json.loads(raw.decode("utf-8"))
        pid, host, since = int(info["pid"]), str(info["hostname"]), str(info["start_time"])
        command = " ".join(str(a) for a in info.get("argv", []))[:200]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process (it has not recorded its pid yet)"
    text = f"pid {pid} on host {host!r}, since {since}" + (f": {command}" if command else "")
    if host == socket.gethostname() and not _pid_alive(pid):
        text += f"; pid {pid} has exited, so a child process it started still holds the lock: stop that process"
    return text


# ----------------------------------------------------------------------------------------------------- RunDir


class RunDir:
    """One run directory. ``RunDir(path)`` only names it; use :meth:`create` or :meth:`open`.

    Parameters
    ----------
    path
        The directory (``./runs/<name>`` by default, see :func:`run_path`).
    keep
        How many checkpoints :meth:`save_checkpoint` keeps (the newest ones).
    """

    def __init__(self, path: str | os.PathLike, *, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int (checkpoints kept), received {keep!r}.")
        self.path = Path(path)
        self.keep = keep
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # -- creation -------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        config: Any,
        *,
        manifest_extra: Mapping[str, Any] | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
        resume: bool = False,
        keep: int = 2,
        lock: bool = False,
    ) -> RunDir:
        """Start a run in ``path`` (or, with ``resume=True``, reopen the run already there).

        Writes ``config.yaml`` (the resolved ``config``, a dict or a config dataclass) and ``manifest.json``.
        ``seed`` and ``device`` default to the ``seed`` / ``device`` keys of ``config`` (searched in nested
        sections too). With ``lock=True`` the run's exclusive lock is taken first (see :meth:`lock`) and held
        on return; temporary files left by killed writers are then deleted.

        Raises
        ------
        RunDirectoryError
            ``path`` holds a run (finished or not) and ``resume`` is False; ``path`` is a non-empty directory
            that is not a run; resuming with a config that differs from the stored one; another process holds
            the lock.
        """
        run = cls(path, keep=keep)
        cfg_class = type(config) if hasattr(type(config), "from_dict") else None
        config = _plain_config(config)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirectoryError(f"Run path {str(run.path)!r} exists and is not a directory; choose another --out.")
        run._refuse_foreign()  # before the lock file is made in someone else's directory
        if lock:
            run.lock()
        try:
            run._start(config, cfg_class, manifest_extra, seed, device, resume)
        except BaseException:
            run.unlock()
            raise
        return run

    def _start(self, config, cfg_class, manifest_extra, seed, device, resume: bool) -> None:
        if self._lock_fd is not None:
            self._remove_temporaries()
        if self._contents() == {MANIFEST} and self._own_manifest():
            (self.path / MANIFEST).unlink()  # a creation killed between manifest.json and config.yaml: start afresh
        has_run = (self.path / MANIFEST).exists() or (self.path / CONFIG).exists()
        if has_run:
            state = "a finished run" if self.is_finished else "an unfinished run"
            if not resume:
                raise RunDirectoryError(
                    f"Run directory {str(self.path)!r} already holds {state}; refusing to overwrite it. Pass "
                    "--resume (resume=True) to continue it, or choose another --out."
                )
            missing = [name for name in (CONFIG, MANIFEST) if not (self.path / name).exists()]
            if missing:
                raise RunDirectoryError(
                    f"Cannot resume {str(self.path)!r}: {', '.join(missing)} is missing (creation was "
                    "interrupted). Delete the directory or choose another --out."
                )
            stored = self.config()
            if cfg_class is not None:  # keys added since the run was created take their defaults
                stored = _plain_config(cfg_class.from_dict(stored))
            changed = [k for k in _diff_keys(stored, config) if k not in EXECUTION_KEYS]
            if changed:
                raise RunDirectoryError(
                    f"Cannot resume {str(self.path)!r} with a different config; changed keys: "
                    f"{', '.join(changed)}. Use the stored config (config.yaml), or start a new run with "
                    "another --out."
                )
            manifest = self.manifest()
            entry = _environment()
            if device is not None:
                entry["device"] = str(device)
            manifest.setdefault("resumes", []).append(entry)
            atomic_write_text(self.path / MANIFEST, _dumps(manifest))
            return
        self._refuse_foreign()
        from rulesearch.io.config import dump_yaml

        self.path.mkdir(parents=True, exist_ok=True)
        env = _environment()
        manifest = {
            "rulesearch_version": env.pop("rulesearch_version"),
            "git_commit": env.pop("git_commit"),
            "git_dirty": env.pop("git_dirty"),
            "torch_version": env.pop("torch_version"),
            "python_version": env.pop("python_version"),
            "seed": seed if seed is not None else _find_key(config, "seed"),
            "threads": env.pop("threads"),
            "device": str(device if device is not None else (_find_key(config, "device") or "cpu")),
            "start_time": env.pop("time"),
            "hostname": env.pop("hostname"),
            **env,
            **dict(manifest_extra or {}),
        }
        atomic_write_text(self.path / MANIFEST, _dumps(manifest))
        atomic_write_text(self.path / CONFIG, dump_yaml(config))

    def _refuse_foreign(self) -> None:
        """Refuse a non-empty directory that holds no run (neither file of one)."""
        if any((self.path / name).exists() for name in (MANIFEST, CONFIG)) or not self._contents():
            return
        raise RunDirectoryError(
            f"Directory {str(self.path)!r} is not empty and is not a run directory (no {MANIFEST}); "
            "refusing to write into it. Choose another --out."
        )

    def _own_manifest(self) -> bool:
        """Whether ``manifest.json`` was written by :meth:`create` (so it may be replaced)."""
        try:
            return "rulesearch_version" in json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False

    def _contents(self) -> set[str]:
        """Names in the directory other than the lock file and temporary files."""
        if not self.path.is_dir():
            return set()
        return {p.name for p in self.path.iterdir() if p.name != LOCK and not _TEMP_RE.match(p.name)}

    def _remove_temporaries(self) -> None:
        """Delete temporary files of killed atomic writes (only under the lock: no other writer is active)."""
        for directory in (self.path, self.checkpoint_dir, self.path / "figures"):
            if directory.is_dir():
                for p in directory.iterdir():
                    if _TEMP_RE.match(p.name) and p.is_file():
                        with contextlib.suppress(OSError):
                            p.unlink()

    # -- lock -----------------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the run's exclusive lock (``flock`` on ``<run>/.lock``), held until :meth:`unlock` or exit.

        Raises :class:`RunDirectoryError` naming the holder (pid, host, start time) when another process has it.
        Where the file system has no locks (or on Windows) the run proceeds unlocked, with a warning.
        """
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            warnings.warn(f"{self.path}: no file locks on this platform; the run is not locked.", stacklevel=2)
            return
        with _storage_errors(self.path / LOCK):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 65536, 0))
            os.close(fd)
            raise RunDirectoryError(
                f"Run directory {str(self.path)!r} is in use by another process ({holder}). Wait for it to "
                "finish (or stop it) and then pass --resume to continue the run, or choose another --name / --out."
            ) from None
        except OSError as err:
            os.close(fd)
            warnings.warn(f"{self.path}: cannot lock the run ({err}); it is not protected against a second writer.",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
            return
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": _now(), "argv": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (no-op when not held)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    @property
    def locked(self) -> bool:
        """Whether this object holds the run's lock."""
        return self._lock_fd is not None

    @classmethod
    def open(cls, path: str | os.PathLike, *, keep: int = 2) -> RunDir:
        """An existing run directory; raises :class:`RunDirectoryError` naming what is missing."""
        run = cls(path, keep=keep)
        if not run.path.is_dir():
            raise RunDirectoryError(
                f"Run directory {str(run.path)!r} does not exist; check the path (runs "
                "live in ./runs/<name> unless --out was given)."
            )
        for name in (CONFIG, MANIFEST):
            if not (run.path / name).is_file():
                raise RunDirectoryError(
                    f"{str(run.path)!r} is not a run directory: {name} is missing. Expected a directory "
                    f"made by RunDir.create (with {CONFIG} and {MANIFEST})."
                )
        return run

    # -- small files ----------------------------------------------------------------------------------------

    def _target(self, name: str | os.PathLike) -> Path:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise RunDirectoryError(
                f"File name {str(name)!r} must be a relative path inside the run directory (no '..', not absolute)."
            )
        return self.path / rel

    def write_text(self, name: str | os.PathLike, text: str) -> Path:
        """Write ``text`` to ``<run>/<name>`` atomically (e.g. ``rule.tex``, ``summary.md``)."""
        return atomic_write_text(self._target(name), text)

    def write_json(self, name: str | os.PathLike, obj: Any) -> Path:
        """Write ``obj`` as indented JSON to ``<run>/<name>`` atomically (tensors and numpy become lists)."""
        return atomic_write_text(self._target(name), _dumps(obj))

    def read_json(self, name: str | os.PathLike) -> Any:
        """Parse ``<run>/<name>`` as JSON (a :class:`RunDirectoryError` names a missing or malformed file)."""
        return read_json(self._target(name), "Run file", RunDirectoryError, _DAMAGED)

    def config(self) -> dict[str, Any]:
        """The stored ``config.yaml`` as a dict."""
        from rulesearch.io.config import load_config

        return load_config(self.path / CONFIG, fix=_DAMAGED)

    def manifest(self) -> dict[str, Any]:
        """The stored ``manifest.json``."""
        manifest = self.read_json(MANIFEST)
        if not isinstance(manifest, dict):
            raise RunDirectoryError(
                f"{self.path / MANIFEST} holds a {type(manifest).__name__}, not an object. {_DAMAGED}"
            )
        return manifest

    # -- finished marker ------------------------------------------------------------------------------------

    def mark_finished(self, summary: Mapping[str, Any] | None = None) -> Path:
        """Write ``finished.json`` (end time and ``summary``); call it last, after every other write."""
        record = {"end_time": _now(), "summary": dict(summary or {})}
        return atomic_write_text(self.path / FINISHED, _dumps(record))

    @property
    def is_finished(self) -> bool:
        """Whether :meth:`mark_finished` has run."""
        return (self.path / FINISHED).is_file()

    def summary(self) -> dict[str, Any]:
        """The summary given to :meth:`mark_finished`; raises if the run is not finished."""
        if not self.is_finished:
            raise RunDirectoryError(f"Run {str(self.path)!r} is not finished (no {FINISHED}).")
        record = self.read_json(FINISHED)
        if not isinstance(record, dict) or not isinstance(record.get("summary"), dict):
            raise RunDirectoryError(f"{self.path / FINISHED} has no 'summary' object. {_DAMAGED}")
        return record["summary"]

    # -- metrics --------------------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def _read_metrics_text(self) -> tuple[str, int]:
        """The complete lines of ``metrics.csv`` and the byte length of a torn trailing line (0 if none)."""
        try:
            data = self.metrics_path.read_bytes()
        except FileNotFoundError:
            return "", 0
        except OSError as err:
            raise RunDirectoryError(f"{self.metrics_path} cannot be read ({err.strerror or err}). {_DAMAGED}") from None
        cut = data.rfind(b"\n") + 1
        try:
            return data[:cut].decode("utf-8"), len(data) - cut
        except UnicodeDecodeError as err:
            raise RunDirectoryError(f"{self.metrics_path} is not UTF-8 text (offset {err.start}). {_DAMAGED}") from None

    def _read_rows(self) -> tuple[list[str], list[dict[str, str]]]:
        text, _ = self._read_metrics_text()
        if not text:
            return [], []
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [row for row in reader]
        return list(reader.fieldnames or []), rows

    def append_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows (dicts of scalars) to ``metrics.csv``; new columns rewrite the file atomically.

        Columns keep the order of first appearance; a row lacking a column leaves it empty (NaN on read).
        """
        if isinstance(rows, Mapping):
            rows = [rows]
        rows = list(rows)
        if not rows:
            return
        header, torn = self._metrics_header()
        columns = list(header)
        for row in rows:
            for col in row:
                if not isinstance(col, str) or not col or "\n" in col or "\r" in col:
                    raise TypeError(f"Metric column names are non-empty one-line strings, received {col!r}.")
                if col not in columns:
                    columns.append(col)
        data = _encode_rows(columns, rows, with_header=False)  # may raise before touching the file
        if torn:
            warnings.warn(
                f"{self.metrics_path}: dropping a torn last line left by an interrupted write.",
                RuntimeWarning,
                stacklevel=2,
            )
        if columns != header:
            _, old_rows = self._read_rows()
            atomic_write_bytes(self.metrics_path, _encode_rows(columns, [*old_rows, *rows], with_header=True))
            return
        with _storage_errors(self.metrics_path):
            if torn:
                text, _ = self._read_metrics_text()
                with open(self.metrics_path, "r+b") as f:
                    f.truncate(len(text.encode("utf-8")))
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    def _metrics_header(self) -> tuple[list[str], bool]:
        """The header of ``metrics.csv`` ([] if absent) and whether its last line is torn; reads two lines."""
        try:
            f = open(self.metrics_path, "rb")
        except FileNotFoundError:
            return [], False
        except OSError as err:
            raise RunDirectoryError(f"{self.metrics_path} cannot be read ({err.strerror or err}). {_DAMAGED}") from None
        with f:
            first = f.readline()
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
            torn = bool(size) and f.read(1) != b"\n"
        if not first.endswith(b"\n"):
            return [], torn  # nothing complete yet
        try:
            return next(csv.reader([first.decode("utf-8")])), torn
        except UnicodeDecodeError:
            raise RunDirectoryError(f"{self.metrics_path} has a header that is not UTF-8 text. {_DAMAGED}") from None

    def read_metrics(self):
        """``metrics.csv`` as a ``pandas.DataFrame`` (empty before any row; a torn last line is skipped)."""
        import pandas as pd

        text, _ = self._read_metrics_text()
        if not text.strip():
            return pd.DataFrame()
        try:
            return pd.read_csv(io.StringIO(text))
        except (ValueError, pd.errors.ParserError) as err:
            raise RunDirectoryError(f"{self.metrics_path} is not a metrics table ({err}). {_DAMAGED}") from None

    def truncate_metrics(self, after_step: int | float, *, step_column: str = "step") -> int:
        """Drop rows whose ``step_column`` exceeds ``after_step`` (atomically); returns how many were dropped.

        Call it when resuming from the checkpoint of step ``after_step`` so that the table matches the state.
        """
        header, rows = self._read_rows()
        if not header:
            return 0
        if step_column not in header:
            raise RunDirectoryError(
                f"{self.metrics_path} has no {step_column!r} column (columns: "
                f"{', '.join(header)}); cannot truncate by step."
            )

        def keep(row: dict[str, str]) -> bool:
            value = row.get(step_column) or ""
            return value == "" or float(value) <= after_step

        kept = [row for row in rows if keep(row)]
        _, torn = self._read_metrics_text()
        if len(kept) != len(rows) or torn:
            atomic_write_bytes(self.metrics_path, _encode_rows(header, kept, with_header=True))
        return len(rows) - len(kept)

    # -- checkpoints ----------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_steps(self) -> list[int]:
        """Steps with a checkpoint file, ascending (files are not opened; see :meth:`load_checkpoint`)."""
        if not self.checkpoint_dir.is_dir():
            return []
        steps = (_step_of(p) for p in self.checkpoint_dir.iterdir())
        return sorted(s for s in steps if s is not None)

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step_{step:06d}.pt"

    def save_checkpoint(self, step: int, state: Mapping[str, Any]) -> Path:
        """Save ``state`` (tensors, numbers, strings, lists, dicts) as ``checkpoints/step_{step:06d}.pt``.

        The write is atomic. Afterwards only the newest ``keep`` checkpoints remain, and checkpoints of steps
        after ``step`` (left by a run rewound to an earlier checkpoint) are deleted.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Checkpoint step must be a non-negative int, received {step!r}.")
        if not isinstance(state, Mapping):
            raise TypeError(f"Checkpoint state must be a dict, received {type(state).__name__}.")
        state = dict(state)
        _check_state(state, "state")
        target = self.checkpoint_path(step)
        payload = {"format": _CHECKPOINT_FORMAT, "step": step, "state": state}
        import torch

        with atomic_open(target, "wb") as f:
            torch.save(payload, f)
        steps = self.checkpoint_steps()
        earlier = [s for s in steps if s <= step]
        for old in [s for s in steps if s > step] + earlier[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                self.checkpoint_path(old).unlink()
        return target

    def _load_file(self, step: int, map_location: Any) -> dict[str, Any]:
        import torch

        path = self.checkpoint_path(step)
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT or "state" not in payload:
            raise RunDirectoryError(
                f"{path} is not a rulesearch checkpoint (expected a dict with 'format' "
                f"{_CHECKPOINT_FORMAT}, 'step' and 'state')."
            )
        if payload.get("step") != step:
            raise RunDirectoryError(f"{path} holds step {payload.get('step')!r}, not {step}.")
        return payload["state"]

    def load_checkpoint(
        self, step: int | None = None, *, map_location: Any = "cpu"
    ) -> tuple[int, dict[str, Any]] | None:
        """Load a checkpoint with ``torch.load(weights_only=True)``: ``(step, state)``.

        With ``step=None`` the newest readable checkpoint is used: an unreadable newer file is skipped with a
        warning. Returns None when the run has no checkpoint at all.

        Raises
        ------
        RunDirectoryError
            The requested ``step`` is absent or unreadable; or every checkpoint is unreadable.
        """
        if step is not None:
            if step not in self.checkpoint_steps():
                raise RunDirectoryError(
                    f"No checkpoint for step {step} in {self.checkpoint_dir}; available: "
                    f"{self.checkpoint_steps() or 'none'}."
                )
            try:
                return step, self._load_file(step, map_location)
            except RunDirectoryError:
                raise
            except Exception as err:
                raise RunDirectoryError(f"Checkpoint {self.checkpoint_path(step)} is unreadable: {err}") from err
        steps = self.checkpoint_steps()
        if not steps:
            return None
        errors = []
        for candidate in reversed(steps):
            try:
                state = self._load_file(candidate, map_location)
            except Exception as err:  # a torn or foreign file: fall back to the previous one
                errors.append(f"step {candidate}: {type(err).__name__}: {err}")
                warnings.warn(
                    f"Checkpoint {self.checkpoint_path(candidate)} is unreadable ({type(err).__name__}: "
                    f"{str(err)[:200]}); falling back to an earlier checkpoint.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            return candidate, state
        raise RunDirectoryError(f"Every checkpoint in {self.checkpoint_dir} is unreadable: {'; '.join(errors)}")

    def resume(self, *, map_location: Any = "cpu", step_column: str = "step") -> tuple[int, dict[str, Any]] | None:
        """Load the newest readable checkpoint and drop metric rows logged after it.

        Returns ``(step, state)``, or None when there is no checkpoint (then every metric row is dropped, as
        the run restarts from scratch).
        """
        loaded = self.load_checkpoint(map_location=map_location)
        header, _ = self._read_rows()
        if step_column in header:
            self.truncate_metrics(loaded[0] if loaded is not None else -math.inf, step_column=step_column)
        elif loaded is None and header:
            atomic_write_bytes(self.metrics_path, b"")
        return loaded

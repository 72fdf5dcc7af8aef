"""Datasets behind one registry: scikit-learn digits, EMNIST / MNIST / Fashion-MNIST files, synthetic tasks.

Every loader returns a :class:`Dataset`: flattened, upright float32 images in ``[0, 1]`` and integer labels
(classification) or float targets (regression). Loaders are looked up by name in :data:`DATASETS`:

>>> ds = load_dataset("digits")
>>> ds
Dataset(name='digits', n_samples=1797, n_features=64, n_classes=10, task='classification')
>>> ds.images.shape, ds.images.dtype, float(ds.images.max())
(torch.Size([1797, 64]), torch.float32, 1.0)
>>> load_dataset("teacher", n_in=8, n_classes=3, n_samples=300, seed=1).n_per_class().sum().item()
300

File datasets (``emnist``, ``mnist``, ``fashion-mnist``) are read from ``path`` or, when it is None, from
:func:`default_data_dir` (``$RULESEARCH_DATA``, else ``../shared/data``). Files are never downloaded.
IDX files (the official ``*-idx3-ubyte[.gz]`` format) are read with plain numpy by :func:`read_idx`.

Randomness: the synthetic datasets draw from ``numpy.random.default_rng(seed)``; nothing seeds globally.
"""

from __future__ import annotations

import difflib
import gzip
import inspect
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rulesearch.errors import ConfigError, DatasetError

__all__ = [
    "Dataset",
    "ClassSplit",
    "DATASETS",
    "load_dataset",
    "default_data_dir",
    "read_idx",
    "load_digits",
    "load_emnist",
    "load_mnist",
    "load_fashion_mnist",
    "make_teacher",
    "make_lowrank",
    "split_classes",
    "EMNIST_MAPPING",
]

#: Characters of the 47 EMNIST Balanced / ByMerge classes, ``EMNIST_MAPPING[label]``.
EMNIST_MAPPING = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"

_TASKS = ("classification", "regression")
_DATA_ENV = "RULESEARCH_DATA"
_FIX_HINT = f"Pass the folder with --data-dir (path=...) or set the environment variable {_DATA_ENV}."


# ------------------------------------------------------------------------------------------------------------
# Dataset value
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset: flattened upright inputs and labels or regression targets.

    Parameters
    ----------
    name : str
        Short identifier, e.g. ``"digits"`` or ``"emnist-balanced-test"``.
    images : torch.Tensor, (N, D) float, or (N, D) uint8 with ``scale``
        Inputs flattened row-major from ``image_shape``, values in ``[0, 1]`` (``images / scale`` when kept
        compact). Read them as floats with :meth:`inputs`.
    labels : torch.Tensor
        ``(N,)`` int64 class ids in ``[0, n_classes)`` for classification; ``(N, n_out)`` float targets for
        regression.
    n_classes : int
        Number of classes; 0 for regression.
    image_shape : tuple of int
        Shape of one input before flattening (``(28, 28)``, ``(8, 8)``, ``(D,)`` for synthetic data).
    task : {"classification", "regression"}
    class_names : tuple of str
        Optional display name per class (``len == n_classes``) or empty.
    info : dict
        Free-form provenance (source file, split, generator parameters, the true weights of ``lowrank``...).
    scale : float or None
        None: ``images`` are floats. A number: ``images`` are the files' uint8 values, kept compact (a quarter of
        the memory of float32) and divided by ``scale`` in float32 when rows are read (:meth:`inputs`, per episode).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    image_shape: tuple
    task: str = "classification"
    class_names: tuple = ()
    info: dict = field(default_factory=dict, repr=False)
    scale: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError(f"Dataset name must be a non-empty string; received {self.name!r}.")
        if self.task not in _TASKS:
            raise DatasetError(f"Dataset {self.name!r}: task must be one of {_TASKS}; received {self.task!r}.")
        x, y = self.images, self.labels
        if self.scale is not None:
            ok = isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and math.isfinite(self.scale)
            if not ok or self.scale <= 0:
                raise DatasetError(f"Dataset {self.name!r}: scale must be a positive number or None; received "
                                   f"{self.scale!r}.")  # fmt: skip
            object.__setattr__(self, "scale", float(self.scale))
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype != torch.uint8:
                raise DatasetError(
                    f"Dataset {self.name!r}: images kept compact (scale={self.scale:g}) must be a uint8 torch.Tensor "
                    f"of shape (N, D); received {_describe(x)}. Pass float images with scale=None."
                )
        elif not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise DatasetError(
                f"Dataset {self.name!r}: images must be a floating torch.Tensor of shape (N, D); received "
                f"{_describe(x)}. Flatten images with images.reshape(len(images), -1).float() / 255."
            )
        try:
            shape = tuple(int(s) for s in self.image_shape)
        except TypeError as err:
            raise DatasetError(
                f"Dataset {self.name!r}: image_shape must be a tuple of ints; received {self.image_shape!r}."
            ) from err
        object.__setattr__(self, "image_shape", shape)
        if int(np.prod(shape)) != x.shape[1]:
            raise DatasetError(
                f"Dataset {self.name!r}: image_shape {shape} holds {int(np.prod(shape))} values but images "
                f"have D = {x.shape[1]} features."
            )
        div = 1.0 if self.scale is None else self.scale
        if x.numel() and (not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > div):
            raise DatasetError(
                f"Dataset {self.name!r}: image values must be finite and in [0, 1]; received range "
                f"[{float(x.min()) / div:g}, {float(x.max()) / div:g}]. Scale uint8 images by 1/255."
            )
        if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
            raise DatasetError(
                f"Dataset {self.name!r}: labels must be a torch.Tensor with one row per image "
                f"(N = {x.shape[0]}); received {_describe(y)}."
            )
        if self.task == "classification":
            if y.ndim != 1 or y.dtype != torch.int64:
                raise DatasetError(
                    f"Dataset {self.name!r}: classification labels must be int64 of shape (N,); received "
                    f"{_describe(y)}."
                )
            if not isinstance(self.n_classes, int) or self.n_classes < 1:
                raise DatasetError(
                    f"Dataset {self.name!r}: n_classes must be a positive int for classification; "
                    f"received {self.n_classes!r}."
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                raise DatasetError(
                    f"Dataset {self.name!r}: labels must lie in [0, {self.n_classes}); received range "
                    f"[{int(y.min())}, {int(y.max())}]."
                )
        else:
            if y.ndim != 2 or not y.is_floating_point():
                raise DatasetError(
                    f"Dataset {self.name!r}: regression targets must be floating of shape (N, n_out); "
                    f"received {_describe(y)}."
                )
            if self.n_classes != 0:
                raise DatasetError(
                    f"Dataset {self.name!r}: n_classes must be 0 for regression; received {self.n_classes!r}."
                )
        names = tuple(str(c) for c in self.class_names)
        if names and len(names) != self.n_classes:
            raise DatasetError(
                f"Dataset {self.name!r}: class_names has {len(names)} entries, expected n_classes = "
                f"{self.n_classes} (or none)."
            )
        object.__setattr__(self, "class_names", names)

    def __repr__(self) -> str:
        cls = f"n_classes={self.n_classes}" if self.task == "classification" else f"n_out={self.n_outputs}"
        return (
            f"Dataset(name={self.name!r}, n_samples={self.n_samples}, n_features={self.n_features}, {cls}, "
            f"task={self.task!r})"
        )

    def __len__(self) -> int:
        return self.n_samples

    @property
    def n_samples(self) -> int:
        """Number of samples ``N``."""
        return int(self.images.shape[0])

    @property
    def n_features(self) -> int:
        """Input dimension ``D``."""
        return int(self.images.shape[1])

    @property
    def n_outputs(self) -> int:
        """Network output size: ``n_classes`` for classification, ``n_out`` for regression."""
        return self.n_classes if self.task == "classification" else int(self.labels.shape[1])

    def inputs(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The rows ``indices`` (an index tensor of any shape; all rows when None) as float inputs in ``[0, 1]``:
        ``images[indices]``, or ``images[indices].float() / scale`` for compact images (the same float32 values as
        converting the whole array at load time, element by element)."""
        x = self.images if indices is None else self.images[indices]
        return x if self.scale is None else x.to(torch.float32) / self.scale

    def n_per_class(self) -> torch.Tensor:
        """Samples per class, ``(n_classes,)`` int64 (classification only)."""
        self._require_classification("n_per_class")
        return torch.bincount(self.labels, minlength=self.n_classes)

    @cached_property
    def _indices_by_class(self) -> tuple:
        order = torch.argsort(self.labels, stable=True)
        return tuple(torch.split(order, self.n_per_class().tolist()))

    def class_indices(self, c: int) -> torch.Tensor:
        """Row indices of class ``c`` in file order, ``(n_c,)`` int64."""
        self._require_classification("class_indices")
        if not 0 <= int(c) < self.n_classes:
            raise ConfigError(f"Dataset {self.name!r}: class {c} is not in [0, {self.n_classes}).")
        return self._indices_by_class[int(c)]

    def select(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> Dataset:
        """The rows ``indices`` (in the given order) as a new dataset with the same classes."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Dataset(
            name=name or self.name,
            images=self.images[idx],
            labels=self.labels[idx],
            n_classes=self.n_classes,
            image_shape=self.image_shape,
            task=self.task,
            class_names=self.class_names,
            info=dict(self.info),
            scale=self.scale,
        )

    def subset(self, classes: Sequence[int], remap: bool = False) -> Dataset:
        """The samples of ``classes``, in file order.

        Parameters
        ----------
        classes : sequence of int
            Class ids to keep (distinct).
        remap : bool
            If True, labels become positions in ``classes`` (``0..len(classes)-1``) and ``n_classes`` shrinks;
            otherwise the original ids and ``n_classes`` are kept.
        """
        self._require_classification("subset")
        cls = _check_class_list(classes, self.n_classes, f"Dataset {self.name!r}.subset")
        keep = torch.isin(self.labels, torch.tensor(cls, dtype=torch.int64))
        idx = torch.nonzero(keep).flatten()
        out = self.select(idx)
        if not remap:
            return out
        lut = torch.full((self.n_classes,), -1, dtype=torch.int64)
        lut[torch.tensor(cls)] = torch.arange(len(cls))
        names = tuple(self.class_names[c] for c in cls) if self.class_names else ()
        return Dataset(
            name=self.name,
            images=out.images,
            labels=lut[out.labels],
            n_classes=len(cls),
            image_shape=self.image_shape,
            task=self.task,
            class_names=names,
            info={**self.info, "classes": list(cls)},
            scale=self.scale,
        )

    def first_per_class(self, n: int) -> Dataset:
        """A balanced subset: the first ``n`` samples of every class in file order (rows stay in file order).

        Raises
        ------
        DatasetError
            If a class holds fewer than ``n`` samples.
        """
        self._require_classification("first_per_class")
        idx = _first_per_class_indices(self.labels.cpu().numpy(), n, self.n_classes, self.name)
        out = self.select(torch.from_numpy(idx))
        return Dataset(
            name=out.name,
            images=out.images,
            labels=out.labels,
            n_classes=out.n_classes,
            image_shape=out.image_shape,
            task=out.task,
            class_names=out.class_names,
            info={**self.info, "per_class": int(n)},
            scale=out.scale,
        )

    def _require_classification(self, what: str) -> None:
        if self.task != "classification":
            raise ConfigError(f"Dataset {self.name!r}.{what}() needs a classification dataset; task is {self.task!r}.")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _check_class_list(classes: Any, n_classes: int, where: str) -> list[int]:
    try:
        cls = [int(c) for c in classes]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: classes must be a sequence of ints; received {classes!r}.") from err
    bad = [c for c in cls if not 0 <= c < n_classes]
    if bad:
        raise ConfigError(f"{where}: classes {bad} are outside [0, {n_classes}).")
    if len(set(cls)) != len(cls):
        dup = sorted({c for c in cls if cls.count(c) > 1})
        raise ConfigError(f"{where}: classes must be distinct; {dup} appear more than once.")
    if not cls:
        raise ConfigError(f"{where}: classes is empty; give at least one class id.")
    return cls


def _first_per_class_indices(labels: np.ndarray, n: int, n_classes: int, name: str) -> np.ndarray:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"per_class must be a positive int; received {n!r}.")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    short = {c: int(counts[c]) for c in range(n_classes) if counts[c] < n}
    if short:
        shown = ", ".join(f"{c}: {k}" for c, k in list(short.items())[:10])
        raise DatasetError(
            f"Dataset {name!r}: per_class={n} needs {n} samples in every class, but {len(short)} classes "
            f"hold fewer (class: count) {shown}{' ...' if len(short) > 10 else ''}. Lower per_class to at "
            f"most {int(counts.min())}."
        )
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = (starts[:, None] + np.arange(n)[None, :]).ravel()
    return np.sort(order[take])


class _NpyMember:
    """One ``.npy`` array of an ``.npz`` archive, read lazily: :meth:`take` streams the member once, in chunks of
    rows, and keeps only the rows asked for, so a subset (``per_class``) never holds the whole array (the bundled
    EMNIST file's 91 MB of images for a 15 MB subset)."""

    _CHUNK_BYTES = 1 << 20

    def __init__(self, file: Path, name: str):
        self.file, self.member = file, name + ".npy"
        with zipfile.ZipFile(file) as zf, zf.open(self.member) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                self.shape, self.fortran, self.dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                self.shape, self.fortran, self.dtype = np.lib.format.read_array_header_2_0(fp)
            else:  # a newer header: whole-array reads only
                whole = np.load(fp, allow_pickle=False)
                self.shape, self.fortran, self.dtype = whole.shape, True, whole.dtype
            self.offset = fp.tell()
        self.fortran = self.fortran or self.dtype.hasobject

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def read(self) -> np.ndarray:
        """The whole array."""
        with zipfile.ZipFile(self.file) as zf, zf.open(self.member) as fp:
            return np.load(fp, allow_pickle=False)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` for sorted row indices ``rows``, reading the member once up to the last of them."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.fortran or rows.size == 0 or np.any(np.diff(rows) < 0):
            return self.read()[rows]
        row_shape = tuple(self.shape[1:])
        row_bytes = self.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        out = np.empty((len(rows), *row_shape), dtype=self.dtype)
        per_chunk = max(1, self._CHUNK_BYTES // max(row_bytes, 1))
        with zipfile.ZipFile(self.file) as zf, zf.open(self.member) as fp:
            fp.seek(self.offset)
            done, start = 0, 0
            while done < len(rows):
                n = min(per_chunk, len(self) - start)
                buf = fp.read(n * row_bytes)
                if len(buf) < n * row_bytes:
                    raise DatasetError(f"{str(self.file)!r}: the array {self.member!r} ends early (truncated file).")
                chunk = np.frombuffer(buf, dtype=self.dtype).reshape(n, *row_shape)
                hi = done + int(np.searchsorted(rows[done:], start + n))
                out[done:hi] = chunk[rows[done:hi] - start]
                done, start = hi, start + n
        return out


def _rows(images, idx: np.ndarray | None) -> np.ndarray:
    """``images[idx]`` (all rows for None) of an array or an :class:`_NpyMember`."""
    if not isinstance(images, _NpyMember):
        return images if idx is None else images[idx]
    try:
        return images.read() if idx is None else images.take(idx)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetError(
            f"Could not read the array {images.member!r} of {str(images.file)!r} ({type(err).__name__}: {err}); the "
            "file is truncated or damaged. Write it again with numpy.savez(file, images=..., labels=...)."
        ) from None


def _int_labels(labels, source: str) -> np.ndarray:
    """``labels`` as int64 class indices; floats must be whole numbers, strings and other types are refused."""
    labels = np.asarray(labels)
    fix = "Store the labels as integer class indices 0..C-1 (map class names to indices first)."
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            bad = labels[~whole][:3].tolist()
            raise DatasetError(f"{source!r}: labels must be whole numbers; received {bad}. {fix}")
    elif labels.dtype.kind not in "biu":
        raise DatasetError(f"{source!r}: labels have dtype {labels.dtype} (not integers). {fix}")
    return labels.astype(np.int64)


def _classification(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    scale: float,
    per_class: int | None,
    class_names: Sequence[str] = (),
    info: dict | None = None,
) -> Dataset:
    """Build a classification dataset from raw arrays (or an :class:`_NpyMember`, of which only the kept rows are
    read), subsetting before the float conversion; uint8 images are kept as they are with ``scale`` (converted per
    episode, :meth:`Dataset.inputs`)."""
    labels = _int_labels(labels, name)
    if images.dtype.kind not in "biuf":
        raise DatasetError(f"Dataset {name!r}: images must be numbers, received dtype {images.dtype}.")
    if per_class is not None:
        idx = _first_per_class_indices(labels, per_class, n_classes, name)
        images, labels = _rows(images, idx), labels[idx]
    else:
        images = _rows(images, None)
    shape = tuple(images.shape[1:])
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    compact = flat.dtype == np.uint8
    x = torch.from_numpy(flat if compact else flat.astype(np.float32) / np.float32(scale))
    info = dict(info or {})
    if per_class is not None:
        info["per_class"] = int(per_class)
    return Dataset(
        name=name,
        images=x,
        labels=torch.from_numpy(labels),
        n_classes=int(n_classes),
        image_shape=shape,
        class_names=tuple(class_names),
        info=info,
        scale=float(scale) if compact else None,
    )


# ------------------------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or plain, into a numpy array.

    The header is two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
    ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a big-endian uint32;
    the data follow in C order, big-endian. Compression is detected from the content, not the name.

    Returns
    -------
    numpy.ndarray
        The array in native byte order (EMNIST images are returned as stored, i.e. transposed).

    Raises
    ------
    DatasetError
        If the file is missing, not IDX (bad magic number), or truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as err:
        raise DatasetError(f"IDX file {str(path)!r} does not exist. {_FIX_HINT}") from err
    except (OSError, EOFError) as err:
        raise DatasetError(f"IDX file {str(path)!r} could not be read or decompressed ({err}).") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{str(path)!r} is not an IDX file: its magic number is {raw[:4].hex() or 'empty'}, expected "
            f"00 00 <type code in {sorted(_IDX_DTYPES)}> <ndim>. Is it an HTML error page or another format?"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {str(path)!r} is truncated inside its header ({len(raw)} bytes).")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"IDX file {str(path)!r} has {len(raw) - header} data bytes, expected {expected} for shape "
            f"{dims} and dtype {dtype}. The file is truncated or corrupt: download it again."
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _idx_pair(folder: Path, images_name: str) -> tuple[Path, Path] | None:
    """The (images, labels) pair of an IDX images base name in ``folder``, with or without ``.gz``."""
    labels_name = images_name.replace("images-idx3", "labels-idx1")
    for suffix in (".gz", ""):
        img, lab = folder / (images_name + suffix), folder / (labels_name + suffix)
        if img.is_file() and lab.is_file():
            return img, lab
    return None


def _read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(
            f"IDX pair {str(images)!r} / {str(labels)!r}: expected images (N, H, W) and labels (N,), "
            f"received {x.shape} and {y.shape}."
        )
    return x, y


def _search_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    return [root] + [root / s for s in subdirs if (root / s).is_dir()]


def _resolve_root(path: str | os.PathLike | None) -> Path:
    return Path(path).expanduser() if path is not None else default_data_dir()


def default_data_dir() -> Path:
    """The data folder: ``$RULESEARCH_DATA`` if set, else ``../shared/data`` relative to the working dir."""
    env = os.environ.get(_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.cwd().parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------------------
def load_digits(path: str | os.PathLike | None = None, per_class: int | None = None) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 images of 8 x 8, 10 classes, scaled by 1/16.

    ``path`` is ignored (the data ship with scikit-learn). ``per_class`` keeps the first N of each class.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    return _classification(
        "digits",
        images,
        bunch.target,
        10,
        16.0,
        per_class,
        class_names=[str(d) for d in range(10)],
        info={"source": "sklearn.datasets.load_digits"},
    )


_EMNIST_CLASSES = {"balanced": 47, "bymerge": 47, "byclass": 62, "letters": 26, "digits": 10, "mnist": 10}
_EMNIST_PARTS = ("train", "test")


def load_emnist(
    path: str | os.PathLike | None = None,
    split: str | None = None,
    part: str = "test",
    per_class: int | None = None,
) -> Dataset:
    """EMNIST from the official IDX files or from an ``.npz`` archive; images returned upright.

    Parameters
    ----------
    path : path-like, optional
        An ``.npz`` file (arrays ``images`` uint8 (N, 28, 28) upright, ``labels``, optional ``mapping``),
        an IDX images file, or a folder holding ``emnist_<split>_<part>.npz`` or the pair
        ``emnist-<split>-<part>-images-idx3-ubyte[.gz]`` / ``...-labels-idx1-ubyte[.gz]`` (also searched in
        its ``emnist/`` and ``gzip/`` subfolders). Default: :func:`default_data_dir`.
    split : str, optional
        ``"balanced"``, ``"bymerge"``, ``"byclass"``, ``"letters"``, ``"digits"`` or ``"mnist"``. None:
        balanced if present, else bymerge (same 47 classes and label order). May carry the part, e.g.
        ``"balanced-train"``.
    part : {"test", "train"}
        Which official part; the paper's 47 x 400 set is the Balanced test part.
    per_class : int, optional
        Keep the first ``per_class`` images of every class in file order (the paper used 400).

    Notes
    -----
    The IDX files store every image transposed; they are transposed back. ``letters`` labels (1..26 in the
    files) are shifted to 0..25.
    """
    if split is not None:
        split = str(split).lower().replace("_", "-")
        for p in _EMNIST_PARTS:
            if split.endswith("-" + p):
                split, part = split[: -len(p) - 1], p
    if part not in _EMNIST_PARTS:
        raise ConfigError(f"EMNIST part must be one of {_EMNIST_PARTS}; received {part!r}.")
    if split is not None and split not in _EMNIST_CLASSES:
        raise ConfigError(
            f"Unknown EMNIST split {split!r}; known: {sorted(_EMNIST_CLASSES)}{_did_you_mean(split, _EMNIST_CLASSES)}"
        )
    root = _resolve_root(path)
    splits = [split] if split is not None else ["balanced", "bymerge"]

    if root.is_file():
        if root.suffix == ".npz":
            return _emnist_from_npz(root, split, _part_from_name(root.name, part), per_class)
        if "images-idx3" in root.name:
            pair = _idx_pair(root.parent, root.name.removesuffix(".gz"))
            if pair is None:
                raise DatasetError(
                    f"Found {str(root)!r} but not its labels file "
                    f"{root.name.replace('images-idx3', 'labels-idx1')!r} beside it."
                )
            return _emnist_from_idx(
                *pair, split or _split_from_name(root.name), _part_from_name(root.name, part), per_class
            )
        raise DatasetError(f"EMNIST path {str(root)!r} is a file but neither .npz nor an IDX images file.")

    looked = _search_dirs(root, ["emnist", "gzip", "emnist/gzip", "EMNIST/raw"])
    for s in splits:
        for folder in looked:
            for npz in (f"emnist_{s}_{part}.npz", f"emnist-{s}-{part}.npz"):
                if (folder / npz).is_file():
                    return _emnist_from_npz(folder / npz, s, part, per_class)
            pair = _idx_pair(folder, f"emnist-{s}-{part}-images-idx3-ubyte")
            if pair is not None:
                return _emnist_from_idx(*pair, s, part, per_class)

    found = sorted({f.name for d in looked if d.is_dir() for f in d.iterdir() if "emnist" in f.name.lower()})
    expected = " or ".join(
        f"'emnist_{s}_{part}.npz' or the pair 'emnist-{s}-{part}-images-idx3-ubyte.gz' + "
        f"'emnist-{s}-{part}-labels-idx1-ubyte.gz'"
        for s in splits
    )
    hint = f" Found other EMNIST files there: {found}; choose them with split=/part=." if found else ""
    raise DatasetError(
        f"No EMNIST {'/'.join(splits)} {part} data in {str(root)!r}"
        f"{'' if root.is_dir() else ' (the folder does not exist)'}. Expected {expected} in one of "
        f"{[str(d) for d in looked]}.{hint} Get the files from https://www.nist.gov/itl/products-and-services/"
        f"emnist-dataset (gzip.zip). {_FIX_HINT}"
    )


def _split_from_name(name: str) -> str | None:
    m = re.search(r"emnist[-_]([a-z]+)", name.lower())
    return m.group(1) if m and m.group(1) in _EMNIST_CLASSES else None


def _part_from_name(name: str, default: str) -> str:
    m = re.search(r"(?<![a-z])(train|test)(?![a-z])", name.lower())
    return m.group(1) if m else default


def _emnist_dataset(
    images: np.ndarray, labels: np.ndarray, split: str | None, part: str, per_class, mapping, source
) -> Dataset:
    labels = _int_labels(labels, str(source))
    if split == "letters" and labels.size and labels.min() >= 1:
        labels = labels - 1
    if mapping:
        n_classes = len(mapping)
    elif split in _EMNIST_CLASSES:
        n_classes = _EMNIST_CLASSES[split]
    else:
        n_classes = int(labels.max()) + 1 if labels.size else 1
    if mapping is None and n_classes == 47:
        mapping = EMNIST_MAPPING
    name = f"emnist-{split}-{part}" if split else "emnist"
    return _classification(
        name,
        images,
        labels,
        n_classes,
        255.0,
        per_class,
        class_names=list(mapping) if mapping and len(mapping) == n_classes else (),
        info={"source": str(source), "split": split, "part": part},
    )


def _emnist_from_npz(file: Path, split: str | None, part: str, per_class: int | None) -> Dataset:
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DatasetError(
                    f"{str(file)!r} lacks the arrays {missing}; an EMNIST npz needs 'images' (uint8, "
                    f"N x 28 x 28, upright) and 'labels' (N,), optionally 'mapping'. It holds {z.files}."
                )
            labels = z["labels"]
            mapping = str(z["mapping"]) if "mapping" in z.files else None
        images = _NpyMember(file, "images")  # its rows are read later: only those kept
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(
            f"Could not read {str(file)!r} as an npz archive ({type(err).__name__}: {err or 'empty file'}); it is "
            "truncated, not an npz, or holds Python objects. Write it again with "
            "numpy.savez(file, images=..., labels=...)."
        ) from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"{str(file)!r}: expected images (N, H, W) and labels (N,), received {images.shape} and {labels.shape}."
        )
    split = split or _split_from_name(file.name)
    return _emnist_dataset(images, labels, split, part, per_class, mapping, file)


def _emnist_from_idx(images: Path, labels: Path, split: str | None, part: str, per_class: int | None) -> Dataset:
    x, y = _read_idx_pair(images, labels)
    return _emnist_dataset(x.transpose(0, 2, 1), y, split, part, per_class, None, images)


def _load_mnist_like(
    name: str, path: str | os.PathLike | None, part: str, per_class: int | None, names: Sequence[str]
) -> Dataset:
    parts = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if part not in parts:
        raise ConfigError(f"{name}: part must be 'train' or 'test'; received {part!r}.")
    root = _resolve_root(path)
    base = f"{parts[part]}-images-idx3-ubyte"
    subdirs = [
        name,
        name.replace("-", "_"),
        f"{name}/raw",
        "MNIST/raw" if name == "mnist" else "FashionMNIST/raw",
    ]
    looked = _search_dirs(root, subdirs)
    for folder in looked:
        pair = _idx_pair(folder, base)
        if pair is not None:
            x, y = _read_idx_pair(*pair)
            return _classification(
                f"{name}-{'test' if part != 'train' else 'train'}",
                x,
                y,
                10,
                255.0,
                per_class,
                class_names=names,
                info={"source": str(pair[0]), "part": part},
            )
    raise DatasetError(
        f"No {name} {part} files in {str(root)!r}{'' if root.is_dir() else ' (the folder does not exist)'}. "
        f"Expected '{base}.gz' and '{base.replace('images-idx3', 'labels-idx1')}.gz' (or uncompressed) in "
        f"one of {[str(d) for d in looked]}. {_FIX_HINT}"
    )


def load_mnist(path: str | os.PathLike | None = None, part: str = "train", per_class: int | None = None) -> Dataset:
    """MNIST from the IDX files ``train-images-idx3-ubyte.gz`` (``t10k-...`` for the test part) in path."""
    return _load_mnist_like("mnist", path, part, per_class, [str(d) for d in range(10)])


_FASHION = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load_fashion_mnist(
    path: str | os.PathLike | None = None, part: str = "train", per_class: int | None = None
) -> Dataset:
    """Fashion-MNIST from its IDX files (same names as MNIST) in ``path`` or ``path/fashion-mnist``."""
    return _load_mnist_like("fashion-mnist", path, part, per_class, _FASHION)


def make_teacher(
    path: str | os.PathLike | None = None,
    n_in: int = 20,
    n_classes: int = 5,
    hidden: int = 32,
    n_samples: int = 2000,
    seed: int = 0,
) -> Dataset:
    """Synthetic classification: inputs uniform in ``[0, 1]^n_in`` labelled by a random teacher MLP.

    .. math:: y = \\arg\\max_c \\; [W_2 \\tanh(W_1 (x - 1/2)) + b]_c

    with Gaussian ``W_1`` (hidden x n_in), ``W_2`` (n_classes x hidden) and a bias ``b`` calibrated so that
    classes are roughly balanced. Everything comes from ``numpy.random.default_rng(seed)``; ``path`` is
    ignored.
    """
    _check_pos(n_in=n_in, n_classes=n_classes, hidden=hidden, n_samples=n_samples)
    rng = np.random.default_rng(seed)
    x = rng.random((n_samples, n_in))
    w1 = rng.standard_normal((hidden, n_in)) * np.sqrt(12.0 / n_in)  # pre-activations of unit variance
    w2 = rng.standard_normal((n_classes, hidden)) / np.sqrt(hidden)
    logits = np.tanh((x - 0.5) @ w1.T) @ w2.T
    b = np.zeros(n_classes)
    for _ in range(100):  # push the argmax frequencies towards 1 / n_classes
        freq = np.bincount(np.argmax(logits + b, axis=1), minlength=n_classes) / n_samples
        b -= 0.5 * (freq - 1.0 / n_classes) * np.std(logits)
    labels = np.argmax(logits + b, axis=1)
    return Dataset(
        name="teacher",
        images=torch.from_numpy(x.astype(np.float32)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        n_classes=n_classes,
        image_shape=(n_in,),
        info={"seed": seed, "hidden": hidden, "W1": w1, "W2": w2, "b": b},
    )


def make_lowrank(
    path: str | os.PathLike | None = None,
    n_in: int = 20,
    n_out: int = 10,
    rank: int = 2,
    n_samples: int = 2000,
    noise: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Synthetic regression with a low-rank linear teacher.

    .. math:: Y = Z W_{true} + \\sigma \\varepsilon, \\qquad W_{true} = A B, \\; A \\in R^{n_{in} \\times r},
        B \\in R^{r \\times n_{out}}

    with ``Z`` uniform in ``[0, 1]^n_in``, Gaussian ``A / sqrt(n_in)``, ``B / sqrt(r)`` and ``eps`` standard
    normal. ``W_true`` (n_in x n_out) is kept in ``info["W_true"]``. ``path`` is ignored.
    """
    _check_pos(n_in=n_in, n_out=n_out, rank=rank, n_samples=n_samples)
    if rank > min(n_in, n_out):
        raise ConfigError(f"lowrank: rank={rank} exceeds min(n_in, n_out) = {min(n_in, n_out)}; lower rank.")
    if not noise >= 0:
        raise ConfigError(f"lowrank: noise must be >= 0; received {noise!r}.")
    rng = np.random.default_rng(seed)
    z = rng.random((n_samples, n_in))
    w_true = (rng.standard_normal((n_in, rank)) / np.sqrt(n_in)) @ (rng.standard_normal((rank, n_out)) / np.sqrt(rank))
    y = z @ w_true + noise * rng.standard_normal((n_samples, n_out))
    return Dataset(
        name="lowrank",
        images=torch.from_numpy(z.astype(np.float32)),
        labels=torch.from_numpy(y.astype(np.float32)),
        n_classes=0,
        image_shape=(n_in,),
        task="regression",
        info={"seed": seed, "rank": rank, "noise": noise, "W_true": w_true},
    )


def _check_pos(**values: Any) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{k} must be a positive int; received {v!r}.")


# ------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------
#: Dataset name -> loader ``f(path=None, **options) -> Dataset``. Add an entry to register a dataset.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "emnist": load_emnist,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "teacher": make_teacher,
    "lowrank": make_lowrank,
}


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f". Did you mean {' or '.join(repr(c) for c in close)}?" if close else "."


def load_dataset(name: str, path: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load a registered dataset by name.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS` (case and ``_`` / ``-`` insensitive): ``digits`` (default, bundled),
        ``emnist``, ``mnist``, ``fashion-mnist``, ``teacher``, ``lowrank``.
    path : path-like, optional
        File or folder for file datasets; None means :func:`default_data_dir`. Ignored by the others.
    **options
        Loader keywords, e.g. ``split="balanced", part="test", per_class=400`` for EMNIST or
        ``n_in=20, seed=0`` for the synthetic ones.

    Raises
    ------
    DatasetError
        Unknown name, or missing / malformed files.
    ConfigError
        Unknown or invalid option.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}{_did_you_mean(key, DATASETS)}")
    loader = DATASETS[key]
    params = inspect.signature(loader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [p for p in params if p != "path"]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ConfigError(
                f"Dataset {key!r} has no option {unknown[0]!r}; its options are {allowed}"
                f"{_did_you_mean(unknown[0], allowed)}"
            )
    return loader(path, **options)


# ------------------------------------------------------------------------------------------------------------
# Class splits
# ------------------------------------------------------------------------------------------------------------
class ClassSplit(NamedTuple):
    """Class ids for meta-training and meta-testing (sorted lists; they may overlap only if asked to)."""

    meta_train: list[int]
    meta_test: list[int]


_EMNIST_GROUPS = {"digits": list(range(10)), "letters": list(range(10, 47))}


def split_classes(dataset: Dataset, spec: Any = "all", seed: int = 0) -> ClassSplit:
    """Split the classes of ``dataset`` into meta-train and meta-test ids.

    Parameters
    ----------
    dataset : Dataset
        A classification dataset.
    spec : str, float, sequence, or pair of sequences
        - ``"all"``: both sides get every class (the paper meta-tests on the meta-training classes).
        - ``"digits"`` / ``"letters"`` (47-class EMNIST layout: labels 0-9 digits, 10-46 letters):
          meta-train on that group, meta-test on the other.
        - a float in (0, 1): that fraction of the classes (rounded, at least one, leaving at least one) drawn
          at random with ``numpy.random.default_rng(seed)`` for meta-training; the rest for meta-testing.
        - a sequence of ints: meta-train classes; the complement is meta-test.
        - a pair ``(meta_train, meta_test)`` of sequences, used as given.
    seed : int
        Seed for the fraction spec.

    Examples
    --------
    >>> split_classes(load_dataset("digits"), [0, 1, 2])
    ClassSplit(meta_train=[0, 1, 2], meta_test=[3, 4, 5, 6, 7, 8, 9])
    """
    if dataset.task != "classification":
        raise ConfigError(f"split_classes needs a classification dataset; {dataset.name!r} is {dataset.task}.")
    n = dataset.n_classes
    everything = list(range(n))
    if isinstance(spec, str):
        key = spec.lower()
        if key == "all":
            return ClassSplit(everything, list(everything))
        if key in _EMNIST_GROUPS:
            if n != 47:
                raise ConfigError(
                    f"split_classes({spec!r}) assumes the 47-class EMNIST layout (0-9 digits, 10-46 "
                    f"letters); {dataset.name!r} has {n} classes. Pass explicit class lists instead."
                )
            train = _EMNIST_GROUPS[key]
            return ClassSplit(list(train), [c for c in everything if c not in train])
        raise ConfigError(
            f"Unknown class split {spec!r}; known names: ['all', 'digits', 'letters']"
            f"{_did_you_mean(key, ['all', 'digits', 'letters'])} Or pass a fraction, a list, or a pair of "
            f"lists."
        )
    if isinstance(spec, float):
        if not 0.0 < spec < 1.0 or n < 2:
            raise ConfigError(f"A fractional class split must lie in (0, 1) with >= 2 classes; received {spec!r}.")
        n_train = min(max(int(round(spec * n)), 1), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        return ClassSplit(sorted(int(c) for c in perm[:n_train]), sorted(int(c) for c in perm[n_train:]))
    try:
        items = list(spec)
    except TypeError as err:
        raise ConfigError(f"Cannot read class split {spec!r}: expected a name, fraction or class lists.") from err
    if len(items) == 2 and all(not isinstance(s, (int, np.integer, str)) for s in items):
        train = _check_class_list(items[0], n, "split_classes meta_train")
        test = _check_class_list(items[1], n, "split_classes meta_test")
        return ClassSplit(sorted(train), sorted(test))
    train = _check_class_list(items, n, "split_classes")
    test = [c for c in everything if c not in train]
    if not test:
        raise ConfigError("split_classes: the list covers every class, leaving none to meta-test; use 'all'.")
    return ClassSplit(sorted(train), test)

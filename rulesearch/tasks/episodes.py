"""Episodes: M-way K-shot Q-query tasks, each a pure function of (seed, t, k).

An *episode* is one task = one inner-loop run. Episode ``k`` of meta-step ``t`` of a run with seed ``seed``
draws its classes, images, order, initial weights and feedback from generators seeded by ``(seed, t, k)``,
so batching, resuming and sharding across processes see identical episodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DatasetError, ShapeError
from .base import Task
from .data import Dataset

__all__ = ["episode_seed", "episode_generator", "EpisodeBatch", "TaskSampler"]


def episode_seed(seed: int, t: int, k: int, stream: str) -> int:
    """A 63-bit seed derived from ``(seed, t, k, stream)`` by hashing (stable across platforms)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(t)}/{int(k)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_generator(seed: int, t: int, k: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for one random stream of episode ``(seed, t, k)``.

    Streams in use: ``"task"`` (classes, images, order) and ``"init"`` (initial weights, feedback).
    """
    return torch.Generator().manual_seed(episode_seed(seed, t, k, stream))


@dataclass(frozen=True, eq=False)
class EpisodeBatch:
    """A batch of ``B`` episodes, each ``M``-way, ``K``-shot with ``Q`` query samples per class.

    Attributes
    ----------
    x_train : torch.Tensor, (B, M*K, D) float
        Training samples in presentation order (shuffled across classes).
    y_train : torch.Tensor, (B, M*K) int64, or (B, M*K, n_out) float for regression
    x_query : torch.Tensor, (B, M*Q, D) float
        Held-out samples, class-major (all ``Q`` of ``classes[:, 0]`` first), disjoint from ``x_train``.
    y_query : torch.Tensor, (B, M*Q) int64, or (B, M*Q, n_out) float for regression
    classes : torch.Tensor, (B, M) int64
        Original class ids of each episode in slot order; ``(B, 0)`` for regression.
    seed, t : int
        Run seed and meta-step of the episodes.
    ks : tuple of int
        Episode index ``k`` of each row: row ``b`` is episode ``(seed, t, ks[b])``.
    M, K, Q : int
        Ways, shots and queries per class.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    classes: torch.Tensor
    seed: int
    t: int
    ks: tuple
    M: int
    K: int
    Q: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        B, MK, MQ = len(self.ks), self.M * self.K, self.M * self.Q
        expect = {
            "x_train": (B, MK),
            "y_train": (B, MK),
            "x_query": (B, MQ),
            "y_query": (B, MQ),
        }
        for name, lead in expect.items():
            x = getattr(self, name)
            if tuple(x.shape[:2]) != lead:
                raise ShapeError(
                    f"EpisodeBatch.{name}: expected leading shape {lead} (B = len(ks), M*K or M*Q); received "
                    f"{tuple(x.shape)}."
                )
        if self.x_train.ndim != 3 or self.x_query.shape[2:] != self.x_train.shape[2:]:
            raise ShapeError(
                f"EpisodeBatch: x_train and x_query must be (B, n, D) with the same D; received "
                f"{tuple(self.x_train.shape)} and {tuple(self.x_query.shape)}."
            )
        if self.classes.ndim != 2 or self.classes.shape[0] != B:
            raise ShapeError(
                f"EpisodeBatch.classes: expected (B, M) with B = {B}; received {tuple(self.classes.shape)}."
            )

    def __len__(self) -> int:
        return len(self.ks)

    def __repr__(self) -> str:
        return (
            f"EpisodeBatch(B={len(self)}, M={self.M}, K={self.K}, Q={self.Q}, D={self.n_features}, "
            f"seed={self.seed}, t={self.t}, ks={list(self.ks)[:8]}{'...' if len(self) > 8 else ''}, "
            f"dtype={self.x_train.dtype}, device={self.x_train.device})"
        )

    @property
    def n_features(self) -> int:
        """Input dimension ``D``."""
        return int(self.x_train.shape[2])

    @property
    def is_regression(self) -> bool:
        """True when the targets are float vectors rather than class ids."""
        return self.y_train.is_floating_point()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EpisodeBatch:
        """A copy on ``device`` with floating tensors (inputs, regression targets) cast to ``dtype``."""

        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)

        return self._replace(*(move(x) for x in self._tensors()))

    def select(self, rows: Sequence[int] | slice) -> EpisodeBatch:
        """The episodes at batch positions ``rows`` (a slice or a list of positions)."""
        pos = list(range(len(self)))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        idx = torch.tensor(pos, dtype=torch.int64)
        moved = (x[idx.to(x.device)] for x in self._tensors())
        return self._replace(*moved, ks=tuple(self.ks[p] for p in pos))

    def _tensors(self) -> tuple:
        return (self.x_train, self.y_train, self.x_query, self.y_query, self.classes)

    def _replace(self, x_train, y_train, x_query, y_query, classes, ks=None) -> EpisodeBatch:
        return EpisodeBatch(
            x_train, y_train, x_query, y_query, classes, self.seed, self.t, self.ks if ks is None else ks,
            self.M, self.K, self.Q,
        )  # fmt: skip


class TaskSampler(Task):
    """Draw ``M``-way ``K``-shot ``Q``-query episodes from a dataset, each a function of ``(seed, t, k)``.

    Episode ``k`` of meta-step ``t`` draws everything from ``episode_generator(seed, t, k, "task")`` alone, in
    this order: the ``M`` classes, then ``K + Q`` distinct images of each class (the first ``K`` train, the
    remaining ``Q`` query), then a random permutation of the ``M*K`` training samples. Hence a batch of
    episodes equals the same episodes sampled one at a time, and any shard of ``ks`` reproduces its rows.
    (Episodes also depend on the dataset, the allowed classes and the options, which fix the draws' shapes.)

    Parameters
    ----------
    dataset : Dataset
        Source of samples. For a regression dataset, each episode draws ``M*K`` training and ``M*Q`` query
        rows at random without replacement (``M`` then only scales the sizes).
    M, K, Q : int
        Classes per episode, training samples per class, query samples per class (``Q = 0`` allowed).
    classes : sequence of int, optional
        Allowed class ids (e.g. the meta-train side of :func:`rulesearch.tasks.data.split_classes`). Default: every
        class that has samples.
    replacement : bool
        Draw the ``M`` classes with replacement, as the paper's code does. A class drawn twice contributes
        the same images to both slots (with ``remap_labels`` both get the label of its first slot), so query
        samples stay disjoint from training samples.
    remap_labels : bool
        Label samples ``0..M-1`` by the slot of their class in ``classes[b]`` instead of the original id.
    fixed_images : bool
        As the paper's code: the training samples of a class are its first ``K`` in file order and the queries
        the next ``Q``; only the classes and the training order are random. Default: ``K + Q`` distinct images
        drawn at random per class and episode.

    Examples
    --------
    >>> from rulesearch.tasks.data import load_dataset
    >>> sampler = TaskSampler(load_dataset("digits"), M=5, K=10, Q=4)
    >>> batch = sampler.sample(seed=0, t=0, ks=range(8))
    >>> batch.x_train.shape, batch.y_train.shape, batch.x_query.shape, batch.classes.shape
    (torch.Size([8, 50, 64]), torch.Size([8, 50]), torch.Size([8, 20, 64]), torch.Size([8, 5]))
    >>> bool((sampler.sample(0, 0, [3]).x_train == batch.x_train[3]).all())
    True
    """

    def __init__(
        self,
        dataset: Dataset,
        M: int = 5,
        K: int = 50,
        Q: int = 10,
        classes: Sequence[int] | None = None,
        replacement: bool = False,
        remap_labels: bool = False,
        fixed_images: bool = False,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise ConfigError(
                f"TaskSampler needs a rulesearch.tasks.data.Dataset; received {type(dataset).__name__}. "
                f"Load one with rulesearch.tasks.data.load_dataset(name)."
            )
        for name, value, low in (("M", M, 1), ("K", K, 1), ("Q", Q, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"TaskSampler: {name} must be an int >= {low}; received {value!r}.")
        self.dataset = dataset
        self.M, self.K, self.Q = M, K, Q
        self.replacement = bool(replacement)
        self.remap_labels = bool(remap_labels)
        self.fixed_images = bool(fixed_images)
        self._images = dataset.images
        self._regression = dataset.task == "regression"
        if self._regression:
            self._init_regression(classes)
        else:
            self._init_classification(classes)

    def _init_regression(self, classes: Sequence[int] | None) -> None:
        ds = self.dataset
        opts = {
            "classes": classes is not None,
            "replacement": self.replacement,
            "remap_labels": self.remap_labels,
        }
        used = [k for k, v in opts.items() if v]
        if used:
            raise ConfigError(
                f"TaskSampler: {used} apply to classification only; dataset {ds.name!r} is a regression "
                f"task. Leave them at their defaults."
            )
        need = self.M * (self.K + self.Q)
        if need > ds.n_samples:
            raise DatasetError(
                f"TaskSampler: an episode needs M*(K+Q) = {self.M}*({self.K}+{self.Q}) = {need} rows "
                f"but dataset {ds.name!r} holds {ds.n_samples}. Lower M, K or Q, or add rows."
            )
        self.classes = ()
        self._targets = ds.labels

    def _init_classification(self, classes: Sequence[int] | None) -> None:
        ds = self.dataset
        counts = ds.n_per_class().cpu()
        if classes is None:
            allowed = [c for c in range(ds.n_classes) if counts[c] > 0]
        else:
            try:
                allowed = [int(c) for c in classes]
            except (TypeError, ValueError) as err:
                raise ConfigError(f"TaskSampler: classes must be a sequence of ints; received {classes!r}.") from err
            bad = [c for c in allowed if not 0 <= c < ds.n_classes]
            if bad or len(set(allowed)) != len(allowed) or not allowed:
                raise ConfigError(
                    f"TaskSampler: classes must be distinct ids in [0, {ds.n_classes}) for dataset "
                    f"{ds.name!r}; received {allowed!r}" + (f" (out of range: {bad})." if bad else ".")
                )
        C = len(allowed)
        if not self.replacement and self.M > C:
            raise ConfigError(
                f"TaskSampler: M = {self.M} classes per episode but only {C} allowed classes in {ds.name!r}. "
                f"Lower M to at most {C}, allow more classes, or pass replacement=True."
            )
        need = self.K + self.Q
        short = {c: int(counts[c]) for c in allowed if counts[c] < need}
        if short:
            shown = ", ".join(f"{c}: {n}" for c, n in list(short.items())[:10])
            raise DatasetError(
                f"TaskSampler: every class needs K + Q = {self.K} + {self.Q} = {need} distinct samples, but "
                f"in {ds.name!r} {len(short)} allowed classes hold fewer (class: count) {shown}"
                f"{' ...' if len(short) > 10 else ''}. Lower K or Q (smallest allowed class: "
                f"{min(int(counts[c]) for c in allowed)}), or exclude those classes via classes=."
            )
        self.classes = tuple(allowed)
        self._allowed = torch.tensor(allowed, dtype=torch.int64)
        self._counts = counts[self._allowed]
        width = need if self.fixed_images else int(self._counts.max())
        table = torch.zeros(C, width, dtype=torch.int64)
        for i, c in enumerate(allowed):
            rows = ds.class_indices(c)[:width].cpu()
            table[i, : len(rows)] = rows
        self._table = table  # (C, width): row i holds the sample indices of class allowed[i] in file order

    def __repr__(self) -> str:
        opts = "".join(f", {k}=True" for k in ("replacement", "remap_labels", "fixed_images") if getattr(self, k))
        n = "regression" if self._regression else f"{len(self.classes)} classes"
        return f"TaskSampler({self.dataset.name!r} [{n}], M={self.M}, K={self.K}, Q={self.Q}{opts})"

    @property
    def n_inputs(self) -> int:
        return self.dataset.n_features

    @property
    def n_outputs(self) -> int:
        """Network output size: ``M`` with ``remap_labels``, else the dataset's ``n_outputs``."""
        return self.M if self.remap_labels else self.dataset.n_outputs

    def sample(self, seed: int, t: int, ks: int | Sequence[int]) -> EpisodeBatch:
        """Draw the episodes ``(seed, t, k)`` for every ``k`` in ``ks`` as one batch.

        Parameters
        ----------
        seed, t : int
            Run seed and meta-step.
        ks : int or sequence of int
            Episode indices (batch row ``b`` is episode ``ks[b]``); an int ``n`` means ``range(n)``.

        Returns
        -------
        EpisodeBatch
            On the device of the dataset, inputs in its dtype (float32 for the built-in loaders).
        """
        if isinstance(ks, bool):
            raise ConfigError(f"ks must be an int count or a sequence of episode indices; received {ks!r}.")
        ks = list(range(ks)) if isinstance(ks, int) else [int(k) for k in ks]
        if not ks or min(ks) < 0:
            raise ConfigError(f"ks must name at least one episode index >= 0; received {ks!r}.")
        gens = [episode_generator(seed, t, k, "task") for k in ks]
        draw = self._draw_regression if self._regression else self._draw_classification
        train, y_train, query, y_query, classes = draw(gens)
        dev = self._images.device
        train, query = train.to(dev), query.to(dev)
        if self._regression:
            y_train, y_query = self._targets[train], self._targets[query]
        return EpisodeBatch(
            x_train=self.dataset.inputs(train),
            y_train=y_train.to(dev),
            x_query=self.dataset.inputs(query),
            y_query=y_query.to(dev),
            classes=classes.to(dev),
            seed=int(seed),
            t=int(t),
            ks=tuple(ks),
            M=self.M,
            K=self.K,
            Q=self.Q,
        )

    def _draw_classification(self, gens: list[torch.Generator]) -> tuple:
        """Sample indices for B episodes: the random draws per episode generator, the rest batched."""
        M, K, Q, C, B = self.M, self.K, self.Q, len(self.classes), len(gens)
        width = self._table.shape[1]
        slots, keys, perms = [], [], []
        for g in gens:  # the only random draws; their order defines the episode
            slots.append(
                torch.randint(C, (M,), generator=g) if self.replacement else torch.randperm(C, generator=g)[:M]
            )
            if not self.fixed_images:
                keys.append(torch.rand(M, width, generator=g, dtype=torch.float64))
            perms.append(torch.randperm(M * K, generator=g))
        slots, perm = torch.stack(slots), torch.stack(perms)  # (B, M), (B, M*K)
        first = (slots[:, :, None] == slots[:, None, :]).int().argmax(dim=2)  # (B, M): first slot of that class
        if self.fixed_images:
            pos = torch.arange(K + Q).expand(B, M, K + Q)
        else:
            keys = torch.stack(keys)  # (B, M, width); keys of the first slot reused by repeated classes
            keys = keys.masked_fill(torch.arange(width) >= self._counts[slots][:, :, None], 2.0)
            keys = keys.gather(1, first[:, :, None].expand(B, M, width))
            # K+Q distinct valid positions per class: the smallest keys (float64 keys do not tie in practice)
            pos = keys.topk(K + Q, dim=2, largest=False, sorted=True).indices
        idx = self._table[slots[:, :, None], pos]  # (B, M, K+Q) sample indices
        classes = self._allowed[slots]
        lab = first if self.remap_labels else classes
        train = idx[:, :, :K].reshape(B, M * K).gather(1, perm)
        y_train = lab.repeat_interleave(K, dim=1).gather(1, perm)
        query = idx[:, :, K:].reshape(B, M * Q)
        return train, y_train, query, lab.repeat_interleave(Q, dim=1), classes

    def _draw_regression(self, gens: list[torch.Generator]) -> tuple:
        n_train, n_query, B = self.M * self.K, self.M * self.Q, len(gens)
        rows, perms = [], []
        for g in gens:
            if self.fixed_images:
                rows.append(torch.arange(n_train + n_query))
            else:
                rows.append(torch.randperm(self.dataset.n_samples, generator=g)[: n_train + n_query])
            perms.append(torch.randperm(n_train, generator=g))
        rows = torch.stack(rows)
        train = rows[:, :n_train].gather(1, torch.stack(perms))
        empty = torch.empty(B, 0, dtype=torch.int64)
        return train, empty, rows[:, n_train:], empty, empty

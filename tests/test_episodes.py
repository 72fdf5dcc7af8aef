"""Tests of rulesearch.tasks.episodes: determinism in (seed, t, k), batching, sharding, invariants, errors."""

from __future__ import annotations

import pytest
import torch

from rulesearch.errors import ConfigError, DatasetError, ShapeError
from rulesearch.tasks.data import Dataset, load_dataset
from rulesearch.tasks.episodes import EpisodeBatch, TaskSampler, episode_generator, episode_seed

N_PER = (30, 25, 40, 22, 35, 28)  # samples per class of the indexed toy set


@pytest.fixture(scope="module")
def indexed():
    """Classification set whose image row i encodes i, so sampled rows can be traced back to their index."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(N_PER)])
    # classes interleaved in file order
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))]
    n = len(labels)
    x = torch.stack([torch.arange(n) / (n - 1), torch.rand(n, generator=torch.Generator().manual_seed(8))], 1)
    return Dataset("indexed", x.double(), labels, len(N_PER), (2,))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def rows_of(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    return torch.round(x[..., 0] * (ds.n_samples - 1)).long()


def assert_batches_equal(a: EpisodeBatch, b: EpisodeBatch) -> None:
    for name in ("x_train", "y_train", "x_query", "y_query", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.seed, a.t, a.ks, a.M, a.K, a.Q) == (b.seed, b.t, b.ks, b.M, b.K, b.Q)


def cat(batches: list[EpisodeBatch]) -> dict:
    return {n: torch.cat([getattr(b, n) for b in batches]) for n in ("x_train", "y_train", "x_query", "y_query")}


# ------------------------------------------------------------------------------------------------------------
# generator streams
# ------------------------------------------------------------------------------------------------------------
def test_episode_seed_stable_and_distinct():
    assert episode_seed(1, 2, 3, "task") == episode_seed(1, 2, 3, "task")
    seeds = {episode_seed(s, t, k, st) for s in (0, 1) for t in (0, 1) for k in (0, 1) for st in ("task", "init")}
    assert len(seeds) == 16 and all(0 <= v < 2**63 for v in seeds)
    a = torch.rand(3, generator=episode_generator(0, 1, 2, "task"))
    assert torch.equal(a, torch.rand(3, generator=episode_generator(0, 1, 2, "task")))


# ------------------------------------------------------------------------------------------------------------
# determinism, batching, sharding
# ------------------------------------------------------------------------------------------------------------
OPTIONS = [
    {},
    {"replacement": True},
    {"remap_labels": True},
    {"fixed_images": True},
    {"replacement": True, "remap_labels": True, "fixed_images": True},
]
OPTION_IDS = ["default", "replacement", "remap", "fixed", "all-options"]


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_deterministic_in_seed_t_k(indexed, opts):
    s = TaskSampler(indexed, M=3, K=6, Q=4, **opts)
    a, b = s.sample(5, 2, [0, 1, 2]), s.sample(5, 2, [0, 1, 2])
    assert_batches_equal(a, b)
    for other in (s.sample(6, 2, [0, 1, 2]), s.sample(5, 3, [0, 1, 2]), s.sample(5, 2, [3, 4, 5])):
        assert not torch.equal(a.x_train, other.x_train)


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_batch_equals_one_at_a_time(indexed, opts):
    s = TaskSampler(indexed, M=4, K=5, Q=3, **opts)
    batch = s.sample(0, 7, range(6))
    singles = [s.sample(0, 7, [k]) for k in range(6)]
    for name, value in cat(singles).items():
        assert torch.equal(getattr(batch, name), value), name
    assert torch.equal(batch.classes, torch.cat([b.classes for b in singles]))
    assert_batches_equal(batch.select([2]), singles[2])


def test_shards_reproduce_rows_in_any_order(digits):
    s = TaskSampler(digits, M=5, K=10, Q=5)
    full = s.sample(3, 1, 8)
    assert full.ks == tuple(range(8))
    shard_a, shard_b = s.sample(3, 1, [0, 1, 2, 3]), s.sample(3, 1, [4, 5, 6, 7])
    for name, value in cat([shard_a, shard_b]).items():
        assert torch.equal(getattr(full, name), value)
    shuffled = s.sample(3, 1, [6, 2])
    assert_batches_equal(shuffled, full.select([6, 2]))
    assert_batches_equal(full.select(slice(4, 8)), shard_b)


def test_independent_of_sampler_instance(digits):
    a = TaskSampler(digits, M=5, K=10, Q=5).sample(1, 1, [4])
    b = TaskSampler(digits, M=5, K=10, Q=5).sample(1, 1, [4])
    assert_batches_equal(a, b)


# ------------------------------------------------------------------------------------------------------------
# sampling invariants
# ------------------------------------------------------------------------------------------------------------
def test_shapes_and_dtypes(digits):
    b = TaskSampler(digits, M=5, K=50, Q=10).sample(0, 0, 32)
    assert b.x_train.shape == (32, 250, 64) and b.x_train.dtype == torch.float32
    assert b.y_train.shape == (32, 250) and b.y_train.dtype == torch.int64
    assert b.x_query.shape == (32, 50, 64) and b.y_query.shape == (32, 50)
    assert b.classes.shape == (32, 5) and b.classes.dtype == torch.int64
    assert len(b) == 32 and (b.M, b.K, b.Q) == (5, 50, 10) and not b.is_regression


def test_classes_distinct_and_samples_consistent(indexed):
    M, K, Q = 4, 7, 5
    b = TaskSampler(indexed, M=M, K=K, Q=Q).sample(0, 0, 40)
    for i in range(len(b)):
        cls = b.classes[i]
        assert len(set(cls.tolist())) == M
        train, query = rows_of(indexed, b.x_train[i]), rows_of(indexed, b.x_query[i])
        assert torch.equal(indexed.labels[train], b.y_train[i])  # labels are the images' own classes
        assert torch.equal(indexed.labels[query], b.y_query[i])
        assert len(set(train.tolist())) == M * K and len(set(query.tolist())) == M * Q  # distinct
        assert not set(train.tolist()) & set(query.tolist())  # query held out
        assert sorted(b.y_train[i].tolist()) == sorted(cls.repeat_interleave(K).tolist())  # K per class
        assert torch.equal(b.y_query[i], cls.repeat_interleave(Q))  # query class-major, in slot order
    # training order is shuffled across classes, not class-major
    class_major = [torch.equal(b.y_train[i], b.classes[i].repeat_interleave(K)) for i in range(len(b))]
    assert not any(class_major)
    # every class and many distinct images get used
    assert set(b.classes.flatten().tolist()) == set(range(len(N_PER)))
    assert len(set(rows_of(indexed, b.x_train).flatten().tolist())) > 0.9 * indexed.n_samples


def test_allowed_classes_restrict(indexed):
    b = TaskSampler(indexed, M=2, K=5, Q=5, classes=[1, 4, 5]).sample(2, 0, 20)
    assert set(b.classes.flatten().tolist()) <= {1, 4, 5}
    assert set(b.y_train.flatten().tolist()) <= {1, 4, 5}


def test_remap_labels(indexed):
    M, K, Q = 3, 4, 2
    b = TaskSampler(indexed, M=M, K=K, Q=Q, remap_labels=True).sample(0, 0, 10)
    assert int(b.y_train.min()) == 0 and int(b.y_train.max()) == M - 1
    for i in range(len(b)):
        train = rows_of(indexed, b.x_train[i])
        assert torch.equal(b.classes[i][b.y_train[i]], indexed.labels[train])
        assert torch.equal(b.y_query[i], torch.arange(M).repeat_interleave(Q))
    assert TaskSampler(indexed, M=M, remap_labels=True, K=2, Q=1).n_outputs == M
    assert TaskSampler(indexed, M=M, K=2, Q=1).n_outputs == len(N_PER)


def test_replacement_allows_repeats_and_keeps_query_held_out(indexed):
    M, K, Q = 10, 3, 2  # more slots than the 6 classes: repeats guaranteed
    s = TaskSampler(indexed, M=M, K=K, Q=Q, replacement=True)
    b = s.sample(1, 0, 5)
    for i in range(len(b)):
        cls = b.classes[i].tolist()
        assert len(set(cls)) < M
        train = rows_of(indexed, b.x_train[i])
        query = rows_of(indexed, b.x_query[i])
        assert not set(train.tolist()) & set(query.tolist())
        assert torch.equal(indexed.labels[train], b.y_train[i])
        # a repeated class contributes the same query images in each of its slots
        q = query.reshape(M, Q)
        for j in range(M):
            assert torch.equal(q[j], q[cls.index(cls[j])])
    remapped = TaskSampler(indexed, M=M, K=K, Q=Q, replacement=True, remap_labels=True).sample(1, 0, 5)
    for i in range(len(remapped)):
        cls = remapped.classes[i].tolist()
        first = torch.tensor([cls.index(c) for c in cls])
        assert torch.equal(remapped.y_query[i], first.repeat_interleave(Q))
    # without replacement such an M is refused
    with pytest.raises(ConfigError, match="replacement=True"):
        TaskSampler(indexed, M=M, K=K, Q=Q)


def test_fixed_images_take_first_k_then_next_q_in_file_order(indexed):
    K, Q = 5, 3
    b = TaskSampler(indexed, M=3, K=K, Q=Q, fixed_images=True).sample(0, 0, 6)
    for i in range(len(b)):
        train, query = rows_of(indexed, b.x_train[i]), rows_of(indexed, b.x_query[i])
        for j, c in enumerate(b.classes[i].tolist()):
            own = indexed.class_indices(c)
            assert set(train[b.y_train[i] == c].tolist()) == set(own[:K].tolist())
            assert torch.equal(query[j * Q : (j + 1) * Q], own[K : K + Q])


def test_to_and_select(digits):
    b = TaskSampler(digits, M=3, K=4, Q=2).sample(0, 0, 4)
    d = b.to(dtype=torch.float64)
    assert d.x_train.dtype == torch.float64 and d.x_query.dtype == torch.float64
    assert d.y_train.dtype == torch.int64 and d.classes.dtype == torch.int64
    assert torch.equal(d.x_train.float(), b.x_train) and b.x_train.dtype == torch.float32  # original untouched
    assert b.to("cpu").x_train.device.type == "cpu"
    sub = b.select([3, 1])
    assert sub.ks == (3, 1) and torch.equal(sub.x_train[0], b.x_train[3])


# ------------------------------------------------------------------------------------------------------------
# regression
# ------------------------------------------------------------------------------------------------------------
def test_regression_episodes():
    ds = load_dataset("lowrank", n_in=5, n_out=3, rank=1, n_samples=200, seed=0)
    s = TaskSampler(ds, M=2, K=10, Q=5)
    b = s.sample(0, 0, 4)
    assert b.is_regression
    assert b.x_train.shape == (4, 20, 5) and b.y_train.shape == (4, 20, 3) and b.y_train.dtype == torch.float32
    assert b.x_query.shape == (4, 10, 5) and b.y_query.shape == (4, 10, 3) and b.classes.shape == (4, 0)
    for i in range(4):
        tr = [int(torch.nonzero((ds.images == row).all(1))[0]) for row in b.x_train[i]]
        qu = [int(torch.nonzero((ds.images == row).all(1))[0]) for row in b.x_query[i]]
        assert len(set(tr)) == 20 and not set(tr) & set(qu)
        assert torch.equal(ds.labels[tr], b.y_train[i])
    for name, value in cat([s.sample(0, 0, [k]) for k in range(4)]).items():
        assert torch.equal(getattr(b, name), value)
    fixed = TaskSampler(ds, M=2, K=10, Q=5, fixed_images=True).sample(0, 0, 1)
    assert torch.equal(fixed.x_query[0], ds.images[20:30])
    with pytest.raises(ConfigError, match="classification only"):
        TaskSampler(ds, M=2, K=10, Q=5, remap_labels=True)
    with pytest.raises(DatasetError, match="= 300 rows"):
        TaskSampler(ds, M=10, K=20, Q=10)


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"M": 0}, "M must be an int >= 1"),
        ({"K": 0}, "K must be an int >= 1"),
        ({"Q": -1}, "Q must be an int >= 0"),
        ({"M": 2.5}, "M must be an int"),
        ({"M": 7}, r"M = 7 .* only 6 allowed classes"),
        ({"classes": [0, 9]}, r"out of range: \[9\]"),
        ({"classes": [0, 0]}, "distinct"),
        ({"M": 3, "classes": [0, 1]}, "only 2 allowed classes"),
    ],
    ids=["M0", "K0", "Qneg", "Mfloat", "M>C", "class-range", "class-dup", "M>allowed"],
)
def test_bad_config(indexed, kwargs, match):
    opts = {"M": 2, "K": 2, "Q": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        TaskSampler(indexed, **opts)


def test_too_few_samples_names_values_and_fix(indexed):
    with pytest.raises(DatasetError) as info:
        TaskSampler(indexed, M=2, K=20, Q=5)  # class 3 holds 22 < 25
    msg = str(info.value)
    assert "K + Q = 20 + 5 = 25" in msg and "3: 22" in msg and "smallest allowed class: 22" in msg
    TaskSampler(indexed, M=2, K=20, Q=5, classes=[0, 2, 4, 5])  # excluding the short classes is the fix


def test_bad_dataset_and_ks(indexed):
    with pytest.raises(ConfigError, match="Dataset"):
        TaskSampler(torch.zeros(3, 3), M=2)
    s = TaskSampler(indexed, M=2, K=2, Q=1)
    with pytest.raises(ConfigError, match="at least one episode"):
        s.sample(0, 0, [])
    with pytest.raises(ConfigError, match=">= 0"):
        s.sample(0, 0, [-1])


def test_episode_batch_shape_check():
    x = torch.zeros(2, 6, 3)
    y = torch.zeros(2, 6, dtype=torch.int64)
    EpisodeBatch(x, y, x[:, :2], y[:, :2], torch.zeros(2, 2, dtype=torch.int64), 0, 0, (0, 1), 2, 3, 1)
    with pytest.raises(ShapeError, match="x_query"):
        EpisodeBatch(x, y, x, y[:, :2], torch.zeros(2, 2, dtype=torch.int64), 0, 0, (0, 1), 2, 3, 1)


def test_compact_uint8_dataset_gives_episodes_bitwise_equal_to_the_float_one(tmp_path):
    """An EMNIST file's uint8 images are kept as they are (``scale`` 255) and divided per episode: the episodes hold
    the same float32 bits as those of the images converted at load time (``astype(float32) / float32(255)``)."""
    import numpy as np

    from rulesearch.tasks.data import load_emnist

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(470, 28, 28), dtype=np.uint8)
    images[0].flat[:256] = np.arange(256)  # every stored value
    labels = np.arange(470) % 47
    np.savez(tmp_path / "emnist-balanced-test.npz", images=images, labels=labels)
    compact = load_emnist(tmp_path / "emnist-balanced-test.npz")
    assert compact.images.dtype == torch.uint8 and compact.scale == 255.0
    floats = torch.from_numpy(images.reshape(470, -1).astype(np.float32) / np.float32(255.0))  # the float path
    as_float = Dataset(compact.name, floats, compact.labels, compact.n_classes, compact.image_shape)
    assert torch.equal(compact.inputs().view(torch.int32), floats.view(torch.int32))
    for kw in ({}, {"fixed_images": True}, {"remap_labels": True, "replacement": True}):
        for seed, t, ks in ((0, 0, 4), (3, 17, [5, 0, 9])):
            a = TaskSampler(compact, M=5, K=6, Q=3, **kw).sample(seed, t, ks)
            b = TaskSampler(as_float, M=5, K=6, Q=3, **kw).sample(seed, t, ks)
            assert a.x_train.dtype == b.x_train.dtype == torch.float32
            assert torch.equal(a.x_train.view(torch.int32), b.x_train.view(torch.int32))
            assert torch.equal(a.x_query.view(torch.int32), b.x_query.view(torch.int32))
            assert_batches_equal(a, b)
    sub = compact.subset([3, 1], remap=True).first_per_class(4)
    assert sub.scale == 255.0 and torch.equal(
        sub.inputs(), as_float.subset([3, 1], remap=True).first_per_class(4).images
    )


def test_compact_dataset_refuses_float_images_and_bad_scale():
    with pytest.raises(DatasetError, match="uint8"):
        Dataset("x", torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 1, (3,), scale=255.0)
    with pytest.raises(DatasetError, match="scale"):
        Dataset("x", torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, (3,), scale=0.0)
    with pytest.raises(DatasetError, match="in \\[0, 1\\]"):
        Dataset("x", torch.full((2, 3), 17, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1, (3,), scale=16)

"""Tests of rulesearch.tasks.data: IDX / npz readers, registry, synthetic sets, class splits (offline)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from rulesearch.errors import ConfigError, DatasetError
from rulesearch.tasks.data import (
    DATASETS,
    EMNIST_MAPPING,
    ClassSplit,
    Dataset,
    default_data_dir,
    load_dataset,
    load_emnist,
    read_idx,
    split_classes,
)

_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
_CODES.update({np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E})


def write_idx(path, array, compress=None):
    """Independent IDX writer (struct, big-endian), gzip when the name ends in .gz."""
    arr = np.asarray(array)
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, _CODES[big.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + big.tobytes(order="C")
    gz = str(path).endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_chars(np_rng, n, n_classes=47, hw=(28, 28)):
    images = np_rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    labels = np.concatenate([np.arange(n_classes), np_rng.integers(0, n_classes, n - n_classes)]).astype(np.uint8)
    return images, labels


# ------------------------------------------------------------------------------------------------------------
# IDX reader
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trip(tmp_path, np_rng, suffix, dtype):
    arr = (np_rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    out = read_idx(write_idx(tmp_path / f"a-idx3-ubyte{suffix}", arr))
    assert out.shape == (3, 4, 5)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_detects_gzip_by_content(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = read_idx(write_idx(tmp_path / "no-extension", arr, compress=True))
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_magic(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(bad)


def test_read_idx_rejects_truncated(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((4, 3, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "nope.gz")


# ------------------------------------------------------------------------------------------------------------
# EMNIST
# ------------------------------------------------------------------------------------------------------------
def test_emnist_idx_is_transposed_upright(tmp_path, np_rng):
    images, labels = fake_chars(np_rng, 60)
    write_idx(tmp_path / "emnist-balanced-test-images-idx3-ubyte.gz", images.transpose(0, 2, 1))
    write_idx(tmp_path / "emnist-balanced-test-labels-idx1-ubyte.gz", labels)
    ds = load_dataset("emnist", tmp_path, split="balanced", part="test")
    assert ds.name == "emnist-balanced-test"
    assert ds.images.shape == (60, 784) and ds.images.dtype == torch.uint8 and ds.scale == 255.0  # kept compact
    assert ds.inputs().shape == (60, 784) and ds.inputs().dtype == torch.float32
    assert ds.image_shape == (28, 28) and ds.n_classes == 47
    np.testing.assert_allclose(ds.inputs().numpy(), images.reshape(60, -1) / 255.0, rtol=0, atol=1e-7)
    assert ds.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert ds.class_names == tuple(EMNIST_MAPPING)


def test_emnist_idx_uncompressed_in_gzip_subfolder_and_file_path(tmp_path, np_rng):
    images, labels = fake_chars(np_rng, 50)
    sub = tmp_path / "gzip"
    sub.mkdir()
    write_idx(sub / "emnist-bymerge-train-images-idx3-ubyte", images.transpose(0, 2, 1))
    write_idx(sub / "emnist-bymerge-train-labels-idx1-ubyte", labels)
    ds = load_emnist(tmp_path, split="bymerge-train")
    np.testing.assert_array_equal((ds.inputs().numpy() * 255).round().astype(np.uint8), images.reshape(50, -1))
    direct = load_emnist(sub / "emnist-bymerge-train-images-idx3-ubyte")
    assert direct.name == "emnist-bymerge-train"
    assert torch.equal(direct.images, ds.images)


def test_emnist_default_split_prefers_balanced_then_bymerge(tmp_path, np_rng):
    images, labels = fake_chars(np_rng, 50)
    np.savez(tmp_path / "emnist_bymerge_test.npz", images=images, labels=labels, mapping=np.array(EMNIST_MAPPING))
    assert load_dataset("emnist", tmp_path).name == "emnist-bymerge-test"
    np.savez(tmp_path / "emnist_balanced_test.npz", images=images[:49], labels=labels[:49])
    assert load_dataset("emnist", tmp_path).name == "emnist-balanced-test"


def test_emnist_npz_file_and_per_class_first_n_in_file_order(tmp_path, np_rng):
    n_classes, n = 47, 47 * 12
    images = np_rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np_rng.permutation(np.repeat(np.arange(n_classes), 12)).astype(np.uint8)
    path = tmp_path / "emnist_bymerge_test.npz"
    np.savez(path, images=images, labels=labels, mapping=np.array(EMNIST_MAPPING))

    full = load_dataset("emnist", path)
    assert full.n_samples == n and full.n_classes == 47
    np.testing.assert_allclose(full.inputs().numpy(), images.reshape(n, -1) / 255.0, atol=1e-7)  # already upright

    sub = load_dataset("emnist", path, per_class=5)
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:5] for c in range(n_classes)]))
    assert sub.n_samples == 5 * n_classes
    assert torch.equal(sub.n_per_class(), torch.full((47,), 5))
    np.testing.assert_array_equal(sub.labels.numpy(), labels[expected])
    np.testing.assert_allclose(sub.inputs().numpy(), images[expected].reshape(len(expected), -1) / 255.0, atol=1e-7)
    assert sub.info["per_class"] == 5
    # the same subset through the Dataset method
    assert torch.equal(full.first_per_class(5).images, sub.images)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_emnist_npz_subset_streams_only_the_kept_rows(tmp_path, np_rng, monkeypatch, save):
    """per_class reads the images member in chunks of rows, keeping only the subset (never the whole array)."""
    from rulesearch.tasks import data

    n = 47 * 9
    images = np_rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np_rng.permutation(np.repeat(np.arange(47), 9)).astype(np.uint8)
    path = tmp_path / "emnist_bymerge_test.npz"
    save(path, images=images, labels=labels)
    monkeypatch.setattr(data._NpyMember, "_CHUNK_BYTES", 7 * 784)  # 7 rows per chunk: many chunks
    monkeypatch.setattr(data._NpyMember, "read", lambda self: pytest.fail("the whole array was read"))
    sub = load_dataset("emnist", path, per_class=4)
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(47)]))
    np.testing.assert_array_equal(sub.images.numpy(), images[expected].reshape(len(expected), -1))
    np.testing.assert_array_equal(sub.labels.numpy(), labels[expected])


def test_emnist_npz_with_a_damaged_images_member(tmp_path, np_rng):
    """A member whose data ends early is a DatasetError naming the file and the fix."""
    import zipfile

    images = np_rng.integers(0, 256, size=(47 * 3, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(47), 3).astype(np.uint8)
    good = tmp_path / "good.npz"
    np.savez(good, images=images, labels=labels)
    bad = tmp_path / "emnist_bymerge_test.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            raw = zin.read(name)
            zout.writestr(name, raw[: len(raw) // 2] if name == "images.npy" else raw)
    for per_class in (2, None):
        with pytest.raises(DatasetError, match=r"images\.npy.*(truncated|ends early).*numpy\.savez"):
            load_dataset("emnist", bad, per_class=per_class)


def test_per_class_too_large_names_the_short_classes(tmp_path, np_rng):
    images, labels = fake_chars(np_rng, 60)
    np.savez(tmp_path / "emnist_balanced_test.npz", images=images, labels=labels)
    with pytest.raises(DatasetError, match=r"per_class=3 .*Lower per_class to at most 1"):
        load_dataset("emnist", tmp_path, per_class=3)


def test_emnist_letters_labels_shift_to_zero(tmp_path, np_rng):
    images = np_rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 26 + 1).astype(np.uint8)
    write_idx(tmp_path / "emnist-letters-train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "emnist-letters-train-labels-idx1-ubyte.gz", labels)
    ds = load_emnist(tmp_path, split="letters", part="train")
    assert ds.n_classes == 26 and int(ds.labels.min()) == 0 and int(ds.labels.max()) == 25


def test_emnist_missing_names_expected_files_and_fix(tmp_path, np_rng):
    with pytest.raises(DatasetError) as info:
        load_dataset("emnist", tmp_path / "absent", split="balanced")
    msg = str(info.value)
    assert "emnist-balanced-test-images-idx3-ubyte.gz" in msg
    assert "emnist-balanced-test-labels-idx1-ubyte.gz" in msg
    assert "emnist_balanced_test.npz" in msg
    assert "--data-dir" in msg and "RULESEARCH_DATA" in msg
    assert "does not exist" in msg
    # other EMNIST files present: the message points at them
    images, labels = fake_chars(np_rng, 50)
    np.savez(tmp_path / "emnist_bymerge_test.npz", images=images, labels=labels)
    with pytest.raises(DatasetError, match="emnist_bymerge_test.npz"):
        load_dataset("emnist", tmp_path, split="balanced")


def test_emnist_malformed_npz(tmp_path):
    np.savez(tmp_path / "emnist_balanced_test.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="lacks the arrays"):
        load_dataset("emnist", tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="Could not read"):
        load_dataset("emnist", tmp_path / "broken.npz")


def test_emnist_bad_split_and_part():
    with pytest.raises(ConfigError, match="Did you mean 'balanced'"):
        load_emnist("/nonexistent", split="balance")
    with pytest.raises(ConfigError, match="part must be one of"):
        load_emnist("/nonexistent", part="validation")


def test_default_data_dir_env(tmp_path, np_rng, monkeypatch):
    monkeypatch.setenv("RULESEARCH_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    images, labels = fake_chars(np_rng, 50)
    np.savez(tmp_path / "emnist_balanced_test.npz", images=images, labels=labels)
    assert load_dataset("emnist").n_samples == 50  # path=None reads $RULESEARCH_DATA
    monkeypatch.delenv("RULESEARCH_DATA")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sub", [("mnist", ""), ("fashion-mnist", "fashion-mnist")])
@pytest.mark.parametrize("part,prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_like_not_transposed(tmp_path, np_rng, name, sub, part, prefix):
    images, _ = fake_chars(np_rng, 40, n_classes=10)
    labels = (np.arange(40) % 10).astype(np.uint8)
    folder = tmp_path / sub if sub else tmp_path
    folder.mkdir(exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    ds = load_dataset(name, tmp_path, part=part)
    assert ds.n_classes == 10 and ds.images.shape == (40, 784)
    np.testing.assert_allclose(ds.inputs().numpy(), images.reshape(40, -1) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert len(load_dataset(name, tmp_path, part=part, per_class=2)) == 20


def test_mnist_missing_names_expected_files(tmp_path):
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", tmp_path, part="test")


def test_mnist_mismatched_pair(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="expected images"):
        load_dataset("mnist", tmp_path)


# ------------------------------------------------------------------------------------------------------------
# digits, synthetic, registry
# ------------------------------------------------------------------------------------------------------------
def test_digits_shape_and_range():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 64) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert ds.labels.shape == (1797,) and ds.labels.dtype == torch.int64
    assert ds.n_classes == 10 and ds.image_shape == (8, 8) and ds.task == "classification"
    assert int(ds.n_per_class().min()) >= 170
    assert torch.equal(load_dataset("digits", per_class=10).n_per_class(), torch.full((10,), 10))


def test_teacher_deterministic_and_seeded():
    a = load_dataset("teacher", n_in=6, n_classes=4, hidden=8, n_samples=400, seed=3)
    b = load_dataset("teacher", n_in=6, n_classes=4, hidden=8, n_samples=400, seed=3)
    c = load_dataset("teacher", n_in=6, n_classes=4, hidden=8, n_samples=400, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (400, 6) and a.n_classes == 4 and a.image_shape == (6,)
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert int(a.n_per_class().min()) > 0  # the bias calibration keeps every class populated
    # labels are the teacher's argmax
    x = a.images.double().numpy()
    logits = np.tanh((x - 0.5) @ a.info["W1"].T) @ a.info["W2"].T + a.info["b"]
    agree = (np.argmax(logits, axis=1) == a.labels.numpy()).mean()
    assert agree > 0.99  # float32 rounding of x may flip a rare near-tie


def test_lowrank_deterministic_rank_and_noise():
    a = load_dataset("lowrank", n_in=8, n_out=6, rank=2, n_samples=300, noise=0.0, seed=1)
    b = load_dataset("lowrank", n_in=8, n_out=6, rank=2, n_samples=300, noise=0.0, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.task == "regression" and a.n_classes == 0 and a.labels.shape == (300, 6)
    assert a.n_outputs == 6 and a.labels.dtype == torch.float32
    w = a.info["W_true"]
    assert w.shape == (8, 6) and np.linalg.matrix_rank(w) == 2
    np.testing.assert_allclose(a.images.double().numpy() @ w, a.labels.double().numpy(), atol=1e-5)
    noisy = load_dataset("lowrank", n_in=8, n_out=6, rank=2, n_samples=300, noise=0.1, seed=1)
    assert not torch.equal(noisy.labels, a.labels)
    with pytest.raises(ConfigError, match="rank=7"):
        load_dataset("lowrank", n_in=8, n_out=6, rank=7)


def test_unknown_dataset_name_lists_known_and_suggests():
    with pytest.raises(DatasetError) as info:
        load_dataset("emnst")
    msg = str(info.value)
    assert "Did you mean 'emnist'" in msg
    for name in DATASETS:
        assert name in msg


def test_dataset_name_is_normalized():
    assert load_dataset("Lowrank", n_samples=10).name == "lowrank"


def test_unknown_option_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'n_samples'"):
        load_dataset("teacher", n_sample=10)


# ------------------------------------------------------------------------------------------------------------
# Dataset value
# ------------------------------------------------------------------------------------------------------------
def _toy(n=12, n_classes=3):
    x = torch.linspace(0, 1, n * 2).reshape(n, 2)
    y = torch.arange(n) % n_classes
    return Dataset("toy", x, y, n_classes, (2,))


def test_dataset_validation():
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(DatasetError, match=r"in \[0, 1\]"):
        Dataset("d", x * 255, y, 3, (6,))
    with pytest.raises(DatasetError, match="image_shape"):
        Dataset("d", x, y, 3, (2, 2))
    with pytest.raises(DatasetError, match="int64"):
        Dataset("d", x, y.float(), 3, (6,))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 2\)"):
        Dataset("d", x, y, 2, (6,))
    with pytest.raises(DatasetError, match="one row per image"):
        Dataset("d", x, y[:3], 3, (6,))
    with pytest.raises(DatasetError, match="task"):
        Dataset("d", x, y, 3, (6,), task="ranking")
    with pytest.raises(DatasetError, match="n_classes must be 0"):
        Dataset("d", x, torch.rand(4, 2), 3, (6,), task="regression")
    with pytest.raises(DatasetError, match="(N, D)"):
        Dataset("d", x.reshape(4, 2, 3), y, 3, (2, 3))


def test_subset_keeps_file_order_and_remaps():
    ds = _toy()
    sub = ds.subset([2, 0])
    assert sub.n_classes == 3 and set(sub.labels.tolist()) == {0, 2}
    keep = torch.nonzero((ds.labels == 0) | (ds.labels == 2)).flatten()
    assert torch.equal(sub.images, ds.images[keep])
    remapped = ds.subset([2, 0], remap=True)
    assert remapped.n_classes == 2
    assert torch.equal(remapped.labels, torch.where(ds.labels[keep] == 2, 0, 1))
    assert torch.equal(ds.class_indices(1), torch.tensor([1, 4, 7, 10]))
    with pytest.raises(ConfigError, match="outside"):
        ds.subset([5])
    with pytest.raises(ConfigError, match="distinct"):
        ds.subset([1, 1])


# ------------------------------------------------------------------------------------------------------------
# class splits
# ------------------------------------------------------------------------------------------------------------
def _emnist_like():
    n = 47 * 2
    return Dataset("emnist-fake", torch.zeros(n, 4), torch.arange(n) % 47, 47, (2, 2))


def test_split_digits_letters():
    ds = _emnist_like()
    assert split_classes(ds, "digits") == ClassSplit(list(range(10)), list(range(10, 47)))
    train, test = split_classes(ds, "letters")
    assert train == list(range(10, 47)) and test == list(range(10))
    assert split_classes(ds, "all") == (list(range(47)), list(range(47)))
    with pytest.raises(ConfigError, match="47-class"):
        split_classes(_toy(), "digits")
    with pytest.raises(ConfigError, match="Did you mean 'letters'"):
        split_classes(ds, "leters")


def test_split_fraction_seeded():
    ds = _emnist_like()
    a, b = split_classes(ds, 0.8, seed=1), split_classes(ds, 0.8, seed=1)
    assert a == b and a != split_classes(ds, 0.8, seed=2)
    assert len(a.meta_train) == round(0.8 * 47) and sorted(a.meta_train + a.meta_test) == list(range(47))
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        split_classes(ds, 1.5)


def test_split_explicit_lists():
    ds = _toy(n_classes=4)
    assert split_classes(ds, [3, 1]) == ([1, 3], [0, 2])
    assert split_classes(ds, ([0, 1], [1, 2])) == ([0, 1], [1, 2])
    with pytest.raises(ConfigError, match="outside"):
        split_classes(ds, [0, 9])
    with pytest.raises(ConfigError, match="none to meta-test"):
        split_classes(ds, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="classification"):
        split_classes(load_dataset("lowrank", n_samples=10), "all")

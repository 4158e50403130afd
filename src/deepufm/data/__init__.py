"""Offline data sets: embedded MNIST subset, IDX and CIFAR-10 files from a data directory.

See :func:`load_dataset`. Samples are balanced and class-major, as the deep UFM orders its
features (Concepts: *Deep unconstrained feature models*).
"""

from deepufm.data.dataset import (
    ClassificationData,
    Standardization,
    balanced_indices,
    fit_standardization,
    pad_images,
    repeat_channels,
)
from deepufm.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataError,
    parse_idx,
    read_cifar_batch,
    read_idx_pair,
)
from deepufm.data.loaders import DATA_DIR_ENV, DATASETS, DatasetSpec, find_files, load_dataset

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "ClassificationData",
    "DataError",
    "DatasetSpec",
    "Standardization",
    "balanced_indices",
    "find_files",
    "fit_standardization",
    "load_dataset",
    "pad_images",
    "parse_idx",
    "read_cifar_batch",
    "read_idx_pair",
    "repeat_channels",
]

"""Parsers of the standard image-classification file formats (no downloads, NumPy only).

* **IDX** (MNIST, Fashion-MNIST): a big-endian header — 2 zero bytes, a type byte (``0x08`` =
  unsigned byte), the number of dimensions — then one big-endian ``uint32`` per dimension, then the
  data, row-major. Images are magic ``0x00000803`` (``N x rows x cols``), labels ``0x00000801``
  (``N``). Files may be gzip-compressed (``.gz``).
* **CIFAR-10 python batches**: pickles (protocol 2, written by Python 2, so read with
  ``encoding="bytes"``) of a dict with ``b"data"`` — ``(10000, 3072)`` ``uint8``, each row the red,
  green and blue 32 x 32 planes in turn — and ``b"labels"`` (a list of ints in ``0..9``).

Every defect (missing, truncated or trailing bytes, wrong magic, bad shapes, labels out of range)
raises :class:`DataError` naming the file. Unpickling runs code stored in the file: load CIFAR
batches only from a source you trust (the official archive).
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from deepufm.errors import DeepUFMError

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
CIFAR_SIDE = 32
CIFAR_ROW = 3 * CIFAR_SIDE * CIFAR_SIDE


class DataError(DeepUFMError):
    """A data set that cannot be found or read; the message names the files and directories."""


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def parse_idx(raw: bytes, magic: int, source: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string whose magic number must be ``magic``.

    Returns a ``uint8`` array of the header's shape (``(N, rows, cols)`` for images, ``(N,)`` for
    labels). Raises :class:`DataError` on a short header, a different magic number, or a data
    length other than the product of the dimensions (truncation or trailing bytes).
    """
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{source}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(0x{IDX_IMAGES_MAGIC:08x} = images, 0x{IDX_LABELS_MAGIC:08x} = labels)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated header ({len(raw)} of {header} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataError(
            f"{source}: {kind}: the header gives shape {shape}, i.e. {expected} bytes, "
            f"but the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images: Path, labels: Path, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, rows, cols)`` uint8 and labels ``(N,)`` int64 from two IDX files.

    Checks the magic numbers, the lengths, equal counts and labels in ``0..K-1``.
    """
    X = parse_idx(read_bytes(images), IDX_IMAGES_MAGIC, str(images))
    y = parse_idx(read_bytes(labels), IDX_LABELS_MAGIC, str(labels)).astype(np.int64)
    if X.shape[0] != y.shape[0]:
        raise DataError(
            f"{images} holds {X.shape[0]} images but {labels} holds {y.shape[0]} labels"
        )
    check_labels(y, K, str(labels))
    return X, y


def check_labels(y: np.ndarray, K: int, source: str) -> None:
    """Check that every label of ``y`` is a class index in ``0..K-1``; returns nothing (an empty
    ``y`` passes).

    Raises:
        DataError: a label outside ``0..K-1``; the message starts with ``source`` (the file read)
            and gives the labels' range.
    """
    if y.size and (y.min() < 0 or y.max() >= K):
        raise DataError(f"{source}: labels in [{y.min()}, {y.max()}], expected 0..{K - 1}")


def read_cifar_batch(path: Path, K: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (optionally ``.gz``): images ``(N, 3, 32, 32)`` uint8, labels ``(N,)``
    int64 in ``0..K-1``."""
    raw = read_bytes(path)
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # a damaged pickle can fail in many ways; all are data errors
        raise DataError(f"{path}: not a readable CIFAR python batch ({exc!r})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    y = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW:
        raise DataError(
            f"{path}: b'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape "
            f"(N, {CIFAR_ROW})"
        )
    if y.ndim != 1 or y.shape[0] != data.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: b'labels' has shape {y.shape} ({y.dtype}), expected {data.shape[0]} integers"
        )
    y = y.astype(np.int64)
    check_labels(y, K, str(path))
    return data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), y

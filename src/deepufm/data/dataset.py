"""`ClassificationData` and the pure transforms that build it (v2 App. G.2).

The project orders samples **class-major** (Concepts: *Deep unconstrained feature models*): all
``n`` samples of class 0, then class 1, ..., so that the features of a real network stacked as
columns form the ``H_1`` of a deep UFM directly. Real data sets are made balanced by
:func:`balanced_indices` (``n`` per class, chosen with a seeded generator) before they are sorted.

Standardisation (v2 App. G.2, "subtract the mean, divide by the std") uses **per-channel**
statistics over every pixel of every training sample: for one-channel images (MNIST,
Fashion-MNIST) that is one global scalar mean and std; for CIFAR-10 one per colour channel. The
statistics are computed on the samples actually used (after subsampling) and before any padding,
so the zero padding added afterwards sits exactly at the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deepufm.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Standardization:
    """Per-channel statistics: ``x <- (x - mean[c]) / std[c]``; ``mean``, ``std`` are ``(C,)``."""

    mean: Tensor
    std: Tensor

    def apply(self, X: Tensor) -> Tensor:
        """``X`` ``(N, C, H, W)`` standardised with these statistics (same shape)."""
        shape = (1, -1, 1, 1)
        return (X - self.mean.to(X).view(shape)) / self.std.to(X).view(shape)


def fit_standardization(X: Tensor) -> Standardization:
    """Mean and (population) std of each channel over all samples and pixels of ``X`` ``(N,C,H,W)``.

    A constant channel (std 0) is left unscaled (std taken as 1) rather than divided by zero.
    """
    mean = X.mean(dim=(0, 2, 3))
    std = X.std(dim=(0, 2, 3), correction=0)
    return Standardization(mean, torch.where(std > 0, std, torch.ones_like(std)))


def balanced_indices(y: np.ndarray, K: int, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of a balanced, class-major subsample of labels ``y`` ``(N,)``.

    For each class ``c = 0..K-1`` in turn, ``per_class`` of its samples chosen uniformly without
    replacement by a ``torch.Generator`` seeded with ``seed`` (the whole draw depends on the seed
    only), kept in their original file order within the class. ``per_class=None`` takes the largest
    balanced subset, i.e. the size of the smallest class.

    Returns ``(K * per_class,)`` int64 indices.
    """
    counts = np.bincount(y, minlength=K)
    smallest = int(counts.min())
    if per_class is None:
        per_class = smallest
    if isinstance(per_class, bool) or not isinstance(per_class, int) or not 1 <= per_class:
        raise ConfigError("per_class", per_class, "a positive integer or None (all)")
    if per_class > smallest:
        raise ConfigError(
            "per_class",
            per_class,
            f"at most {smallest}, the size of the smallest class "
            f"(class {int(counts.argmin())}; counts {counts.tolist()})",
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(K):
        members = np.flatnonzero(y == c)
        pick = torch.randperm(len(members), generator=gen)[:per_class].numpy()
        chosen.append(members[np.sort(pick)])
    return np.concatenate(chosen)


def pad_images(X: Tensor, size: int) -> Tensor:
    """Zero-pad ``X`` ``(N, C, H, W)`` symmetrically to ``(N, C, size, size)`` (extra pixel at the
    bottom/right when the margin is odd), e.g. MNIST 28 -> 32 for a CIFAR-sized stem."""
    H, W = X.shape[-2:]
    if isinstance(size, bool) or not isinstance(size, int) or size < max(H, W):
        raise ConfigError("pad_to", size, f"an integer >= the image size {H}x{W}")
    top, left = (size - H) // 2, (size - W) // 2
    return F.pad(X, (left, size - W - left, top, size - H - top))


def repeat_channels(X: Tensor, channels: int) -> Tensor:
    """``X`` ``(N, C, H, W)`` with ``channels`` channels: unchanged when ``C == channels``, the one
    channel of a grey-scale set repeated when ``C == 1`` (a 3-channel stem on MNIST)."""
    C = X.shape[1]
    if channels == C:
        return X
    if C == 1 and isinstance(channels, int) and not isinstance(channels, bool) and channels > 1:
        return X.expand(-1, channels, -1, -1).contiguous()
    raise ConfigError(
        "channels",
        channels,
        f"{C} (the data's channels)" + (" or any integer > 1" if C == 1 else ""),
    )


@dataclass(frozen=True, eq=False)
class ClassificationData:
    """A balanced classification data set in class-major order.

    Attributes:
        X: images ``(N, C, H, W)``, floating point.
        y: labels ``(N,)`` long, ``[0]*n + [1]*n + ... + [K-1]*n``.
        K: number of classes.
        name: the data set's name (``"mnist"``, ``"cifar10"``, ...).
        classes: the ``K`` class names.
        split: ``"train"`` or ``"test"``.
        standardization: the statistics applied to ``X`` (``None`` when not standardised); apply
            the same to other splits.
    """

    X: Tensor
    y: Tensor
    K: int
    name: str
    classes: tuple[str, ...]
    split: str = "train"
    standardization: Standardization | None = None

    def __post_init__(self) -> None:
        if self.X.ndim != 4 or self.y.shape != (self.X.shape[0],):
            raise ValueError(
                f"X {tuple(self.X.shape)} / y {tuple(self.y.shape)}: expected (N,C,H,W) / (N,)"
            )
        if len(self.classes) != self.K or self.X.shape[0] % self.K:
            raise ValueError(f"{self.X.shape[0]} samples, {len(self.classes)} names for K={self.K}")
        expected = torch.arange(self.K, device=self.y.device).repeat_interleave(self.n)
        if self.y.dtype != torch.long or not torch.equal(self.y, expected):
            raise ValueError("y must be long, balanced and class-major: [0]*n + [1]*n + ...")

    @property
    def N(self) -> int:
        """Number of samples ``K * n``."""
        return self.X.shape[0]

    @property
    def n(self) -> int:
        """Samples per class."""
        return self.X.shape[0] // self.K

    def first_per_class(self, m: int) -> ClassificationData:
        """The first ``m`` samples of every class (still balanced and class-major)."""
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.n:
            raise ConfigError("per_class", m, f"an integer in [1, n={self.n}]")
        idx = (torch.arange(self.K) * self.n).repeat_interleave(m) + torch.arange(m).repeat(self.K)
        idx = idx.to(self.y.device)
        return replace(self, X=self.X[idx], y=self.y[idx])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.X.shape[1:])

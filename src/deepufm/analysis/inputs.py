"""What `deepufm.analyze` accepts: data as batches, labels, the data loss and its logit derivatives.

Data loss (docs: Concepts › Deep unconstrained feature models), a mean over the ``N`` samples of the whole data set however it is batched:

* ``"mse"``: ``D = 1/(2N) sum_i ||z_i - e_{y_i}||^2`` — the paper's loss. ``nn.MSELoss()`` averages
  over the ``N K`` entries, so ``D = (K/2) * nn.MSELoss()(z, one_hot(y))``.
* ``"ce"``: ``D = 1/N sum_i -log softmax(z_i)_{y_i}`` (``nn.CrossEntropyLoss()``).
* a callable ``(output (B, K), y (B,)) -> mean loss over the batch``; it must be the batch mean
  of a per-sample loss (checked on the first batch), whose logit gradient and Hessian are taken
  by autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deepufm.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = list[tuple[Tensor, Tensor]]
LOSSES = ("mse", "ce")


# -- data ------------------------------------------------------------------------------------------
def as_batches(data: object, batch_size: int | None = None) -> Batches:
    """``(X, y)`` tensors or numpy arrays (split into ``batch_size`` chunks; one batch by
    default) or a re-iterable of ``(X, y)`` batches, read twice: the two passes must agree exactly
    (no shuffling, no augmentation), else the Hessian of "the" data set would not be defined."""
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ConfigError("batch_size", batch_size, "a positive integer or None (one batch)")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, np.ndarray) for t in data):
        data = (torch.as_tensor(data[0]), torch.as_tensor(data[1]))  # numpy arrays: as tensors
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, y = data
        _check_pair(X, y, "data")
        if batch_size is None:
            return [(X, y)]
        return list(zip(X.split(batch_size), y.split(batch_size), strict=True))
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise ConfigError(
            "data",
            type(data).__name__,
            "a pair (X, y) of tensors or a re-iterable of (X, y) batches (a DataLoader)",
        )
    if iter(data) is data:
        raise ConfigError(
            "data",
            type(data).__name__,
            "a re-iterable of (X, y) batches (a list or a DataLoader), not a one-shot iterator",
            "The data are read twice, to check that every pass gives the same batches.",
        )
    first = [_batch(b, i) for i, b in enumerate(data)]
    second = [_batch(b, i) for i, b in enumerate(data)]
    if not first:
        raise ConfigError("data", "empty", "at least one (X, y) batch")
    same = len(first) == len(second) and all(
        X1.shape == X2.shape and torch.equal(X1, X2) and torch.equal(y1, y2)
        for (X1, y1), (X2, y2) in zip(first, second)
    )
    if not same:
        raise ConfigError(
            "data",
            "non-deterministic",
            "a loader that gives the same batches on every pass",
            "Two passes over the data differ (a shuffling sampler or random augmentation?): "
            "use shuffle=False and no random transforms for the analysis.",
        )
    return first


def _batch(b: object, i: int) -> tuple[Tensor, Tensor]:
    """Batch ``i`` of a loader as ``(X, y)``, refused unless it is a pair of tensors."""
    if not (isinstance(b, (tuple, list)) and len(b) == 2):
        raise ConfigError(f"data batch {i}", type(b).__name__, "a pair (X, y) of tensors")
    X, y = b
    _check_pair(X, y, f"data batch {i}")
    return X, y


def _check_pair(X: object, y: object, where: str) -> None:
    """``X`` a tensor and ``y`` a non-empty ``(N,)`` integer label vector for it."""
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise ConfigError(where, (type(X).__name__, type(y).__name__), "a pair (X, y) of tensors")
    if y.dim() != 1 or y.shape[0] != X.shape[0] or y.shape[0] == 0:
        raise ConfigError(
            f"{where} y",
            tuple(y.shape),
            f"a non-empty (N,) label vector for the {X.shape[0] if X.dim() else 0} inputs",
        )
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ConfigError(f"{where} y.dtype", str(y.dtype), "an integer type (class labels)")


def check_labels(y: Tensor, K: int) -> Tensor:
    """Class counts ``(K,)`` of labels ``y`` ``(N,)``; every label in ``[0, K)`` and every class
    present (a class without samples has no class mean: NC1, Papyan's terms undefined)."""
    if K < 2:
        raise ConfigError(
            "model output", K, "at least 2 logits per sample (a classifier with K >= 2 classes)"
        )
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= K:
        raise ConfigError("y", f"labels in [{lo}, {hi}]", f"integer labels in [0, K-1={K - 1}]")
    counts = torch.bincount(y.to(torch.long), minlength=K)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(
            "y",
            f"no sample of class {empty[0]}" + (f" (nor {empty[1:]})" if len(empty) > 1 else ""),
            f"at least one sample of every class 0..{K - 1} (the model has K={K} logits)",
        )
    return counts


# -- the loss --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataLoss:
    """A per-sample loss ``l(z, y)``; the data loss is its mean (module docstring).

    ``name``: ``"mse"``, ``"ce"`` or ``"callable"``; ``fn``: ``(z (B, K), y (B,)) -> mean``.
    """

    name: str
    fn: LossFn

    @property
    def description(self) -> str:
        """The loss in words and formula (``config["loss_definition"]``)."""
        return {
            "mse": "1/(2N) sum_i ||z_i - e_{y_i}||^2 (the paper's data loss; = K/2 * nn.MSELoss())",
            "ce": "1/N sum_i -log softmax(z_i)_{y_i} (nn.CrossEntropyLoss())",
        }.get(self.name, f"mean of the callable {getattr(self.fn, '__name__', repr(self.fn))}")

    def derivatives(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``dl/dz`` ``(B, K)`` and ``d^2 l/dz^2`` ``(B, K, K)``."""
        K = z.shape[1]
        onehot = F.one_hot(y.to(torch.long), K).to(z.dtype)
        if self.name == "mse":
            eye = torch.eye(K, dtype=z.dtype, device=z.device)
            return z - onehot, eye.expand(z.shape[0], K, K)
        if self.name == "ce":
            p = torch.softmax(z, dim=1)
            return p - onehot, torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        with torch.enable_grad():
            one = lambda zi, yi: self.fn(zi.unsqueeze(0), yi.unsqueeze(0))  # noqa: E731
            grads = torch.stack([torch.func.grad(one)(zi, yi) for zi, yi in zip(z, y)])
            hess = torch.stack([torch.func.hessian(one)(zi, yi) for zi, yi in zip(z, y)])
        return grads.detach(), hess.detach()

    def factor(self, z: Tensor, y: Tensor) -> Tensor:
        """``M`` ``(B, R, K)`` with ``M^T M = d^2 l/dz^2`` per sample: ``I`` (MSE, ``R = K``),
        Papyan's ``diag(sqrt p)(I - 1 p^T)`` (CE), ``Lambda^{1/2} Q^T`` from the eigenvectors of
        the logit Hessian (callable; refused when it is indefinite: Gauss–Newton needs a convex
        per-sample loss to be a Gram)."""
        K = z.shape[1]
        if self.name == "mse":
            return torch.eye(K, dtype=z.dtype, device=z.device).expand(z.shape[0], K, K)
        if self.name == "ce":
            p = torch.softmax(z, dim=1)
            eye = torch.eye(K, dtype=z.dtype, device=z.device)
            return p.sqrt().unsqueeze(2) * (eye - p.unsqueeze(1))
        _, B = self.derivatives(z, y)
        lam, Q = torch.linalg.eigh(0.5 * (B + B.transpose(1, 2)))
        scale = lam.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
        if bool((lam < -1e-10 * scale).any()):
            raise ConfigError(
                "loss",
                self.description,
                "a per-sample loss convex in the logits (positive semi-definite d^2 l/dz^2)",
                "Its logit Hessian is indefinite at some sample, so the Gauss–Newton matrix is "
                "not a Gram of loss-weighted Jacobian rows.",
            )
        return lam.clamp_min(0).sqrt().unsqueeze(2) * Q.transpose(1, 2)

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(B,)``."""
        if self.name == "mse":
            onehot = F.one_hot(y.to(torch.long), z.shape[1]).to(z.dtype)
            return 0.5 * ((z - onehot) ** 2).sum(dim=1)
        if self.name == "ce":
            return F.cross_entropy(z, y.to(torch.long), reduction="none")
        return torch.stack([self.fn(zi.unsqueeze(0), yi.unsqueeze(0)) for zi, yi in zip(z, y)])

    def batch_mean(self, z: Tensor, y: Tensor) -> Tensor:
        """The mean loss of a batch (what a Hessian-vector product differentiates)."""
        if self.name == "callable":
            return self.fn(z, y)
        return self.value(z, y).mean()


def _mse_mean(z: Tensor, y: Tensor) -> Tensor:
    """The paper's MSE data loss of a batch: ``1/(2B) sum ||z - e_y||^2``."""
    return 0.5 * ((z - F.one_hot(y.to(torch.long), z.shape[1]).to(z.dtype)) ** 2).sum(1).mean()


def _ce_mean(z: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of a batch."""
    return F.cross_entropy(z, y.to(torch.long))


_BUILT_IN = {"mse": _mse_mean, "ce": _ce_mean}


def data_loss(loss: str | LossFn) -> DataLoss:
    """``"mse"``, ``"ce"`` or a callable ``(output, y) -> mean loss`` as a :class:`DataLoss`."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ConfigError("loss", loss, "'mse', 'ce' or a callable (output, y) -> mean loss")
        return DataLoss(loss, _BUILT_IN[loss])
    if not callable(loss):
        raise ConfigError("loss", loss, "'mse', 'ce' or a callable (output, y) -> mean loss")
    return DataLoss("callable", loss)


def check_mean_loss(loss: DataLoss, z: Tensor, y: Tensor) -> None:
    """Refuse a callable that is not the batch mean of a per-sample loss (e.g. a sum, or one
    coupling the samples): the data loss over batches would then not be its weighted mean."""
    if loss.name != "callable":
        return
    with torch.no_grad():
        batch = loss.fn(z, y)
        if not isinstance(batch, Tensor) or batch.numel() != 1:
            raise ConfigError("loss", loss.description, "a callable returning a scalar tensor")
        per = loss.value(z, y).mean()
    if not torch.allclose(batch.reshape(()), per, rtol=1e-10, atol=1e-300):
        raise ConfigError(
            "loss",
            loss.description,
            "the batch mean of a per-sample loss (reduction='mean')",
            f"On the first batch it gives {float(batch):.6g}, the mean of its per-sample values "
            f"{float(per):.6g}.",
        )

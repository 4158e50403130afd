"""Matrix-free Hessian of the empirical risk of any ``torch.nn.Module`` (the full-network Hessian of
v2 §3.4).

For a model ``f(x; theta)``, a loss ``loss_fn(output, y)`` and data given as batches ``(X_b, y_b)``,

    R(theta) = sum_b w_b loss_fn(f(X_b; theta), y_b),
    w_b = |X_b| / N  (loss_fn averages over its batch, ``reduction="mean"``),  w_b = 1 (``"sum"``),

so the operator is the Hessian of the loss over the whole data set however it is batched. A product
``H V`` with ``V`` ``(p, m)`` is forward-over-reverse, ``jvp(grad(R_b), theta, v)``, ``vmap``-ed
over the ``m`` columns: one pass over the data serves all ``m`` vectors (Lanczos blocks, SLQ probes,
``dense()``). Some PyTorch ops have no working forward-over-reverse rule — notably
``F.mse_loss(reduction="mean")`` ("ZeroTensors are immutable", pytorch/pytorch#123996) — so
``hvp="auto"`` tries one product on the first batch and otherwise uses reverse-over-reverse,
``vjp(grad(R_b), theta)`` with the pull-back ``vmap``-ed over the columns (also one pass).

``theta`` is the concatenation of the chosen parameters, each ``reshape(-1)`` (row-major,
``deepufm.vec``), in ``named_parameters()`` order, copied when the operator is built (later changes
to the module do not reach it); the other parameters are held fixed.

The model is called through ``torch.func.functional_call`` with its buffers, in whatever mode it is
in: in ``eval()`` mode BatchNorm uses its running statistics; in ``train()`` mode it uses the
statistics of each batch (so the Hessian depends on how the data are batched) and Dropout would be
random — which the determinism check refuses. Buffers are passed as copies: computing products
never changes the module (no running-statistics updates).

The idea of weighting batches by their size and checking the data for determinism follows
curvlinops' ``_EmpiricalRiskMixin`` (Dangel et al.); this is an independent implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from deepufm.errors import ConfigError
from deepufm.matrices.operator import SymmetricMatrix

LossFn = Callable[[Tensor, Tensor], Tensor]
HVP_MODES = ("auto", "forward", "reverse", "autograd")


def _reduction(loss_fn: LossFn, reduction: str | None) -> str:
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ConfigError("reduction", reduction, "'mean' or 'sum' (the loss must be a scalar)")
    return reduction


class ModuleHessian(SymmetricMatrix):
    """The Hessian of the empirical risk of ``model`` w.r.t. the chosen parameters (module docstring).

    Args:
        model: any ``nn.Module``; its mode (train/eval) is respected, its state never changed.
        loss_fn: ``(output, y) -> scalar``, e.g. ``nn.CrossEntropyLoss()``. The paper's data
            loss ``1/(2N) sum_i ||z_i - e_{y_i}||^2`` is **K/2 times** ``nn.MSELoss()`` (which
            averages over all ``N K`` entries): pass
            ``lambda z, y: 0.5 * (z - F.one_hot(y, K).to(z.dtype)).pow(2).sum(1).mean()``, or
            scale the operator by ``K / 2``, to compare with deepufm's MSE spectra.
        batches: a re-iterable of ``(X, y)`` (a list, a ``DataLoader`` without shuffling or
            augmentation); traversed once per product.
        params: names of the parameters (``named_parameters()`` keys) to differentiate, in any
            order (they are used in module order); default all parameters with ``requires_grad``.
        reduction: ``"mean"`` or ``"sum"``; default ``loss_fn.reduction`` if present, else mean.
        chunk_size: columns per ``vmap`` call (bounds memory for wide blocks such as ``dense()``).
        check_deterministic: refuse data or models whose first batch differs between two passes.
        hvp: ``"forward"`` (forward-over-reverse), ``"reverse"`` (reverse-over-reverse),
            ``"autograd"`` (classic double backward: one gradient graph per batch, then one
            backward pass through it per column, so a block of columns shares the forward pass;
            6x cheaper than forward on a tiny CPU ResNet, on par at 28x28, see
            ``benchmarks/README.md``) or ``"auto"`` (forward when one
            probe product on the first batch succeeds); the mode used is ``self.hvp``.
    """

    matrix_free = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Tensor, Tensor]],
        params: Sequence[str] | None = None,
        reduction: str | None = None,
        chunk_size: int | None = None,
        check_deterministic: bool = True,
        hvp: str = "auto",
    ) -> None:
        if hvp not in HVP_MODES:
            raise ConfigError("hvp", hvp, f"one of {', '.join(HVP_MODES)}")
        if iter(batches) is batches:
            raise ConfigError(
                "batches",
                type(batches).__name__,
                "a re-iterable collection of (X, y) batches (a list or a DataLoader)",
                "A one-shot iterator or generator would be exhausted after one product.",
            )
        named = dict(model.named_parameters())
        if params is None:
            names = [k for k, v in named.items() if v.requires_grad]
        else:
            unknown = sorted(set(params) - set(named))
            if unknown:
                raise ConfigError("params", unknown[0], f"one of {', '.join(named)}")
            names = [k for k in named if k in set(params)]
        if not names:
            raise ConfigError("params", params, "at least one parameter of the model")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.names = names
        self.shapes = [named[k].shape for k in names]
        self.numels = [named[k].numel() for k in names]
        self.theta = torch.cat([named[k].detach().reshape(-1) for k in names])
        self.fixed = {k: v.detach() for k, v in named.items() if k not in set(names)}
        self.reduction = _reduction(loss_fn, reduction)
        self.chunk_size = chunk_size
        super().__init__(self.theta.numel(), self.theta.dtype, self.theta.device)
        self.num_data = self._count_and_check(check_deterministic)
        self.hvp = self._probe_forward() if hvp == "auto" else hvp

    # -- data ----------------------------------------------------------------------------------
    def _batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        for X, y in self.batches:
            yield X.to(self.device), y.to(self.device)

    def _count_and_check(self, check: bool) -> int:
        num, first = 0, None
        for X, y in self._batches():
            num += X.shape[0]
            if first is None:
                first = (X, y)
        if first is None or num == 0:
            raise ConfigError("batches", self.batches, "at least one non-empty (X, y) batch")
        if check:
            X2, y2 = next(iter(self._batches()))
            with torch.no_grad():
                out1, out2 = self._forward(self.theta, first[0]), self._forward(self.theta, X2)
            same = (
                X2.shape == first[0].shape
                and torch.equal(X2, first[0])
                and torch.equal(y2, first[1])
                and torch.equal(out1, out2)
            )
            if not same:
                raise ConfigError(
                    "batches",
                    "non-deterministic",
                    "data and model that give identical batches and outputs on every pass",
                    "Turn off shuffling and augmentation, and put Dropout layers in eval() mode.",
                )
        return num

    def _weight(self, X: Tensor) -> float:
        return X.shape[0] / self.num_data if self.reduction == "mean" else 1.0

    # -- the function --------------------------------------------------------------------------
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta`` ``(p,)`` -> ``{name: tensor}`` in the parameters' shapes (for eigenvectors too)."""
        parts = torch.split(theta, self.numels)
        return {k: t.reshape(s) for k, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def _forward(self, theta: Tensor, X: Tensor) -> Tensor:
        # Fresh buffer copies: BatchNorm in train mode updates running statistics in place.
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        return functional_call(self.model, (self.unflatten(theta), self.fixed, buffers), (X,))

    def _risk(self, X: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        w = self._weight(X)
        return lambda theta: w * self.loss_fn(self._forward(theta, X), y)

    def loss(self) -> Tensor:
        """``R(theta)`` at the current parameters: a scalar."""
        with torch.no_grad():
            return sum(self._risk(X, y)(self.theta) for X, y in self._batches())

    def gradient(self) -> Tensor:
        """``grad R(theta)``: ``(p,)`` (same weighting as the Hessian)."""
        return sum(grad(self._risk(X, y))(self.theta) for X, y in self._batches())

    def _batch_hvp(self, X: Tensor, y: Tensor, V: Tensor, mode: str) -> Tensor:
        """``H_b V`` for one batch: ``(p, m) -> (p, m)``."""
        if mode == "autograd":
            with torch.enable_grad():
                theta = self.theta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._risk(X, y)(theta), theta, create_graph=True)
                cols = [
                    torch.autograd.grad(g, theta, v, retain_graph=j < V.shape[1] - 1)[0]
                    for j, v in enumerate(V.unbind(dim=1))
                ]
            return torch.stack(cols, dim=1)
        g = grad(self._risk(X, y))
        if mode == "forward":
            column = lambda v: jvp(g, (self.theta,), (v,))[1]  # noqa: E731
        else:
            pull_back = vjp(g, self.theta)[1]
            column = lambda v: pull_back(v)[0]  # noqa: E731
        return vmap(column, in_dims=1, out_dims=1, chunk_size=self.chunk_size)(V)

    def _probe_forward(self) -> str:
        X, y = next(iter(self._batches()))
        try:
            self._batch_hvp(X, y, self.theta.unsqueeze(1), "forward")
        except RuntimeError:
            return "reverse"
        return "forward"

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` ``(p, m)``: one pass over the data, the ``m`` columns ``vmap``-ed."""
        V = V.to(dtype=self.dtype, device=self.device)
        out = torch.zeros_like(V)
        for X, y in self._batches():
            out = out + self._batch_hvp(X, y, V, self.hvp)
        return out


def module_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    params: Sequence[str] | None = None,
    **options,
) -> ModuleHessian:
    """The matrix-free Hessian of the empirical risk of ``model`` (see :class:`ModuleHessian`).

    ``nn.MSELoss()`` averages over ``N K`` entries: the paper's MSE data loss (and
    ``deepufm.analyze(..., loss="mse")``) is ``K/2`` times it, and so is its Hessian."""
    return ModuleHessian(model, loss_fn, batches, params, **options)

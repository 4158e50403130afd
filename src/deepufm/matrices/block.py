"""The block Hessian over several layers and its Gauss–Newton / residual split (THEORY §5, M6).

``H_blk = d^2 D / dw^2`` for ``w = [vec W_l]_{l in layers}`` (increasing ``l``, row-major vec).
``G_blk = 1/N sum_ic J_ic^T B_ic J_ic`` with ``J_ic = [J^(l)_ic]_l`` — low rank (``N K`` rows) and
held through its rows; ``E_blk = H_blk - G_blk`` comes from the second derivatives of the logits
across layers (zero diagonal blocks for linear nets). ``H_blk`` itself is matrix-free:
forward-over-reverse Hessian-vector products with ``torch.func``, ``vmap``-ed over many vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from deepufm.matrices.hessian import _weighted_factors
from deepufm.matrices.jacobian import layer_jacobian
from deepufm.matrices.operator import LinearCombination, SymmetricMatrix
from deepufm.matrices.papyan import RowGram
from deepufm.models import functional as Fn
from deepufm.models.ufm import DeepUFM


class FunctionHessian(SymmetricMatrix):
    """Hessian of a scalar function ``f(w)`` at ``w`` through batched HVPs (no matrix formed)."""

    def __init__(self, f, w: Tensor) -> None:
        super().__init__(w.numel(), w.dtype, w.device)
        self.f, self.w = f, w
        self._hvp = vmap(lambda v: jvp(grad(f), (w,), (v,))[1], in_dims=1, out_dims=1)

    def matmat(self, V: Tensor) -> Tensor:
        return self._hvp(V)


@dataclass(frozen=True)
class BlockHessian:
    """``hessian = gauss_newton + residual`` over ``layers`` (1-based, increasing)."""

    layers: tuple[int, ...]
    hessian: SymmetricMatrix
    gauss_newton: RowGram
    residual: SymmetricMatrix
    sizes: tuple[int, ...]


def block_hessian(
    model: DeepUFM, layers: Sequence[int] | None = None, relu_tol: float = 0.0
) -> BlockHessian:
    """The block data-loss Hessian over ``layers`` (default: all ``W_1 .. W_L``)."""
    cfg = model.config
    layers = tuple(sorted(range(1, cfg.L + 1) if layers is None else layers))
    shapes = [model.W[l - 1].shape for l in layers]
    sizes = tuple(s[0] * s[1] for s in shapes)
    w = torch.cat([model.W[l - 1].reshape(-1) for l in layers])

    def data_loss(w_flat: Tensor) -> Tensor:
        Ws, start = list(model.W), 0
        for l, s, p in zip(layers, shapes, sizes):
            Ws[l - 1] = w_flat[start : start + p].reshape(s)
            start += p
        Z = Fn.forward(model.H1, Ws, cfg.activation)[-1]
        return Fn.data_loss(Z, cfg.loss, cfg.K, cfg.n)

    rows = []
    for l in layers:
        jac = layer_jacobian(model, l, relu_tol)
        A = _weighted_factors(jac, cfg.loss)  # (N, K, d_out)
        rows.append(torch.einsum("nkd,en->nkde", A, jac.H).reshape(cfg.N * cfg.K, -1))
    G = RowGram(torch.cat(rows, dim=1) / math.sqrt(cfg.N))
    H = FunctionHessian(data_loss, w)
    return BlockHessian(layers, H, G, LinearCombination([(1.0, H), (-1.0, G)]), sizes)

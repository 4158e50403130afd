"""The block Hessian over several layers and its Gauss–Newton / residual split (Concepts: *The
curvature matrices*, v2 Theorem 5).

``H_blk = d^2 D / dw^2`` for ``w = [vec W_l]_{l in layers}`` (increasing ``l``, row-major vec), split
``H_blk = G_blk + E_blk``:

* ``G_blk = 1/N sum_ic J_ic^T B_ic J_ic`` with ``J_ic = [J^(l)_ic]_l``: a :class:`BlockJacobianGram`,
  ``V^T V`` for the side-by-side layer rows ``V = [V_l]`` (``N K`` rows, ``matrices.hessian``);
  its diagonal blocks are the layer Hessians.
* ``E_blk = 1/N sum_ic sum_k (dl_ic/dz_k) d^2 z_ic,k / dw^2``: a :class:`BlockResidual`, in closed
  form for every deep UFM. With ``δ^(m+1)`` the back-propagated error at ``u^(m+1)`` (the output
  of ``W_m``, divided by ``N``) and masks ``D^(k) = diag sigma'(u^(k))`` (``I`` when linear;
  sigma'' = 0), the only second derivatives of ``z`` are across two different layers ``l < m``:

      <dW_m, E_ml dW_l> = sum_ic δ^(m+1)_ic^T dW_m D^(m) W_{m-1} ... W_{l+1} D^(l+1) dW_l h^(l)_ic

  (for linear nets: ``sum (z - y)^T A^(m+1) dW_m W_{m-1} ... W_{l+1} dW_l h^(l) / N``).
  Diagonal blocks are zero. A product ``E_blk x`` is one forward tangent sweep (the lower blocks:
  ``E_ml x_l = δ^(m+1) t^(m)T`` with ``t^(m)`` the tangent of ``H_m``) and one reverse cotangent
  sweep (the upper blocks, their adjoints): ``O(L d^2 N)`` per vector, no matrix formed.

``H_blk = G_blk + E_blk`` is therefore matrix-free too; ``dense()`` on any of them forms the
``P x P`` matrix only when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from deepufm.errors import ConfigError
from deepufm.matrices.gradients import output_errors
from deepufm.matrices.hessian import loss_weighted_factors
from deepufm.matrices.jacobian import layer_jacobian, relu_derivative
from deepufm.matrices.operator import LinearCombination, SymmetricMatrix
from deepufm.matrices.structured import JacobianGram, RowSpaceGram
from deepufm.models import functional as Fn
from deepufm.models.ufm import DeepUFM

# Columns per sweep in dense(): bounds the (m, d, N) tangents in memory.
_CHUNK = 256


class FunctionHessian(SymmetricMatrix):
    """Hessian of a scalar function ``f(w)`` at ``w`` through batched forward-over-reverse HVPs
    (``torch.func``; no matrix formed). A generic reference for the structured forms."""

    matrix_free = True

    def __init__(self, f: Callable[[Tensor], Tensor], w: Tensor) -> None:
        super().__init__(w.numel(), w.dtype, w.device)
        self.f, self.w = f, w
        self._hvp = vmap(lambda v: jvp(grad(f), (w,), (v,))[1], in_dims=1, out_dims=1)

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` by a ``vmap`` over the columns of a forward-over-reverse product (``jvp`` of
        ``grad f``): ``(P, m) -> (P, m)``, the cost of about ``m`` gradient evaluations."""
        return self._hvp(V)


def _chunked_dense(M: SymmetricMatrix) -> Tensor:
    eye = torch.eye(M.size, dtype=M.dtype, device=M.device)
    D = torch.cat([M.matmat(eye[:, i : i + _CHUNK]) for i in range(0, M.size, _CHUNK)], dim=1)
    return 0.5 * (D + D.T)


class BlockJacobianGram(RowSpaceGram):
    """``G_blk = V^T V`` with ``V = [V_l]_l`` side by side (``N R`` rows, ``sum_l p_l`` columns);
    ``blocks[l]`` is the layer's :class:`JacobianGram`. ``V V^T = sum_l V_l V_l^T``."""

    def __init__(self, blocks: Sequence[JacobianGram]) -> None:
        self.blocks = tuple(blocks)
        self.sizes = tuple(b.size for b in self.blocks)
        self.N, self.R = self.blocks[0].N, self.blocks[0].R
        first = self.blocks[0]
        super().__init__(sum(self.sizes), first.dtype, first.device)

    @property
    def rank_bound(self) -> int:
        """``min(N R, P)``: the rows of ``V`` bound the rank of ``G_blk``."""
        return min(self.N * self.R, self.size)

    def _split(self, V: Tensor) -> list[Tensor]:
        return list(torch.split(V, self.sizes, dim=0))

    def apply_V(self, V: Tensor) -> Tensor:
        """``V x = sum_l V_l x_l`` for every column, each block's rows applied to its slice of
        ``x``: ``(P, m) -> (m, N, R)``."""
        return sum(b.apply_V(x) for b, x in zip(self.blocks, self._split(V)))

    def apply_VT(self, S: Tensor) -> Tensor:
        """``V^T s``: every layer's ``V_l^T s`` stacked in layer order, ``(m, N, R) -> (P, m)``."""
        return torch.cat([b.apply_VT(S) for b in self.blocks], dim=0)

    def gram(self) -> Tensor:
        """``V V^T = sum_l V_l V_l^T``, the sum of the layers' Grams: ``(N R, N R)``."""
        return sum(b.gram() for b in self.blocks)

    def rows(self) -> Tensor:
        """``V = [V_l]_l`` side by side: ``(N R, P)``, rows ordered ``(sample, r)`` (formed on
        this call)."""
        return torch.cat([b.rows() for b in self.blocks], dim=1)

    def dense(self) -> Tensor:
        """``G_blk`` as a ``(P, P)`` matrix: ``V^T V`` from the rows when ``N R < P``, else ``P``
        products in chunks of 256 columns (symmetrised)."""
        if self.N * self.R < self.size:
            V = self.rows()
            return V.T @ V
        return _chunked_dense(self)

    def trace(self) -> Tensor:
        """``sum_l tr G_l``: the diagonal blocks are the layer matrices (a 0-dim tensor)."""
        return sum(b.trace() for b in self.blocks)


class BlockResidual(SymmetricMatrix):
    """``E_blk`` over ``layers`` in closed form (module docstring): zero diagonal blocks, block
    ``(m, l)``, ``l < m``: ``X_l -> δ^(m+1) (dH_m[X_l])^T``; the upper blocks are its adjoint.

    Built from the forward features ``H_1..H_L``, the masks ``D^(2..L)`` (``None`` when linear) and
    the back-propagated errors ``δ^(2..L+1)`` (``d_{k} x N``, already divided by ``N``).
    """

    matrix_free = True

    def __init__(
        self,
        layers: tuple[int, ...],
        W: Sequence[Tensor],
        Hs: Sequence[Tensor],
        masks: dict[int, Tensor] | None,
        deltas: dict[int, Tensor],
    ) -> None:
        self.layers, self.W, self.Hs, self.masks, self.deltas = layers, W, Hs, masks, deltas
        self.shapes = tuple(tuple(W[l - 1].shape) for l in layers)
        self.sizes = tuple(s[0] * s[1] for s in self.shapes)
        super().__init__(sum(self.sizes), Hs[0].dtype, Hs[0].device)

    def _mask(self, k: int, T: Tensor) -> Tensor:
        return T if self.masks is None else T * self.masks[k]

    def matmat(self, V: Tensor) -> Tensor:
        """``E_blk V`` by one forward tangent sweep (the lower blocks ``E_ml``, ``l < m``) and
        one reverse cotangent sweep (their adjoints), all ``m`` columns at once:
        ``O(L d^2 N m)``, no matrix formed. ``(P, m) -> (P, m)``."""
        m = V.shape[1]
        X = {
            l: x.T.reshape(m, *s)
            for l, s, x in zip(self.layers, self.shapes, torch.split(V, self.sizes, dim=0))
        }
        out = {l: V.new_zeros(m, *s) for l, s in zip(self.layers, self.shapes)}
        top = max(self.layers)
        # forward tangents t^(k) of H_k from the perturbed layers below k: lower blocks
        t = None
        for k in range(1, top + 1):
            if k in X and t is not None:
                out[k] = out[k] + self.deltas[k + 1] @ t.transpose(1, 2)
            if k == top:
                break
            s = X[k] @ self.Hs[k - 1] if k in X else None
            if t is not None:
                s = self.W[k - 1] @ t if s is None else s + self.W[k - 1] @ t
            t = None if s is None else self._mask(k + 1, s)
        # reverse cotangents at u^(k+1) from the perturbed layers above k: upper blocks
        cu = None
        for k in range(top, 0, -1):
            if k in X and cu is not None:
                out[k] = out[k] + cu @ self.Hs[k - 1].T
            ch = None if cu is None else self.W[k - 1].T @ cu
            if k in X:
                g = X[k].transpose(1, 2) @ self.deltas[k + 1]  # injected at h^(k)
                ch = g if ch is None else ch + g
            cu = None if ch is None or k == 1 else self._mask(k, ch)
        return torch.cat([out[l].reshape(m, -1).T for l in self.layers], dim=0)

    def dense(self) -> Tensor:
        """``E_blk`` as a ``(P, P)`` matrix: ``P`` products in chunks of 256 columns
        (symmetrised)."""
        return _chunked_dense(self)


@dataclass(frozen=True)
class BlockHessian:
    """``hessian = gauss_newton + residual`` over ``layers`` (1-based, increasing), each
    ``(P, P)`` with ``P = sum(sizes)``; coordinates are ``[vec W_l]_{l in layers}``."""

    layers: tuple[int, ...]
    sizes: tuple[int, ...]
    hessian: SymmetricMatrix
    gauss_newton: BlockJacobianGram
    residual: BlockResidual

    def split(self, v: Tensor) -> dict[int, Tensor]:
        """``{l: the block of v for W_l}`` for a ``(P,)`` or ``(P, m)`` tensor."""
        return dict(zip(self.layers, torch.split(v, self.sizes, dim=0)))


def block_hessian(
    model: DeepUFM, layers: Sequence[int] | None = None, relu_tol: float = 0.0
) -> BlockHessian:
    """The block data-loss Hessian over ``layers`` (default: ``W_1 .. W_L``, as in v2 Theorem 5).

    Works for linear and ReLU models, MSE and CE (``relu_tol`` as in ``layer_hessian``; the closed
    form uses sigma'(0) = 1 and sigma'' = 0, the a.e. Hessian).
    """
    cfg = model.config
    chosen = tuple(sorted(set(range(1, cfg.L + 1) if layers is None else layers)))
    if not chosen or any(
        isinstance(l, bool) or not isinstance(l, int) or not 1 <= l <= cfg.L for l in chosen
    ):
        raise ConfigError("layers", layers, f"distinct integers in [1, L={cfg.L}]")
    blocks = []
    for l in chosen:
        jac = layer_jacobian(model, l, relu_tol)
        blocks.append(JacobianGram(loss_weighted_factors(jac, cfg.loss), jac.H))
    G = BlockJacobianGram(blocks)

    Hs = Fn.forward(model.H1, model.W, cfg.activation)
    relu = cfg.activation == "relu"
    masks = (
        {k: relu_derivative(model.W[k - 2] @ Hs[k - 2], relu_tol) for k in range(2, cfg.L + 1)}
        if relu
        else None
    )
    Y = Fn.labels(cfg.K, cfg.n, Hs[-1].dtype, Hs[-1].device)
    deltas = {cfg.L + 1: output_errors(Hs[-1], Y, cfg.loss) / cfg.N}
    for k in range(cfg.L, 1, -1):  # δ^(k) = D^(k) W_k^T δ^(k+1)
        back = model.W[k - 1].T @ deltas[k + 1]
        deltas[k] = back * masks[k] if relu else back
    E = BlockResidual(chosen, model.W, Hs[:-1], masks, deltas)
    return BlockHessian(
        layers=chosen,
        sizes=G.sizes,
        hessian=LinearCombination([(1.0, G), (1.0, E)]),
        gauss_newton=G,
        residual=E,
    )

"""Papyan's class / cross-class / within-class decomposition of ``G_l`` and knockouts (THEORY M3).

With Jacobian rows ``v_{icc'} = grad_{w_l} z_{ic,c'}`` (MSE: unit weights), class-pair means
``v_{cc'} = mean_i v_{icc'}`` and class means ``v_c = mean_{c'} v_{cc'}`` (over the *output* index),

    G_l = sum_c v_c v_c^T                                   (G_class, uncentred, rank <= K)
        + 1/K sum_{c,c'} (v_cc' - v_c)(v_cc' - v_c)^T       (G_cross, rank <= K(K-1))
        + 1/N sum_{i,c,c'} (v_icc' - v_cc')(v_icc' - v_cc')^T (G_within)

exactly, at every point. For cross-entropy the rows are Papyan's (2020) loss-Hessian-weighted ones,
``sqrt(p_{icc'}) (v_{icc'} - sum_k p_{ick} v_{ick})``, whose Gram is again ``G_l``; the same three
sums are then taken over them. A knockout is the spectrum of ``H_l - G_X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.matrices.jacobian import layer_jacobian
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.models.ufm import DeepUFM


class RowGram(SymmetricMatrix):
    """``sum_r s_r f_r f_r^T`` for rows ``F`` ``(R, p)`` and signs/weights ``s`` ``(R,)``.

    Low rank; the exact non-zero spectrum comes from a QR of ``F^T`` (``p x R``) and the
    ``R x R`` symmetric matrix ``T diag(s) T^T`` — valid for indefinite weights (knockouts).
    """

    def __init__(self, F: Tensor, weights: Tensor | None = None) -> None:
        super().__init__(F.shape[1], F.dtype, F.device)
        self.F = F
        self.w = (
            torch.ones(F.shape[0], dtype=F.dtype, device=F.device) if weights is None else weights
        )

    def matmat(self, V: Tensor) -> Tensor:
        return self.F.T @ (self.w.unsqueeze(1) * (self.F @ V))

    def dense(self) -> Tensor:
        return self.F.T @ (self.w.unsqueeze(1) * self.F)

    def eigh(self) -> tuple[Tensor, Tensor]:
        if self.F.shape[0] >= self.size:
            return super().eigh()
        Q, T = torch.linalg.qr(self.F.T)  # F^T = Q T, Q (p, R)
        vals, vecs = torch.linalg.eigh(T @ (self.w.unsqueeze(1) * T.T))
        order = torch.argsort(vals, descending=True)
        return vals[order], Q @ vecs[:, order]

    def eigvalsh(self) -> Tensor:
        vals, _ = self.eigh()
        missing = self.size - vals.numel()
        return torch.sort(
            torch.cat([vals, vals.new_zeros(max(missing, 0))]), descending=True
        ).values

    def topk(self, k: int, tol: float = 0.0) -> tuple[Tensor, Tensor]:
        vals, vecs = self.eigh()
        return vals[:k], vecs[:, :k]

    def __sub__(self, other: SymmetricMatrix) -> SymmetricMatrix:
        if isinstance(other, RowGram):
            return RowGram(torch.cat([self.F, other.F]), torch.cat([self.w, -other.w]))
        return super().__sub__(other)


@dataclass(frozen=True)
class PapyanDecomposition:
    """``G_l = class_ + cross + within`` for one layer; each term a :class:`RowGram`."""

    gauss_newton: RowGram
    class_: RowGram
    cross: RowGram
    within: RowGram

    def components(self) -> dict[str, RowGram]:
        return {"class": self.class_, "cross": self.cross, "within": self.within}


def jacobian_rows(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """Rows ``v_{icc'}``: ``(K_samples, n, K_outputs, p)``, loss-weighted for CE (module docstring)."""
    cfg = model.config
    jac = layer_jacobian(model, layer, relu_tol)
    A = jac.per_sample_A  # (N, K, d_out)
    v = torch.einsum("nkd,en->nkde", A, jac.H).reshape(cfg.N, cfg.K, -1)
    if cfg.loss == "ce":
        p = torch.softmax(jac.Z, dim=0).T  # (N, K)
        mean = torch.einsum("nk,nkq->nq", p, v)
        v = p.sqrt().unsqueeze(2) * (v - mean.unsqueeze(1))
    return v.reshape(cfg.K, cfg.n, cfg.K, -1)


def papyan_decomposition(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> PapyanDecomposition:
    """Class / cross-class / within-class parts of the layer Gauss–Newton matrix (THEORY M3)."""
    v = jacobian_rows(model, layer, relu_tol)  # (c, i, c', p)
    K, n = v.shape[0], v.shape[1]
    N = K * n
    v_pair = v.mean(dim=1)  # (c, c', p)
    v_class = v_pair.mean(dim=1)  # (c, p)
    within = (v - v_pair.unsqueeze(1)).reshape(-1, v.shape[-1])
    cross = (v_pair - v_class.unsqueeze(1)).reshape(-1, v.shape[-1])
    one = lambda F, s: RowGram(F, torch.full((F.shape[0],), s, dtype=F.dtype, device=F.device))  # noqa: E731
    return PapyanDecomposition(
        gauss_newton=one(v.reshape(-1, v.shape[-1]), 1.0 / N),
        class_=one(v_class, 1.0),
        cross=one(cross, 1.0 / K),
        within=one(within, 1.0 / N),
    )


def knockout_spectra(
    model: DeepUFM, layer: int, k: int | None = None, relu_tol: float = 0.0
) -> dict[str, Tensor]:
    """Descending eigenvalues of ``H_l - G_X`` for ``X`` in class, cross, within (top ``k``;
    default ``K^2``). ``H_l = G_l`` for a single layer (``hessian.gauss_newton``)."""
    dec = papyan_decomposition(model, layer, relu_tol)
    k = model.config.K**2 if k is None else k
    return {
        name: (dec.gauss_newton - part).eigvalsh()[:k] for name, part in dec.components().items()
    }

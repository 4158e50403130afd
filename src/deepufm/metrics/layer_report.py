"""Every per-layer quantity of ``deepufm analyze``, recomputed from the parameters alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from deepufm.matrices import (
    backprop_error_matrix,
    data_gradient,
    feature_gram,
    gradient_covariance,
    layer_hessian,
    papyan_decomposition,
    weight_singular_values,
)
from deepufm.metrics.collapse import class_means, nc1, orthogonal_frame_distance
from deepufm.metrics.spectral import (
    effective_rank,
    eigvec_alignment_matrix,
    gradient_coefficients,
    negative_fraction,
    projection_proportion,
)
from deepufm.models.ufm import DeepUFM


@dataclass(frozen=True)
class LayerReport:
    """Measurements for the weight ``W_l`` (features: its input ``H_l``). Lists are descending."""

    layer: int
    hessian_eigenvalues: list[float]
    hessian_rank: int
    papyan_ranks: dict[str, int]
    knockout_eigenvalues: dict[str, list[float]]
    gradient_coefficients: list[list[float]]
    eigvec_alignment: list[list[float]]
    projection_proportion: float
    weight_singular_values: list[float]
    grad_cov_eigenvalues: list[float]
    backprop_eigenvalues: list[float]
    feature_gram_eigenvalues: list[float]
    nc1: float
    orthogonal_frame_distance: float
    effective_rank_hessian: float
    effective_rank_weight: float
    negative_fraction: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _rank(vals: torch.Tensor, reference: float, rtol: float) -> int:
    return int((vals > rtol * reference).sum())


def layer_report(
    model: DeepUFM, layer: int, full: bool = False, rank_rtol: float = 1e-8, relu_tol: float = 0.0
) -> LayerReport:
    """All quantities of one layer (THEORY §5, §9); Papyan terms are the MSE form (M3), the
    loss-Hessian-weighted form for CE."""
    cfg = model.config
    K = cfg.K
    Hs = model.features()
    M_in, M_out = class_means(Hs[layer - 1], K), class_means(Hs[layer], K)
    H = layer_hessian(model, layer, relu_tol)
    vals, vecs = H.eigh() if H.size <= 4096 else (H.eigvalsh(), None)
    top = float(vals[0]) if float(vals[0]) > 0 else 1.0
    k2 = min(K * K, H.size)
    if vecs is None:
        _, vecs = H.topk(k2)
    dec = papyan_decomposition(model, layer, relu_tol)
    ranks = {
        name: _rank(part.eigvalsh(), top, rank_rtol) for name, part in dec.components().items()
    }
    knockouts = {name: M.eigvalsh()[:k2].tolist() for name, M in dec.knockouts().items()}
    g = data_gradient(model, layer, relu_tol)
    sv = weight_singular_values(model, layer)
    U = model.W[layer - 1] @ Hs[layer - 1]
    relu_layer = cfg.activation == "relu" and layer < cfg.L
    return LayerReport(
        layer=layer,
        hessian_eigenvalues=(vals if full else vals[: K * K + K]).tolist(),
        hessian_rank=_rank(vals, top, rank_rtol),
        papyan_ranks=ranks,
        knockout_eigenvalues=knockouts,
        gradient_coefficients=gradient_coefficients(g, M_out, M_in).tolist(),
        eigvec_alignment=eigvec_alignment_matrix(H, M_out, M_in).tolist(),
        projection_proportion=projection_proportion(g, vecs[:, :k2]),
        weight_singular_values=sv.tolist(),
        grad_cov_eigenvalues=gradient_covariance(model, layer, relu_tol).eigvalsh()[:K].tolist(),
        backprop_eigenvalues=backprop_error_matrix(model, layer, relu_tol).eigvalsh()[:K].tolist(),
        feature_gram_eigenvalues=feature_gram(model, layer).eigvalsh()[:K].tolist(),
        nc1=nc1(Hs[layer - 1], K),
        orthogonal_frame_distance=orthogonal_frame_distance(M_in),
        effective_rank_hessian=effective_rank(vals),
        effective_rank_weight=effective_rank(sv),
        negative_fraction=negative_fraction(U) if relu_layer else None,
    )

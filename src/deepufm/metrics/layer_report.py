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
from deepufm.matrices.spectra import check_rank_rtol, numerical_rank
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
        """Every field as a plain ``dict`` (``dataclasses.asdict``: nested lists and dicts
        copied), ready for JSON."""
        return asdict(self)


def layer_report(
    model: DeepUFM,
    layer: int,
    full: bool = False,
    rank_rtol: float | None = None,
    relu_tol: float = 0.0,
) -> LayerReport:
    """All quantities of one layer (Concepts: *The curvature matrices*, *The metrics*); Papyan terms
    are the MSE form, the loss-Hessian-weighted form for CE.

    Ranks count eigenvalues above ``rank_rtol * lambda_max(H_l)``; by default ``rank_rtol`` is
    the rank rule of ``deepufm.matrices.spectra`` (``p * eps`` of the model's dtype), so a float32
    and a float64 model at the same point report the same ranks. The top-``K^2`` eigenvectors
    (projection proportion) come from the certified ``topk``: an uncertified result raises
    :class:`~deepufm.errors.UncertifiedError` rather than a wrong number.
    """
    if rank_rtol is not None:
        rank_rtol = check_rank_rtol(rank_rtol)
    cfg = model.config
    K = cfg.K
    Hs = model.features()
    M_in, M_out = class_means(Hs[layer - 1], K), class_means(Hs[layer], K)
    H = layer_hessian(model, layer, relu_tol)
    vals = H.eigvalsh()
    top = max(float(vals[0]), 0.0)
    k2 = min(K * K, H.size)
    _, vecs = H.topk(k2, strict=True)

    def rank(values: torch.Tensor) -> int:
        return numerical_rank(values, H.size, rank_rtol, scale=top)

    dec = papyan_decomposition(model, layer, relu_tol)
    ranks = {name: rank(part.eigvalsh()) for name, part in dec.components().items()}
    knockouts = {name: M.eigvalsh()[:k2].tolist() for name, M in dec.knockouts().items()}
    g = data_gradient(model, layer, relu_tol)
    sv = weight_singular_values(model, layer)
    U = model.W[layer - 1] @ Hs[layer - 1]
    relu_layer = cfg.activation == "relu" and layer < cfg.L
    return LayerReport(
        layer=layer,
        hessian_eigenvalues=(vals if full else vals[: K * K + K]).tolist(),
        hessian_rank=rank(vals),
        papyan_ranks=ranks,
        knockout_eigenvalues=knockouts,
        gradient_coefficients=gradient_coefficients(g, M_out, M_in).tolist(),
        eigvec_alignment=eigvec_alignment_matrix(H, M_out, M_in).tolist(),
        projection_proportion=projection_proportion(g, vecs),
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

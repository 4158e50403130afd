"""Weights and features of one layer (Concepts: *The curvature matrices*).

Layer ``l`` is the weight ``W_l`` (``d_out x d_in``); its input features are ``H_l`` (``d_in x N``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepufm.matrices.operator import DenseSymmetric
from deepufm.models.ufm import DeepUFM


def _check_layer(model: DeepUFM, layer: int, top: int) -> None:
    if not 1 <= layer <= top:
        raise ValueError(f"layer={layer} must be in [1, {top}]")


def feature_gram(model: DeepUFM, layer: int) -> DenseSymmetric:
    """``H_l H_l^T`` (unnormalised; v1 Theorem E.3): ``(d, d)``, ``1 <= layer <= L + 1``.

    ``layer = L + 1`` gives the logits' Gram ``Z Z^T``. At the linear-MSE optimum
    ``H_l H_l^T = n sum_c mu_c mu_c^T``: ``K`` eigenvalues ``n ||mu^{(l)}||^2`` on the class means.
    Divide by ``N`` for the second moment ``H_l H_l^T / N``.
    """
    _check_layer(model, layer, model.config.L + 1)
    H = model.features()[layer - 1]
    return DenseSymmetric(H @ H.T)


def weight_gram(model: DeepUFM, layer: int, side: str = "right") -> DenseSymmetric:
    """``W_l^T W_l`` (``side="right"``, ``d_in x d_in``) or ``W_l W_l^T`` (``"left"``).

    At the linear-MSE optimum both have ``K`` eigenvalues ``omega_l^2`` (v2 Theorem 4).
    """
    _check_layer(model, layer, model.config.L)
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} must be 'right' or 'left'")
    W = model.W[layer - 1]
    return DenseSymmetric(W.T @ W if side == "right" else W @ W.T)


def weight_svd(model: DeepUFM, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``W_l = U diag(S) V^T``: ``U`` ``(d_out, r)``, ``S`` ``(r,)`` descending,
    ``V`` ``(d_in, r)``, ``r = min(d_out, d_in)``. Note ``V``, not ``V^T``.

    At the linear-MSE optimum ``W_l = omega_l sum_c hat mu'_c hat mu_c^T``: the first ``K`` left /
    right singular vectors span the output / input class means (v2 Theorem 4).
    """
    _check_layer(model, layer, model.config.L)
    U, S, Vh = torch.linalg.svd(model.W[layer - 1], full_matrices=False)
    return U, S, Vh.T


def weight_singular_values(model: DeepUFM, layer: int) -> Tensor:
    """All ``min(d_out, d_in)`` singular values ``omega`` of ``W_l``, descending."""
    _check_layer(model, layer, model.config.L)
    return torch.linalg.svdvals(model.W[layer - 1])

"""Gradients and the matrices built from them (THEORY §5: M4, M5, M8, M9, M10).

Per-sample gradients come from the factored Jacobian (``matrices.jacobian``):
``g_ic = (A_ic^T r_ic) ⊗ h_ic`` with ``r_ic = dl_ic/dz`` (``z - y`` for MSE, ``p - y`` for CE).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepufm.matrices.jacobian import layer_jacobian
from deepufm.matrices.operator import DenseSymmetric
from deepufm.matrices.papyan import RowGram
from deepufm.models import functional as Fn
from deepufm.models.ufm import DeepUFM


def _output_errors(model: DeepUFM, Z: Tensor) -> Tensor:
    """``r_ic = dl_ic/dz``: ``(K, N)``."""
    cfg = model.config
    Y = Fn.labels(cfg.K, cfg.n, Z.dtype, Z.device)
    return Z - Y if cfg.loss == "mse" else torch.softmax(Z, dim=0) - Y


def per_sample_gradients(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """``g_ic = grad_{w_l} l_ic``: ``(N, p)``, rows in class-major sample order (M4)."""
    jac = layer_jacobian(model, layer, relu_tol)
    R = _output_errors(model, jac.Z)
    back = torch.einsum("nkd,kn->nd", jac.per_sample_A, R)  # A_ic^T r_ic, (N, d_out)
    return torch.einsum("nd,en->nde", back, jac.H).reshape(back.shape[0], -1)


def data_gradient(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """``tilde g_l = grad_{w_l} D = vec(A^T R H_l^T / N)``: ``(p,)`` (M4, data loss only)."""
    jac = layer_jacobian(model, layer, relu_tol)
    R = _output_errors(model, jac.Z) / jac.H.shape[1]
    if jac.shared:
        return (jac.A.T @ R @ jac.H.T).reshape(-1)
    back = torch.einsum("nkd,kn->dn", jac.A, R)
    return (back @ jac.H.T).reshape(-1)


def gradient_covariance(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> RowGram:
    """``Sigma_g = 1/N sum_ic (g_ic - g_bar)(g_ic - g_bar)^T`` (M8): rank ``<= N - 1``, never ``p x p``."""
    g = per_sample_gradients(model, layer, relu_tol)
    centred = g - g.mean(dim=0)
    return RowGram(
        centred, torch.full((g.shape[0],), 1.0 / g.shape[0], dtype=g.dtype, device=g.device)
    )


def backprop_error_matrix(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> DenseSymmetric:
    """``Sigma_delta = 1/N sum_ic sum_c' delta_icc' delta_icc'^T``, ``delta_icc' = A_ic^T (z_ic - e_c')``
    (M9, summed over ``c'``; the back-propagated error at the output of ``W_l``): ``(d_out, d_out)``."""
    jac = layer_jacobian(model, layer, relu_tol)
    K, N = jac.Z.shape
    eye = torch.eye(K, dtype=jac.Z.dtype, device=jac.Z.device)
    diffs = jac.Z.T.unsqueeze(2) - eye.unsqueeze(0)  # (N, K, K'): column c' is z_ic - e_c'
    deltas = torch.einsum("nkd,nkc->ncd", jac.per_sample_A, diffs).reshape(-1, jac.d_out)
    return DenseSymmetric(deltas.T @ deltas / N)


def feature_gram(model: DeepUFM, layer: int) -> DenseSymmetric:
    """``H_l H_l^T`` (unnormalised, M10): ``(d_in, d_in)`` for the input features of ``W_l``."""
    H = model.features()[layer - 1]
    return DenseSymmetric(H @ H.T)


def weight_gram(model: DeepUFM, layer: int) -> DenseSymmetric:
    """``W_l^T W_l`` (M5): ``(d_in, d_in)``."""
    W = model.W[layer - 1]
    return DenseSymmetric(W.T @ W)


def weight_singular_values(model: DeepUFM, layer: int) -> Tensor:
    """All singular values of ``W_l``, descending (M5)."""
    return torch.linalg.svdvals(model.W[layer - 1])

"""Layer-wise Hessians of the data loss (Concepts: *The curvature matrices*).

``H_l = d^2 D / d w_l^2`` with ``w_l = vec(W_l)`` (row-major, ``deepufm.vec``). With the factored
Jacobian of ``matrices.jacobian`` (rows ``v_{icc'} = a_{ic,c'} ⊗ h_ic``),

    G_l = 1/N sum_ic J_ic^T B_ic J_ic,    B_ic = d^2 l_ic / dz^2 = I_K (MSE),  diag(p) - p p^T (CE),

and ``E_l = H_l - G_l = 1/N sum_ic sum_k (dl_ic/dz_k) d^2 z_ic,k / dw_l^2 = 0`` for every deep UFM,
linear or ReLU: the logits are (piecewise) linear in ``w_l`` alone (``W_l`` enters the forward pass
once, and sigma'' = 0 almost everywhere). So ``H_l = G_l`` exactly, and:

* linear MSE: ``H_l = (A^T A) ⊗ (H_l H_l^T / N)`` — a :class:`KroneckerGram`, whose spectrum and
  top eigenvectors come from the two factors;
* everything else (ReLU and/or CE): a :class:`JacobianGram` ``V^T V`` with the ``N R`` rows
  ``ã_{ic,k} ⊗ h_ic / sqrt(N)``, ``ã = M_ic A_ic`` where ``B_ic = M_ic^T M_ic`` (``M = I`` for MSE;
  ``M = diag(sqrt p)(I - 1 p^T)`` for CE, Papyan's 2020 square-root factor).

The structured classes live in ``deepufm.matrices.structured``, ``combine`` in ``operator`` and
``dense_topk`` in ``spectra`` (all re-exported here, where they used to live).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices import spectra
from deepufm.matrices.jacobian import LayerJacobian, layer_jacobian
from deepufm.matrices.operator import SymmetricMatrix, combine
from deepufm.matrices.structured import (
    PARTS,
    JacobianGram,
    KroneckerGram,
    KroneckerSum,
    RowGram,
    RowSpaceGram,
    ZeroMatrix,
    gram_eigh,
    pad_spectrum,
)
from deepufm.models.ufm import DeepUFM

__all__ = [
    "PARTS",
    "JacobianGram",
    "KroneckerGram",
    "KroneckerSum",
    "RowGram",
    "RowSpaceGram",
    "ZeroMatrix",
    "check_layer",
    "combine",
    "dense_topk",
    "gauss_newton",
    "gram_eigh",
    "hessian_residual",
    "layer_hessian",
    "loss_weighted_factors",
    "pad_spectrum",
]


def dense_topk(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of a dense symmetric ``M``: ``(k,)``, ``(p, k)`` (kept here for its
    callers; :func:`deepufm.matrices.spectra.dense_topk` also returns the next eigenvalue)."""
    vals, vecs, _ = spectra.dense_topk(M, k)
    return vals, vecs


def check_layer(model: DeepUFM, layer: int) -> None:
    """Validate a 1-based layer index of ``model`` (``W_layer``); returns nothing.

    Raises:
        ConfigError: ``layer`` is not an integer in ``[1, L]`` (a ``bool`` is rejected).
    """
    L = model.config.L
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= L:
        raise ConfigError("layer", layer, f"an integer in [1, L={L}]")


def loss_weighted_factors(jac: LayerJacobian, loss: str) -> Tensor:
    """``Ã_ic = M_ic A_ic`` with ``M_ic^T M_ic = B_ic`` the loss Hessian in the logits.

    MSE: ``M = I`` (returns ``A`` as is: ``(K, d_out)`` shared or ``(N, K, d_out)``). CE:
    ``B = diag(p) - p p^T = M^T M`` with ``M = diag(sqrt p)(I - 1 p^T)``, i.e. rows
    ``sqrt(p_k) (a_k - sum_j p_j a_j)`` (Papyan 2020): ``(N, K, d_out)``.
    """
    if loss == "mse":
        return jac.A
    p = torch.softmax(jac.Z, dim=0).T  # (N, K)
    A = jac.per_sample_A
    mean = torch.einsum("nk,nkd->nd", p, A)
    return p.sqrt().unsqueeze(2) * (A - mean.unsqueeze(1))


def layer_hessian(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> SymmetricMatrix:
    """Hessian of the data loss with respect to ``w_l = vec(W_layer)``: ``(p, p)``,
    ``p = d_out d_in``; a :class:`KroneckerGram` for linear MSE (and the last layer of a ReLU MSE
    model, where ``A = I``), else a :class:`JacobianGram`.

    ``relu_tol``: pre-activations ``u >= -relu_tol * max|u|`` count as non-negative
    (sigma'(0) = 1, Concepts: *Conventions*).

    The linear head of a real network is the same object: build
    ``DeepUFM(config, features, [W_1, ..., W_L])`` with the head's input features (``d x N``,
    class-major, ``n`` per class) as ``H1``. Nothing here treats ``H1`` as a parameter; only the
    weights are differentiated.
    """
    check_layer(model, layer)
    jac = layer_jacobian(model, layer, relu_tol)
    if jac.shared and model.config.loss == "mse":
        return KroneckerGram(jac.A, jac.H / math.sqrt(jac.H.shape[1]))
    return JacobianGram(loss_weighted_factors(jac, model.config.loss), jac.H)


def gauss_newton(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> SymmetricMatrix:
    """``G_l = 1/N sum_ic J_ic^T B_ic J_ic``. For one layer of a deep UFM it *is* the layer
    Hessian: ``E_l = 0`` because the logits are (piecewise) linear in ``w_l`` (module docstring)."""
    return layer_hessian(model, layer, relu_tol)


def hessian_residual(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> SymmetricMatrix:
    """``E_l = H_l - G_l``: identically zero for one layer of a linear or ReLU deep UFM, with
    MSE or CE, at every point (a.e. for ReLU) — ``E_l`` sums ``dl/dz_k d^2 z_k / dw_l^2`` and
    ``z`` is (piecewise) linear in ``w_l``. Returned as a :class:`ZeroMatrix` of size ``p``."""
    check_layer(model, layer)
    del relu_tol  # E_l vanishes whatever the masks are
    d_out, d_in = model.W[layer - 1].shape
    return ZeroMatrix(d_out * d_in, model.H1.dtype, model.H1.device)

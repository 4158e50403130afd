"""Every closed-form prediction of the paper, as data (Concepts: *Predictions at the optimum*).

A :class:`Prediction` names the matrix it is about, the layer, the predicted non-zero eigenvalues
with multiplicities, the rank, and the predicted eigenvectors / singular vectors as the columns of
a tensor. The vectors are built from the class means of a *given* state, so the same records can
be checked against the exact optimum or against a trained model. Vectors in parameter space are
``vec``-ed row-major (``deepufm.vec``): ``mu'_c ⊗ mu_c'`` has the output-side factor first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.metrics.collapse import class_means
from deepufm.models.ufm import DeepUFM
from deepufm.theory.ce import ce_constants
from deepufm.theory.constants import dnc_constants


@dataclass(frozen=True)
class Prediction:
    """One theorem's statement about one matrix at one layer (``layer=None``: all layers).

    ``vectors`` (columns) span the predicted eigenspace of ``eigenvalues[0]`` when ``spanning``
    is False they are also mutually orthogonal eigenvectors; ``None`` where the theorem makes no
    vector statement. ``theorem_v1`` / ``theorem_v2`` give the paper's numbering in each version.
    """

    matrix: str
    layer: int | None
    eigenvalues: tuple[float, ...]
    multiplicities: tuple[int, ...]
    rank: int
    vectors: Tensor | None
    theorem_v1: str
    theorem_v2: str
    description: str
    spanning: bool = False


def _kron_columns(left: Tensor, right: Tensor) -> Tensor:
    """Columns ``left[:, a] ⊗ right[:, b]`` for all ``(a, b)`` (a-major): ``(p*q, A*B)``."""
    return torch.einsum("ia,jb->ijab", left, right).reshape(left.shape[0] * right.shape[0], -1)


def _means(model: DeepUFM, layer: int) -> tuple[Tensor, Tensor]:
    """``(M_l, M_{l+1})``: class means of the input and of the output features of ``W_l``."""
    Hs = model.features()
    K = model.config.K
    return class_means(Hs[layer - 1], K), class_means(Hs[layer], K)


def predictions(model: DeepUFM, layer: int) -> list[Prediction]:
    """The linear-MSE predictions for ``W_layer`` (v1 Theorems 4.1–4.4, E.1–E.3; v2 Theorems 1–4,
    10, 11), vectors from ``model``'s means.

    Eigenvalues come from the configuration (``dnc_constants``); for the ReLU model they apply at
    Definition-2 points (Theorem 7).
    """
    cfg = model.config
    K, l = cfg.K, layer
    k = dnc_constants(cfg)
    M, Mp = _means(model, l)
    Lam = k.hessian_eigenvalue[l - 1]
    mu_G = Mp.mean(dim=1, keepdim=True)
    eye_pairs = _kron_columns(Mp, M)  # (c, c') -> mu'_c ⊗ mu_c'
    diag = eye_pairs[:, [c * K + c for c in range(K)]]
    large, small = k.backprop_eigenvalues(l)
    cov_vecs = diag - diag.mean(dim=1, keepdim=True)
    return [
        Prediction(
            "layer_hessian",
            l,
            (Lam,),
            (K * K,),
            K * K,
            eye_pairs,
            "4.1",
            "1",
            "rank K^2, every non-zero eigenvalue Lambda_l, eigenvectors mu'_c ⊗ mu_c'",
        ),
        Prediction(
            "gauss_newton_class",
            l,
            (Lam,),
            (K,),
            K,
            _kron_columns(mu_G, M),
            "4.2(c)",
            "2(c)",
            "G_class: rank K, eigenvalue Lambda_l, eigenvectors mu'_G ⊗ mu_c",
        ),
        Prediction(
            "gauss_newton_cross",
            l,
            (Lam,),
            (K * (K - 1),),
            K * (K - 1),
            _kron_columns(Mp - mu_G, M),
            "4.2(b)",
            "2(b)",
            "G_cross: rank K(K-1), eigenvalue Lambda_l, spanned by (mu'_c' - mu'_G) ⊗ mu_c",
            spanning=True,
        ),
        Prediction("gauss_newton_within", l, (), (), 0, None, "4.2(a)", "2(a)", "G_within = 0"),
        Prediction(
            "knockout_class",
            l,
            (Lam,),
            (K * (K - 1),),
            K * (K - 1),
            None,
            "4.2",
            "2",
            "H - G_class: the K(K-1) cross outliers remain",
        ),
        Prediction(
            "knockout_cross",
            l,
            (Lam,),
            (K,),
            K,
            None,
            "4.2",
            "2",
            "H - G_cross: the K class outliers remain",
        ),
        Prediction(
            "data_gradient",
            l,
            (),
            (),
            1,
            diag.sum(dim=1, keepdim=True),
            "4.3",
            "3",
            "data gradient = -lam_l vec W_l, parallel to sum_c mu'_c ⊗ mu_c: gamma_cc = 1/K, "
            "gamma_cc' = 0, inside the top-K^2 Hessian eigenspace",
        ),
        Prediction(
            "weight",
            l,
            (k.omega2[l - 1],),
            (K,),
            K,
            torch.cat([Mp, M], dim=0),
            "4.4",
            "4",
            "W_l = omega_l sum_c mu'^_c mu^_c^T: K singular values omega_l; columns stack "
            "left (mu'_c) over right (mu_c) singular vectors; eigenvalue of W^T W is omega^2",
        ),
        Prediction(
            "gradient_covariance",
            l,
            (k.grad_cov_eigenvalue(l),),
            (K - 1,),
            K - 1,
            cov_vecs,
            "E.1",
            "10",
            "rank K-1, eigenvalue (1-c)^2 Lambda_l = c(1-c) lam_l, spanned by "
            "mu'_c ⊗ mu_c minus their mean (a simplex ETF)",
            spanning=True,
        ),
        Prediction(
            "backprop_error",
            l,
            (large, small),
            (K - 1, 1),
            K,
            torch.cat([Mp - mu_G, mu_G], 1),
            "E.2",
            "11",
            "rank K: (1+c^2) c^2/||mu'||^2 on mu'_c - mu'_G (K-1), (1-c)^2 c^2/||mu'||^2 on mu'_G",
            spanning=True,
        ),
        Prediction(
            "feature_gram",
            l,
            (k.feature_gram_eigenvalue(l),),
            (K,),
            K,
            M,
            "E.3",
            "—",
            "H_l H_l^T: K eigenvalues n ||mu^(l)||^2, eigenvectors mu_c",
        ),
    ]


def block_prediction(model: DeepUFM) -> Prediction:
    """v2 Theorem 5: the block Gauss–Newton matrix over ``W_1..W_L`` has rank ``K^2``, all non-zero
    eigenvalues ``sum_l Lambda_l``, eigenvectors stacking ``beta_{m+1} mu^(m+1)_a ⊗ mu^(m)_b``."""
    cfg = model.config
    K = cfg.K
    k = dnc_constants(cfg)
    Hs = model.features()
    blocks = []
    for m in range(1, cfg.L + 1):
        M, Mp = class_means(Hs[m - 1], K), class_means(Hs[m], K)
        blocks.append(k.beta[m] * _kron_columns(Mp, M))
    return Prediction(
        "block_gauss_newton",
        None,
        (k.block_gn_eigenvalue,),
        (K * K,),
        K * K,
        torch.cat(blocks, dim=0),
        "—",
        "5",
        "G_blk over all layers: rank K^2, eigenvalue sum_l Lambda_l",
    )


def ce_predictions(model: DeepUFM, layer: int) -> list[Prediction]:
    """v2 Theorem 9: the CE layer Hessian at the CE DNC point."""
    k = ce_constants(model.config)
    values, mults = k.hessian_spectrum(layer)
    M, Mp = _means(model, layer)
    K = model.config.K
    diag = _kron_columns(Mp, M)[:, [c * K + c for c in range(K)]]
    return [
        Prediction(
            "layer_hessian",
            layer,
            values,
            mults,
            (K - 1) ** 2,
            diag.sum(dim=1, keepdim=True),
            "—",
            "9",
            "K spikes (one dominant, eigenvector sum_c mu'_c ⊗ mu_c) over a "
            "mini-bulk of K^2-3K+1, rank (K-1)^2",
        ),
    ]

"""Alignment and spectral metrics (THEORY §9), one small function each.

``M`` arguments may be a dense symmetric tensor or any ``deepufm.matrices.SymmetricMatrix``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _apply(M, V: Tensor) -> Tensor:
    return M @ V if isinstance(M, Tensor) else M.matmat(V)


def kron_columns(left: Tensor, right: Tensor) -> Tensor:
    """Columns ``left[:, a] ⊗ right[:, b]`` for every ``(a, b)``, ``a``-major: ``(p*q, A*B)``."""
    return torch.einsum("ia,jb->ijab", left, right).reshape(left.shape[0] * right.shape[0], -1)


def eigvec_alignment(V: Tensor, M) -> Tensor:
    """``f(v; M) = (v^T M v)^2 / (||v||^2 ||M v||^2)`` per column of ``V`` (v1 f_cc'; v2 "cosine
    similarity squared"): 1 iff ``v`` is an eigenvector with a non-zero eigenvalue. ``(p, m) -> (m,)``."""
    MV = _apply(M, V)
    num = (V * MV).sum(dim=0) ** 2
    den = (V * V).sum(dim=0) * (MV * MV).sum(dim=0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), torch.zeros_like(num))


def eigvec_alignment_matrix(M, means_out: Tensor, means_in: Tensor) -> Tensor:
    """``f_cc' = f(mu'_c ⊗ mu_c'; M)``: ``(K, K)`` for the layer with class means ``M_{l+1}``, ``M_l``."""
    K = means_out.shape[1]
    return eigvec_alignment(kron_columns(means_out, means_in), M).reshape(K, K)


def gradient_coefficients(g: Tensor, means_out: Tensor, means_in: Tensor) -> Tensor:
    """``gamma_cc' = cos^2(g, mu'_c ⊗ mu_c') = (mu'_c^T G mu_c')^2 / (||G||^2 ||mu'_c||^2 ||mu_c'||^2)``
    with ``G`` the matrix form of ``g`` (THEORY §9): ``(K, K)``; prediction ``I/K`` at DNC."""
    G = g.reshape(means_out.shape[0], means_in.shape[0])
    num = (means_out.T @ G @ means_in) ** 2
    den = (G**2).sum() * torch.outer((means_out**2).sum(0), (means_in**2).sum(0))
    return num / den


def projection_proportion(g: Tensor, V: Tensor) -> float:
    """``||P g||^2 / ||g||^2`` with ``P`` the projector on the orthonormal columns of ``V`` (Gur-Ari et al.)."""
    return float(((V.T @ g) ** 2).sum() / (g @ g))


def subspace_overlap(V1: Tensor, V2: Tensor) -> float:
    """``tr(P_1 P_2) / k`` for two ``(p, k)`` orthonormal bases (Gur-Ari et al. 2018): in ``[0, 1]``."""
    return float(((V1.T @ V2) ** 2).sum() / V1.shape[1])


def effective_rank(values: Tensor) -> float:
    """``exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum sigma`` (Roy & Vetterli 2007; v2 eq. 25).

    ``values`` are singular values (for a PSD matrix, its eigenvalues); tiny negative round-off is
    clipped to 0, and ``0 log 0 = 0``.
    """
    s = values.clamp_min(0)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def outlier_count(eigenvalues: Tensor, floor: float = 1e-10, min_gap: float = 10.0) -> int:
    """Number of outliers: cut at the largest ratio gap between consecutive eigenvalues.

    Rule (explicit, scale-free): sort descending, keep those ``> floor * max``, and cut where
    ``lambda_i / lambda_{i+1}`` is largest. If no ratio reaches ``min_gap`` the kept values form
    one group and all of them count (a flat spectrum has no outliers to separate).
    """
    vals = torch.sort(eigenvalues, descending=True).values
    top = float(vals[0])
    if top <= 0:
        return 0
    kept = vals[vals > floor * top]
    if kept.numel() == 1:
        return 1
    ratios = kept[:-1] / kept[1:]
    best = int(torch.argmax(ratios))
    return best + 1 if float(ratios[best]) >= min_gap else int(kept.numel())


def outlier_stats(eigenvalues: Tensor, k: int) -> tuple[float, float]:
    """Mean and standard deviation of the top ``k`` eigenvalues (v2 Fig. 18)."""
    top = torch.sort(eigenvalues, descending=True).values[:k]
    return float(top.mean()), float(top.std(unbiased=False))


def negative_fraction(U: Tensor, tol: float = 0.0) -> float:
    """Fraction of entries of a pre-activation matrix below ``-tol * max|U|`` (v2 §5, ReLU)."""
    return float((U < -tol * U.abs().max()).to(torch.float64).mean())


def singular_vector_alignment(
    W: Tensor, means_out: Tensor, means_in: Tensor
) -> tuple[Tensor, Tensor]:
    """``(f(mu^'_c; W W^T), f(mu^_c; W^T W))`` per class (v2 Fig. 16): left and right, ``(K,)`` each."""
    return eigvec_alignment(means_out, W @ W.T), eigvec_alignment(means_in, W.T @ W)

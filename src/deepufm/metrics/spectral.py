"""Alignment and spectral metrics (Concepts: *Deep neural collapse*, *The metrics*), one small
function each.

``M`` arguments may be a dense symmetric tensor or any ``deepufm.matrices.SymmetricMatrix``.
Parameter-space vectors are ``vec``-ed row-major, so the paper's natural basis vector
``mu'_c ⊗ mu_c'`` is ``vec(mu'_c mu_c'^T)`` (``deepufm.vec``). Class means are columns:
``means_out = M_{l+1}`` ``(d_out, K)`` and ``means_in = M_l`` ``(d_in, K)`` for the layer ``W_l``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.spectra import zero_threshold
from deepufm.matrices.structured import KroneckerGram

Matrix = Tensor | SymmetricMatrix


def _apply(M: Matrix, V: Tensor) -> Tensor:
    return M @ V if isinstance(M, Tensor) else M.matmat(V)


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``0`` where ``den == 0`` (a zero vector is aligned with nothing)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1), torch.zeros_like(num))


def kron_columns(left: Tensor, right: Tensor) -> Tensor:
    """Columns ``left[:, a] ⊗ right[:, b]`` for every ``(a, b)``, ``a``-major: ``(p*q, A*B)``."""
    return torch.einsum("ia,jb->ijab", left, right).reshape(left.shape[0] * right.shape[0], -1)


def eigvec_alignment(V: Tensor, M: Matrix) -> Tensor:
    """``f(v; M) = (v^T M v)^2 / (||v||^2 ||M v||^2)`` in ``[0, 1]`` (v1 ``f_cc'``, v2
    "cosine similarity squared"): ``1`` iff ``v`` is an eigenvector with a non-zero eigenvalue.

    ``V`` ``(p,)`` -> scalar tensor, or ``(p, m)`` -> ``(m,)`` (one value per column). ``0`` when
    ``M v = 0``.
    """
    if V.dim() == 1:
        return eigvec_alignment(V.unsqueeze(1), M)[0]
    MV = _apply(M, V)
    num = (V * MV).sum(dim=0) ** 2
    return _safe_ratio(num, (V * V).sum(dim=0) * (MV * MV).sum(dim=0))


def eigvec_alignment_matrix(M: Matrix, means_out: Tensor, means_in: Tensor) -> Tensor:
    """``f_cc' = f(mu'_c ⊗ mu_c'; M)`` for the layer Hessian ``M`` of ``W_l``: ``(K, K)``.

    ``M`` is any symmetric matrix of size ``d_out d_in``. For a Kronecker Hessian ``P ⊗ Q``
    (linear MSE) ``f(a ⊗ b; P ⊗ Q) = f(a; P) f(b; Q)``, computed from the factors alone.
    At DNC every entry is 1 (v2 Theorem 1).
    """
    if isinstance(M, KroneckerGram):
        return torch.outer(eigvec_alignment(means_out, M.P), eigvec_alignment(means_in, M.Q))
    K_out, K_in = means_out.shape[1], means_in.shape[1]
    return eigvec_alignment(kron_columns(means_out, means_in), M).reshape(K_out, K_in)


def gradient_coefficients(g: Tensor, means_out: Tensor, means_in: Tensor) -> Tensor:
    """``gamma_cc' = cos^2(g, mu'_c ⊗ mu_c') = (mu'_c^T G mu_c')^2 / (||G||_F^2 ||mu'_c||^2 ||mu_c'||^2)``
    with ``G`` the ``(d_out, d_in)`` matrix of ``g``: ``(K, K)``.

    They sum to 1 when the ``mu'_c ⊗ mu_c'`` are orthogonal and span ``g``; prediction at DNC:
    ``I_K / K`` (Thm 3).
    """
    G = g.reshape(means_out.shape[0], means_in.shape[0])
    num = (means_out.T @ G @ means_in) ** 2
    den = (G**2).sum() * torch.outer((means_out**2).sum(0), (means_in**2).sum(0))
    return _safe_ratio(num, den)


def basis_coefficients(g: Tensor, V: Tensor) -> Tensor:
    """``cos^2(g, v_j)`` for every column of ``V`` ``(p, m)``: ``(m,)`` (v1 Table 2: the true top
    ``K^2`` eigenvectors of ``H_l`` instead of the predicted ``mu'_c ⊗ mu_c'``)."""
    return _safe_ratio((V.T @ g) ** 2, (g @ g) * (V * V).sum(dim=0))


def projection_proportion(g: Tensor, V: Tensor) -> float:
    """``pi(g) = ||P g||^2 / ||g||^2`` with ``P`` the projector on the orthonormal columns of ``V``
    ``(p, k)`` (Gur-Ari, Roberts & Dyer 2018). Use the data gradient ``tilde g_l``.

    ``nan`` when ``g = 0`` (e.g. at an exact optimum of the data loss): a zero gradient lies in
    no subspace, and 0/0 must not read as a proportion. ``g`` is scaled by ``max|g|`` first, so
    that a tiny non-zero gradient does not underflow to that case. The projector is formed from a
    float64 QR of ``V``: the same subspace, and a proportion that cannot exceed 1 by the
    round-off of float32 vectors.
    """
    peak = g.abs().max()
    if not peak > 0:
        return float("nan")
    u = (g / peak).to(torch.float64)
    Q = torch.linalg.qr(V.to(torch.float64))[0]
    return float(((Q.T @ u) ** 2).sum() / (u @ u))


def eigenbasis_coefficients(g: Tensor, V: Tensor) -> Tensor:
    """``cos^2(g, v_i) = (v_i^T g)^2 / ||g||^2`` for the orthonormal columns ``v_i`` of ``V``
    ``(p, k)``: ``(k,)``. v1 Table 2 with ``V`` the true top-``K^2`` eigenvectors of ``H_l``; they
    sum to :func:`projection_proportion`."""
    return (V.T @ g) ** 2 / (g @ g)


def subspace_overlap(V1: Tensor, V2: Tensor) -> float:
    """``ov = tr(P_1 P_2) / k = ||V1^T V2||_F^2 / k`` for two ``(p, k)`` orthonormal bases
    (Gur-Ari et al. 2018): in ``[0, 1]``, 1 iff the subspaces coincide."""
    return float(((V1.T @ V2) ** 2).sum() / V1.shape[1])


def effective_rank(values: Tensor) -> float:
    """``exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j`` (Roy & Vetterli 2007; v2 eq. 25).

    ``values`` are singular values (for a PSD matrix, its eigenvalues); tiny negative round-off is
    clipped to 0, ``0 log 0 = 0``, and an all-zero input has effective rank 0.
    """
    s = values.to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


OUTLIER_RULES = ("log_gap", "threshold")


def outlier_count(
    eigenvalues: Tensor,
    rule: str = "log_gap",
    floor: float | None = None,
    min_gap: float = 2.0,
    size: int | None = None,
) -> int:
    """Number of outlier eigenvalues, by an explicit rule (Concepts: *The metrics*).

    Only eigenvalues above the numerical-zero threshold are *kept* (``lambda_max > 0``; else the
    count is 0): the rank rule of ``deepufm.matrices.spectra`` (``size * eps(dtype)`` relative to
    ``lambda_max``, ``size`` the operator's dimension, default the number of values given), or
    ``floor * lambda_max`` when ``floor`` is given.

    * ``"threshold"``: the number of kept eigenvalues (the numerical rank of a PSD matrix).
    * ``"log_gap"`` (default): sort the kept values descending and cut at the largest ratio
      ``lambda_i / lambda_{i+1}`` between consecutive kept values; the count is the position of
      that cut (ties: the first, i.e. the fewest outliers). If no ratio reaches ``min_gap`` there
      is no separated group inside the kept values and the count is the number kept (an exactly
      low-rank spectrum with equal outliers, such as the DNC Hessian's ``K^2`` values over zeros).
      Scale-free.
    """
    if rule not in OUTLIER_RULES:
        raise ConfigError("rule", rule, f"one of {OUTLIER_RULES}")
    vals = torch.sort(eigenvalues.reshape(-1), descending=True).values
    if vals.numel() == 0 or float(vals[0]) <= 0:
        return 0
    threshold = zero_threshold(vals, size, floor, scale=float(vals[0]))
    kept = vals[vals > threshold].to(torch.float64)
    if rule == "threshold" or kept.numel() == 1:
        return int(kept.numel())
    ratios = kept[:-1] / kept[1:]
    best = int(torch.argmax(ratios))
    return best + 1 if float(ratios[best]) >= min_gap else int(kept.numel())


def outlier_stats(eigenvalues: Tensor, k: int) -> tuple[float, float]:
    """Mean and (population) standard deviation of the ``k`` largest eigenvalues (v2 Fig. 18):
    the spread of the outliers; at DNC the std of the top ``K^2`` of ``H_l`` is 0."""
    top = torch.sort(eigenvalues.to(torch.float64).reshape(-1), descending=True).values[:k]
    return float(top.mean()), float(top.std(correction=0))


def negative_fraction(U: Tensor, tol: float = 0.0) -> float:
    """Fraction of entries of a pre-activation matrix ``U_l`` below ``-tol * max|U_l|`` (v2 §5,
    ReLU; ``tol = 0`` is the paper's description)."""
    return float((U < -tol * U.abs().max()).to(torch.float64).mean())


def singular_vector_alignment(
    W: Tensor, means_out: Tensor, means_in: Tensor
) -> tuple[Tensor, Tensor]:
    """``(f(mu'_c; W W^T), f(mu_c; W^T W))`` per class (v2 Fig. 16): left and right
    singular-vector alignment of ``W_l`` ``(d_out, d_in)`` with the output / input class means,
    ``(K,)`` each; both 1 at DNC (Thm 4)."""
    return eigvec_alignment(means_out, W @ W.T), eigvec_alignment(means_in, W.T @ W)

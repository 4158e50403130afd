"""Exact DNC points: the linear-MSE global optimum (Concepts: *Deep neural collapse*), the ReLU
Definition-2 point and the CE DNC critical point (Definition 3, v2 App. B)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.theory.ce import ce_constants
from deepufm.theory.constants import dnc_constants


def _orthogonal(d: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A Haar-random ``d x d`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def _permutation(d: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.eye(d, dtype=dtype)[:, torch.randperm(d, generator=gen)]


def _frames(config: UFMConfig, seed: int | None, nonnegative: bool) -> list[Tensor]:
    """``U_0, ..., U_{L-1}`` in ``O(d)``; all permutations when ``nonnegative``.

    Definition 2 only needs ``U_1 ..`` to be permutations, but a permutation ``U_0`` as well makes
    every product exact, so the zero pre-activations are exactly 0 rather than +-1e-17 (which
    the ReLU derivative convention would otherwise have to absorb with a tolerance).
    """
    gen = torch.Generator().manual_seed(config.seed if seed is None else seed)
    dtype, d = config.torch_dtype, config.d
    draw = _permutation if nonnegative else _orthogonal
    return [draw(d, gen, dtype) for _ in range(config.L)]


def dnc_optimum(config: UFMConfig, seed: int | None = None, nonnegative: bool = False) -> DeepUFM:
    """A global optimum of the linear-MSE deep UFM, built exactly (Concepts: *Deep neural
    collapse*).

    ``H_1 = h U_0^K ⊗ 1_n^T``, ``W_l = omega_l U_l^K U_{l-1}^{K T}``,
    ``W_L = omega_L U_{L-1}^{K T}`` with random orthogonal frames ``U_m`` (seeded). With
    ``nonnegative=True`` the frames are permutations, so every pre-activation is non-negative: the
    ReLU model's DNC point of v2 Definition 2 (where Theorem 7 applies), accepted for
    ``activation="relu"`` as well.
    """
    if config.loss != "mse":
        raise ConfigError("loss", config.loss, "mse (use ce_dnc_point for cross-entropy)")
    if config.activation != "linear" and not nonnegative:
        raise ConfigError(
            "activation", config.activation, "linear, or relu with nonnegative=True (Definition 2)"
        )
    k = dnc_constants(config)
    U = [u[:, : config.K] for u in _frames(config, seed, nonnegative)]
    H1 = math.sqrt(k.mean_norm2[0]) * U[0].repeat_interleave(config.n, dim=1)
    W = [math.sqrt(k.omega2[l - 1]) * U[l] @ U[l - 1].T for l in range(1, config.L)]
    W.append(math.sqrt(k.omega2[-1]) * U[-1].T)
    return DeepUFM(config, H1, W).to(device=config.torch_device)


def flat_family_point(config: UFMConfig, a: float, seed: int | None = None) -> DeepUFM:
    """A point of the flat family at the first ReLU (Concepts: *Where the code departs from or goes
    beyond the paper*): same loss as Definition 2.

    Starting from the Definition-2 point (``dnc_optimum(nonnegative=True)``), the product
    ``W_1 H_1 = t U (I_K) ⊗ 1_n^T`` is replaced by ``t/(1-a) U (I_K - a 1 1^T) ⊗ 1_n^T``, which
    ReLU maps to the same ``H_2`` and whose nuclear norm is the same, factored as balanced SVD
    factors ``W_1 = P S^{1/2} B^T``, ``H_1 = B S^{1/2} R^T`` (``B`` the old input frame). For
    ``0 < a <= 1/K`` the pre-activations ``u^(2)`` have ``K-1`` negative entries per column;
    ``a = 1/K`` gives rank ``K-1``. Needs one lambda for ``W_1`` and ``H_1`` (``lam_W[0] == lam_H``),
    where ``||W_1||^2 + ||H_1||^2 = 2 ||W_1 H_1||_*`` is the minimal regulariser.
    """
    if config.activation != "relu" or config.L < 2:
        raise ConfigError("activation", config.activation, "relu with L >= 2 (a first ReLU)")
    if config.lam_W[0] != config.lam_H:
        raise ConfigError("lam_H", config.lam_H, f"equal to lam_W[0]={config.lam_W[0]}")
    if not 0 <= a <= 1 / config.K:
        raise ConfigError("a", a, f"a number in [0, 1/K={1 / config.K:.6g}]")
    point = dnc_optimum(config, seed, nonnegative=True)
    K, n = config.K, config.n
    U = point.W[0] @ point.H1  # (d, N): t U (I_K) ⊗ 1_n^T, class-major columns
    centre = U.reshape(U.shape[0], K, n).sum(dim=1, keepdim=True) / K  # t/K U 1 per column
    M = (U - a * K * centre.expand(-1, K, -1).reshape(U.shape)) / (1 - a)
    P, S, Rt = torch.linalg.svd(M, full_matrices=False)
    rank = int((S > 1e-12 * S[0]).sum())
    P, S, Rt = P[:, :rank], S[:rank], Rt[:rank]
    B = torch.linalg.svd(point.H1, full_matrices=False)[0][:, :rank]
    root = S.sqrt()
    W1 = (P * root) @ B.T
    H1 = (B * root) @ Rt
    return DeepUFM(config, H1, [W1, *point.W[1:]])


def simplex_basis(K: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Q``: ``K x (K-1)`` orthonormal basis of the complement of ``1`` (``Q Q^T = S``)."""
    S = torch.eye(K, dtype=dtype) - 1.0 / K
    _, vecs = torch.linalg.eigh(S)
    return vecs[:, 1:]  # eigenvalue 0 (the all-ones direction) comes first


def ce_dnc_point(config: UFMConfig, seed: int | None = None) -> DeepUFM:
    """The CE DNC critical point of Definition 3 (v2 App. B): ``Z = alpha S ⊗ 1_n^T``.

    ``H_1 = s_H U_0^{K-1} R^T``, ``W_l = s_l U_l^{K-1} U_{l-1}^{K-1 T}``, ``W_L = s_L Q U_{L-1}^{K-1 T}``
    with ``R = (Q ⊗ 1_n)/sqrt(n)`` and balanced singular values ``lam_l s_l^2 = lam_H s_H^2``.
    """
    if config.loss != "ce" or config.activation != "linear":
        raise ConfigError(
            "loss", config.loss, "ce with activation linear (v2 App. B, Definition 3)"
        )
    k = ce_constants(config)
    K, n, dtype = config.K, config.n, config.torch_dtype
    Q = simplex_basis(K, dtype)
    R = Q.repeat_interleave(n, dim=0) / math.sqrt(n)  # N x (K-1), orthonormal columns
    U = [u[:, : K - 1] for u in _frames(config, seed, nonnegative=False)]
    H1 = math.sqrt(k.s2_H) * U[0] @ R.T
    W = [math.sqrt(k.s2[l - 1]) * U[l] @ U[l - 1].T for l in range(1, config.L)]
    W.append(math.sqrt(k.s2[-1]) * Q @ U[-1].T)
    return DeepUFM(config, H1, W).to(device=config.torch_device)

"""Lanczos quadrature on any :class:`SymmetricMatrix`: the spectral density (SLQ).

* :func:`lanczos_topk` — certified block Lanczos top-k; it lives in the spectral engine
  (``deepufm.matrices.spectra``) and is re-exported here.
* :func:`frobenius_estimate` — Hutchinson's ``||M||_F`` with its standard error (one block of
  products), for operators too large to form.
* :func:`spectral_density` — stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
  Krishnan & Xiao 2019; Papyan 2019): for Rademacher probes ``v`` (``||v||^2 = p``), ``m`` Lanczos
  steps give a Gauss quadrature ``v^T f(M) v / p ≈ sum_j tau_j f(theta_j)`` (exact for polynomials
  of degree ``<= 2m - 1``), so the Gaussian-broadened eigenvalue density
  ``phi(t) = 1/p sum_i N(t; lambda_i, sigma^2)`` is estimated by
  ``1/P sum_probes sum_j tau_j N(t; theta_j, sigma^2)``. All probes run together: each Lanczos
  step is one ``matmat`` on a ``(p, P)`` block (one data pass for a :class:`ModuleHessian`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.spectra import lanczos_topk

__all__ = [
    "SpectralDensity",
    "frobenius_estimate",
    "gaussian_density",
    "lanczos_quadrature",
    "lanczos_topk",
    "rademacher",
    "spectral_density",
]


def lanczos_quadrature(op: SymmetricMatrix, V: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of ``v^T f(M) v / ||v||^2`` for every column of ``V``.

    ``V`` ``(p, P)`` -> nodes ``theta`` ``(P, m)`` and weights ``tau`` ``(P, m)`` (each row sums to
    1), ``m = min(steps, p)``: the eigenvalues of the ``m x m`` Lanczos tridiagonal ``T`` and the
    squared first components of its eigenvectors. Full re-orthogonalisation (twice) keeps the
    Krylov basis orthogonal in floating point; after an exact breakdown (invariant subspace found)
    the basis continues with zeros, which adds nodes of weight exactly 0.
    """
    p, P = V.shape
    m = min(int(steps), p)
    if m < 1:
        raise ConfigError("lanczos_steps", steps, "an integer >= 1")
    Q = V / torch.linalg.norm(V, dim=0)
    basis = [Q]
    alphas, betas = [], []
    prev, beta = torch.zeros_like(Q), torch.zeros(P, dtype=V.dtype, device=V.device)
    scale = torch.zeros(P, dtype=V.dtype, device=V.device)
    for j in range(m):
        W = op.matmat(Q)
        scale = torch.maximum(scale, torch.linalg.norm(W, dim=0))
        alpha = (Q * W).sum(dim=0)
        alphas.append(alpha)
        if j == m - 1:
            break
        W = W - alpha * Q - beta * prev
        B = torch.stack(basis)  # (j+1, p, P)
        for _ in range(2):
            W = W - torch.einsum("jpm,jm->pm", B, torch.einsum("jpm,pm->jm", B, W))
        beta = torch.linalg.norm(W, dim=0)
        alive = beta > 1e3 * torch.finfo(V.dtype).eps * scale
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        betas.append(beta)
        prev, Q = Q, torch.where(alive, W / torch.where(alive, beta, 1), torch.zeros_like(W))
        basis.append(Q)
    a = torch.stack(alphas, dim=1)  # (P, m)
    T = torch.diag_embed(a)
    if betas:
        b = torch.stack(betas, dim=1)  # (P, m-1)
        T = T + torch.diag_embed(b, offset=1) + torch.diag_embed(b, offset=-1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[:, 0, :] ** 2


def rademacher(p: int, num: int, seed: int, dtype: torch.dtype, device) -> Tensor:
    """``num`` independent Rademacher (+-1) vectors, ``(p, num)``, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (p, num), generator=gen).to(dtype) * 2 - 1
    return signs.to(device)


def frobenius_estimate(
    op: SymmetricMatrix,
    probes: int,
    seed: int = 0,
    deflate: tuple[Tensor, Tensor] | None = None,
) -> tuple[float, float]:
    """``||M||_F`` from Hutchinson's ``||M||_F^2 = E ||M v||^2`` (Rademacher ``v``), with the
    standard error of the estimate (delta method); ``probes`` products in one ``matmat``.

    ``deflate``: eigenpairs ``(values (k,), orthonormal vectors Q (p, k))`` of ``M`` (e.g. a
    certified :class:`~deepufm.matrices.spectra.TopK`). Then ``||M||_F^2 = sum values^2 +
    tr(M^2 (I - Q Q^T))`` and only the second term is estimated, with probes projected off
    ``Q``: the outliers, which dominate both the norm and the variance of the plain estimate,
    are counted exactly.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
        raise ConfigError("probes", probes, "an integer >= 2")
    V = rademacher(op.size, probes, seed, op.dtype, op.device)
    exact = 0.0
    if deflate is not None:
        values, Q = deflate
        exact = float((values.to(op.dtype) ** 2).sum())
        Q = Q.to(dtype=op.dtype, device=op.device)
        for _ in range(2):  # twice: the projection must not leave Q's round-off behind
            V = V - Q @ (Q.T @ V)
    sq = (op.matmat(V) ** 2).sum(dim=0)
    fro = math.sqrt(exact + float(sq.mean()))
    if fro == 0:
        return 0.0, 0.0
    return fro, float(sq.std() / math.sqrt(probes)) / (2 * fro)


@dataclass(frozen=True)
class SpectralDensity:
    """A Gaussian-broadened eigenvalue density and the quadrature it came from.

    Attributes:
        grid: ``(G,)`` points ``t``.
        density: ``(G,)`` ``phi(t)``; integrates to 1 over the real line (eigenvalue fraction).
        nodes: ``(P, m)`` Lanczos nodes ``theta`` per probe.
        weights: ``(P, m)`` quadrature weights ``tau`` per probe (rows sum to 1).
        sigma: the broadening.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float

    def moment(self, k: int) -> float:
        """Estimate of ``tr(M^k) / p`` (exact per probe for ``k <= 2m - 1``)."""
        return float((self.weights * self.nodes**k).sum(dim=1).mean())


def gaussian_density(grid: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """``sum_j w_j N(t; x_j, sigma^2)`` on ``grid`` for flat ``nodes``/``weights``: ``(G,)``."""
    z = (grid.unsqueeze(1) - nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ weights.reshape(-1)


def spectral_density(
    op: SymmetricMatrix,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density of ``op`` (module docstring).

    Args:
        op: any symmetric matrix (e.g. a :class:`ModuleHessian`).
        num_probes: Rademacher probe vectors ``P`` (all run in one block).
        lanczos_steps: Lanczos steps ``m`` per probe (capped at ``p``).
        grid: the points ``t`` ``(G,)``, or a number of points spread over
            ``[min theta - 5 sigma, max theta + 5 sigma]``.
        sigma: Gaussian broadening; default 1% of the spread of the nodes.
        seed: seed of the probes.
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ConfigError("num_probes", num_probes, "an integer >= 1")
    V = rademacher(op.size, num_probes, seed, op.dtype, op.device)
    nodes, weights = lanczos_quadrature(op, V, lanczos_steps)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * max(hi - lo, abs(hi), torch.finfo(op.dtype).tiny)
    if not sigma > 0:
        raise ConfigError("sigma", sigma, "a number > 0")
    if isinstance(grid, int):
        grid = torch.linspace(
            lo - 5 * sigma, hi + 5 * sigma, grid, dtype=op.dtype, device=op.device
        )
    density = gaussian_density(grid, nodes, weights, sigma) / num_probes
    return SpectralDensity(grid, density, nodes, weights, float(sigma))

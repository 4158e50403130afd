"""Lanczos on any :class:`SymmetricMatrix`: top-k eigenpairs and the spectral density (SLQ).

* :func:`lanczos_topk` — thick-restarted block Lanczos in torch on ``op.matmat`` (what
  ``SymmetricMatrix.topk`` uses for large matrices; it switches to a dense ``eigh`` for small
  ones, and structured subclasses to their exact small eigenproblems where those are cheaper).
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

from deepufm.errors import ConfigError, ConvergenceError
from deepufm.matrices.operator import SymmetricMatrix


def lanczos_topk(
    op: SymmetricMatrix,
    k: int,
    tol: float = 0.0,
    seed: int = 0,
    block: int | None = None,
    max_basis: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` algebraically largest eigenpairs by block Lanczos: ``(k,)`` descending, ``(p, k)``.

    Thick-restarted (Krylov–Schur) block Lanczos with full re-orthogonalisation, in torch: every
    product is one ``op.matmat`` on a ``(p, block)`` block, so a structured operator runs GEMMs
    instead of one matrix-vector product at a time. Converged when every residual
    ``||M x_i - theta_i x_i|| <= max(tol |theta_i|, 1000 eps max|theta|)`` (``tol = 0``: to working
    accuracy), read off the Krylov relation ``M Q = Q T + Q_next B E^T`` without extra products.

    Args:
        op: the symmetric matrix.
        k: how many eigenpairs.
        tol: relative residual tolerance (as scipy's ``eigsh``).
        seed: seed of the random start block (repeated calls agree).
        block: block size; default ``min(8, k)``. Larger blocks make a product cheaper per
            vector but need more of them (for the top 100 of the d = 64 ReLU layer Hessian:
            ~420 products at 8, ~680 at 25).
        max_basis: Krylov basis size before a restart; default ``max(2k, k + 8 block)``.

    When the basis could not be much smaller than ``p`` (``k >= p / 4``) the answer comes from
    ``op.eigh()`` (dense for a plain operator) instead.
    """
    if not 1 <= k <= op.size:
        raise ConfigError("k", k, f"an integer in [1, {op.size}]")
    p = op.size
    b = block if block is not None else min(8, k)
    m_max = max_basis if max_basis is not None else max(2 * k, k + 8 * b)
    m_max = min(m_max, p - b)
    if 4 * k >= p or m_max < k + b:
        vals, vecs = op.eigh()
        return vals[:k], vecs[:, :k]
    state = _BlockKrylov.start(op, b, m_max, seed)
    eps = torch.finfo(op.dtype).eps
    for _ in range(max(50, 20 * p // b)):
        state.extend()
        full = state.filled + b > m_max  # basis and next block must fit in p dimensions
        if state.filled < k or not (full or state.due()):
            continue
        theta, Y, resid = state.ritz()
        floor = 1e3 * eps * float(theta.abs().max())
        if bool((resid[:k] <= torch.clamp(tol * theta[:k].abs(), min=floor)).all()):
            return theta[:k], state.vectors(Y[:, :k])
        if full:
            state.restart(theta, Y, keep=min(k + (m_max - k) // 2, m_max - b))
    raise ConvergenceError("lanczos_topk", k, state.products)


@dataclass
class _BlockKrylov:
    """Orthonormal basis ``Q`` (``filled`` vectors) with ``M Q = Q T + Q_next B E_last^T``.

    Vectors are stored as rows (``Q^T``, ``(m, p)``): the re-orthogonalisation reads the basis
    four times per block, and contiguous rows make those skinny GEMMs several times faster than
    a column-sliced ``(p, m)`` basis.
    """

    op: SymmetricMatrix
    Qt: Tensor  # (m_max + b, p): the basis as rows, then room for one more block
    T: Tensor  # (m_max + b, m_max + b): Q^T M Q, symmetric
    nxt: Tensor  # (b, p): the next block (rows), orthogonal to the basis
    B: Tensor  # (b, b): its coefficients, M Q_last - Q (Q^T M Q_last) = nxt^T B
    filled: int
    last: int  # first row of the last block
    gen: torch.Generator
    scale: float = 0.0  # running max of ||M q||, for the breakdown test
    products: int = 0
    since_ritz: int = 0

    @classmethod
    def start(cls, op: SymmetricMatrix, b: int, m_max: int, seed: int) -> _BlockKrylov:
        gen = torch.Generator().manual_seed(seed)
        Qt = torch.zeros(m_max + b, op.size, dtype=op.dtype, device=op.device)
        first = torch.randn(op.size, b, generator=gen, dtype=op.dtype).to(op.device)
        T = torch.zeros(m_max + b, m_max + b, dtype=op.dtype, device=op.device)
        nxt = torch.linalg.qr(first)[0].T.contiguous()
        B = torch.zeros(b, b, dtype=op.dtype, device=op.device)
        return cls(op, Qt, T, nxt, B, filled=0, last=0, gen=gen)

    def basis(self) -> Tensor:
        """``Q^T``: ``(filled, p)``."""
        return self.Qt[: self.filled]

    def due(self) -> bool:
        """Rayleigh–Ritz checks every few blocks (each costs an eigendecomposition of ``T``)."""
        return self.since_ritz * self.nxt.shape[0] >= max(16, self.filled // 4)

    def extend(self) -> None:
        """Append ``nxt`` to the basis, multiply it, and orthogonalise the product into ``nxt``."""
        b = self.nxt.shape[0]
        lo, hi = self.filled, self.filled + b
        self.Qt[lo:hi] = self.nxt
        self.filled, self.last = hi, lo
        W = self.op.matmat(self.nxt.T).T.contiguous()  # (b, p)
        self.products += b
        self.since_ritz += 1
        self.scale = max(self.scale, float(torch.linalg.norm(W, dim=1).max()))
        Qb = self.Qt[:hi]
        C = W @ Qb.T  # (b, hi)
        W = torch.addmm(W, C, Qb, alpha=-1)
        C2 = W @ Qb.T  # twice is enough (Kahan–Parlett)
        W = torch.addmm(W, C2, Qb, alpha=-1)
        C = C + C2
        self.T[lo:hi, :hi] = C
        self.T[:hi, lo:hi] = C.T
        diag = self.T[lo:hi, lo:hi]
        self.T[lo:hi, lo:hi] = 0.5 * (diag + diag.T)
        self.nxt, self.B = self._orthonormal(W, Qb)

    def _orthonormal(self, Wt: Tensor, Qb: Tensor) -> tuple[Tensor, Tensor]:
        """``W = U B`` (rows: ``Wt = B^T U^T``) with ``U`` orthonormal and orthogonal to the
        basis; directions that ``W`` lacks (an invariant subspace was found) are filled with
        fresh random ones and get coefficient 0, so multiple eigenvalues are still reached."""
        floor = 1e3 * torch.finfo(Wt.dtype).eps * max(self.scale, torch.finfo(Wt.dtype).tiny)
        U, R = torch.linalg.qr(Wt.T)  # the common case: W has full column rank
        if bool((torch.diagonal(R).abs() > floor).all()):
            return U.T.contiguous(), R
        Z, s, Ut = torch.linalg.svd(Wt, full_matrices=False)  # Wt = Z diag(s) U^T
        dead = s <= floor
        if bool(dead.any()):
            fresh = torch.randn(int(dead.sum()), Wt.shape[1], generator=self.gen, dtype=Wt.dtype)
            keep = torch.cat([Qb, Ut[~dead]], dim=0)
            fresh = fresh.to(Wt.device)
            for _ in range(2):
                fresh = fresh - (fresh @ keep.T) @ keep
            Ut[dead] = torch.linalg.qr(fresh.T)[0].T
            s = torch.where(dead, torch.zeros_like(s), s)
        return Ut.contiguous(), s.unsqueeze(1) * Z.T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (descending), their coordinates in the basis and residual norms
        ``||B y_last||``."""
        self.since_ritz = 0
        hi = self.filled
        theta, Y = torch.linalg.eigh(self.T[:hi, :hi])
        theta, Y = theta.flip(0), Y.flip(1)
        resid = torch.linalg.norm(self.B @ Y[self.last : hi], dim=0)
        return theta, Y, resid

    def vectors(self, Y: Tensor) -> Tensor:
        """Ritz vectors ``Q Y``: ``(p, columns of Y)``."""
        return self.basis().T @ Y

    def restart(self, theta: Tensor, Y: Tensor, keep: int) -> None:
        """Compress the basis to the ``keep`` leading Ritz vectors; ``nxt`` is unchanged and still
        orthogonal to them, and their coupling to it is recomputed by the next :meth:`extend`."""
        self.Qt[:keep] = Y[:, :keep].T @ self.basis()
        self.T.zero_()
        self.T[:keep, :keep] = torch.diag(theta[:keep])
        self.filled = keep


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

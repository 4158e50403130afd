"""Layer-wise Hessians of the data loss (THEORY §5, M2), exact and structured.

``H_l = d^2 D / d w_l^2`` with ``w_l = vec(W_l)`` (row-major). For every deep UFM, linear or ReLU,
MSE or CE, the logits are (piecewise) linear in ``w_l``, so the residual ``E_l`` vanishes and
``H_l = G_l = (1/N) sum_ic J_ic^T B_ic J_ic`` with ``J_ic = A_ic ⊗ h_ic^T`` (``matrices.jacobian``)
and ``B_ic`` the Hessian of the loss in the logits (``I_K`` for MSE; ``diag(p) - p p^T`` for CE).

* Linear MSE: ``H_l = (A^T A) ⊗ (H_l H_l^T / N)`` — a :class:`KroneckerGram`; its full spectrum is
  every product of the two factors' eigenvalues, read off the ``K x K`` and ``N x N`` Grams.
* Everything else: a :class:`JacobianGram` ``V^T V`` with ``N K`` rows ``ã_{ic,k} ⊗ h_ic / sqrt(N)``
  (``ã = C^T A`` with ``B = C C^T``); its exact non-zero spectrum comes from the ``NK x NK`` Gram.

No ``p x p`` matrix is formed unless ``dense()`` is asked for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepufm.matrices.jacobian import LayerJacobian, layer_jacobian
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.models.ufm import DeepUFM


def _gram_eigh(F: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    """Non-zero-capable eigenpairs of ``F^T F`` (``rows=True``) or ``F F^T`` via the smaller Gram.

    Returns eigenvalues (descending) and eigenvectors of the *large* matrix as columns.
    """
    X = F if rows else F.T  # the matrix is X^T X with X (r, m)
    r, m = X.shape
    if r >= m:
        vals, vecs = torch.linalg.eigh(X.T @ X)
        return vals.flip(0), vecs.flip(1)
    vals, small = torch.linalg.eigh(X @ X.T)
    vals, small = vals.flip(0), small.flip(1)
    vecs = X.T @ small
    norms = torch.linalg.norm(vecs, dim=0)
    safe = norms > 0
    vecs = torch.where(safe, vecs / torch.where(safe, norms, 1), vecs)
    return vals.clamp_min(0), vecs


class KroneckerGram(SymmetricMatrix):
    """``P ⊗ Q`` with ``P = F_P^T F_P`` (``F_P``: ``r x a``) and ``Q = F_Q F_Q^T`` (``F_Q``: ``b x s``).

    Size ``a*b``; vectors are ``vec`` of ``a x b`` matrices, ``(P ⊗ Q) vec(X) = vec(P X Q)``.
    """

    def __init__(self, F_P: Tensor, F_Q: Tensor) -> None:
        self.F_P, self.F_Q = F_P, F_Q
        self.a, self.b = F_P.shape[1], F_Q.shape[0]
        super().__init__(self.a * self.b, F_P.dtype, F_P.device)

    @property
    def P(self) -> Tensor:
        return self.F_P.T @ self.F_P

    @property
    def Q(self) -> Tensor:
        return self.F_Q @ self.F_Q.T

    def matmat(self, V: Tensor) -> Tensor:
        X = V.T.reshape(-1, self.a, self.b)
        Y = self.F_P.T @ (self.F_P @ X) @ self.F_Q @ self.F_Q.T
        return Y.reshape(-1, self.size).T

    def dense(self) -> Tensor:
        return torch.kron(self.P, self.Q)

    def factor_eigh(
        self, full: bool = False
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Eigenpairs (descending) of ``P`` and ``Q``: from their small Grams (the non-zero part),
        or, with ``full``, complete bases from the ``a x a`` and ``b x b`` factors themselves."""
        if full:
            (p, U), (q, W) = torch.linalg.eigh(self.P), torch.linalg.eigh(self.Q)
            return (p.flip(0), U.flip(1)), (q.flip(0), W.flip(1))
        return _gram_eigh(self.F_P, rows=True), _gram_eigh(self.F_Q, rows=False)

    def eigvalsh(self) -> Tensor:
        (p, _), (q, _) = self.factor_eigh()
        vals = torch.outer(p, q).reshape(-1)
        vals = torch.sort(vals, descending=True).values
        missing = self.size - vals.numel()  # the factors' null spaces
        return torch.cat([vals, vals.new_zeros(missing)]) if missing > 0 else vals

    def topk(self, k: int, tol: float = 0.0) -> tuple[Tensor, Tensor]:
        """Top-``k`` eigenpairs as Kronecker products of factor eigenvectors (no Lanczos)."""
        (p, U), (q, W) = self.factor_eigh()
        if k > p.numel() * q.numel():
            (p, U), (q, W) = self.factor_eigh(full=True)
        prods = torch.outer(p, q).reshape(-1)
        order = torch.argsort(prods, descending=True)[:k]
        i, j = order // q.numel(), order % q.numel()
        vecs = (U[:, i].unsqueeze(1) * W[:, j].unsqueeze(0)).reshape(self.size, k)
        return prods[order], vecs

    def eigh(self) -> tuple[Tensor, Tensor]:
        return self.topk(self.size)

    def trace(self) -> Tensor:
        return (self.F_P**2).sum() * (self.F_Q**2).sum()


class JacobianGram(SymmetricMatrix):
    """``V^T V`` with rows ``ã_{n,k} ⊗ h_n / sqrt(N)``: ``Ã`` ``(N, R, d_out)``, ``H`` ``(d_in, N)``."""

    def __init__(self, A_w: Tensor, H: Tensor) -> None:
        self.A_w, self.H = A_w, H
        self.N = H.shape[1]
        self.d_out, self.d_in = A_w.shape[2], H.shape[0]
        super().__init__(self.d_out * self.d_in, H.dtype, H.device)

    def _apply_V(self, V: Tensor) -> Tensor:
        """``V x`` for every column: ``(p, m) -> (m, N, R)``."""
        X = V.T.reshape(-1, self.d_out, self.d_in)
        return torch.einsum("nrd,mdn->mnr", self.A_w, X @ self.H) / math.sqrt(self.N)

    def _apply_VT(self, S: Tensor) -> Tensor:
        """``V^T s``: ``(m, N, R) -> (p, m)``."""
        T = torch.einsum("nrd,mnr->mdn", self.A_w, S) @ self.H.T / math.sqrt(self.N)
        return T.reshape(-1, self.size).T

    def matmat(self, V: Tensor) -> Tensor:
        return self._apply_VT(self._apply_V(V))

    def rows(self) -> Tensor:
        """``V``: ``(N R, p)`` (formed only for Grams and dense output)."""
        V = torch.einsum("nrd,en->nrde", self.A_w, self.H) / math.sqrt(self.N)
        return V.reshape(-1, self.size)

    def dense(self) -> Tensor:
        V = self.rows()
        return V.T @ V

    def gram(self) -> Tensor:
        """``V V^T``: ``(NR, NR)`` with entries ``(ã·ã')(h·h')/N``."""
        AA = torch.einsum("nrd,msd->nrms", self.A_w, self.A_w)
        HH = self.H.T @ self.H
        G = AA * HH.unsqueeze(1).unsqueeze(3)
        R = self.A_w.shape[1]
        return G.reshape(self.N * R, self.N * R) / self.N

    def eigh(self) -> tuple[Tensor, Tensor]:
        rows = self.N * self.A_w.shape[1]
        if rows >= self.size:
            return super().eigh()
        vals, small = torch.linalg.eigh(self.gram())
        vals, small = vals.flip(0).clamp_min(0), small.flip(1)
        vecs = self._apply_VT(small.T.reshape(-1, self.N, self.A_w.shape[1]))
        vecs = vecs / torch.linalg.norm(vecs, dim=0).clamp_min(torch.finfo(vecs.dtype).tiny)
        return vals, vecs  # the remaining p - NR eigenvalues are 0

    def eigvalsh(self) -> Tensor:
        rows = self.N * self.A_w.shape[1]
        if rows >= self.size:
            return super().eigvalsh()
        vals = torch.linalg.eigvalsh(self.gram()).flip(0).clamp_min(0)
        return torch.cat([vals, vals.new_zeros(self.size - rows)])

    def topk(self, k: int, tol: float = 0.0) -> tuple[Tensor, Tensor]:
        vals, vecs = self.eigh()
        return vals[:k], vecs[:, :k]


def _weighted_factors(jac: LayerJacobian, loss: str) -> Tensor:
    """``Ã_ic = C_ic^T A_ic`` with ``C C^T`` the loss Hessian in the logits: ``(N, K, d_out)``."""
    A = jac.per_sample_A
    if loss == "mse":
        return A
    p = torch.softmax(jac.Z, dim=0).T  # (N, K)
    B = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    vals, vecs = torch.linalg.eigh(B)
    C = vecs * vals.clamp_min(0).sqrt().unsqueeze(1)  # B = C C^T
    return C.transpose(1, 2) @ A


def layer_hessian(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> SymmetricMatrix:
    """Hessian of the data loss with respect to ``vec(W_layer)``: ``(p, p)``, ``p = d_out d_in``.

    ``relu_tol`` counts pre-activations ``u >= -relu_tol * max|u|`` as non-negative (sigma'(0)=1).
    Works for the linear head of a real network too: build ``DeepUFM(config, features, weights)``.
    """
    jac = layer_jacobian(model, layer, relu_tol)
    if jac.shared and model.config.loss == "mse":
        return KroneckerGram(jac.A, jac.H / math.sqrt(jac.H.shape[1]))
    return JacobianGram(_weighted_factors(jac, model.config.loss), jac.H)


def gauss_newton(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> SymmetricMatrix:
    """``G_l`` (M2). For one layer of these models ``G_l = H_l`` exactly: the logits are
    (piecewise) linear in ``w_l``, so the second-derivative term ``E_l`` vanishes."""
    return layer_hessian(model, layer, relu_tol)


def hessian_residual(model: DeepUFM, layer: int) -> SymmetricMatrix:
    """``E_l = H_l - G_l``: identically zero for a single layer of a deep UFM (see ``gauss_newton``)."""
    shape = model.W[layer - 1].shape
    return _Zero(shape[0] * shape[1], model.H1.dtype, model.H1.device)


class _Zero(SymmetricMatrix):
    """The zero matrix of a given size."""

    def matmat(self, V: Tensor) -> Tensor:
        return torch.zeros_like(V)

    def dense(self) -> Tensor:
        return torch.zeros(self.size, self.size, dtype=self.dtype, device=self.device)

    def eigvalsh(self) -> Tensor:
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)

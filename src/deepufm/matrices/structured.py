"""Structured symmetric matrices: Kronecker products, row Grams and Grams of Jacobian rows.

The curvature matrices of a deep UFM are built from a few exact structures, each a
:class:`~deepufm.matrices.operator.SymmetricMatrix` with an exact small eigenproblem behind its
spectrum and its top-k (certified by ``deepufm.matrices.spectra``):

* :class:`KroneckerGram` ``P ⊗ Q`` (the linear-MSE layer Hessian): eigenpairs are
  products of the factors' (``K x K`` and ``min(d, N)``-sized Grams);
* :class:`RowGram` ``F^T diag(w) F`` with ``R`` rows (Papyan's class and cross-class terms, signed
  knockouts): an ``R x R`` problem after a thin QR;
* :class:`KroneckerSum` ``sum c_i P_i ⊗ Q_i`` of one shape (linear knockouts): exact in a shared
  factor basis;
* :class:`JacobianGram` ``V^T C V`` for Jacobian rows ``ã_{n,r} ⊗ h_n / sqrt(N)`` (ReLU and CE
  layer Hessians, their Papyan terms and knockouts; ``C`` a projector on the sample side): an
  ``NR x NR`` Gram when ``NR < p``, else dense;
* :class:`ZeroMatrix`.

Sums and differences keep their structure through the one addition rule of
``deepufm.matrices.operator`` (:func:`kronecker_sum`, then :func:`row_gram_sum`). No ``p x p``
matrix is formed unless ``dense()`` (or a dense eigensolver, for ``p <= NR``) is asked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices.operator import SymmetricMatrix, Terms
from deepufm.matrices.spectra import (
    dense_eigh,
    dense_topk,
    gram_lift,
    orthonormal_complement,
    with_null_space,
)


# -- small exact spectral helpers -----------------------------------------------------------------
def pad_spectrum(vals: Tensor, size: int) -> Tensor:
    """Descending ``vals`` (the possibly non-zero eigenvalues) completed with ``size - len`` exact
    zeros, in descending order: ``(r,) -> (size,)``."""
    vals = torch.sort(vals, descending=True).values
    missing = size - vals.numel()
    if missing <= 0:
        return vals
    neg = vals < 0
    zeros = vals.new_zeros(missing)
    return torch.cat([vals[~neg], zeros, vals[neg]])


def gram_eigh(X: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``X^T X`` (``X``: ``(r, m)``), descending, from the smaller of its two Grams.

    For ``r >= m`` a complete ``m x m`` eigenbasis; for ``r < m`` the ``r`` eigenpairs that can be
    non-zero, ``x_j = X^T u_j / ||X^T u_j||`` from ``X X^T u_j = s_j u_j``, dropping those whose
    eigenvalue is zero to working precision (their ``x_j`` would be noise).
    """
    r, m = X.shape
    if r >= m:
        vals, vecs = torch.linalg.eigh(X.T @ X)
        return vals.flip(0), vecs.flip(1)
    vals, small = torch.linalg.eigh(X @ X.T)
    vals, small = vals.flip(0), small.flip(1)
    keep = vals > vals[0].abs() * r * torch.finfo(X.dtype).eps if r > 0 else vals > 0
    vecs = X.T @ small[:, keep]
    return vals[keep], vecs / torch.linalg.norm(vecs, dim=0)


def _triangle(d: int, device: torch.device) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Upper-triangle indices ``(rows, cols)`` of a ``d x d`` matrix and, for every ``(i, j)``,
    the position of ``(min, max)`` among them: ``(d, d)``."""
    rows, cols = torch.triu_indices(d, d, device=device)
    where = torch.empty(d, d, dtype=torch.long, device=device)
    where[rows, cols] = torch.arange(rows.numel(), device=device)
    where[cols, rows] = where[rows, cols]
    return (rows, cols), where


class RowFactored:
    """Matrices ``F^T diag(w) F`` given by ``row_factor()`` (and a ``rank_bound``): their sums and
    differences stay exact and low-rank while the stacked rows are fewer than ``p``
    (:func:`row_gram_sum`, the structured sum that :func:`~deepufm.matrices.operator.combine`
    asks for)."""

    sum_priority = 1

    @classmethod
    def structured_sum(cls, terms: Terms) -> SymmetricMatrix | None:
        """The sum of ``terms`` as one :class:`RowGram` (:func:`row_gram_sum`): exact while the
        stacked rows of the terms are fewer than ``p``, else ``None`` (``combine`` then tries the
        next class)."""
        return row_gram_sum(terms)


# -- F^T diag(w) F ---------------------------------------------------------------------------------
class RowGram(RowFactored, SymmetricMatrix):
    """``M = F^T diag(w) F = sum_r w_r f_r f_r^T``: rows ``F`` ``(R, p)``, weights ``w`` ``(R,)``.

    Weights may be negative (knockouts ``H - G_X``). For ``R < p`` the exact spectrum comes from a
    thin QR ``F^T = Q T`` (``Q``: ``p x R``) and the ``R x R`` symmetric ``T diag(w) T^T``: cost
    ``O(p R^2)``, no ``p x p`` matrix; the other ``p - R`` eigenvalues are exactly 0.
    """

    def __init__(self, F: Tensor, weights: Tensor | None = None) -> None:
        super().__init__(F.shape[1], F.dtype, F.device)
        self.F = F
        self.w = F.new_ones(F.shape[0]) if weights is None else weights.to(F.dtype)

    @property
    def rank_bound(self) -> int:
        """``min(R, p)``: at most this many eigenvalues are non-zero."""
        return min(self.F.shape[0], self.size)

    def row_factor(self) -> tuple[Tensor, Tensor]:
        """``(F, w)``: the rows ``(R, p)`` and weights ``(R,)`` themselves, which
        :func:`row_gram_sum` stacks (no copy)."""
        return self.F, self.w

    def matmat(self, V: Tensor) -> Tensor:
        """``F^T (w * (F V))``: two thin products, ``O(p R m)`` for ``V`` ``(p, m)``; no
        ``p x p`` matrix."""
        return self.F.T @ (self.w.unsqueeze(1) * (self.F @ V))

    def dense(self) -> Tensor:
        """``F^T diag(w) F``: ``(p, p)`` in one ``O(p^2 R)`` product."""
        return self.F.T @ (self.w.unsqueeze(1) * self.F)

    def trace(self) -> Tensor:
        """``sum_r w_r ||f_r||^2`` from the rows: ``O(p R)``, a 0-dim tensor."""
        return (self.w * (self.F**2).sum(dim=1)).sum()

    def nonzero_eigh(self) -> tuple[Tensor, Tensor]:
        """The at most ``R`` eigenpairs that can be non-zero (all ``p`` if ``R >= p``), descending;
        orthonormal vectors ``Q y`` from the thin QR ``F^T = Q T``."""
        if self.F.shape[0] >= self.size:
            return dense_eigh(self.dense())
        Q, T = torch.linalg.qr(self.F.T)  # F^T = Q T
        vals, small = dense_eigh(T @ (self.w.unsqueeze(1) * T.T))
        return vals, Q @ small

    def eigvalsh(self) -> Tensor:
        """All ``p`` eigenvalues, descending. For ``R < p``: those of the ``R x R`` matrix
        ``T diag(w) T^T`` (``T`` from a thin QR of ``F^T``, ``O(p R^2)``) completed with
        ``p - R`` exact zeros in their sorted place (negative weights give eigenvalues below
        them); dense for ``R >= p``."""
        if self.F.shape[0] >= self.size:
            return torch.linalg.eigvalsh(self.dense()).flip(0)
        _, T = torch.linalg.qr(self.F.T, mode="r")
        small = T @ (self.w.unsqueeze(1) * T.T)
        return pad_spectrum(torch.linalg.eigvalsh(0.5 * (small + small.T)), self.size)

    @property
    def exact_size(self) -> int:
        """``min(R, p)``: the rows of the thin-QR eigenproblem behind :meth:`exact_topk`."""
        return min(self.F.shape[0], self.size)

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """From the ``R x R`` problem of the thin QR, the other ``p - R`` eigenvalues exactly 0
        (their vectors: an orthonormal basis of the complement of the rows' span)."""
        if self.F.shape[0] >= self.size:
            return super().exact_topk(k)
        return (*with_null_space(*self.nonzero_eigh(), self.size, k), "row gram")


def row_gram_sum(terms: Terms) -> SymmetricMatrix | None:
    """``sum a_i M_i`` as one :class:`RowGram` when every term has a row factor and the stacked
    rows are fewer than ``p`` (exact low-rank spectrum), else ``None``."""
    size = terms[0][1].size
    if not all(hasattr(M, "row_factor") for _, M in terms):
        return None
    if sum(min(getattr(M, "rank_bound", size), size) for _, M in terms) >= size:
        return None
    Fs, ws = [], []
    for a, M in terms:
        F, w = M.row_factor()
        Fs.append(F)
        ws.append(a * w)
    return RowGram(torch.cat(Fs), torch.cat(ws))


def kronecker_sum(terms: Terms) -> SymmetricMatrix | None:
    """``sum a_i M_i`` as one :class:`KroneckerSum` when every term is Kronecker with factors of
    one shape (exact spectrum in the shared factor basis), else ``None``."""
    if not all(isinstance(M, KroneckerGram | KroneckerSum) for _, M in terms):
        return None
    flat = [
        (a * c, T)
        for a, M in terms
        for c, T in (M.terms if isinstance(M, KroneckerSum) else [(1.0, M)])
    ]
    if len({(T.a, T.b) for _, T in flat}) != 1:
        return None
    return KroneckerSum(flat)


class KroneckerStructured(RowFactored):
    """Kronecker matrices: a sum of them is first a :class:`KroneckerSum`, else a row Gram."""

    sum_priority = 2

    @classmethod
    def structured_sum(cls, terms: Terms) -> SymmetricMatrix | None:
        """The sum of ``terms`` as one :class:`KroneckerSum` when all are Kronecker with factors
        of one shape (:func:`kronecker_sum`), else a :class:`RowGram` of the stacked rows
        (:func:`row_gram_sum`), else ``None``."""
        return kronecker_sum(terms) or row_gram_sum(terms)


class ZeroMatrix(RowFactored, SymmetricMatrix):
    """The ``p x p`` zero matrix (``E_l`` of one layer)."""

    exact_size = 0

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """No eigenproblem: ``k`` zeros, an orthonormal basis ``(p, k)`` of the first ``k``
        directions, next eigenvalue 0 (``-inf`` when ``k = p``) and the route ``"zero"``."""
        empty = torch.zeros(self.size, 0, dtype=self.dtype, device=self.device)
        return (*with_null_space(empty.new_zeros(0), empty, self.size, k), "zero")

    def matmat(self, V: Tensor) -> Tensor:
        """Zeros shaped like ``V`` (``(p, m)``), with no arithmetic."""
        return torch.zeros_like(V)

    def dense(self) -> Tensor:
        """The ``(p, p)`` zero matrix."""
        return torch.zeros(self.size, self.size, dtype=self.dtype, device=self.device)

    def eigvalsh(self) -> Tensor:
        """``p`` zeros: ``(p,)``."""
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)

    def row_factor(self) -> tuple[Tensor, Tensor]:
        """No rows: ``(0, p)`` and ``(0,)``, so that a sum with the zero matrix stays a
        :class:`RowGram` of the other terms' rows."""
        return torch.zeros(0, self.size, dtype=self.dtype, device=self.device), torch.zeros(
            0, dtype=self.dtype, device=self.device
        )

    rank_bound = 0


# -- P ⊗ Q ------------------------------------------------------------------------------------------
class KroneckerGram(KroneckerStructured, SymmetricMatrix):
    """``P ⊗ Q`` with ``P = F_P^T F_P`` (``F_P``: ``r x a``) and ``Q = F_Q F_Q^T`` (``F_Q``: ``b x s``).

    Size ``a b``; vectors are ``vec`` of ``a x b`` matrices (row-major), and
    ``(P ⊗ Q) vec(X) = vec(P X Q)`` (``deepufm.vec``). The linear-MSE layer Hessian is
    ``F_P = A^{(l+1)}`` (``K x d_out``), ``F_Q = H_l / sqrt(N)`` (``d_in x N``). Eigenvalues are the
    products ``p_i q_j``, eigenvectors ``u_i ⊗ w_j``.
    """

    def __init__(self, F_P: Tensor, F_Q: Tensor) -> None:
        self.F_P, self.F_Q = F_P, F_Q
        self.a, self.b = F_P.shape[1], F_Q.shape[0]
        super().__init__(self.a * self.b, F_P.dtype, F_P.device)
        self._factors: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def P(self) -> Tensor:
        """``F_P^T F_P``: ``(a, a)``."""
        return self.F_P.T @ self.F_P

    @property
    def Q(self) -> Tensor:
        """``F_Q F_Q^T``: ``(b, b)``."""
        return self.F_Q @ self.F_Q.T

    @property
    def rank_bound(self) -> int:
        """``min(r, a) min(s, b)``: the number of products of possibly non-zero factor
        eigenvalues."""
        return min(self.F_P.shape[0], self.a) * min(self.F_Q.shape[1], self.b)

    def matmat(self, V: Tensor) -> Tensor:
        """``vec(P X Q)`` for each column ``vec(X)`` of ``V`` (``X``: ``(a, b)``, row-major vec).

        A thin factor (``r < a`` or ``s < b``) is applied as ``F_P^T (F_P X)`` or
        ``(X F_Q) F_Q^T``: ``O(r b (a + s))`` per column instead of ``O(a b (a + b))``; ``P ⊗ Q``
        is never formed."""
        X = V.T.reshape(-1, self.a, self.b)
        # Contract through the thin side of each factor first: O(r a b + r b s) instead of O(a b^2).
        thin_P, thin_Q = self.F_P.shape[0] < self.a, self.F_Q.shape[1] < self.b
        Y = self.F_P @ X if thin_P else self.P @ X
        Y = (Y @ self.F_Q) @ self.F_Q.T if thin_Q else Y @ self.Q
        if thin_P:
            Y = self.F_P.T @ Y
        return Y.reshape(-1, self.size).T

    def dense(self) -> Tensor:
        """``torch.kron(P, Q)``: ``(a b, a b)``."""
        return torch.kron(self.P, self.Q)

    def trace(self) -> Tensor:
        """``tr(P) tr(Q) = ||F_P||_F^2 ||F_Q||_F^2`` from the factors (a 0-dim tensor)."""
        return (self.F_P**2).sum() * (self.F_Q**2).sum()

    def factor_eigh(
        self, full: bool = False
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Eigenpairs (descending) of ``P`` and ``Q``: ``((p, U), (q, W))``, ``U``: ``(a, alpha)``.

        By default only the pairs that can be non-zero, from the smaller Grams (``K x K`` and
        ``min(d, N)``-sized for a layer Hessian); with ``full``, complete bases (``a x a``, ``b x b``).
        """
        if full:
            return dense_eigh(self.P), dense_eigh(self.Q)
        if self._factors is None:
            self._factors = (gram_eigh(self.F_P), gram_eigh(self.F_Q.T))
        return self._factors

    def eigvalsh(self) -> Tensor:
        """All ``a b`` eigenvalues, descending: the products of the factors' non-zero eigenvalues,
        then exact zeros (the products involving a factor's null space)."""
        (p, _), (q, _) = self.factor_eigh()
        return pad_spectrum(torch.outer(p, q).reshape(-1), self.size)

    def topk_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` eigenpairs in factored form: values ``(k,)``, ``U`` ``(a, k)``, ``W`` ``(b, k)``;
        eigenvector ``j`` is ``U[:, j] ⊗ W[:, j]`` (``p`` numbers never stored)."""
        if not 1 <= k <= self.size:
            raise ConfigError("k", k, f"an integer in [1, {self.size}]")
        (p, U), (q, W) = self.factor_eigh()
        if k > p.numel() * q.numel():  # needs null-space directions: complete factor bases
            (p, U), (q, W) = self.factor_eigh(full=True)
        prods = torch.outer(p, q).reshape(-1)
        order = torch.argsort(prods, descending=True)[:k]
        i, j = order // q.numel(), order % q.numel()
        return prods[order], U[:, i], W[:, j]

    def _products(self, idx: Tensor, U: Tensor, W: Tensor, q: int) -> Tensor:
        """Eigenvectors ``U[:, i] ⊗ W[:, j]`` for flat product indices ``idx = i q + j``:
        ``(a b, len(idx))``."""
        i, j = idx // q, idx % q
        return (U[:, i].unsqueeze(1) * W[:, j].unsqueeze(0)).reshape(self.size, -1)

    @property
    def exact_size(self) -> int:
        """The larger of the two factor eigenproblems, ``min(r, a)`` and ``min(s, b)`` (at least
        1): for a layer Hessian ``max(K, min(d_in, N))`` rather than ``p``."""
        return max(min(self.F_P.shape[0], self.a), min(self.F_Q.shape[1], self.b), 1)

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """Products of the factors' non-zero eigenpairs (only the ``k`` wanted vectors formed);
        the rest of the spectrum is exactly 0, on the complement of those products."""
        (p, U), (q, W) = self.factor_eigh()
        prods = torch.outer(p, q).reshape(-1)
        r = prods.numel()
        order = torch.argsort(prods, descending=True)
        if k <= r and float(prods[order[k - 1]]) >= 0:  # no zero among the top k
            if k < r:  # the next product, or an exact zero of the complement if larger
                nxt = float(prods[order[k]])
                nxt = max(nxt, 0.0) if r < self.size else nxt
            else:
                nxt = 0.0 if r < self.size else -math.inf
            return prods[order[:k]], self._products(order[:k], U, W, q.numel()), nxt, "kronecker"
        vecs = self._products(order, U, W, q.numel())
        return (*with_null_space(prods[order], vecs, self.size, k), "kronecker")

    def eigh(self) -> tuple[Tensor, Tensor]:
        """All ``a b`` eigenpairs from complete factor bases, descending."""
        (p, U), (q, W) = self.factor_eigh(full=True)
        prods = torch.outer(p, q).reshape(-1)
        order = torch.argsort(prods, descending=True)
        return prods[order], self._products(order, U, W, q.numel())

    def nonzero_eigh(self) -> tuple[Tensor, Tensor]:
        """The eigenpairs with products of non-zero factor eigenvalues, descending."""
        (p, U), (q, W) = self.factor_eigh()
        prods = torch.outer(p, q).reshape(-1)
        order = torch.argsort(prods, descending=True)
        return prods[order], self._products(order, U, W, q.numel())

    def row_factor(self) -> tuple[Tensor, Tensor]:
        """``F`` with rows ``u_i ⊗ w_j`` and weights ``p_i q_j`` (the non-zero eigenpairs)."""
        (p, U), (q, W) = self.factor_eigh()
        F = (U.T.unsqueeze(1).unsqueeze(3) * W.T.unsqueeze(0).unsqueeze(2)).reshape(-1, self.size)
        return F, torch.outer(p, q).reshape(-1)


def _span(X: Tensor) -> Tensor:
    """Orthonormal basis ``(m, r)`` of the column space of ``X`` ``(m, c)``: the left singular
    vectors above round-off (a direction whose singular value is below ``eps max(m, c)`` of the
    largest carries less than ``eps^2`` of any Gram built from ``X``'s columns). Stacked factors
    that share a span (``A`` and its mean row; ``H`` and its class means) count once."""
    m, c = X.shape
    U, sv, _ = torch.linalg.svd(X, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return U[:, :0]
    return U[:, sv > sv[0] * max(m, c) * torch.finfo(X.dtype).eps]


class KroneckerSum(KroneckerStructured, RowGram):
    """``sum_i c_i P_i ⊗ Q_i`` of :class:`KroneckerGram` terms of one shape (Papyan's components
    and knockouts in the linear MSE model), with an exact spectrum in a shared factor basis.

    Every ``P_i = F_Pi^T F_Pi`` lies in the row space of the stacked ``F_P``'s and every
    ``Q_i = F_Qi F_Qi^T`` in the column space of the stacked ``F_Q``'s. With orthonormal bases
    ``U`` (``a x r``) and ``W`` (``b x s``) of the two, ``M = (U ⊗ W) S (U ⊗ W)^T`` with

        S = sum_i c_i (U^T P_i U) ⊗ (W^T Q_i W)        (r s x r s),

    so the spectrum is ``eig(S)`` followed by ``a b - r s`` exact zeros: for a layer Hessian
    minus a Papyan term ``r <= K`` (every left factor is in the row space of ``A``) and
    ``s <= min(d, N)`` (the class means are in the span of ``H``), where the rows of
    :class:`RowGram` would need a thin QR of ``p x K min(d, N)``.
    It is a :class:`RowGram` whose rows (the lifted eigenvectors of ``S``) are formed only on
    request.
    """

    def __init__(self, terms: list[tuple[float, KroneckerGram]]) -> None:
        first = terms[0][1]
        SymmetricMatrix.__init__(self, first.size, first.dtype, first.device)
        self.terms = [(float(c), M) for c, M in terms]
        self.a, self.b = first.a, first.b
        # a factor shared by several terms (the class means in G_class and G_cross) counts once
        lefts = list({id(M.F_P): M.F_P for _, M in self.terms}.values())
        rights = list({id(M.F_Q): M.F_Q for _, M in self.terms}.values())
        self.U = _span(torch.cat(lefts, dim=0).T)  # (a, r)
        self.W = _span(torch.cat(rights, dim=1))  # (b, s)
        self._eig: tuple[Tensor, Tensor] | None = None

    @property
    def rank_bound(self) -> int:
        """``r s``: the size of ``S``, a bound on the number of non-zero eigenvalues."""
        return self.U.shape[1] * self.W.shape[1]

    def small(self) -> Tensor:
        """``S``: ``(r s, r s)`` (class docstring)."""
        r, s = self.U.shape[1], self.W.shape[1]
        S = torch.zeros(r * s, r * s, dtype=self.dtype, device=self.device)
        for c, M in self.terms:
            FP, FQ = M.F_P @ self.U, self.W.T @ M.F_Q
            S = S + c * torch.kron(FP.T @ FP, FQ @ FQ.T)
        return 0.5 * (S + S.T)

    def matmat(self, V: Tensor) -> Tensor:
        """``sum_i c_i (P_i ⊗ Q_i) V`` through each term's factored :meth:`KroneckerGram.matmat`
        (``S`` and its basis are not used)."""
        out = torch.zeros_like(V)
        for c, M in self.terms:
            out = out + c * M.matmat(V)
        return out

    def dense(self) -> Tensor:
        """``sum_i c_i kron(P_i, Q_i)``: ``(a b, a b)``."""
        return sum(c * M.dense() for c, M in self.terms)

    def trace(self) -> Tensor:
        """``sum_i c_i tr(P_i) tr(Q_i)`` from the terms' factors (a 0-dim tensor)."""
        return sum(c * M.trace() for c, M in self.terms)

    def eigvalsh(self) -> Tensor:
        """All ``a b`` eigenvalues, descending: ``eig(S)`` (an ``r s x r s`` problem) completed
        with ``a b - r s`` exact zeros."""
        return pad_spectrum(torch.linalg.eigvalsh(self.small()), self.size)

    def nonzero_eigh(self) -> tuple[Tensor, Tensor]:
        """The ``r s`` eigenpairs of ``S`` lifted to ``vec(U Y W^T)``, descending."""
        if self._eig is None:
            vals, Y = dense_eigh(self.small())
            Y = Y.T.reshape(-1, self.U.shape[1], self.W.shape[1])
            vecs = (self.U @ Y @ self.W.T).reshape(-1, self.size).T
            self._eig = (vals, vecs)
        return self._eig

    @property
    def exact_size(self) -> int:
        """``r s``: the size of ``S``, the eigenproblem behind :meth:`exact_topk`."""
        return self.rank_bound

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """From ``S`` (class docstring); the other ``a b - r s`` eigenvalues exactly 0."""
        return (*with_null_space(*self.nonzero_eigh(), self.size, k), "kronecker sum")

    @property
    def F(self) -> Tensor:  # the RowGram view: rows are the lifted eigenvectors
        """The rows of the :class:`RowGram` view: the lifted eigenvectors of ``S``, ``(r s, p)``
        (computed once, on first use)."""
        return self.nonzero_eigh()[1].T

    @property
    def w(self) -> Tensor:
        """The weights of the :class:`RowGram` view: the eigenvalues of ``S``, ``(r s,)``
        descending."""
        return self.nonzero_eigh()[0]


# -- Grams of sample-indexed Jacobian rows ----------------------------------------------------------
class RowSpaceGram(RowFactored, SymmetricMatrix):
    """``V^T V`` for a ``V`` with ``N R`` rows indexed ``(sample n, r)``, given through products.

    Subclasses provide ``apply_V`` (``(p, m) -> (m, N, R)``), ``apply_VT`` (its adjoint),
    ``gram`` (``V V^T``, ``(NR, NR)``), ``rows`` (``V``) and ``rank_bound``; this class chooses
    between the Gram route (``NR < p``: an ``NR x NR`` eigenproblem, eigenvectors
    ``V^T u / ||V^T u||``) and the dense ``p x p`` one.
    """

    N: int
    R: int

    def matmat(self, V: Tensor) -> Tensor:
        """``V^T (V X)`` through the subclass's ``apply_V`` and ``apply_VT``: no ``p x p`` or
        ``NR x p`` matrix is formed."""
        return self.apply_VT(self.apply_V(V))

    def row_factor(self) -> tuple[Tensor, Tensor]:
        """``(rows(), ones)``: the ``(N R, p)`` rows (formed on this call) with unit weights."""
        F = self.rows()
        return F, F.new_ones(F.shape[0])

    def _use_gram(self) -> bool:
        return self.N * self.R < self.size

    def nonzero_eigh(self) -> tuple[Tensor, Tensor]:
        """Every eigenpair that can be non-zero, descending: ``rank_bound`` of them (all ``p`` on
        the dense route). Vectors of eigenvalues that are zero to working precision are an
        orthonormal basis of the null space (lifted Gram vectors would be round-off there)."""
        if not self._use_gram():
            return dense_eigh(self.dense())
        vals, vecs = self._gram_pairs()
        m = self.rank_bound
        r = vals.numel()
        if r >= m:
            return vals[:m], vecs[:, :m]
        gram = torch.linalg.eigvalsh(self.gram()).flip(0)[r:m]
        null = orthonormal_complement(vecs, m - r)
        return torch.cat([vals, gram]), torch.cat([vecs, null], dim=1)

    def _gram_pairs(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The eigenpairs of the ``NR x NR`` Gram (all, or the top ``k + 1``) lifted to
        ``V^T u / ||V^T u||`` whose eigenvalue is reliably non-zero
        (:func:`~deepufm.matrices.spectra.gram_lift`)."""
        if k is None or k + 1 >= self.rank_bound:
            vals, small = dense_eigh(self.gram())
        else:
            vals, small, _ = dense_topk(self.gram(), k + 1)
        vals, small = vals[: self.rank_bound], small[:, : self.rank_bound]
        return gram_lift(vals, self.apply_VT(small.T.reshape(-1, self.N, self.R)), self.size)

    def eigvalsh(self) -> Tensor:
        """All ``p`` eigenvalues, descending: when ``NR < p`` the top ``rank_bound`` eigenvalues
        of the ``NR x NR`` Gram completed with exact zeros, else those of the dense ``(p, p)``
        matrix."""
        if not self._use_gram():
            return torch.linalg.eigvalsh(self.dense()).flip(0)
        vals = torch.linalg.eigvalsh(self.gram()).flip(0)[: self.rank_bound]
        return pad_spectrum(vals, self.size)

    @property
    def exact_size(self) -> int:
        """``min(N R, p)``: the Gram's size on the Gram route, ``p`` on the dense one."""
        return min(self.N * self.R, self.size)

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """Dense ``p x p`` when ``NR >= p``; else the ``NR x NR`` Gram, its reliably non-zero
        eigenpairs lifted and the null space completed by an orthonormal basis."""
        if not self._use_gram():
            return super().exact_topk(k)
        return (*with_null_space(*self._gram_pairs(k), self.size, k), "gram")


# The sample-side projectors C of JacobianGram (Papyan's terms, as in deepufm.matrices.papyan):
# with M_pair averaging the rows of one (class, r) pair over the n samples and M_class averaging a
# class's n R rows, the Papyan terms are
# V^T M_class V = G_class, V^T (M_pair - M_class) V = G_cross, V^T (I - M_pair) V = G_within.
PARTS = ("within", "minus_class", "minus_cross")


def _project(X: Tensor, part: str) -> Tensor:
    """``C X`` for ``X`` ``(K, n, R, ...)`` indexed by rows (class, sample, r): ``I - M_pair``
    (``"within"``, ``G_within``), ``I - M_class`` (``"minus_class"``, ``H - G_class``) or
    ``I - M_pair + M_class`` (``"minus_cross"``, ``H - G_cross``)."""
    if part == "within":
        return X - X.mean(dim=1, keepdim=True)
    class_mean = X.mean(dim=(1, 2), keepdim=True)
    if part == "minus_class":
        return X - class_mean
    return X - X.mean(dim=1, keepdim=True) + class_mean


class JacobianGram(RowSpaceGram):
    """``(1/N) sum_n (Ã_n^T Ã_n) ⊗ (h_n h_n^T) = V^T C V``, rows ``ã_{n,r} ⊗ h_n / sqrt(N)`` of ``V``.

    Args:
        A_w: ``(N, R, d_out)`` per-sample weighted back products, or ``(R, d_out)`` shared.
        H: layer inputs ``(d_in, N)``, class-major columns.
        class_size: if given (``n``), ``C`` is one of the orthogonal projectors on the sample
            side chosen by ``part`` (see ``_project``); else ``C = I``.
        part: ``"within"`` (Papyan's ``G_within``: rows centred over the samples of each class,
            ``v_{icr} -> v_{icr} - mean_i v_{icr}``), ``"minus_class"`` (``H_l - G_class``) or
            ``"minus_cross"`` (``H_l - G_cross``): the knockouts keep the row-space form, so
            their exact spectrum comes from an ``NR x NR`` Gram when ``NR < p``.

    ``matmat`` costs ``O(N R d_out + d_out d_in N)`` per vector; nothing of size ``p x p`` or
    ``NR x p`` is formed except by ``dense``/``rows``. Spectrum: from the ``NR x NR`` Gram
    ``C (ÃÃ^T ∘ H^T H) C / N`` when ``NR < p``, else dense.
    """

    def __init__(
        self, A_w: Tensor, H: Tensor, class_size: int | None = None, part: str = "within"
    ) -> None:
        if part not in PARTS:
            raise ConfigError("part", part, f"one of {PARTS}")
        self.A_w, self.H, self.class_size, self.part = A_w, H, class_size, part
        # batched products with a transposed operand run ~1.5x slower on MKL: keep a copy
        self.A_wT = A_w.transpose(-1, -2).contiguous()
        self.shared = A_w.dim() == 2
        self.N, self.R = H.shape[1], A_w.shape[-2]
        self.d_out, self.d_in = A_w.shape[-1], H.shape[0]
        super().__init__(self.d_out * self.d_in, H.dtype, H.device)

    @property
    def rank_bound(self) -> int:
        """The ``N R`` rows less the directions that the projector ``C`` removes (``K R`` for
        ``"within"``, ``K`` for ``"minus_class"``, ``K R - K`` for ``"minus_cross"``, with
        ``K = N / class_size``), at most ``p``."""
        rows, K = self.N * self.R, self.N // (self.class_size or 1)
        removed = {"within": K * self.R, "minus_class": K, "minus_cross": K * self.R - K}
        if self.class_size is not None:
            rows -= removed[self.part]
        return min(rows, self.size)

    def _center(self, S: Tensor) -> Tensor:
        """``C`` on sample-major tensors ``(N, R, ...)``."""
        if self.class_size is None:
            return S
        n = self.class_size
        X = _project(S.reshape(self.N // n, n, *S.shape[1:]), self.part)
        return X.reshape(S.shape)

    def apply_V(self, V: Tensor) -> Tensor:
        """``C V x`` for every column: ``(p, m) -> (m, N, R)`` (a view of a sample-major tensor).

        Two large GEMMs against ``H`` and one batched product per sample; columns are the inner
        index throughout, so no batched product sees a strided operand.
        """
        m = V.shape[1]
        # X_j H for every column j as (N, d_out, m): one (N x d_in) @ (d_in x d_out m) GEMM
        Vt = V.reshape(self.d_out, self.d_in, m).transpose(0, 1).reshape(self.d_in, -1)
        Y = (self.H.T @ Vt).reshape(self.N, self.d_out, m)
        S = torch.matmul(self.A_w, Y)  # (N, R, m); the shared (R, d_out) factor broadcasts
        return (self._center(S) / math.sqrt(self.N)).permute(2, 0, 1)

    def apply_VT(self, S: Tensor) -> Tensor:
        """``V^T C s``: ``(m, N, R) -> (p, m)``."""
        m = S.shape[0]
        S = self._center(S.permute(1, 2, 0))  # (N, R, m)
        T = torch.matmul(self.A_wT, S)  # (N, d_out, m)
        out = self.H @ T.reshape(self.N, -1)  # (d_in, d_out m)
        out = out.reshape(self.d_in, self.d_out, m).transpose(0, 1).reshape(self.size, m)
        return out / math.sqrt(self.N)

    def per_sample_A(self) -> Tensor:
        """``Ã_n`` for every sample: ``(N, R, d_out)`` (an expanded view when shared)."""
        if self.shared:
            return self.A_w.unsqueeze(0).expand(self.N, self.R, self.d_out)
        return self.A_w

    def rows(self) -> Tensor:
        """``C V``: ``(N R, p)``, rows ordered ``(sample, r)`` (formed only on request)."""
        V = torch.einsum("nrd,en->nrde", self.per_sample_A(), self.H) / math.sqrt(self.N)
        return self._center(V.reshape(self.N, self.R, self.size)).reshape(-1, self.size)

    def dense(self) -> Tensor:
        """``(1/N) sum_n (Ã_n^T Ã_n) ⊗ (h_n h_n^T)`` minus ``V^T (I - C) V``.

        The first term is one ``(N, a <= a') x (N, b <= b')`` product over the upper triangles of
        the symmetric per-sample factors, scattered to all ``p^2`` entries (``R`` times cheaper
        than ``V^T V``, and 4 times cheaper than the full ``(a a', b b')`` product). The second,
        from the class-pair means ``v̄_cr`` of the rows: ``(n/N) sum_{c,r} v̄_cr v̄_cr^T`` for
        ``G_within``, ``G_class`` or ``G_cross`` (``(n/N) sum (v̄_cr - v̄_c)(v̄_cr - v̄_c)^T``)
        for the knockouts."""
        A = self.per_sample_A()
        (ro, co), where_out = _triangle(self.d_out, self.H.device)
        (ri, ci), where_in = _triangle(self.d_in, self.H.device)
        S = (A.transpose(1, 2) @ A)[:, ro, co]  # (N, t_out)
        HH = self.H[ri] * self.H[ci]  # (t_in, N)
        P = (S.T @ HH.T) / self.N  # (t_out, t_in)
        G = P.index_select(0, where_out.reshape(-1)).index_select(1, where_in.reshape(-1))
        G = G.reshape(self.d_out, self.d_out, self.d_in, self.d_in).permute(0, 2, 1, 3)
        G = G.reshape(self.size, self.size)
        if self.class_size is not None:
            n = self.class_size
            K = self.N // n
            Ak = A.reshape(K, n, self.R, self.d_out)
            Hk = self.H.reshape(self.d_in, K, n)
            means = torch.einsum("cird,eci->crde", Ak, Hk).reshape(K, self.R, -1) / n
            class_means = means.mean(dim=1, keepdim=True)
            if self.part == "minus_class":  # G_class = sum_c v̄_c v̄_c^T (nR = N)
                rows = class_means.reshape(K, -1) * math.sqrt(self.R)
            elif self.part == "minus_cross":
                rows = (means - class_means).reshape(K * self.R, -1)
            else:
                rows = means.reshape(K * self.R, -1)
            G = G - (n / self.N) * (rows.T @ rows)
            G = 0.5 * (G + G.T)
        return G

    def gram(self) -> Tensor:
        """``C V V^T C``: ``(NR, NR)``, entries ``(ã_{n,r}·ã_{n',r'})(h_n·h_n')/N`` before ``C``."""
        HH = self.H.T @ self.H
        if self.shared:
            G = torch.kron(HH, self.A_w @ self.A_w.T)
        else:
            Af = self.A_w.reshape(self.N * self.R, self.d_out)
            G = Af @ Af.T
            G.view(self.N, self.R, self.N, self.R).mul_(HH.unsqueeze(1).unsqueeze(3))
        G = G / self.N
        if self.class_size is not None:
            G = self._center(G.reshape(self.N, self.R, -1)).reshape(G.shape)
            G = self._center(G.T.reshape(self.N, self.R, -1)).reshape(G.shape)  # C G C^T
        return G

    def trace(self) -> Tensor:
        """Without a projector ``(1/N) sum_n ||Ã_n||_F^2 ||h_n||^2``, ``O(N (R d_out + d_in))``;
        with one, the trace of the ``NR x NR`` Gram (``tr V^T C V = tr C V V^T C``). A 0-dim
        tensor."""
        if self.class_size is None:
            A2 = (self.per_sample_A() ** 2).sum(dim=(1, 2))  # ||Ã_n||_F^2
            return (A2 * (self.H**2).sum(dim=0)).sum() / self.N
        return torch.diagonal(self.gram()).sum()

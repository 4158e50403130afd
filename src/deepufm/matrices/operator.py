"""`SymmetricMatrix`: the one interface every curvature matrix of deepufm exposes.

A subclass implements :meth:`matmat` (and, where structure allows, faster :meth:`dense`,
:meth:`eigvalsh` or an exact small eigenproblem for :meth:`topk`). Everything else — a matvec, a
dense matrix on request, the full spectrum, certified top-k eigenpairs (``deepufm.matrices.
spectra``), a ``scipy.sparse.linalg.LinearOperator`` for ``eigsh``/``lobpcg``/``cg``, sums and
differences (knockouts) — comes from this base. Vectors are ``vec``-ed row-major
(``deepufm.vec``).

One addition rule: ``A + B``, ``A - B`` and ``c * A`` are :func:`combine` of the terms, which
asks every term's class, most structured first, for an exact form of the sum (a Kronecker sum
in a shared factor basis, a low-rank row Gram) and otherwise builds a
:class:`LinearCombination`. So ``G + E`` and ``E + G`` are the same kind of matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from deepufm.matrices import spectra
from deepufm.matrices.spectra import TopK

Terms = list[tuple[float, "SymmetricMatrix"]]


class SymmetricMatrix(ABC):
    """A real symmetric ``(p, p)`` matrix given through products.

    Class attributes a subclass may override:
        matrix_free: ``dense()`` costs ``p`` products (no cheaper exact route exists).
        sum_priority: the order in which :func:`combine` asks classes for a structured sum.
    """

    matrix_free = False
    sum_priority = 0

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.size, self.dtype, self.device = int(size), dtype, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        """``(p, p)``, as a ``LinearOperator`` or a tensor would report it."""
        return (self.size, self.size)

    @abstractmethod
    def matmat(self, V: Tensor) -> Tensor:
        """``M @ V``: ``(p, m) -> (p, m)``."""

    def matvec(self, v: Tensor) -> Tensor:
        """``M @ v``: ``(p,) -> (p,)``."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def dense(self) -> Tensor:
        """The full ``(p, p)`` matrix (only on request: it may be large)."""
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        M = self.matmat(eye)
        return 0.5 * (M + M.T)

    def eigvalsh(self) -> Tensor:
        """All ``p`` eigenvalues, descending."""
        return torch.linalg.eigvalsh(self.dense()).flip(0)

    def eigh(self) -> tuple[Tensor, Tensor]:
        """All eigenpairs, eigenvalues descending; eigenvectors are the columns."""
        return spectra.dense_eigh(self.dense())

    # -- top-k ---------------------------------------------------------------------------------
    @property
    def exact_size(self) -> int:
        """Rows of the smallest exact eigenproblem behind :meth:`exact_topk` (here: dense)."""
        return self.size

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """Top-``k`` by an exact decomposition: values ``(k,)``, orthonormal vectors ``(p, k)``,
        the next eigenvalue (``-inf`` when ``k = p``) and the route's name."""
        vals, vecs, nxt = spectra.dense_topk(self.dense(), k)
        return vals, vecs, nxt, "dense"

    def topk(
        self, k: int, tol: float = 0.0, *, strict: bool = False, max_products: int | None = None
    ) -> TopK:
        """The ``k`` algebraically largest eigenpairs, every copy of a repeated eigenvalue
        included: a :class:`~deepufm.matrices.spectra.TopK` that unpacks as
        ``(values (k,) descending, vectors (p, k) orthonormal)`` and carries its certificate.

        The exact route of the matrix's structure while its exact eigenproblem is small
        (:func:`~deepufm.matrices.spectra.use_exact`), else certified block Lanczos on
        :meth:`matmat`. ``tol``: relative residual tolerance (0 = working accuracy);
        ``strict``: raise instead of returning an uncertified result. ``max_products``: the
        product budget of the iterative route (:func:`~deepufm.matrices.spectra.iterative_topk`).
        """
        return spectra.topk(self, k, tol, strict=strict, max_products=max_products)

    def as_linear_operator(self) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` (symmetric)."""

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X).reshape(self.size, -1)
            T = torch.as_tensor(X, dtype=self.dtype, device=self.device)
            return self.matmat(T).detach().cpu().numpy().astype(np.float64)

        return LinearOperator(
            self.shape,
            matvec=lambda x: mm(x).ravel(),
            matmat=mm,
            rmatvec=lambda x: mm(x).ravel(),
            dtype=np.float64,
        )

    def trace(self) -> Tensor:
        """``tr M`` as a 0-dim tensor. Here from :meth:`dense` (``p`` products); subclasses with
        a factored form compute it from their factors."""
        return torch.trace(self.dense())

    # -- sums ----------------------------------------------------------------------------------
    @classmethod
    def structured_sum(cls, terms: Terms) -> SymmetricMatrix | None:
        """An exact structured form of ``sum a_i M_i`` if this class knows one for these terms."""
        return None

    def __add__(self, other: SymmetricMatrix) -> SymmetricMatrix:
        return combine([(1.0, self), (1.0, other)])

    def __sub__(self, other: SymmetricMatrix) -> SymmetricMatrix:
        return combine([(1.0, self), (-1.0, other)])

    def __rmul__(self, scalar: float) -> SymmetricMatrix:
        return combine([(float(scalar), self)])


def combine(terms: Terms) -> SymmetricMatrix:
    """``sum_i a_i M_i``: the structured form that the terms' classes offer, most structured
    class first (``sum_priority``), else a :class:`LinearCombination`."""
    if any(M.size != terms[0][1].size for _, M in terms):
        raise ValueError("all terms must have the same size")
    classes = sorted({type(M) for _, M in terms}, key=lambda c: (-c.sum_priority, c.__name__))
    for cls in classes:
        out = cls.structured_sum(terms)
        if out is not None:
            return out
    return LinearCombination(terms)


class LinearCombination(SymmetricMatrix):
    """``sum_i a_i M_i`` of symmetric matrices of one size, without a shared structure (e.g.
    ``G_blk + E_blk``)."""

    def __init__(self, terms: Terms) -> None:
        first = terms[0][1]
        if any(M.size != first.size for _, M in terms):
            raise ValueError("all terms must have the same size")
        super().__init__(first.size, first.dtype, first.device)
        self.terms = terms
        self.matrix_free = any(M.matrix_free for _, M in terms)

    def matmat(self, V: Tensor) -> Tensor:
        """``sum_i a_i (M_i @ V)``: one product of every term, ``(p, m) -> (p, m)``."""
        out = torch.zeros_like(V)
        for a, M in self.terms:
            out = out + a * M.matmat(V)
        return out

    def dense(self) -> Tensor:
        """``sum_i a_i M_i.dense()``: each term's own (possibly structured) dense form,
        ``(p, p)``."""
        return sum(a * M.dense() for a, M in self.terms)


class DenseSymmetric(SymmetricMatrix):
    """A symmetric matrix held densely (references, and small matrices such as ``d x d`` Grams)."""

    def __init__(self, M: Tensor) -> None:
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M = 0.5 * (M + M.T)

    def matmat(self, V: Tensor) -> Tensor:
        """``M @ V`` with the stored matrix: ``O(p^2 m)``."""
        return self.M @ V

    def dense(self) -> Tensor:
        """The stored ``(p, p)`` matrix itself (symmetrised at construction; not a copy)."""
        return self.M

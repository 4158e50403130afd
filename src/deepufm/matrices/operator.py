"""`SymmetricMatrix`: the one interface every curvature matrix of deepufm exposes.

A subclass implements :meth:`matmat` (and, where structure allows, faster :meth:`dense`,
:meth:`eigvalsh` or :meth:`topk`). Everything else — a matvec, a dense matrix on request, the full
spectrum, top-k eigenpairs, a ``scipy.sparse.linalg.LinearOperator`` for ``eigsh``/``lobpcg``/``cg``,
sums and differences (knockouts) — comes from this base. Vectors are ``vec``-ed row-major
(``deepufm.vec``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

# Below this size a dense eigendecomposition is cheaper and exact; above, Lanczos.
DENSE_LIMIT = 4096


class SymmetricMatrix(ABC):
    """A real symmetric ``(p, p)`` matrix given through products."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.size, self.dtype, self.device = int(size), dtype, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
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
        vals, vecs = torch.linalg.eigh(self.dense())
        return vals.flip(0), vecs.flip(1)

    def topk(self, k: int, tol: float = 0.0) -> tuple[Tensor, Tensor]:
        """The ``k`` algebraically largest eigenpairs, descending: ``(k,)``, ``(p, k)``.

        Dense ``eigh`` for small matrices, block Lanczos on :meth:`matmat` otherwise
        (``lanczos.lanczos_topk``; ``tol`` is its relative residual tolerance, 0 = working
        accuracy).
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be in [1, {self.size}]")
        if self.size <= DENSE_LIMIT or 4 * k >= self.size:
            vals, vecs = self.eigh()
            return vals[:k], vecs[:, :k]
        from deepufm.matrices.lanczos import lanczos_topk  # lanczos builds on this module

        return lanczos_topk(self, k, tol)

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
        return torch.trace(self.dense())

    def __add__(self, other: SymmetricMatrix) -> SymmetricMatrix:
        return LinearCombination([(1.0, self), (1.0, other)])

    def __sub__(self, other: SymmetricMatrix) -> SymmetricMatrix:
        return LinearCombination([(1.0, self), (-1.0, other)])

    def __rmul__(self, scalar: float) -> SymmetricMatrix:
        return LinearCombination([(float(scalar), self)])


class LinearCombination(SymmetricMatrix):
    """``sum_i a_i M_i`` of symmetric matrices of one size (e.g. a knockout ``H - G_class``)."""

    def __init__(self, terms: list[tuple[float, SymmetricMatrix]]) -> None:
        first = terms[0][1]
        if any(M.size != first.size for _, M in terms):
            raise ValueError("all terms must have the same size")
        super().__init__(first.size, first.dtype, first.device)
        self.terms = terms

    def matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for a, M in self.terms:
            out = out + a * M.matmat(V)
        return out

    def dense(self) -> Tensor:
        return sum(a * M.dense() for a, M in self.terms)


class DenseSymmetric(SymmetricMatrix):
    """A symmetric matrix held densely (references, and small matrices such as ``d x d`` Grams)."""

    def __init__(self, M: Tensor) -> None:
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M = 0.5 * (M + M.T)

    def matmat(self, V: Tensor) -> Tensor:
        return self.M @ V

    def dense(self) -> Tensor:
        return self.M

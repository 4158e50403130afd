"""The vec convention, stated once and used everywhere.

vec is **row-major**: for ``W`` of shape ``(p, q)``, ``vec(W)[i*q + j] = W[i, j]``, which is exactly
``W.reshape(-1)``. Under this convention

* ``vec(u v^T) = u ⊗ v``;
* ``vec(A X B^T) = (A ⊗ B) vec(X)``;
* a layer Hessian of the linear MSE model is ``(A^T A) ⊗ (H H^T / N)``: output-side factor first,
  and its eigenvectors are ``mu'_c ⊗ mu_c'`` as in the paper.

Multi-layer parameter vectors concatenate ``vec(W_1), vec(W_2), ...`` in increasing layer order,
then ``vec(H_1)`` when the features are included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def vec(W: Tensor) -> Tensor:
    """Row-major vectorisation: ``(p, q) -> (p*q,)``, a view of ``W`` where ``reshape`` allows.

    Example:
        >>> vec(torch.tensor([[1, 2], [3, 4]]))
        tensor([1, 2, 3, 4])
    """
    return W.reshape(-1)


def unvec(w: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`vec`: ``(p*q,) -> (p, q)`` (also ``(..., p*q) -> (..., p, q)``).

    A ``RuntimeError`` (from ``reshape``) when the last axis is not ``p*q`` long.

    Example:
        >>> unvec(torch.tensor([1, 2, 3, 4]), (2, 2))
        tensor([[1, 2],
                [3, 4]])
    """
    return w.reshape(*w.shape[:-1], *shape)


def kron_vec(u: Tensor, v: Tensor) -> Tensor:
    """``u ⊗ v = vec(u v^T)``: ``(p,), (q,) -> (p*q,)``, entry ``i*q + j`` is ``u[i] v[j]``.

    Example:
        >>> kron_vec(torch.tensor([1, 2]), torch.tensor([1, 10]))
        tensor([ 1, 10,  2, 20])
    """
    return torch.outer(u, v).reshape(-1)


def concat_vec(mats: Sequence[Tensor]) -> Tensor:
    """Concatenate ``vec(M_1), vec(M_2), ...`` into one vector: ``(sum_i p_i q_i,)``, the
    multi-layer parameter order of the module docstring (a new tensor, not a view)."""
    return torch.cat([vec(M) for M in mats])

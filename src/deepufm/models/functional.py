"""Pure functions of the deep UFM (Concepts: *Deep unconstrained feature models*): forward pass,
losses, regulariser.

They take tensors and return tensors, with no hidden state, so that ``torch.func`` transforms
(``grad``, ``hessian``, ``vmap``) compose over them. Shapes: ``H1`` is ``(d, N)`` with class-major
columns (column ``c*n + i`` is sample ``i`` of class ``c``, 0-based), ``Ws[l-1] = W_l`` is ``(d, d)``
for ``l < L`` and ``(K, d)`` for ``l = L``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def class_index(K: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """Class of every sample in class-major order: ``(N,)`` long, ``[0]*n + [1]*n + ...``."""
    return torch.arange(K, device=device).repeat_interleave(n)


def labels(K: int, n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """One-hot targets ``Y = I_K ⊗ 1_n^T``: ``(K, N)``."""
    return torch.eye(K, dtype=dtype, device=device).repeat_interleave(n, dim=1)


def relu(u: Tensor) -> Tensor:
    """ReLU whose autograd derivative at 0 is 1 (the paper's convention; Concepts: *Conventions*).

    ``torch.relu`` has derivative 0 at 0, which gives wrong Hessians at DNC points where many
    pre-activations are exactly 0.
    """
    return torch.where(u >= 0, u, torch.zeros_like(u))


def activate(u: Tensor, activation: str) -> Tensor:
    """``sigma(u)``: :func:`relu` (derivative 1 at 0) when ``activation == "relu"``, else ``u``
    itself (any other value is treated as linear); same shape as ``u``."""
    return relu(u) if activation == "relu" else u


def forward(H1: Tensor, Ws: Sequence[Tensor], activation: str = "linear") -> list[Tensor]:
    """All features ``[H_1, ..., H_L, H_{L+1} = Z]``: ``H_l`` is ``(d, N)``, ``Z`` is ``(K, N)``.

    ``H_{l+1} = sigma(W_l H_l)`` for ``l < L`` and ``Z = W_L H_L`` (no activation on the output).
    """
    Hs = [H1]
    L = len(Ws)
    for l, W in enumerate(Ws, start=1):
        U = W @ Hs[-1]
        Hs.append(activate(U, activation) if l < L else U)
    return Hs


def preactivations(H1: Tensor, Ws: Sequence[Tensor], activation: str = "linear") -> list[Tensor]:
    """Pre-activations ``[U_2, ..., U_{L+1}]`` with ``U_{l+1} = W_l H_l``: ``(d, N)`` / ``(K, N)``."""
    Hs = forward(H1, Ws, activation)
    return [W @ H for W, H in zip(Ws, Hs[:-1], strict=True)]


def data_loss(Z: Tensor, loss: str, K: int, n: int) -> Tensor:
    """Data loss D (mean over the N samples, no regulariser).

    MSE: ``||Z - Y||_F^2 / (2N)``; CE: mean of ``-log softmax(z_ic)_c``.
    """
    N = K * n
    if loss == "mse":
        return 0.5 * (Z - labels(K, n, Z.dtype, Z.device)).pow(2).sum() / N
    return F.cross_entropy(Z.T, class_index(K, n, Z.device), reduction="mean")


def regulariser(H1: Tensor, Ws: Sequence[Tensor], lam_W: Sequence[float], lam_H: float) -> Tensor:
    """``sum_l lam_l/2 ||W_l||_F^2 + lam_H/2 ||H_1||_F^2``."""
    reg = 0.5 * lam_H * H1.pow(2).sum()
    for lam, W in zip(lam_W, Ws, strict=True):
        reg = reg + 0.5 * lam * W.pow(2).sum()
    return reg


def total_loss(
    H1: Tensor,
    Ws: Sequence[Tensor],
    *,
    K: int,
    n: int,
    activation: str,
    loss: str,
    lam_W: Sequence[float],
    lam_H: float,
) -> Tensor:
    """The objective ``L = D + regulariser`` (Concepts: *Deep unconstrained feature models*)."""
    Z = forward(H1, Ws, activation)[-1]
    return data_loss(Z, loss, K, n) + regulariser(H1, Ws, lam_W, lam_H)

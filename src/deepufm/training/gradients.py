"""Hand-derived gradients of the deep-UFM objective and the fused in-place gradient step.

Notation (THEORY §1, §5 M4): ``R = dD/dZ`` is ``(Z - Y)/N`` (MSE) or ``(softmax(Z) - Y)/N`` (CE),
``(K, N)``. The data gradient of layer ``l`` is ``Delta_{l+1} H_l^T`` with ``Delta_{l+1}`` the error
at the output of ``W_l``, and ``dD/dH_1 = Delta_1``.

**Linear model: rank-K factorisation.** Every back-propagated error is ``Delta_l = A^{(l)T} R`` with
``A^{(l)} = W_L ... W_l`` (``K x d``), so the data gradient is ``A^{(l+1)T} (R H_l^T)``, and
``B_l := R H_l^T`` obeys ``B_{l+1} = B_l W_l^T`` (``K x d``). One step then costs
``O(L K d^2 + K d N)`` instead of the ``O(L d^2 N)`` of ordinary back-propagation: no ``d x N``
hidden feature matrix is ever formed. ReLU layers break the factorisation (the masks depend on
the sample), so the ReLU model back-propagates ``d x N`` errors as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deepufm.models import functional as Fn
from deepufm.models.config import UFMConfig


def output_error(Z: Tensor, Y: Tensor, loss: str) -> Tensor:
    """``R = dD/dZ``: ``(K, N)``."""
    N = Z.shape[1]
    if loss == "mse":
        return (Z - Y) / N
    return (torch.softmax(Z, dim=0) - Y) / N


def _back_products(Ws: Sequence[Tensor]) -> list[Tensor]:
    """``[A^{(1)}, ..., A^{(L)}]`` with ``A^{(m)} = W_L ... W_m`` (``K x d``)."""
    A = [Ws[-1]]
    for W in reversed(Ws[:-1]):
        A.append(A[-1] @ W)
    return A[::-1]


def _linear_terms(H1: Tensor, Ws: Sequence[Tensor], Y: Tensor, loss: str):
    """``(A, B, R)`` of the rank-K factorisation: ``grad W_l = A^{(l+1)T} B_l``, ``grad H_1 = A^{(1)T} R``."""
    A = _back_products(Ws)
    R = output_error(A[0] @ H1, Y, loss)
    B = [R @ H1.T]
    for W in Ws[:-1]:
        B.append(B[-1] @ W.T)
    return A, B, R


def data_gradients(H1: Tensor, Ws: Sequence[Tensor], config: UFMConfig) -> list[Tensor]:
    """Gradients of the data loss ``D``: ``[dD/dH1, dD/dW_1, ..., dD/dW_L]`` (matrix shapes)."""
    Y = Fn.labels(config.K, config.n, H1.dtype, H1.device)
    if config.activation == "linear":
        A, B, R = _linear_terms(H1, Ws, Y, config.loss)
        grads = [A[m].T @ B[m - 1] for m in range(1, len(Ws))] + [B[-1]]
        return [A[0].T @ R, *grads]
    Hs = Fn.forward(H1, Ws, "relu")
    delta = output_error(Hs[-1], Y, config.loss)
    grads: list[Tensor] = []
    for l in range(len(Ws), 0, -1):
        grads.append(delta @ Hs[l - 1].T)
        delta = Ws[l - 1].T @ delta
        if l > 1:  # sigma'(u) with sigma'(0) = 1; H_l = relu(u_l) is >= 0 exactly where u_l >= 0
            delta = delta * (Ws[l - 2] @ Hs[l - 2] >= 0)
    return [delta, *grads[::-1]]


def loss_gradients(H1: Tensor, Ws: Sequence[Tensor], config: UFMConfig) -> list[Tensor]:
    """Gradients of the total objective ``D + regulariser`` w.r.t. ``[H1, W_1, ..., W_L]``."""
    grads = data_gradients(H1, Ws, config)
    lams = (config.lam_H, *config.lam_W)
    return [g + lam * p for g, lam, p in zip(grads, lams, [H1, *Ws], strict=True)]


class FusedStep:
    """One in-place full-batch gradient-descent step, fused by hand for speed.

    The parameters ``[H1, W_1, ..., W_L]`` are updated in place; every error term is computed from
    the old parameters before any update. Weight decay is folded into the update
    (``p <- (1 - lr*lam) p - lr*g``), which is algebraically plain gradient descent on ``L``.
    With momentum (PyTorch's convention) ``v <- mu v + (g + lam p)``, ``p <- p - lr v``.
    """

    def __init__(
        self,
        config: UFMConfig,
        params: list[Tensor],
        momentum: float = 0.0,
        buffers: list[Tensor] | None = None,
    ) -> None:
        self.config = config
        self.params = params
        self.lams = (config.lam_H, *config.lam_W)
        self.momentum = momentum
        H1 = params[0]
        self.Y = Fn.labels(config.K, config.n, H1.dtype, H1.device)
        if momentum > 0 and buffers is None:
            buffers = [torch.zeros_like(p) for p in params]
        self.buffers = buffers if momentum > 0 else None

    def __call__(self, lr: float) -> None:
        if self.config.activation == "linear":
            self._linear(lr)
        else:
            self._relu(lr)

    # Each `_apply(i, A_T, B, lr)` performs p_i <- p_i - lr*(A_T @ B + lam_i p_i) (A_T None: B alone).
    def _apply(self, i: int, A_T: Tensor | None, B: Tensor, lr: float) -> None:
        p, lam = self.params[i], self.lams[i]
        if self.buffers is None:
            if A_T is None:
                p.mul_(1.0 - lr * lam).add_(B, alpha=-lr)
            else:
                p.addmm_(A_T, B, beta=1.0 - lr * lam, alpha=-lr)
            return
        v = self.buffers[i]
        v.mul_(self.momentum).add_(p, alpha=lam)
        if A_T is None:
            v.add_(B)
        else:
            v.addmm_(A_T, B)
        p.add_(v, alpha=-lr)

    def _linear(self, lr: float) -> None:
        H1, Ws = self.params[0], self.params[1:]
        A, B, R = _linear_terms(H1, Ws, self.Y, self.config.loss)
        L = len(Ws)
        for m in range(1, L):
            self._apply(m, A[m].T, B[m - 1], lr)
        self._apply(L, None, B[-1], lr)
        self._apply(0, A[0].T, R, lr)

    def _relu(self, lr: float) -> None:
        H1, Ws = self.params[0], self.params[1:]
        L = len(Ws)
        Hs, masks = [H1], []
        for W in Ws[:-1]:
            U = W @ Hs[-1]
            mask = U >= 0
            masks.append(mask)
            Hs.append(U.mul_(mask))
        delta = output_error(Ws[-1] @ Hs[-1], self.Y, self.config.loss)
        for l in range(L, 0, -1):
            back = Ws[l - 1].T @ delta  # uses W_l before its update
            self._apply(l, delta, Hs[l - 1].T, lr)
            delta = back.mul_(masks[l - 2]) if l > 1 else back
        self._apply(0, None, delta, lr)

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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


# Below this many multiply-adds per step, intra-op threads cost more in synchronisation than
# they save (measured: the K=4, n=25, d=64, L=4 step runs 1.3x faster on one thread of two).
SINGLE_THREAD_WORK = 5e5


def step_work(config: UFMConfig) -> float:
    """Multiply-adds of one fused step: ``K(L d^2 + d N)`` (linear) or ``L d^2 N`` (ReLU)."""
    d, K, N, L = config.d, config.K, config.N, config.L
    return K * (L * d * d + d * N) if config.activation == "linear" else L * d * d * N


def step_threads(config: UFMConfig) -> int:
    """Intra-op threads for the fused step: one for small problems, torch's default otherwise."""
    return 1 if step_work(config) < SINGLE_THREAD_WORK else torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, restoring the previous setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class FusedStep:
    """One in-place full-batch gradient-descent step, fused by hand for speed.

    The parameters ``[H1, W_1, ..., W_L]`` are updated in place; every error term is computed from
    the old parameters before any update. Weight decay is folded into the update
    (``p <- (1 - lr*lam) p - lr*g``), which is algebraically plain gradient descent on ``L``.
    With momentum (PyTorch's convention) ``v <- mu v + (g + lam p)``, ``p <- p - lr v``.
    The step is overhead-bound at the sizes of the paper, so it issues as few kernels as it can:
    transposes are views taken once (the parameters change in place), ``1/N`` is folded into the
    update coefficient, and ``Z - Y`` is one ``addmm``.
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
        self.eye = torch.eye(config.K, dtype=H1.dtype, device=H1.device)
        self.T = [p.T for p in params]  # views: stay current as the parameters change in place
        if momentum > 0 and buffers is None:
            buffers = [torch.zeros_like(p) for p in params]
        self.buffers = buffers if momentum > 0 else None

    def __call__(self, lr: float) -> None:
        self.run(lr, 1)

    def run(self, lr: float, steps: int) -> None:
        """``steps`` steps at step size ``lr``."""
        if self.config.activation == "linear" and self.buffers is None:
            self._linear_plain(lr, steps)
            return
        body = self._linear if self.config.activation == "linear" else self._relu
        for _ in range(steps):
            body(lr)

    # `_apply(i, X, Y, a)` performs p_i <- p_i - lr*(a * X @ Y + lam_i p_i).
    def _apply(self, i: int, X: Tensor, Y: Tensor, lr: float, a: float) -> None:
        p, lam = self.params[i], self.lams[i]
        if self.buffers is None:
            p.addmm_(X, Y, beta=1.0 - lr * lam, alpha=-lr * a)
            return
        v = self.buffers[i]
        v.mul_(self.momentum).add_(p, alpha=lam).addmm_(X, Y, alpha=a)
        p.add_(v, alpha=-lr)

    def _residual(self, Z_from: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        """``(N R, 1/N)``: the output error up to the factor ``1/N``, folded into the update."""
        if self.config.loss == "mse":
            return torch.addmm(self.Y, *Z_from, beta=-1.0), 1.0 / self.config.N
        Z = Z_from[0] @ Z_from[1]
        return torch.softmax(Z, dim=0).sub_(self.Y), 1.0 / self.config.N

    def _back_products_T(self) -> list[Tensor]:
        """``[A^{(1)T}, ..., A^{(L)T}]``, ``A^{(m)T} = W_m^T A^{(m+1)T}`` (``d x K``)."""
        T = self.T
        L = len(T) - 1
        AT = [T[L]]
        for m in range(L - 1, 0, -1):
            AT.append(T[m] @ AT[-1])
        return AT[::-1]

    def _linear(self, lr: float) -> None:
        T = self.T
        L = len(T) - 1
        AT = self._back_products_T()
        R, a = self._residual((AT[0].T, self.params[0]))
        B = [R @ T[0]]  # B_l = R H_l^T (K x d_in of layer l)
        for m in range(1, L):
            B.append(B[-1] @ T[m])
        for m in range(1, L):
            self._apply(m, AT[m], B[m - 1], lr, a)
        self._apply(L, self.eye, B[-1], lr, a)
        self._apply(0, AT[0], R, lr, a)

    def _linear_plain(self, lr: float, steps: int) -> None:
        """The linear step without momentum, as a tight loop: the hot path of long runs.

        ``A^{(L)T} = W_L^T`` is a view of ``W_L``, so every product is taken before any update.
        """
        P, T, L = self.params, self.T, len(self.params) - 1
        beta = [1.0 - lr * lam for lam in self.lams]
        alpha = -lr / self.config.N
        mse = self.config.loss == "mse"
        Y, eye, mm, addmm = self.Y, self.eye, torch.mm, torch.addmm
        for _ in range(steps):
            AT = [T[L]]
            for m in range(L - 1, 0, -1):
                AT.append(mm(T[m], AT[-1]))
            AT.reverse()
            if mse:
                R = addmm(Y, AT[0].T, P[0], beta=-1.0)
            else:
                R = torch.softmax(mm(AT[0].T, P[0]), dim=0).sub_(Y)
            B = [mm(R, T[0])]
            for m in range(1, L):
                B.append(mm(B[-1], T[m]))
            for m in range(1, L):
                P[m].addmm_(AT[m], B[m - 1], beta=beta[m], alpha=alpha)
            P[L].addmm_(eye, B[-1], beta=beta[L], alpha=alpha)
            P[0].addmm_(AT[0], R, beta=beta[0], alpha=alpha)

    def _relu(self, lr: float) -> None:
        Ws, T = self.params[1:], self.T
        L = len(Ws)
        Hs, masks = [self.params[0]], []
        for W in Ws[:-1]:
            U = W @ Hs[-1]
            mask = U >= 0
            masks.append(mask)
            Hs.append(U.mul_(mask))
        delta, a = self._residual((Ws[-1], Hs[-1]))
        for l in range(L, 0, -1):
            back = T[l] @ delta  # uses W_l before its update
            self._apply(l, delta, Hs[l - 1].T, lr, a)
            delta = back.mul_(masks[l - 2]) if l > 1 else back
        self._apply_dense(0, delta, lr, a)

    def _apply_dense(self, i: int, G: Tensor, lr: float, a: float) -> None:
        """``p_i <- p_i - lr*(a*G + lam_i p_i)`` for a gradient given densely."""
        p, lam = self.params[i], self.lams[i]
        if self.buffers is None:
            p.mul_(1.0 - lr * lam).add_(G, alpha=-lr * a)
            return
        v = self.buffers[i]
        v.mul_(self.momentum).add_(p, alpha=lam).add_(G, alpha=a)
        p.add_(v, alpha=-lr)

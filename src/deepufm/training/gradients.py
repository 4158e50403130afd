"""Hand-derived gradients of the deep-UFM objective and the fused in-place gradient step.

Notation (docs: Concepts, Deep unconstrained feature models): ``R = dD/dZ`` is ``(Z - Y)/N`` (MSE) or ``(softmax(Z) - Y)/N`` (CE),
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
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from deepufm.errors import ConfigError
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


# Below this many multiply-adds per step (about a millisecond on one core), intra-op threads
# cost more than they save: on an idle machine the K=4, n=25, d=64, L=4 linear step runs 1.3x
# faster on one thread of two, and when another process holds a core every parallel region
# waits for its descheduled worker (measured: a K=3, n=40, d=65, L=4 ReLU run at 87 steps/s on
# two threads against 2,200 on one).
SINGLE_THREAD_WORK = 1e7


def step_work(config: UFMConfig) -> float:
    """Multiply-adds of one fused step: ``K(L d^2 + d N)`` (linear) or ``L d^2 N`` (ReLU)."""
    d, K, N, L = config.d, config.K, config.N, config.L
    return K * (L * d * d + d * N) if config.activation == "linear" else L * d * d * N


def step_threads(config: UFMConfig) -> int:
    """Intra-op threads for the fused step: one for small problems, torch's default otherwise."""
    return 1 if step_work(config) < SINGLE_THREAD_WORK else torch.get_num_threads()


Engine = Literal["auto", "torch", "numpy"]
ENGINES = ("auto", "torch", "numpy")


def step_engine(config: UFMConfig, device: torch.device, momentum: float = 0.0) -> str:
    """The library that runs the plain ReLU loop: ``"numpy"`` for small CPU problems, else ``"torch"``.

    At the paper's ReLU sizes (``d x d`` by ``d x N`` products, d = 65, N = 120) NumPy's OpenBLAS
    runs the GEMMs 1.2-1.4x faster than the MKL inside PyTorch's CPU build and its calls cost less,
    so the whole step is about 1.25x faster (``benchmarks/README.md``). Decided from the
    configuration alone, so a resumed run takes the same route and stays bitwise identical.
    """
    small = step_work(config) < SINGLE_THREAD_WORK
    numpy = device.type == "cpu" and small and _has_numpy_loop(config, momentum)
    return "numpy" if numpy else "torch"


def _has_numpy_loop(config: UFMConfig, momentum: float) -> bool:
    """Only the plain (no-momentum) ReLU loop has a NumPy form; the others run in torch."""
    return config.activation == "relu" and momentum == 0


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

    The step is overhead- and layout-bound at the sizes of the paper (``benchmarks/README.md``),
    so the plain (no-momentum) loops issue as few kernels as they can, into preallocated
    workspace buffers (``out=``), under ``torch.inference_mode``: transposes are views taken once
    (the parameters change in place), ``1/N`` is folded into the update coefficient, ``Z - Y`` is
    one ``addmm``, the linear back products are chained in row form ``A^{(m)} = A^{(m+1)} W_m``
    (``K x d``, contiguous: 1.3-1.5x faster in MKL than ``W_m^T A^{(m+1)T}``), and ReLU masks are
    kept as 0/1 floats (a bool mask costs 3-4x more to build and to multiply by).

    ``engine`` picks the library of the plain ReLU loop: ``"auto"`` (:func:`step_engine`),
    ``"torch"``, or ``"numpy"`` (CPU only: NumPy works on the parameters' memory through
    ``Tensor.numpy()`` views, with its BLAS held to one thread). Both compute the same step; their
    results differ by round-off only.
    """

    def __init__(
        self,
        config: UFMConfig,
        params: list[Tensor],
        momentum: float = 0.0,
        buffers: list[Tensor] | None = None,
        engine: Engine = "auto",
    ) -> None:
        if engine not in ENGINES:
            raise ConfigError("engine", engine, f"one of {', '.join(ENGINES)}")
        device = params[0].device
        if engine == "numpy" and device.type != "cpu":
            raise ConfigError("engine", engine, f"'torch' for parameters on {device}")
        if engine == "auto":
            engine = step_engine(config, device, momentum)  # type: ignore[assignment]
        self.engine = engine if _has_numpy_loop(config, momentum) else "torch"
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
        self._work: dict[str, list[Tensor]] | None = None
        self._np_work: dict[str, list[np.ndarray]] | None = None
        self._blas = None  # threadpoolctl controller, made on first NumPy run

    def __call__(self, lr: float) -> None:
        self.run(lr, 1)

    def run(self, lr: float, steps: int) -> None:
        """``steps`` steps at step size ``lr``."""
        linear = self.config.activation == "linear"
        if self.engine == "numpy":
            self._relu_plain_numpy(lr, steps)
            return
        with torch.inference_mode():
            if self.buffers is None:
                (self._linear_plain if linear else self._relu_plain)(lr, steps)
                return
            body = self._linear if linear else self._relu
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

    def _residual(self, Z_from: tuple[Tensor, Tensor], out: Tensor | None = None) -> Tensor:
        """``N R``: the output error up to the factor ``1/N``, which is folded into the update."""
        if self.config.loss == "mse":
            return torch.addmm(self.Y, *Z_from, beta=-1.0, out=out)
        return torch.softmax(torch.mm(*Z_from), dim=0).sub_(self.Y)

    def _workspace(self) -> dict[str, list[Tensor]]:
        """Preallocated intermediates of the plain loops (allocated once, on first use).

        Linear: ``A[m] = A^{(m+1)}`` (``K x d``; ``A[L-1]`` is ``W_L`` itself), ``B[l] = R H_{l+1}^T``
        (``K x d``), ``R`` (``K x N``). ReLU: ``H[l] = H_{l+1}`` and the 0/1 masks
        ``M[l] = [U_{l+2} >= 0]`` (``d x N``), back-propagated errors ``D[l]`` (``d x N``),
        ``G`` (the shape of ``W_1``), ``R``.
        """
        if self._work is None:
            P, L = self.params, len(self.params) - 1
            (K, N), d = self.Y.shape, P[0].shape[0]
            new = P[0].new_empty
            if self.config.activation == "linear":
                self._work = {
                    "A": [new(K, d) for _ in range(L - 1)] + [P[L]],
                    "B": [new(K, d) for _ in range(L)],
                    "R": [new(K, N)],
                }
            else:
                self._work = {
                    "H": [P[0]] + [new(d, N) for _ in range(L - 1)],
                    "M": [new(d, N) for _ in range(L - 1)],
                    "D": [new(d, N) for _ in range(L - 1)],
                    "G": [torch.empty_like(P[1])],
                    "R": [new(K, N)],
                }
        return self._work

    def _linear(self, lr: float) -> None:
        T = self.T
        L = len(T) - 1
        AT = [T[L]]  # A^{(m)T} = W_m^T A^{(m+1)T} (d x K)
        for m in range(L - 1, 0, -1):
            AT.append(T[m] @ AT[-1])
        AT.reverse()
        R, a = self._residual((AT[0].T, self.params[0])), 1.0 / self.config.N
        B = [R @ T[0]]  # B_l = R H_l^T (K x d_in of layer l)
        for m in range(1, L):
            B.append(B[-1] @ T[m])
        for m in range(1, L):
            self._apply(m, AT[m], B[m - 1], lr, a)
        # H1 before W_L: with L = 1, A^{(1)T} is a view of W_L.
        self._apply(0, AT[0], R, lr, a)
        self._apply(L, self.eye, B[-1], lr, a)

    def _linear_plain(self, lr: float, steps: int) -> None:
        """The linear step without momentum, as a tight loop: the hot path of long runs.

        ``A^{(L)} = W_L`` is the parameter itself, so every product is taken before any update,
        and ``W_L`` is updated last.
        """
        P, T, L = self.params, self.T, len(self.params) - 1
        work = self._workspace()
        A, B, (R,) = work["A"], work["B"], work["R"]
        AT = [a.T for a in A]
        beta = [1.0 - lr * lam for lam in self.lams]
        alpha = -lr / self.config.N
        mse = self.config.loss == "mse"
        Y, eye, mm, addmm = self.Y, self.eye, torch.mm, torch.addmm
        for _ in range(steps):
            for m in range(L - 2, -1, -1):
                mm(A[m + 1], P[m + 1], out=A[m])
            if mse:
                addmm(Y, A[0], P[0], beta=-1.0, out=R)
            else:
                R = torch.softmax(mm(A[0], P[0]), dim=0).sub_(Y)
            mm(R, T[0], out=B[0])
            for m in range(1, L):
                mm(B[m - 1], T[m], out=B[m])
            for m in range(1, L):
                P[m].addmm_(AT[m], B[m - 1], beta=beta[m], alpha=alpha)
            P[0].addmm_(AT[0], R, beta=beta[0], alpha=alpha)
            P[L].addmm_(eye, B[L - 1], beta=beta[L], alpha=alpha)

    def _relu_plain(self, lr: float, steps: int) -> None:
        """The ReLU step without momentum, as a tight loop.

        ``grad W_l = Delta_{l+1} H_l^T`` and ``Delta_l = [U_l >= 0] * (W_l^T Delta_{l+1})``
        (``sigma'(0) = 1``, docs: Concepts, Conventions). At the first layer ``grad W_1`` goes to ``G`` (``d x d``)
        so that ``H1 <- beta H1 + alpha W_1^T Delta_2`` is one ``addmm_`` with the old ``W_1``.
        """
        P, T, L = self.params, self.T, len(self.params) - 1
        work = self._workspace()
        Hs, M, D, (G,), (R,) = work["H"], work["M"], work["D"], work["G"], work["R"]
        HT = [h.T for h in Hs]
        beta = [1.0 - lr * lam for lam in self.lams]
        alpha = -lr / self.config.N
        mse = self.config.loss == "mse"
        Y, mm, ge = self.Y, torch.mm, torch.ge
        for _ in range(steps):
            for l in range(1, L):
                U = mm(P[l], Hs[l - 1], out=Hs[l])
                U.mul_(ge(U, 0, out=M[l - 1]))
            if mse:
                delta = torch.addmm(Y, P[L], Hs[L - 1], beta=-1.0, out=R)
            else:
                delta = torch.softmax(mm(P[L], Hs[L - 1]), dim=0).sub_(Y)
            for l in range(L, 1, -1):
                back = mm(T[l], delta, out=D[l - 2])  # W_l before its update
                P[l].addmm_(delta, HT[l - 1], beta=beta[l], alpha=alpha)
                delta = back.mul_(M[l - 2])
            mm(delta, HT[0], out=G)
            P[0].addmm_(T[1], delta, beta=beta[0], alpha=alpha)
            P[1].mul_(beta[1]).add_(G, alpha=alpha)

    def _relu_plain_numpy(self, lr: float, steps: int) -> None:
        """:meth:`_relu_plain` in NumPy, on views of the parameters' memory.

        ``alpha = -lr/N`` is folded into the output error, so every back-propagated error and
        gradient carries it and each update is ``p <- beta p + g``. The ``H_l^T`` are copied to
        contiguous ``N x d`` buffers: OpenBLAS runs ``Delta H_l^T`` 1.4x faster from them than
        from a transposed view.
        """
        import threadpoolctl

        P = [p.detach().numpy() for p in self.params]
        L = len(P) - 1
        w = self._numpy_workspace(P)
        H, HT, M, D, G, (GH,), (R,) = (w[k] for k in ("H", "HT", "M", "D", "G", "GH", "R"))
        beta = [1.0 - lr * lam for lam in self.lams]
        alpha = -lr / self.config.N
        mse = self.config.loss == "mse"
        Y = self.Y.numpy()
        mm, ge, mul = np.matmul, np.greater_equal, np.multiply
        if self._blas is None:
            self._blas = threadpoolctl.ThreadpoolController()
        # One thread for the same reason as `step_threads`; OpenBLAS would otherwise take all cores.
        with self._blas.limit(limits=1, user_api="blas"):
            for _ in range(steps):
                for l in range(1, L):
                    U = mm(P[l], H[l - 1], out=H[l])
                    ge(U, 0, out=M[l - 1])  # sigma'(0) = 1
                    mul(U, M[l - 1], out=U)
                for l in range(L):
                    np.copyto(HT[l], H[l].T)
                mm(P[L], H[L - 1], out=R)
                if not mse:
                    R -= R.max(axis=0)
                    np.exp(R, out=R)
                    R /= R.sum(axis=0)
                R -= Y
                R *= alpha
                delta = R
                for l in range(L, 1, -1):
                    back = mm(P[l].T, delta, out=D[l - 2])  # W_l before its update
                    mm(delta, HT[l - 1], out=G[l])
                    P[l] *= beta[l]
                    P[l] += G[l]
                    delta = mul(back, M[l - 2], out=back)
                mm(delta, HT[0], out=G[1])
                mm(P[1].T, delta, out=GH)
                P[0] *= beta[0]
                P[0] += GH
                P[1] *= beta[1]
                P[1] += G[1]
        # NumPy's writes bypass autograd's version counters: bump them, so that a graph which
        # saved a parameter before this step refuses to back-propagate through stale values.
        for p in self.params:
            torch.autograd.graph.increment_version(p)

    def _numpy_workspace(self, P: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Intermediates of :meth:`_relu_plain_numpy`, as in :meth:`_workspace`, plus ``HT[l]``
        (``N x d``, contiguous copies of ``H_{l+1}^T``), ``G[l]`` (the shape of ``W_l``;
        ``G[0]`` unused) and ``GH`` (the shape of ``H1``)."""
        if self._np_work is None:
            L, (d, N), K = len(P) - 1, P[0].shape, self.Y.shape[0]
            new = lambda *shape: np.empty(shape, dtype=P[0].dtype)  # noqa: E731
            self._np_work = {
                "H": [P[0]] + [new(d, N) for _ in range(L - 1)],
                "HT": [new(N, d) for _ in range(L)],
                "M": [new(d, N) for _ in range(L - 1)],
                "D": [new(d, N) for _ in range(L - 1)],
                "G": [None] + [np.empty_like(p) for p in P[1:]],
                "GH": [np.empty_like(P[0])],
                "R": [new(K, N)],
            }
        return self._np_work

    def _relu(self, lr: float) -> None:
        Ws, T = self.params[1:], self.T
        L = len(Ws)
        Hs, masks = [self.params[0]], []
        for W in Ws[:-1]:
            U = W @ Hs[-1]
            mask = (U >= 0).to(U.dtype)
            masks.append(mask)
            Hs.append(U.mul_(mask))
        delta, a = self._residual((Ws[-1], Hs[-1])), 1.0 / self.config.N
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

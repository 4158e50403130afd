"""Gradients of one layer and the matrices built from them (Concepts: *The curvature matrices*).

Everything comes from the factored Jacobian of ``matrices.jacobian`` (rows ``a_{ic,c'} ⊗ h_ic``):
the per-sample gradient of ``l_ic`` with respect to ``w_l = vec(W_l)`` (row-major) is

    g_ic = (A_ic^T r_ic) ⊗ h_ic,     r_ic = dl_ic/dz = z_ic - y_c (MSE),  p_ic - y_c (CE),

with ``A_ic = A^{(l+1)}_{ic}`` (sample-independent in the linear model). So a per-sample gradient is
one ``d_out``-vector ``b_ic = A_ic^T r_ic`` times one feature ``h_ic``, and no per-sample loop or
``N x p`` matrix is needed except where the per-sample gradients themselves are asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepufm.matrices.jacobian import LayerJacobian, layer_jacobian
from deepufm.matrices.operator import DenseSymmetric, SymmetricMatrix
from deepufm.matrices.spectra import dense_eigh, dense_topk, gram_lift, with_null_space
from deepufm.models import functional as Fn
from deepufm.models.ufm import DeepUFM


def output_errors(Z: Tensor, Y: Tensor, loss: str) -> Tensor:
    """``r_ic = d l_ic / d z_ic`` for every sample: ``(K, N)``.

    MSE (``l = ||z - y||^2 / 2``): ``z - y``; CE (``l = -log softmax(z)_c``): ``softmax(z) - y``.
    ``Y`` may hold any one-hot labels (the candidate labels ``e_c'`` of :func:`backprop_errors` as
    well).
    """
    return Z - Y if loss == "mse" else torch.softmax(Z, dim=0) - Y


def _back_errors(jac: LayerJacobian, R: Tensor) -> Tensor:
    """``b_ic = A_ic^T r_ic``: ``R`` ``(K, N)`` -> ``(N, d_out)``."""
    if jac.shared:
        return R.T @ jac.A
    return torch.einsum("nkd,kn->nd", jac.A, R)


def _layer_errors(model: DeepUFM, layer: int, relu_tol: float) -> tuple[Tensor, Tensor]:
    """``B = [b_ic]`` ``(N, d_out)`` and the layer input ``H_l`` ``(d_in, N)``."""
    cfg = model.config
    jac = layer_jacobian(model, layer, relu_tol)
    R = output_errors(jac.Z, Fn.labels(cfg.K, cfg.n, jac.Z.dtype, jac.Z.device), cfg.loss)
    return _back_errors(jac, R), jac.H


def per_sample_gradients(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """``g_ic = grad_{w_l} l_ic = (A_ic^T r_ic) ⊗ h_ic``: ``(N, p)``, ``p = d_out d_in``.

    Rows in class-major sample order; gradients of the per-sample *data* loss (no regulariser, not
    divided by ``N``: the data gradient is their mean). MSE and CE; linear and ReLU (sigma'(0)=1,
    pre-activations ``>= -relu_tol * max|u|`` count as non-negative).
    """
    B, H = _layer_errors(model, layer, relu_tol)
    return (B.unsqueeze(2) * H.T.unsqueeze(1)).reshape(B.shape[0], -1)


def data_gradient(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> Tensor:
    """``tilde g_l = grad_{w_l} D = vec(1/N sum_ic b_ic h_ic^T)``: ``(p,)``, row-major vec.

    Linear model: ``vec(A^T (Z - Y) H_l^T / N)``. At a critical point of the regularised objective
    ``tilde g_l = -lambda_l w_l`` (v2 Theorem 3).
    """
    B, H = _layer_errors(model, layer, relu_tol)
    return (B.T @ H.T / H.shape[1]).reshape(-1)


class GradientCovariance(SymmetricMatrix):
    """``Sigma_g = 1/N sum_ic (g_ic - g_bar)(g_ic - g_bar)^T`` with ``g_ic = b_ic ⊗ h_ic``.

    Held as the factors ``B`` ``(N, d_out)`` and ``H`` ``(d_in, N)``; the ``p x p`` matrix is formed
    only by :meth:`dense`. ``matmat`` uses ``g_ic^T vec(X) = b_ic^T X h_ic``. The spectrum (rank
    ``<= N - 1``) and the top-k come from the ``N x N`` Gram of the centred gradients,
    ``1/N C [(B B^T) ∘ (H^T H)] C`` with ``C = I - 11^T/N``, whenever ``N < p``.
    """

    def __init__(self, B: Tensor, H: Tensor) -> None:
        self.B, self.H = B, H
        self.N, self.d_out, self.d_in = H.shape[1], B.shape[1], H.shape[0]
        super().__init__(self.d_out * self.d_in, H.dtype, H.device)

    @property
    def mean(self) -> Tensor:
        """``g_bar`` (the data gradient): ``(p,)``."""
        return (self.B.T @ self.H.T / self.N).reshape(-1)

    def _centred_coefficients(self, V: Tensor) -> Tensor:
        """``(g_ic - g_bar)^T v`` for every column: ``(p, m) -> (N, m)``."""
        X = V.T.reshape(-1, self.d_out, self.d_in)
        S = torch.einsum("nd,mde,en->nm", self.B, X, self.H)
        return S - S.mean(dim=0, keepdim=True)

    def _combine(self, S: Tensor) -> Tensor:
        """``sum_ic s_ic (g_ic - g_bar)``: ``(N, m) -> (p, m)``."""
        S = S - S.mean(dim=0, keepdim=True)
        T = torch.einsum("nd,nm,en->mde", self.B, S, self.H)
        return T.reshape(-1, self.size).T

    def matmat(self, V: Tensor) -> Tensor:
        """``Sigma_g V`` from the factors: the centred coefficients
        ``(g_ic - g_bar)^T v = b_ic^T X h_ic - mean`` ``(N, m)``, then their combination of the
        centred gradients, divided by ``N``; ``O(N d_out d_in m)``, no ``(N, p)`` matrix."""
        return self._combine(self._centred_coefficients(V)) / self.N

    def centred_gradients(self) -> Tensor:
        """``g_ic - g_bar``: ``(N, p)`` (formed on request)."""
        G = (self.B.unsqueeze(2) * self.H.T.unsqueeze(1)).reshape(self.N, -1)
        return G - G.mean(dim=0, keepdim=True)

    def dense(self) -> Tensor:
        """``G^T G / N`` from the ``(N, p)`` centred gradients (:meth:`centred_gradients`):
        ``(p, p)``."""
        G = self.centred_gradients()
        return G.T @ G / self.N

    def gram(self) -> Tensor:
        """``1/N C [(B B^T) ∘ (H^T H)] C``: ``(N, N)``, same non-zero spectrum as ``Sigma_g``."""
        G = (self.B @ self.B.T) * (self.H.T @ self.H)
        G = G - G.mean(dim=0, keepdim=True)
        G = G - G.mean(dim=1, keepdim=True)
        return 0.5 * (G + G.T) / self.N

    @property
    def exact_size(self) -> int:
        """``min(N, p)``: the ``N x N`` Gram when ``N < p``, else the dense matrix."""
        return min(self.N, self.size)

    def _gram_pairs(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The Gram's reliably non-zero eigenpairs (all, or among the top ``k + 1``) lifted to
        ``(g_ic - g_bar)``-combinations (:func:`~deepufm.matrices.spectra.gram_lift`):
        ``(r,)``, ``(p, r)``."""
        if k is None or k + 1 >= self.N:
            vals, small = dense_eigh(self.gram())
        else:
            vals, small, _ = dense_topk(self.gram(), k + 1)
        return gram_lift(vals, self._combine(small), self.size)

    def exact_topk(self, k: int) -> tuple[Tensor, Tensor, float, str]:
        """Dense when ``N >= p``; else from the ``N x N`` Gram, the other eigenvalues exactly 0
        (an orthonormal basis of the null space completes the vectors)."""
        if self.N >= self.size:
            return super().exact_topk(k)
        return (*with_null_space(*self._gram_pairs(k), self.size, k), "gram")

    def eigh(self) -> tuple[Tensor, Tensor]:
        """All ``p`` eigenpairs, descending (via the ``N x N`` Gram when ``N < p``)."""
        if self.N >= self.size:
            return super().eigh()
        vals, vecs, _ = with_null_space(*self._gram_pairs(), self.size, self.size)
        return vals, vecs

    def eigvalsh(self) -> Tensor:
        """All ``p`` eigenvalues, descending: those of the ``N x N`` Gram (:meth:`gram`) followed
        by ``p - N`` exact zeros when ``N < p``, else dense."""
        if self.N >= self.size:
            return super().eigvalsh()
        vals = torch.linalg.eigvalsh(self.gram()).flip(0)
        return torch.cat([vals, vals.new_zeros(self.size - self.N)])

    def trace(self) -> Tensor:
        """The trace of the ``N x N`` Gram, equal to ``tr Sigma_g`` (a 0-dim tensor)."""
        return torch.trace(self.gram())


def gradient_covariance(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> GradientCovariance:
    """Covariance of the per-sample gradients of layer ``l`` (v1 Theorem E.1 / v2 Theorem 10):
    ``p x p``.

    ``Sigma_g = 1/N sum_ic (g_ic - g_bar)(g_ic - g_bar)^T``, ``g_bar = tilde g_l``. At the linear-MSE
    optimum: rank ``K - 1``, every non-zero eigenvalue ``c (1 - c) lambda_l``.
    """
    B, H = _layer_errors(model, layer, relu_tol)
    return GradientCovariance(B, H)


ERROR_FORMS = ("mse", "loss")


def backprop_errors(model: DeepUFM, layer: int, relu_tol: float = 0.0, form: str = "mse") -> Tensor:
    """Extended back-propagated errors ``delta_icc'`` at the output of ``W_l``: ``(N, K, d_out)``.

    ``delta_icc' = grad_{u^{(l+1)}_ic} l(z_ic; e_c') = A_ic^T r(z_ic; e_c')`` for every candidate
    label ``c'``, index ``[ic, c', :]``; the ordinary back-propagated error is ``c' = c``.

    * ``form="mse"`` (the paper's, any model): ``l = ||z - e_c'||^2 / 2``,
      ``delta = A_ic^T (z_ic - e_c')``.
    * ``form="loss"``: the model's own loss — the same as ``"mse"`` for MSE models, and
      ``A_ic^T (softmax(z_ic) - e_c')`` for CE ([D] extension; the paper defines only the MSE form).
    """
    if form not in ERROR_FORMS:
        raise ValueError(f"form={form!r} must be one of {ERROR_FORMS}")
    jac = layer_jacobian(model, layer, relu_tol)
    K = jac.Z.shape[0]
    eye = torch.eye(K, dtype=jac.Z.dtype, device=jac.Z.device)
    ce = form == "loss" and model.config.loss == "ce"
    out = torch.softmax(jac.Z, dim=0) if ce else jac.Z
    R = out.T.unsqueeze(2) - eye.unsqueeze(0)  # (N, K, K'): [n, :, c'] = r(z_n; e_c')
    if jac.shared:
        return torch.einsum("nkc,kd->ncd", R, jac.A)
    return torch.einsum("nkc,nkd->ncd", R, jac.A)


def backprop_error_matrix(
    model: DeepUFM, layer: int, relu_tol: float = 0.0, form: str = "mse"
) -> DenseSymmetric:
    """``Sigma_delta = 1/N sum_ic sum_c' delta_icc' delta_icc'^T`` (v1 Theorem E.2 / v2 Theorem 11).

    ``(d_out, d_out)``, summed (not averaged) over ``c'``: the same unit weights as ``G_l``
    (as in the paper; divide eigenvalues by ``K`` for the averaged form); ``form`` as in
    :func:`backprop_errors`. At the linear-MSE optimum: eigenvalue ``(1 + c^2) c^2 / ||mu'||^2``
    (``K - 1`` times, on ``mu'_c - mu'_G``) and ``(1 - c)^2 c^2 / ||mu'||^2`` (once, on ``mu'_G``).
    """
    deltas = backprop_errors(model, layer, relu_tol, form)
    N = deltas.shape[0]
    D = deltas.reshape(-1, deltas.shape[-1])
    return DenseSymmetric(D.T @ D / N)

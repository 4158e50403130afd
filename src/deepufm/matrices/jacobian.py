"""The output Jacobian of one layer in factored form (Concepts: *The curvature matrices*).

For layer ``l`` (weight ``W_l``, ``d_out x d_in``) the Jacobian of the logits of sample ``(i, c)``
with respect to ``w_l = vec(W_l)`` (row-major) has rows

    v_{icc'} = grad_{w_l} z_{ic,c'} = a^{(l+1)}_{ic,c'} ⊗ h^{(l)}_{ic},

where ``a^{(l+1)}_{ic,c'}`` is row ``c'`` of ``A^{(l+1)}_{ic} = W_L D^{(L)} W_{L-1} ... W_{l+1} D^{(l+1)}``
(``D^{(m)} = diag sigma'(u^{(m)}_{ic})``, sigma'(0) = 1) and ``h^{(l)}_{ic}`` is the input feature. In
the linear model ``A^{(l+1)}`` does not depend on the sample. Every layer-wise matrix of the paper is
built from these two factors, so no ``K x p`` Jacobian is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.models import functional as Fn
from deepufm.models.ufm import DeepUFM


@dataclass(frozen=True)
class LayerJacobian:
    """Factors of ``J^{(l)}_{ic} = A_{ic} ⊗ h_{ic}^T`` (rows ``a_{ic,c'} ⊗ h_{ic}``).

    Attributes:
        A: ``(K, d_out)`` when the same for every sample (linear model, ``shared=True``), else
            ``(N, K, d_out)``.
        H: the layer's input features ``H_l``, ``(d_in, N)``.
        Z: logits ``(K, N)`` at the point (for loss derivatives).
        shared: whether ``A`` is sample-independent.
    """

    A: Tensor
    H: Tensor
    Z: Tensor
    shared: bool

    @property
    def per_sample_A(self) -> Tensor:
        """``A_{ic}`` for every sample: ``(N, K, d_out)`` (an expanded view when shared)."""
        if self.shared:
            return self.A.unsqueeze(0).expand(self.H.shape[1], *self.A.shape)
        return self.A

    @property
    def d_out(self) -> int:
        """Output width of ``W_l`` (rows of the weight; the last axis of ``A``)."""
        return self.A.shape[-1]

    @property
    def d_in(self) -> int:
        """Input width of ``W_l`` (columns of the weight; the rows of ``H``)."""
        return self.H.shape[0]


def relu_derivative(U: Tensor, tol: float = 0.0) -> Tensor:
    """``sigma'(U)`` with sigma'(0) = 1: entries ``u >= -tol * max|U|`` count as non-negative.

    ``tol`` absorbs round-off after long training (Concepts: *Conventions*; ~1e-12 at constructed
    points, ~1e-4 after training); ``tol=0`` is the exact convention.
    """
    scale = U.abs().max() if tol > 0 else U.new_zeros(())
    return (U >= -tol * scale).to(U.dtype)


def layer_jacobian(model: DeepUFM, layer: int, relu_tol: float = 0.0) -> LayerJacobian:
    """Factored Jacobian of the logits with respect to ``vec(W_layer)``, ``1 <= layer <= L``."""
    cfg = model.config
    if not 1 <= layer <= cfg.L:
        raise ValueError(f"layer={layer} must be in [1, L={cfg.L}]")
    Hs = Fn.forward(model.H1, model.W, cfg.activation)
    eye = torch.eye(cfg.K, dtype=model.H1.dtype, device=model.H1.device)
    if cfg.activation == "linear" or layer == cfg.L:
        A = eye
        for W in reversed(model.W[layer:]):
            A = A @ W
        return LayerJacobian(A=A, H=Hs[layer - 1], Z=Hs[-1], shared=True)
    # A_m = A_{m+1} W_m D^{(m)}, from m = L down to layer + 1; D^{(m)} is sigma' of u^{(m)} = W_{m-1} H_{m-1}.
    A = eye.unsqueeze(0).expand(cfg.N, cfg.K, cfg.K)
    for m in range(cfg.L, layer, -1):
        U = model.W[m - 2] @ Hs[m - 2]  # u^{(m)}, (d, N)
        D = relu_derivative(U, relu_tol)  # (d, N)
        A = (A @ model.W[m - 1]) * D.T.unsqueeze(1)
    return LayerJacobian(A=A, H=Hs[layer - 1], Z=Hs[-1], shared=False)

"""NC3-type (weight–feature) alignment metrics (Concepts: *Deep neural collapse*, DNC3).

``A^{(l)} = W_L W_{L-1} ... W_l`` (``K x d``) maps the features ``h^{(l)}`` to the logits in the
linear model; at DNC its rows are proportional to the class means, ``a^{(l)}_c = beta_l mu^{(l)}_c``,
and ``W_l = omega_l sum_c hat mu^{(l+1)}_c hat mu^{(l)T}_c`` (v2 Theorem 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepufm.matrices.jacobian import layer_jacobian, relu_derivative
from deepufm.metrics.collapse import class_means
from deepufm.models.ufm import DeepUFM

NC3_FORMS = ("a", "b", "c", "d")


def back_product(
    model: DeepUFM, layer: int, per_sample: bool = False, relu_tol: float = 0.0
) -> Tensor:
    """``A^{(l)}``, the map from ``h^{(l)}`` to ``z``: ``1 <= layer <= L``.

    ``per_sample=False``: the weight product ``W_L ... W_l`` ``(K, d_in)`` (no activations).
    ``per_sample=True``: the per-sample ``A^{(l)}_{ic} = W_L D^{(L)}_{ic} ... W_l D^{(l)}_{ic}
    = dz_ic / du^{(l)}_ic`` ``(N, K, d_in)``, the ReLU masks ``D^{(m)}_{ic} = diag sigma'(u^{(m)}_ic)``
    (sigma'(0)=1, entries ``>= -relu_tol max|U_m|`` count as non-negative) *including the trailing*
    ``D^{(l)}``: the map from the pre-activation, not from ``h^{(l)}``. Layer 1 has no activation
    (``h^{(1)}`` are the free features), so there it is ``dz/dh^{(1)} = A^{(2)}_{ic} W_1``; in the
    linear model every sample has the same ``W_L ... W_l``.
    """
    if per_sample:
        A = layer_jacobian(model, layer, relu_tol).per_sample_A @ model.W[layer - 1]
        if model.config.activation == "relu" and layer >= 2:
            U = model.preactivations()[layer - 2]  # u^{(l)} = W_{l-1} h^{(l-1)}, (d_in, N)
            A = A * relu_derivative(U, relu_tol).T.unsqueeze(1)
        return A
    A = model.W[-1]
    for W in reversed(model.W[layer - 1 : -1]):
        A = A @ W
    return A


def nc3_row_alignment(A: Tensor, M: Tensor) -> float:
    """Form (a): ``min_c cos^2(a_c, mu_c)`` for the rows of ``A`` ``(K, d)`` and the columns of
    ``M`` ``(d, K)``; 1 at DNC (Dang et al. 2023, v1). A zero row or mean counts as 0."""
    num = (A * M.T).sum(dim=1) ** 2
    den = (A * A).sum(dim=1) * (M * M).sum(dim=0)
    ok = den > 0
    return float(torch.where(ok, num / torch.where(ok, den, 1), torch.zeros_like(num)).min())


def nc3_row_space_residual(W: Tensor, M: Tensor, rtol: float = 1e-10) -> float:
    """Form (b): ``||W (I - P_M)||_F / ||W||_F`` with ``P_M`` the orthogonal projector on
    ``span M`` (``M`` ``(d_in, K)``; singular values below ``rtol * max`` are dropped): the part
    of ``W``'s row space outside the input class means; 0 at DNC."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    U = U[:, S > rtol * S[0]]
    residual = W - (W @ U) @ U.T
    return float(torch.linalg.norm(residual) / torch.linalg.norm(W))


def nc3_gram(A: Tensor) -> Tensor:
    """Forms (c)/(d): ``O = Ã Ã^T`` with ``Ã = A / rms_c ||a_c||`` (v1 Tables 3–4): ``(K, K)``.

    ``A`` ``(K, d)`` gives (c); per-sample ``A_ic`` ``(N, K, d)`` give (d), the data average
    ``mean_ic A_ic A_ic^T`` with the same normalisation (mean diagonal 1). ``O = I_K`` at DNC.
    Normalisation [U]: dividing by the root-mean-square row norm is our choice.
    """
    G = A @ A.transpose(-1, -2)
    if G.dim() == 3:
        G = G.mean(dim=0)
    return G / (torch.diagonal(G).sum() / G.shape[0])


def nc3_alignment(model: DeepUFM, layer: int, form: str = "a", relu_tol: float = 0.0):
    """One NC3-type alignment of layer ``l`` (``1 <= l <= L``), form (a)–(d) (module docstring).

    (a) ``float``: ``min_c cos^2(a^{(l)}_c, mu^{(l)}_c)`` with ``A^{(l)} = W_L ... W_l``;
    (b) ``float``: row-space residual of ``W_l`` outside ``span M_l``;
    (c) ``(K, K)`` tensor: normalised ``A^{(l)} A^{(l)T}``;
    (d) ``(K, K)`` tensor: normalised data average of ``A^{(l)}_{ic} A^{(l)T}_{ic}`` with
    ``A^{(l)}_{ic} = dz_ic/du^{(l)}_ic`` as :func:`back_product` with ``per_sample=True`` defines
    it (ReLU masks up to and including ``D^{(l)}``).
    """
    if form not in NC3_FORMS:
        raise ValueError(f"form={form!r} must be one of {NC3_FORMS}")
    if not 1 <= layer <= model.config.L:
        raise ValueError(f"layer={layer} must be in [1, L={model.config.L}]")
    M = class_means(model.features()[layer - 1], model.config.K)
    if form == "a":
        return nc3_row_alignment(back_product(model, layer), M)
    if form == "b":
        return nc3_row_space_residual(model.W[layer - 1], M)
    return nc3_gram(back_product(model, layer, per_sample=form == "d", relu_tol=relu_tol))

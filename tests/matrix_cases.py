"""Shared cases and independent references for the structured-matrix tests.

Everything here is built from the definitions (``deepufm.models.functional`` and ``torch.func``) or
from the formulas of THEORY §4, never from ``deepufm.matrices`` or ``deepufm.theory``.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import brentq
from torch.func import hessian, jacrev

from deepufm import DeepUFM, UFMConfig
from deepufm.models import functional as Fn

# (K, n, d, L, activation, loss, regularisation). "Gram" cases have N*K < d^2 (the NK x NK Gram
# route of JacobianGram), "dense" cases N*K >= d^2; d > N exercises the zero padding of the
# Kronecker spectrum.
CASES = {
    "lin-mse": dict(K=3, n=4, d=5, L=3, activation="linear", loss="mse", lam=0.01),
    "lin-mse-wide": dict(K=2, n=2, d=6, L=2, activation="linear", loss="mse", lam=0.01),
    "relu-mse-dense": dict(K=3, n=4, d=4, L=3, activation="relu", loss="mse", lam=0.01),
    "relu-mse-gram": dict(K=2, n=2, d=5, L=3, activation="relu", loss="mse", lam=0.01),
    "lin-ce": dict(K=3, n=4, d=5, L=3, activation="linear", loss="ce", lam=0.01),
    "relu-ce-perlayer": dict(
        K=2, n=3, d=4, L=4, activation="relu", loss="ce", lam_W=[0.1, 0.2, 0.3, 0.4], lam_H=0.5
    ),
    "lin-mse-perlayer": dict(
        K=4, n=2, d=4, L=2, activation="linear", loss="mse", lam_W=[0.02, 0.05], lam_H=0.1
    ),
    "lin-ce-gram": dict(K=2, n=2, d=5, L=2, activation="linear", loss="ce", lam=0.01),
}
LAYER_CASES = [(name, l) for name, c in CASES.items() for l in range(1, c["L"] + 1)]


def random_model(name: str | dict, seed: int = 0, init_std: float = 0.8) -> DeepUFM:
    """A random, non-optimal point; ``init_std`` of order 1 keeps ReLU masks mixed and the softmax
    away from saturation."""
    kw = CASES[name] if isinstance(name, str) else name
    return DeepUFM.init(UFMConfig(**kw, init_std=init_std, seed=seed, device="cpu"))


def replace_weights(model: DeepUFM, layers, w: torch.Tensor) -> list[torch.Tensor]:
    """``model.W`` with the layers in ``layers`` read from the concatenated row-major ``w``."""
    Ws, start = list(model.W), 0
    for l in layers:
        shape = model.W[l - 1].shape
        Ws[l - 1] = w[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
    return Ws


def data_loss_of(model: DeepUFM, layers):
    cfg = model.config

    def f(w):
        Z = Fn.forward(model.H1, replace_weights(model, layers, w), cfg.activation)[-1]
        return Fn.data_loss(Z, cfg.loss, cfg.K, cfg.n)

    return f


def flat_weights(model: DeepUFM, layers) -> torch.Tensor:
    return torch.cat([model.W[l - 1].reshape(-1) for l in layers])


def dense_hessian(model: DeepUFM, layers) -> torch.Tensor:
    """``torch.func.hessian`` of the data loss over ``[vec W_l]_{l in layers}``."""
    layers = tuple(layers)
    return hessian(data_loss_of(model, layers))(flat_weights(model, layers))


def dense_gauss_newton(model: DeepUFM, layers) -> torch.Tensor:
    """``1/N sum_ic J_ic^T B_ic J_ic`` from ``jacrev`` of the logits and the loss Hessian in ``z``."""
    cfg = model.config
    layers = tuple(layers)

    def logits(w):
        return Fn.forward(model.H1, replace_weights(model, layers, w), cfg.activation)[-1]

    J = jacrev(logits)(flat_weights(model, layers))  # (K, N, P)
    J = J.permute(1, 0, 2)  # (N, K, P)
    if cfg.loss == "mse":
        B = torch.eye(cfg.K).expand(cfg.N, cfg.K, cfg.K)
    else:
        p = torch.softmax(logits(flat_weights(model, layers)), dim=0).T
        B = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("nkp,nkj,njq->pq", J, B, J) / cfg.N


def jacobian_rows_ref(model: DeepUFM, l: int) -> torch.Tensor:
    """Papyan's rows from ``jacrev``: ``(K, n, K, p)`` indexed ``(c, i, c')``; unit rows for MSE,
    ``sqrt(p_c') (v_c' - sum_k p_k v_k)`` for CE."""
    cfg = model.config

    def logits(w):
        return Fn.forward(model.H1, replace_weights(model, (l,), w), cfg.activation)[-1]

    w = model.W[l - 1].reshape(-1)
    v = jacrev(logits)(w).permute(1, 0, 2)  # (N, K, p)
    if cfg.loss == "ce":
        p = torch.softmax(logits(w), dim=0).T  # (N, K)
        v = p.sqrt().unsqueeze(2) * (v - torch.einsum("nk,nkq->nq", p, v).unsqueeze(1))
    return v.reshape(cfg.K, cfg.n, cfg.K, -1)


# -- the exact DNC optimum of the linear MSE model (THEORY §4.2-4.3), built from the formulas ------
def output_scale(cfg: UFMConfig, root: str = "larger") -> float:
    """``c``: the larger root in ``(0, 1)`` of ``(1 - c) c^{(L-1)/(L+1)} = b`` (THEORY §4.2);
    ``root="smaller"``: the other one, in ``(0, c_m)`` (``L >= 2``), a maximum of the reduced loss."""
    L = cfg.L
    b = cfg.K * (cfg.n * cfg.lam_H * math.prod(cfg.lam_W)) ** (1 / (L + 1))
    if L == 1 and root == "larger":
        return 1 - b
    p = (L - 1) / (L + 1)
    c_m = p / (1 + p)
    lo, hi = (c_m, 1.0) if root == "larger" else (0.0, c_m)
    return brentq(lambda c: (1 - c) * c**p - b, lo, hi, xtol=1e-15, rtol=1e-15)


def dnc_optimum(
    cfg: UFMConfig, seed: int = 0, permutations: bool = False, root: str = "larger"
) -> DeepUFM:
    """THEORY §4.3: ``H_1 = h U_0^K ⊗ 1_n^T``, ``W_l = omega_l U_l^K U_{l-1}^{K T}``,
    ``W_L = omega_L U_{L-1}^{K T}`` with ``tau = c(1-c)/K``, ``omega_l = sqrt(tau/lam_l)``,
    ``h = sqrt(tau/(n lam_H))``. ``permutations`` makes ``U_1..U_{L-1}`` permutation matrices (the
    non-negative ReLU point of Definition 2). ``root="smaller"`` builds the same critical point
    from the smaller root ``c`` of §4.2: a saddle, not the optimum."""
    gen = torch.Generator().manual_seed(seed)
    d, K, n, L = cfg.d, cfg.K, cfg.n, cfg.L
    c = output_scale(cfg, root)
    tau = c * (1 - c) / K

    def orth(i: int) -> torch.Tensor:
        if permutations and i > 0:
            return torch.eye(d)[:, torch.randperm(d, generator=gen)]
        return torch.linalg.qr(torch.randn(d, d, generator=gen))[0]

    U = [orth(i)[:, :K] for i in range(L)]
    h = math.sqrt(tau / (n * cfg.lam_H))
    H1 = h * U[0].repeat_interleave(n, dim=1)
    omega = [math.sqrt(tau / lam) for lam in cfg.lam_W]
    W = [omega[l - 1] * U[l] @ U[l - 1].T for l in range(1, L)]
    W.append(omega[L - 1] * U[L - 1].T)
    return DeepUFM(cfg, H1, W)


def layer_outlier(cfg: UFMConfig, l: int) -> float:
    """``Lambda_l = c lam_l / (1 - c)`` (THEORY §6)."""
    c = output_scale(cfg)
    return c * cfg.lam_W[l - 1] / (1 - c)


def rank(vals: torch.Tensor, rtol: float = 1e-8) -> int:
    return int((vals > rtol * vals.abs().max()).sum())


def assert_top_eigenpairs(vals: torch.Tensor, vecs: torch.Tensor, ref: torch.Tensor, k: int):
    """``(vals, vecs)`` ``(k,)``, ``(p, k)`` are the ``k`` algebraically largest eigenpairs of the
    dense symmetric ``ref`` ``(p, p)``: the values are dense ``eigvalsh``'s top ``k`` (nothing larger
    was missed, every copy of a repeated value counted), every pair has ``||ref v - theta v||``
    below ``1e-9`` of the spectral radius, and the vectors are orthonormal (``max|V^T V - I|``)."""
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    scale = float(ref_vals.abs().max())
    assert vals.shape == (k,) and vecs.shape == (ref.shape[0], k)
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-10 * scale)
    residual = float(torch.linalg.vector_norm(ref @ vecs - vecs * vals, dim=0).max())
    assert residual <= 1e-9 * scale, f"k={k}: max ||Hv - theta v|| = {residual:.3g} of {scale:.3g}"
    orth = float((vecs.T @ vecs - torch.eye(k, dtype=vecs.dtype)).abs().max())
    assert orth <= 1e-9, f"k={k}: max |V^T V - I| = {orth:.3g}"

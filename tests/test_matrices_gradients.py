"""Gradients, gradient covariance, back-propagated errors, weights and feature Grams (THEORY M4, M5,
M8–M10): against dense torch.func autograd at random points, and against THEORY §6 (Thm 3, 4, 10,
11, E.3) at an exact optimum built here by hand from THEORY §4.3."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch.func import grad, jacrev

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import (
    GradientCovariance,
    backprop_error_matrix,
    backprop_errors,
    data_gradient,
    feature_gram,
    gradient_covariance,
    per_sample_gradients,
    weight_gram,
    weight_singular_values,
    weight_svd,
)
from deepufm.models import functional as Fn
from matrix_cases import assert_top_eigenpairs

REGISTRY = [
    dict(K=3, n=4, d=5, L=3, activation="linear", loss="mse", lam=0.01),
    dict(K=3, n=4, d=5, L=3, activation="relu", loss="mse", lam=0.01),
    dict(K=3, n=4, d=5, L=3, activation="linear", loss="ce", lam=0.01),
    dict(K=2, n=3, d=4, L=4, activation="relu", loss="ce", lam_W=[0.1, 0.2, 0.3, 0.4], lam_H=0.5),
    # N = 12 >= p = 9 for the hidden layer: the covariance's dense branch
    dict(K=2, n=6, d=3, L=2, activation="relu", loss="mse", lam_W=[0.02, 0.05], lam_H=0.1),
]
CASES = [(i, l) for i, c in enumerate(REGISTRY) for l in range(1, c["L"] + 1)]
RTOL = 1e-10


def random_model(i: int, seed: int = 0) -> DeepUFM:
    return DeepUFM.init(UFMConfig(**REGISTRY[i], init_std=0.8, seed=seed, device="cpu"))


def close(actual, expected, rtol=RTOL):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def logits_with(model: DeepUFM, l: int, w: torch.Tensor) -> torch.Tensor:
    Ws = list(model.W)
    Ws[l - 1] = w.reshape(model.W[l - 1].shape)
    return Fn.forward(model.H1, Ws, model.config.activation)[-1]


def sample_losses(Z: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """``l_ic`` for every column of ``Z`` ``(K, N)`` with integer labels ``(N,)``: ``(N,)``."""
    if loss == "mse":
        Y = F.one_hot(labels, Z.shape[0]).T.to(Z.dtype)
        return 0.5 * ((Z - Y) ** 2).sum(dim=0)
    return F.cross_entropy(Z.T, labels, reduction="none")


def dense_per_sample_gradients(model: DeepUFM, l: int) -> torch.Tensor:
    cfg = model.config
    labels = Fn.class_index(cfg.K, cfg.n)
    f = lambda w: sample_losses(logits_with(model, l, w), labels, cfg.loss)  # noqa: E731
    return jacrev(f)(model.W[l - 1].reshape(-1))


# --------------------------------------------------------------------------------------------
# random, non-optimal points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("i", "l"), CASES)
def test_gradients_match_autograd(i, l):
    model = random_model(i)
    cfg = model.config
    ref = dense_per_sample_gradients(model, l)
    close(per_sample_gradients(model, l), ref)
    f = lambda w: Fn.data_loss(logits_with(model, l, w), cfg.loss, cfg.K, cfg.n)  # noqa: E731
    g_ref = grad(f)(model.W[l - 1].reshape(-1))
    close(data_gradient(model, l), g_ref)
    close(ref.mean(dim=0), g_ref)  # the data gradient is the mean of the per-sample ones


@pytest.mark.parametrize(("i", "l"), CASES)
def test_gradient_covariance_matches_autograd(i, l):
    model = random_model(i, seed=1)
    G = dense_per_sample_gradients(model, l)
    Gc = G - G.mean(dim=0)
    ref = Gc.T @ Gc / G.shape[0]
    cov = gradient_covariance(model, l)
    assert isinstance(cov, GradientCovariance)
    close(cov.dense(), ref)
    V = torch.randn(cov.size, 3)
    close(cov.matmat(V), ref @ V)
    close(cov.mean, G.mean(dim=0))
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    top = float(ref_vals[0])
    torch.testing.assert_close(cov.eigvalsh(), ref_vals, rtol=0, atol=1e-10 * top)
    close(cov.trace(), torch.trace(ref))
    k = min(3, cov.N - 1)
    vals, vecs = cov.topk(k)
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-10 * top)
    torch.testing.assert_close(ref @ vecs, vecs * vals, rtol=0, atol=1e-9 * top)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k), rtol=0, atol=1e-9)
    all_vals, all_vecs = cov.eigh()  # all p pairs, the Gram's null space completed
    assert all_vals.shape == (cov.size,)
    torch.testing.assert_close(all_vals, ref_vals, rtol=0, atol=1e-10 * top)
    torch.testing.assert_close(all_vecs.T @ all_vecs, torch.eye(cov.size), rtol=0, atol=1e-9)
    torch.testing.assert_close(ref @ all_vecs, all_vecs * all_vals, rtol=0, atol=1e-9 * top)
    # k beyond N (rank <= N - 1): every pair, exact zeros with an orthonormal null basis
    k = min(cov.N + 3, cov.size)
    result = cov.topk(k)
    vals, vecs = result
    assert result.certified and vals.shape == (k,) and vecs.shape == (cov.size, k)
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-10 * top)
    torch.testing.assert_close(ref @ vecs, vecs * vals, rtol=0, atol=1e-9 * top)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k), rtol=0, atol=1e-9)


def dense_backprop_error_matrix(model: DeepUFM, l: int, loss: str) -> torch.Tensor:
    """``1/N sum_ic sum_c' delta delta^T`` with ``delta_icc' = grad_{u^{(l+1)}_ic} l(z_ic; c')``
    from autograd through the rest of the network (``u^{(l+1)} = W_l H_l``)."""
    cfg = model.config
    Hs = model.features()
    U = model.W[l - 1] @ Hs[l - 1]

    def rest(U):  # the logits from the pre-activation at the output of W_l
        if l == cfg.L:
            return U
        return Fn.forward(Fn.activate(U, cfg.activation), model.W[l:], cfg.activation)[-1]

    out = torch.zeros(U.shape[0], U.shape[0])
    for cp in range(cfg.K):
        labels = torch.full((cfg.N,), cp)
        D = grad(lambda U, labels=labels: sample_losses(rest(U), labels, loss).sum())(U)
        out = out + D @ D.T  # samples are independent: column ic of D is delta_icc'
    return out / cfg.N


@pytest.mark.parametrize(("i", "l"), CASES)
def test_backprop_error_matrix_matches_autograd(i, l):
    model = random_model(i, seed=2)
    # THEORY M9 form (1/2 ||z - e_c'||^2 for every model) and the model's own loss
    for form, loss in [("mse", "mse"), ("loss", model.config.loss)]:
        ref = dense_backprop_error_matrix(model, l, loss)
        S = backprop_error_matrix(model, l, form=form)
        close(S.dense(), ref)
        torch.testing.assert_close(
            S.eigvalsh(), torch.linalg.eigvalsh(ref).flip(0), rtol=0, atol=1e-10 * float(ref.max())
        )
    with pytest.raises(ValueError):
        backprop_errors(model, l, form="ce")
    # the ordinary back-propagated error is the case c' = c, and it gives the per-sample gradient
    cfg = model.config
    deltas = backprop_errors(model, l, form="loss")
    own = deltas[torch.arange(cfg.N), Fn.class_index(cfg.K, cfg.n)]  # (N, d_out)
    H = model.features()[l - 1]
    close(torch.einsum("nd,en->nde", own, H).reshape(cfg.N, -1), per_sample_gradients(model, l))


@pytest.mark.parametrize(("i", "l"), CASES)
def test_weights_and_feature_grams(i, l):
    model = random_model(i, seed=4)
    W = model.W[l - 1]
    H = Fn.forward(model.H1, model.W, model.config.activation)[l - 1]
    close(feature_gram(model, l).dense(), H @ H.T)
    close(weight_gram(model, l).dense(), W.T @ W)
    close(weight_gram(model, l, side="left").dense(), W @ W.T)
    U, S, V = weight_svd(model, l)
    close(U @ torch.diag(S) @ V.T, W)
    close(U.T @ U, torch.eye(S.numel()))
    close(V.T @ V, torch.eye(S.numel()))
    close(weight_singular_values(model, l), S)
    close(weight_gram(model, l).eigvalsh()[: S.numel()], S**2)
    assert torch.all(S[:-1] >= S[1:])


def test_feature_gram_of_the_logits_and_bad_layers():
    model = random_model(0)
    Z = model.output()
    close(feature_gram(model, model.config.L + 1).dense(), Z @ Z.T)
    with pytest.raises(ValueError):
        weight_svd(model, 0)
    with pytest.raises(ValueError):
        feature_gram(model, model.config.L + 2)
    with pytest.raises(ValueError):
        weight_gram(model, 1, side="middle")


# --------------------------------------------------------------------------------------------
# the exact optimum (THEORY §4.2–4.3), built by hand
# --------------------------------------------------------------------------------------------


def output_scale(cfg: UFMConfig) -> float:
    """``c``: the larger root in ``(0, 1)`` of ``(1 - c) c^{(L-1)/(L+1)} = b`` (THEORY §4.2)."""
    L = cfg.L
    b = cfg.K * (cfg.n * cfg.lam_H * math.prod(cfg.lam_W)) ** (1 / (L + 1))
    p = (L - 1) / (L + 1)
    c_m = p / (1 + p)
    return brentq(lambda c: (1 - c) * c**p - b, c_m, 1.0, xtol=1e-15, rtol=1e-15)


def optimum(cfg: UFMConfig, permutations: bool = False, seed: int = 0) -> tuple[DeepUFM, float]:
    """THEORY §4.3: ``H_1 = h U_0^K ⊗ 1_n^T``, ``W_l = omega_l U_l^K U_{l-1}^{K T}``,
    ``W_L = omega_L U_{L-1}^{K T}``; permutation frames give the ReLU Definition-2 point (§7)."""
    K, d, L = cfg.K, cfg.d, cfg.L
    c = output_scale(cfg)
    tau = c * (1 - c) / K
    gen = torch.Generator().manual_seed(seed)
    if permutations:
        frames = [torch.eye(d)[:, torch.randperm(d, generator=gen)] for _ in range(L)]
    else:
        frames = [torch.linalg.qr(torch.randn(d, d, generator=gen))[0] for _ in range(L)]
    U = [f[:, :K] for f in frames]
    omega = [math.sqrt(tau / lam) for lam in cfg.lam_W]
    H1 = math.sqrt(tau / (cfg.n * cfg.lam_H)) * U[0].repeat_interleave(cfg.n, dim=1)
    W = [omega[l - 1] * U[l] @ U[l - 1].T for l in range(1, L)] + [omega[-1] * U[-1].T]
    return DeepUFM(cfg, H1, W), c


OPTIMA = [
    (dict(K=3, n=3, d=5, L=3, lam=0.01), False),
    (dict(K=3, n=2, d=5, L=3, lam_W=[0.01, 0.03, 0.02], lam_H=0.005), False),
    (dict(K=4, n=2, d=6, L=2, lam_W=[0.004, 0.01], lam_H=0.02), False),
    (dict(K=3, n=2, d=4, L=3, activation="relu", lam=0.01), True),  # Theorem 7
]
OPT_CASES = [(j, l) for j, (c, _) in enumerate(OPTIMA) for l in range(1, c["L"] + 1)]


def build_optimum(j: int) -> tuple[DeepUFM, float]:
    kw, perm = OPTIMA[j]
    return optimum(UFMConfig(**kw, device="cpu"), permutations=perm)


def test_the_hand_built_point_is_the_optimum():
    for j in range(len(OPTIMA)):
        model, c = build_optimum(j)
        close(model.output(), c * model.labels(), rtol=1e-12)
        H1 = model.H1.clone().requires_grad_(True)
        Ws = [W.clone().requires_grad_(True) for W in model.W]
        loss = model.loss_fn()(H1, Ws)
        grads = torch.autograd.grad(loss, [H1, *Ws])
        assert max(float(g.abs().max()) for g in grads) < 1e-12


def tail_max(x: torch.Tensor) -> float:
    """``max |x|`` (0 for an empty tensor)."""
    return float(x.abs().max()) if x.numel() else 0.0


def span_distance(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal-angle sine between ``span A`` and ``span B`` (equal dimension)."""
    Qa, Qb = torch.linalg.qr(A)[0], torch.linalg.qr(B)[0]
    return float(torch.linalg.norm(Qb - Qa @ (Qa.T @ Qb), ord=2))


@pytest.mark.parametrize(("j", "l"), OPT_CASES)
def test_optimum_gradients_and_gradient_covariance(j, l):
    """Thm 3: ``tilde g_l = -lambda_l w_l``; Thm 10: ``g_ic = -(1-c) beta mu'_c ⊗ mu_c``, and
    ``Sigma_g`` has rank ``K - 1``, eigenvalue ``c (1-c) lambda_l``, ETF eigenvectors."""
    model, c = build_optimum(j)
    cfg = model.config
    K, n, lam = cfg.K, cfg.n, cfg.lam_W[l - 1]
    Hs = model.features()
    mu_in = Hs[l - 1][:, ::n]  # DNC1: every sample equals its class mean
    mu_out = Hs[l][:, ::n]
    beta = c / float((mu_out[:, 0] ** 2).sum())
    close(data_gradient(model, l), -lam * model.W[l - 1].reshape(-1), rtol=1e-11)
    pairs = torch.stack([torch.kron(mu_out[:, k], mu_in[:, k]) for k in range(K)])  # (K, p)
    close(per_sample_gradients(model, l), -(1 - c) * beta * pairs.repeat_interleave(n, dim=0))
    cov = gradient_covariance(model, l)
    vals = cov.eigvalsh()
    expected = c * (1 - c) * lam
    close(vals[: K - 1], torch.full((K - 1,), expected))
    assert float(vals[K - 1 :].abs().max()) < 1e-10 * expected
    G = dense_per_sample_gradients(model, l)
    ref = (G - G.mean(dim=0)).T @ (G - G.mean(dim=0)) / G.shape[0]
    top, vecs = cov.topk(K - 1)  # K - 1 equal values: every copy, orthonormal
    assert_top_eigenpairs(top, vecs, ref, K - 1)
    close(top, torch.full((K - 1,), expected))
    etf = (pairs - pairs.mean(dim=0)).T[:, : K - 1]
    assert span_distance(vecs, etf) < 1e-8


@pytest.mark.parametrize(("j", "l"), OPT_CASES)
def test_optimum_backprop_errors(j, l):
    """Thm 11: eigenvalues ``(1+c^2) c^2/||mu'||^2`` (``K-1``, on ``mu'_c - mu'_G``) and
    ``(1-c)^2 c^2/||mu'||^2`` (on ``mu'_G``), rank ``K``."""
    model, c = build_optimum(j)
    cfg = model.config
    K, n = cfg.K, cfg.n
    mu_out = model.features()[l][:, ::n]
    s = c**2 / float((mu_out[:, 0] ** 2).sum())
    S = backprop_error_matrix(model, l)
    vals, vecs = S.eigh()
    close(vals[: K - 1], torch.full((K - 1,), (1 + c**2) * s))
    close(vals[K - 1], torch.tensor((1 - c) ** 2 * s))
    assert tail_max(vals[K:]) < 1e-10 * s
    mu_G = mu_out.mean(dim=1, keepdim=True)
    assert span_distance(vecs[:, K - 1 : K], mu_G) < 1e-8
    assert span_distance(vecs[:, : K - 1], (mu_out - mu_G)[:, : K - 1]) < 1e-8
    if l == cfg.L:  # single lambda closed form: c^2/||mu'||^2 = (c^2 n)^{(L-l)/(L+1)} = 1
        assert s == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(("j", "l"), OPT_CASES)
def test_optimum_weights_and_feature_gram(j, l):
    """Thm 4: ``W_l = omega_l sum_c hat mu'_c hat mu_c^T`` (``K`` singular values ``omega_l``);
    E.3: ``H_l H_l^T = n sum_c mu_c mu_c^T`` (``K`` eigenvalues ``n ||mu||^2``)."""
    model, c = build_optimum(j)
    cfg = model.config
    K, n, lam = cfg.K, cfg.n, cfg.lam_W[l - 1]
    Hs = model.features()
    mu_in, mu_out = Hs[l - 1][:, ::n], Hs[l][:, ::n]
    omega = math.sqrt(c * (1 - c) / (K * lam))
    U, S, V = weight_svd(model, l)
    close(S[:K], torch.full((K,), omega))
    assert tail_max(S[K:]) < 1e-12 * omega
    assert span_distance(U[:, :K], mu_out) < 1e-10
    assert span_distance(V[:, :K], mu_in) < 1e-10
    hat = lambda M: M / torch.linalg.norm(M, dim=0)  # noqa: E731
    close(model.W[l - 1], omega * hat(mu_out) @ hat(mu_in).T)
    close(weight_gram(model, l).eigvalsh()[:K], torch.full((K,), omega**2))
    G = feature_gram(model, l)
    r2 = float((mu_in[:, 0] ** 2).sum())
    vals = G.eigvalsh()
    close(vals[:K], torch.full((K,), n * r2))
    assert tail_max(vals[K:]) < 1e-10 * n * r2
    close(G.dense(), n * mu_in @ mu_in.T)

"""The closed-form theory against independent computations: dense torch.func autograd of the
model's own loss, brute-force minimisation, and hand-checkable identities. No deepufm.matrices."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch.func import hessian, jacrev

from deepufm import ConfigError, DeepUFM, UFMConfig
from deepufm.cli import main
from deepufm.metrics import class_means
from deepufm.models import functional as Fn
from deepufm.theory import (
    b_crit,
    block_prediction,
    ce_constants,
    ce_dnc_point,
    ce_predictions,
    dnc_constant,
    dnc_constants,
    dnc_optimum,
    fold_point,
    predictions,
    reduced_loss,
)
from matrix_cases import dnc_optimum as built_from_formulas

CONFIGS = [
    UFMConfig(K=3, n=5, d=7, L=4, lam=0.01, device="cpu", seed=1),
    UFMConfig(K=4, n=3, d=6, L=3, lam_W=[0.01, 0.02, 0.005], lam_H=0.03, device="cpu", seed=2),
    UFMConfig(K=2, n=4, d=3, L=2, lam=0.05, device="cpu", seed=3),
]
CASES = [(i, l) for i, c in enumerate(CONFIGS) for l in range(1, c.L + 1)]


# -- dense references ---------------------------------------------------------------------------
def _with_layer(model, l, w):
    Ws = list(model.W)
    Ws[l - 1] = w.reshape(model.W[l - 1].shape)
    return Ws


def dense_hessian(model, l, relu=Fn.relu):
    cfg = model.config

    def loss(w):
        X = model.H1
        Ws = _with_layer(model, l, w)
        for m, W in enumerate(Ws, start=1):
            X = W @ X
            if cfg.activation == "relu" and m < cfg.L:
                X = relu(X)
        return Fn.data_loss(X, cfg.loss, cfg.K, cfg.n)

    return hessian(loss)(model.W[l - 1].reshape(-1))


def jacobian_rows(model, l):
    """``v_icc'`` as an ``(N, K, p)`` tensor, by reverse-mode autograd of the logits."""
    cfg = model.config
    J = jacrev(lambda w: Fn.forward(model.H1, _with_layer(model, l, w), cfg.activation)[-1])(
        model.W[l - 1].reshape(-1)
    )  # (K, N, p)
    return J.permute(1, 0, 2)


def per_sample_gradients(model, l):
    cfg = model.config
    Y = Fn.labels(cfg.K, cfg.n)

    def losses(w):
        Z = Fn.forward(model.H1, _with_layer(model, l, w), cfg.activation)[-1]
        return 0.5 * ((Z - Y) ** 2).sum(dim=0)

    return jacrev(losses)(model.W[l - 1].reshape(-1))  # (N, p)


def top_eigs(M):
    return torch.linalg.eigvalsh(M).flip(0)


def rank(vals, rel=1e-8):
    return int((vals.abs() > rel * vals.abs().max()).sum())


def assert_same_span(pred_vectors, M, r):
    """The predicted vectors span exactly the top-``r`` eigenspace of ``M`` (principal angles 0)."""
    U, S, _ = torch.linalg.svd(pred_vectors, full_matrices=False)
    assert int((S > 1e-10 * S[0]).sum()) == r
    _, vecs = torch.linalg.eigh(M)
    top = vecs[:, -r:]
    cosines = torch.linalg.svdvals(U[:, :r].T @ top)
    assert float(cosines.min()) == pytest.approx(1.0, abs=1e-8)


# -- the constant c and the threshold -------------------------------------------------------------
@pytest.mark.parametrize(("b", "L"), [(0.05, 5), (0.001, 3), (0.2, 2), (0.15, 4), (0.3, 1)])
def test_c_solves_its_equation_and_minimises_the_reduced_loss(b, L):
    c = dnc_constant(b, L)
    assert (1 - c) * c ** ((L - 1) / (L + 1)) == pytest.approx(b, rel=1e-13)
    assert c > fold_point(L)[0]
    grid = np.linspace(1e-6, 1, 200001)
    c_grid = grid[np.argmin(reduced_loss(grid, b, L))]
    res = minimize_scalar(
        lambda x: reduced_loss(x, b, L),
        bounds=(max(c_grid - 1e-4, 0), min(c_grid + 1e-4, 1)),
        method="bounded",
        options={"xatol": 1e-12},
    )
    assert c == pytest.approx(res.x, abs=1e-6)


def test_reference_constants_of_the_v1_configuration():
    k = dnc_constants(UFMConfig(K=3, n=40, d=60, L=5, lam=0.01))
    assert k.b == pytest.approx(0.0555, abs=1e-4) and k.b_crit == pytest.approx(0.172, abs=1e-3)
    assert k.c == pytest.approx(0.94228, abs=5e-6)
    assert k.hessian_eigenvalue[2] == pytest.approx(0.163243, abs=5e-7)
    assert k.omega2[2] == pytest.approx(1.81302, abs=5e-6)
    assert k.loss == pytest.approx(0.164838, abs=5e-7)
    # single-lambda closed forms of v2 (THEORY §4.2, §11)
    c, n, L, K = k.c, 40, 5, 3
    assert k.omega2[0] == pytest.approx(c ** (2 / (L + 1)) * n ** (1 / (L + 1)), rel=1e-12)
    assert k.hessian_eigenvalue[0] == pytest.approx(
        c ** (2 * L / (L + 1)) / (K * n ** (1 / (L + 1))), rel=1e-12
    )
    for l in range(1, L + 2):
        assert k.mean_norm2[l - 1] == pytest.approx(
            c ** (2 * l / (L + 1)) * n ** (-(L + 1 - l) / (L + 1)), rel=1e-12
        )


def test_b_crit_values():
    assert b_crit(1) == 1.0
    assert b_crit(2) == pytest.approx(1 / 2 ** (4 / 3), rel=1e-15)
    # At b = b_crit, c = (L-1)/L and the DNC loss ties with the zero solution (1/2).
    for L in (2, 3, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = dnc_constant(b_crit(L), L)
        assert c == pytest.approx((L - 1) / L, rel=1e-9)
        assert 0.5 * (1 - c) * (1 + L * c) == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("L", [2, 4])
def test_dnc_beats_zero_just_below_the_threshold_and_loses_just_above(L):
    K, n = 3, 10
    lam_crit = b_crit(L) / (K * n ** (1 / (L + 1)))
    below = dnc_constants(UFMConfig(K=K, n=n, d=4, L=L, lam=lam_crit * (1 - 1e-3)))
    assert below.loss < 0.5
    with pytest.warns(UserWarning, match="b_crit"):
        above = dnc_constants(UFMConfig(K=K, n=n, d=4, L=L, lam=lam_crit * (1 + 1e-3)))
    assert above.loss > 0.5
    # The optimum built from the constants has exactly that loss.
    m = dnc_optimum(UFMConfig(K=K, n=n, d=4, L=L, lam=lam_crit * (1 - 1e-3), device="cpu"))
    assert float(m.total_loss()) == pytest.approx(below.loss, rel=1e-12)


def test_no_root_names_b_and_b_crit():
    with pytest.raises(ConfigError) as info:
        dnc_constant(0.5, 5)
    assert "b_crit" in str(info.value) and "b=0.5" in str(info.value)


# -- the exact optimum -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS)
def test_optimum_is_critical_with_the_closed_form_loss(cfg):
    m = dnc_optimum(cfg)
    params = [p.clone().requires_grad_(True) for p in m.params]
    loss = m.loss_fn()(params[0], params[1:])
    grads = torch.autograd.grad(loss, params)
    gnorm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    pnorm = math.sqrt(sum(float((p**2).sum()) for p in m.params))
    assert gnorm <= 1e-10 * pnorm
    assert float(loss.detach()) == pytest.approx(dnc_constants(cfg).loss, rel=1e-13)
    Z = m.output()
    torch.testing.assert_close(Z, dnc_constants(cfg).c * m.labels(), rtol=0, atol=1e-13)


def full_objective(model):
    """The total loss as a function of the flat ``(vec H_1, vec W_1, ..., vec W_L)``, and that
    point of ``model``."""
    shapes = [p.shape for p in model.params]
    loss = model.loss_fn()

    def f(theta):
        parts = [t.reshape(s) for t, s in zip(theta.split([math.prod(s) for s in shapes]), shapes)]
        return loss(parts[0], parts[1:])

    return f, torch.cat([p.reshape(-1) for p in model.params])


def second_order(model):
    """``||grad|| / ||theta||`` and the ascending eigenpairs of the dense ``torch.func`` Hessian of
    the full objective (every parameter, regulariser included)."""
    f, theta = full_objective(model)
    g = torch.func.grad(f)(theta)
    return float(g.norm() / theta.norm()), *torch.linalg.eigh(hessian(f)(theta))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_the_optimum_satisfies_the_second_order_conditions(cfg):
    """At the claimed minimum the gradient vanishes and the Hessian of the full objective is PSD
    (its zeros: the orthogonal freedom of the factors). Random perturbations cannot tell a
    minimum from a saddle (a saddle's few negative directions carry a tiny share of a random
    step), so the check is run on a known saddle too — the same construction from the smaller
    root of the c equation (THEORY §4.2, a maximum of the reduced loss) — and must see it."""
    grad, eig, _ = second_order(dnc_optimum(cfg))
    assert grad <= 1e-10
    assert float(eig[0]) >= -1e-10 * float(eig[-1])
    saddle = built_from_formulas(cfg, seed=cfg.seed, root="smaller")
    grad, eig, vecs = second_order(saddle)
    assert grad <= 1e-10  # a critical point as well: first-order conditions cannot tell
    assert float(eig[0]) < -1e-2 * float(eig[-1])
    # the negative curvature is real: a step along its eigenvector lowers the loss by ~ t^2 |eig|/2
    f, theta = full_objective(saddle)
    t = 1e-3
    drop = float(f(theta)) - float(f(theta + t * vecs[:, 0]))
    assert drop == pytest.approx(-0.5 * t**2 * float(eig[0]), rel=1e-2)


# -- every prediction of THEORY §6 against dense autograd ------------------------------------------
@pytest.mark.parametrize(("i", "l"), CASES)
def test_layer_hessian_and_papyan_predictions(i, l):
    cfg = CONFIGS[i]
    K = cfg.K
    m = dnc_optimum(cfg)
    pred = {p.matrix: p for p in predictions(m, l)}
    H = dense_hessian(m, l)
    vals = top_eigs(H)
    Lam = pred["layer_hessian"].eigenvalues[0]
    assert rank(vals) == K * K == pred["layer_hessian"].rank
    torch.testing.assert_close(vals[: K * K], torch.full((K * K,), Lam), rtol=1e-8, atol=0)
    assert float(vals[K * K :].abs().max()) <= 1e-10 * Lam
    assert_same_span(pred["layer_hessian"].vectors, H, K * K)
    # Papyan's decomposition from the Jacobian rows v_icc' (THEORY M3), built densely here.
    v = jacobian_rows(m, l)  # (N, K, p)
    N = cfg.N
    G = torch.einsum("ncp,ncq->pq", v, v) / N
    torch.testing.assert_close(G, H, rtol=0, atol=1e-12 * Lam)  # E_l = 0
    v_cc = v.reshape(K, cfg.n, K, -1).mean(dim=1)  # (c, c', p)
    v_c = v_cc.mean(dim=1)  # (c, p)
    G_class = v_c.T @ v_c
    dev = (v_cc - v_c.unsqueeze(1)).reshape(K * K, -1)
    G_cross = dev.T @ dev / K
    G_within = G - G_class - G_cross
    for name, M, r in (
        ("gauss_newton_class", G_class, K),
        ("gauss_newton_cross", G_cross, K * (K - 1)),
    ):
        e = top_eigs(M)
        assert rank(e) == r == pred[name].rank
        torch.testing.assert_close(e[:r], torch.full((r,), Lam), rtol=1e-8, atol=0)
        assert_same_span(pred[name].vectors, M, r)
    assert float(G_within.abs().max()) <= 1e-10 * Lam
    assert float((G_class @ G_cross).abs().max()) <= 1e-10 * Lam**2
    for name, M in (("knockout_class", H - G_class), ("knockout_cross", H - G_cross)):
        e = top_eigs(M)
        r = pred[name].rank
        assert rank(e) == r
        torch.testing.assert_close(e[:r], torch.full((r,), Lam), rtol=1e-8, atol=0)


@pytest.mark.parametrize(("i", "l"), CASES)
def test_gradient_weight_covariance_backprop_and_gram_predictions(i, l):
    cfg = CONFIGS[i]
    K, n = cfg.K, cfg.n
    m = dnc_optimum(cfg)
    k = dnc_constants(cfg)
    pred = {p.matrix: p for p in predictions(m, l)}
    Hs = m.features()
    M, Mp = class_means(Hs[l - 1], K), class_means(Hs[l], K)
    # Theorem 3: the data gradient is -lam_l vec W_l, parallel to sum_c mu'_c ⊗ mu_c.
    g = per_sample_gradients(m, l).sum(dim=0) / cfg.N
    torch.testing.assert_close(g, -cfg.lam_W[l - 1] * m.W[l - 1].reshape(-1), rtol=1e-9, atol=1e-14)
    direction = pred["data_gradient"].vectors[:, 0]
    assert float(torch.dot(g, direction) ** 2 / (g @ g) / (direction @ direction)) == pytest.approx(
        1.0, abs=1e-10
    )
    G = g.reshape(m.W[l - 1].shape)
    gamma = (Mp.T @ G @ M) ** 2 / (G**2).sum() / torch.outer((Mp**2).sum(0), (M**2).sum(0))
    torch.testing.assert_close(gamma, torch.eye(K) / K, rtol=0, atol=1e-10)
    # Theorem 4: singular values and vectors of W_l.
    W = m.W[l - 1]
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close(s[:K] ** 2, torch.full((K,), k.omega2[l - 1]), rtol=1e-10, atol=0)
    assert all(float(x) <= 1e-10 * float(s[0]) for x in s[K:])
    vecs = pred["weight"].vectors
    left, right = vecs[: W.shape[0]], vecs[W.shape[0] :]
    assert_same_span(left, W @ W.T, K)
    assert_same_span(right, W.T @ W, K)
    # Theorem 10: covariance of per-sample gradients.
    gs = per_sample_gradients(m, l)
    centred = gs - gs.mean(dim=0)
    cov = centred.T @ centred / cfg.N
    e = top_eigs(cov)
    r = pred["gradient_covariance"].rank
    assert rank(e) == r == K - 1
    if r:
        torch.testing.assert_close(
            e[:r], torch.full((r,), k.grad_cov_eigenvalue(l)), rtol=1e-8, atol=0
        )
        assert_same_span(pred["gradient_covariance"].vectors, cov, r)
    # Theorem 11: extended back-propagated errors at the output of W_l, summed over c'.
    A = jacrev(lambda u: Fn.forward(u.unsqueeze(1), m.W[l:], "linear")[-1][:, 0])(
        Hs[l][:, 0]
    )  # (K, d_out)
    Z = Hs[-1]
    deltas = torch.stack([A.T @ (Z - torch.eye(K)[:, [cp]]) for cp in range(K)])  # (K', d_out, N)
    sigma = torch.einsum("aiN,ajN->ij", deltas, deltas) / cfg.N
    e = top_eigs(sigma)
    big, small = pred["backprop_error"].eigenvalues
    assert rank(e, rel=1e-12) == K
    torch.testing.assert_close(e[: K - 1], torch.full((K - 1,), big), rtol=1e-8, atol=0)
    assert float(e[K - 1]) == pytest.approx(small, rel=1e-8)
    # v1 E.3: the feature Gram.
    e = top_eigs(Hs[l - 1] @ Hs[l - 1].T)
    assert rank(e) == K
    torch.testing.assert_close(e[:K], torch.full((K,), n * k.mean_norm2[l - 1]), rtol=1e-10, atol=0)
    assert_same_span(pred["feature_gram"].vectors, Hs[l - 1] @ Hs[l - 1].T, K)


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_block_gauss_newton_theorem_5(cfg):
    m = dnc_optimum(cfg)
    pred = block_prediction(m)
    w = torch.cat([W.reshape(-1) for W in m.W])
    shapes = [W.shape for W in m.W]

    def logits(w):
        Ws, i = [], 0
        for s in shapes:
            Ws.append(w[i : i + s.numel()].reshape(s))
            i += s.numel()
        return Fn.forward(m.H1, Ws, "linear")[-1]

    J = jacrev(logits)(w).permute(1, 0, 2).reshape(cfg.N * cfg.K, -1)
    G = J.T @ J / cfg.N
    e = top_eigs(G)
    K2 = cfg.K**2
    assert rank(e) == K2
    torch.testing.assert_close(e[:K2], torch.full((K2,), pred.eigenvalues[0]), rtol=1e-8, atol=0)
    assert_same_span(pred.vectors, G, K2)
    # E_blk = H_blk - G_blk has the Frobenius size of THEORY §6 (single lambda, all layers).
    if cfg.lam is not None:
        Hb = hessian(lambda w: Fn.data_loss(logits(w), "mse", cfg.K, cfg.n))(w)
        c, L, d, K = dnc_constants(cfg).c, cfg.L, cfg.d, cfg.K
        ratio = float(torch.linalg.norm(Hb - G) / torch.linalg.norm(G))
        assert ratio == pytest.approx(
            (1 - c) / (c * L) * math.sqrt(2 * (L - 1) * (d / K + (L - 2) / 2)), rel=1e-8
        )


# -- ReLU: Definition 2 and Theorem 7 ----------------------------------------------------------------
def test_relu_definition_2_point_obeys_theorem_7_only_with_unit_derivative_at_zero():
    cfg = UFMConfig(K=3, n=2, d=5, L=3, lam=0.01, activation="relu", device="cpu", seed=4)
    m = dnc_optimum(cfg, nonnegative=True)
    assert all(bool((U >= 0).all()) for U in m.preactivations()[:-1])
    linear = DeepUFM(UFMConfig(**{**cfg.to_dict(), "activation": "linear"}), m.H1, m.W)
    assert float(m.total_loss()) == pytest.approx(float(linear.total_loss()), rel=1e-15)
    Lam = dnc_constants(cfg).hessian_eigenvalue[1]
    H_relu = dense_hessian(m, 2)
    torch.testing.assert_close(H_relu, dense_hessian(linear, 2), rtol=0, atol=1e-13)
    e = top_eigs(H_relu)
    assert rank(e) == 9
    torch.testing.assert_close(e[:9], torch.full((9,), Lam), rtol=1e-8, atol=0)
    # PyTorch's own ReLU has derivative 0 at 0: the Hessian loses rank at this point.
    e0 = top_eigs(dense_hessian(m, 2, relu=torch.relu))
    assert rank(e0) < 9


# -- cross-entropy: alpha, the DNC critical point and Theorem 9 ----------------------------------------
@pytest.mark.parametrize(("K", "L"), [(3, 2), (3, 3), (4, 2)])
def test_ce_alpha_critical_point_and_theorem_9_spectrum(K, L):
    cfg = UFMConfig(K=K, n=3, d=K + 2, L=L, lam=0.005, loss="ce", device="cpu", seed=5)
    k = ce_constants(cfg)
    lam, n, a = 0.005, 3, k.alpha
    assert a ** ((L - 1) / (L + 1)) == pytest.approx(
        lam * n ** (1 / (L + 1)) * (math.exp(a) + K - 1), rel=1e-12
    )
    # larger root: the equation's left-minus-right side decreases there
    f = lambda x: (L - 1) / (L + 1) * math.log(x) - math.log(math.exp(x) + K - 1)  # noqa: E731
    assert f(a * 1.001) < f(a)
    m = ce_dnc_point(cfg)
    params = [p.clone().requires_grad_(True) for p in m.params]
    loss = m.loss_fn()(params[0], params[1:])
    grads = torch.autograd.grad(loss, params)
    assert max(float(g.abs().max()) for g in grads) <= 1e-12
    assert float(loss.detach()) == pytest.approx(k.loss, rel=1e-12)
    torch.testing.assert_close(
        m.output(), a * (torch.eye(K) - 1 / K).repeat_interleave(n, dim=1), rtol=0, atol=1e-12
    )
    for l in range(1, L + 1):
        pred = ce_predictions(m, l)[0]
        e = top_eigs(dense_hessian(m, l))
        assert rank(e) == (K - 1) ** 2 == pred.rank
        expected = torch.tensor(
            [v for v, mult in zip(pred.eigenvalues, pred.multiplicities) for _ in range(mult)]
        )
        torch.testing.assert_close(e[: (K - 1) ** 2], expected, rtol=1e-8, atol=0)
        # the dominant eigenvector is sum_c mu'_c ⊗ mu_c
        _, vecs = torch.linalg.eigh(dense_hessian(m, l))
        top, v = vecs[:, -1], pred.vectors[:, 0]
        assert float((top @ v) ** 2 / (v @ v)) == pytest.approx(1.0, abs=1e-8)
        assert pred.eigenvalues[-1] == pytest.approx(a * lam / K, rel=1e-12)


# -- the CLI's public JSON contract -----------------------------------------------------------------------
def test_theory_cli_json_contract(capsys):
    assert (
        main(
            ["theory", "--K", "3", "--n", "40", "--d", "60", "--L", "5", "--lam", "0.01", "--json"]
        )
        == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["c"] == pytest.approx(0.94228, abs=5e-6) and s["loss"] == pytest.approx(
        0.164838, abs=5e-7
    )
    assert s["b"] < s["b_crit"]
    assert len(s["layers"]) == 5 and [e["layer"] for e in s["layers"]] == [1, 2, 3, 4, 5]
    e = s["layers"][2]
    assert e["hessian_eigenvalue"] == pytest.approx(0.163243, abs=5e-7) and e["hessian_rank"] == 9
    assert e["omega2"] == pytest.approx(1.81302, abs=5e-6)
    assert s["block_gn_eigenvalue"] == pytest.approx(5 * e["hessian_eigenvalue"], rel=1e-12)
    for key in (
        "mean_norm2",
        "grad_cov_eigenvalue",
        "backprop_eigenvalues",
        "feature_gram_eigenvalue",
    ):
        assert key in e
    assert (
        main(
            [
                "theory",
                "--K",
                "3",
                "--n",
                "5",
                "--d",
                "6",
                "--L",
                "2",
                "--lam",
                "0.01",
                "--loss",
                "ce",
                "--json",
            ]
        )
        == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["alpha"] > 0 and s["layers"][0]["hessian_multiplicities"] == [1, 2, 1]
    code = main(["theory", "--K", "3", "--n", "40", "--d", "60", "--L", "5", "--lam", "0.5"])
    assert code == 2 and "threshold" in capsys.readouterr().err

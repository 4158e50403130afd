"""Metrics of THEORY §4.1 and §9 on hand-worked cases, against explicit definitions at random
points, and at an exact DNC optimum."""

import math

import numpy as np
import pytest
import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import DenseSymmetric, KroneckerGram, data_gradient, layer_hessian
from deepufm.metrics import (
    back_product,
    basis_coefficients,
    class_means,
    collapse_note,
    effective_rank,
    eigvec_alignment,
    eigvec_alignment_matrix,
    etf_distance,
    gradient_coefficients,
    kron_columns,
    means_degeneracy,
    nc1,
    nc3_alignment,
    nc3_gram,
    nc3_row_alignment,
    nc3_row_space_residual,
    negative_fraction,
    orthogonal_frame_distance,
    outlier_count,
    outlier_stats,
    projection_proportion,
    singular_vector_alignment,
    subspace_overlap,
)
from deepufm.theory import dnc_optimum

t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


# --------------------------------------------------------------------------------------------
# hand-worked cases
# --------------------------------------------------------------------------------------------


def test_eigvec_alignment_by_hand():
    M = torch.diag(t(2.0, 1.0))
    assert float(eigvec_alignment(t(1.0, 0.0), M)) == pytest.approx(1.0)
    # v = (1, 1): v^T M v = 3, ||v||^2 = 2, ||M v||^2 = 5 -> 9 / 10
    assert float(eigvec_alignment(t(1.0, 1.0), M)) == pytest.approx(0.9, rel=1e-15)
    V = torch.stack([t(1.0, 0.0), t(1.0, 1.0), t(0.0, 3.0)], dim=1)
    torch.testing.assert_close(eigvec_alignment(V, M), t(1.0, 0.9, 1.0))
    torch.testing.assert_close(eigvec_alignment(V, DenseSymmetric(M)), t(1.0, 0.9, 1.0))
    # an eigenvector with eigenvalue 0 is not aligned: f = 0
    assert float(eigvec_alignment(t(0.0, 1.0), torch.diag(t(1.0, 0.0)))) == 0.0


def test_alignment_and_gradient_coefficients_in_an_orthogonal_frame():
    """DNC geometry by hand: orthogonal means, ``P = sum mu' mu'^T``, ``Q = sum mu mu^T``; every
    ``mu'_c ⊗ mu_c'`` is an eigenvector (f = 1) and ``g = sum_c mu'_c ⊗ mu_c`` has ``gamma = I/K``."""
    K = 3
    gen = torch.Generator().manual_seed(0)
    mu_out = 2.0 * torch.linalg.qr(torch.randn(5, K, generator=gen))[0]
    mu_in = 0.5 * torch.linalg.qr(torch.randn(4, K, generator=gen))[0]
    kron = KroneckerGram(mu_out.T, mu_in)  # P = mu_out mu_out^T, Q = mu_in mu_in^T
    torch.testing.assert_close(eigvec_alignment_matrix(kron, mu_out, mu_in), torch.ones(K, K))
    general = DenseSymmetric(kron.dense())
    torch.testing.assert_close(eigvec_alignment_matrix(general, mu_out, mu_in), torch.ones(K, K))
    g = sum(torch.kron(mu_out[:, c], mu_in[:, c]) for c in range(K))
    torch.testing.assert_close(gradient_coefficients(g, mu_out, mu_in), torch.eye(K) / K)
    basis = kron_columns(mu_out, mu_in)  # column c*K + c' is mu'_c ⊗ mu_c'
    torch.testing.assert_close(basis[:, 1], torch.kron(mu_out[:, 0], mu_in[:, 1]))
    torch.testing.assert_close(basis_coefficients(g, basis), (torch.eye(K) / K).reshape(-1))


def test_projection_and_overlap_by_hand():
    e = torch.eye(4)
    g = t(3.0, 4.0, 0.0, 0.0)
    assert projection_proportion(g, e[:, :1]) == pytest.approx(9 / 25)
    assert projection_proportion(g, e[:, :2]) == pytest.approx(1.0)
    assert subspace_overlap(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)
    rot = torch.tensor([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    assert subspace_overlap(e[:, [0, 1]], e[:, [0, 1]] @ rot) == pytest.approx(1.0)
    assert subspace_overlap(e[:, [0, 1]], e[:, [2, 3]]) == 0.0


def test_effective_rank_by_hand():
    assert effective_rank(t(1.0, 1.0, 1.0, 0.0)) == pytest.approx(3.0)
    assert effective_rank(t(5.0, 0.0)) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): exp(1/2 log 2 + 1/2 log 4) = 2^{3/2}
    assert effective_rank(t(2.0, 1.0, 1.0)) == pytest.approx(2**1.5, rel=1e-14)
    assert effective_rank(t(1.0, 1.0, -1e-17)) == pytest.approx(2.0)  # round-off clipped
    assert effective_rank(t(0.0, 0.0)) == 0.0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([10, 10, 10, 1, 0.9, 0.5], 3),  # clear gap after three outliers
        ([3, 3, 3, 1e-16, 0, -1e-16], 3),  # exactly low rank: the zeros are below the floor
        ([1, 1, 1, 1], 4),  # flat: no separated group
        ([5, 4, 3, 2, 1.1], 5),  # largest ratio 1.82 < min_gap: no separated group
        ([12, 10, 1e-9, 1e-9, 1e-10, 0], 2),  # bulk above the floor but 1e10 below the spikes
        ([2.0, 1.5, 1.2, -3.0], 3),  # negative eigenvalues never count
        ([8.0, 4.0, 2.0, 1.9], 1),  # equal ratios: the first (fewest outliers) wins
        ([-1.0, -2.0], 0),
        ([7.0], 1),
    ],
)
def test_outlier_count_gap_rule(values, expected):
    vals = torch.tensor(values, dtype=torch.float64)
    assert outlier_count(vals) == expected
    assert outlier_count(vals.flip(0)) == expected  # order of the input does not matter


def test_outlier_count_threshold_rule_and_parameters():
    # the default floor is the rank rule, size * eps(dtype) of lambda_max: 6 * 2.2e-16 in float64
    vals = t(10.0, 10.0, 10.0, 1.0, 0.9, 1e-12, 1e-15)
    assert outlier_count(vals, rule="threshold") == 6
    assert outlier_count(vals, rule="threshold", size=10**4) == 5  # 10^4 eps = 2.2e-12
    assert outlier_count(vals.float(), rule="threshold") == 5  # 7 * 1.2e-7 in float32
    assert outlier_count(vals, rule="threshold", floor=1e-14) == 6
    assert outlier_count(vals, rule="threshold", floor=1e-11) == 5
    with pytest.raises(ValueError, match="rank_rtol"):
        outlier_count(vals, floor=float("nan"))
    assert outlier_count(t(5.0, 4.0, 3.0, 2.0, 1.1), min_gap=1.5) == 4
    with pytest.raises(ValueError):
        outlier_count(vals, rule="largest")


def test_outlier_stats_negative_fraction_and_singular_vectors_by_hand():
    assert outlier_stats(t(1.0, 4.0, 2.0), 2) == pytest.approx((3.0, 1.0))
    U = torch.tensor([[1.0, -1.0], [-0.5, 0.0]])
    assert negative_fraction(U) == 0.5
    assert negative_fraction(U, tol=0.6) == 0.25  # only -1 < -0.6 max|U|
    W = torch.diag(t(3.0, 1.0))
    left, right = singular_vector_alignment(W, torch.eye(2), torch.eye(2))
    torch.testing.assert_close(left, torch.ones(2))
    torch.testing.assert_close(right, torch.ones(2))
    # f((1,1); diag(9, 1)) = 10^2 / (2 * 82)
    left, _ = singular_vector_alignment(W, t(1.0, 1.0).reshape(2, 1), torch.eye(2))
    torch.testing.assert_close(left, t(100 / 164))


def test_nc3_forms_by_hand():
    A = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert nc3_row_alignment(A, torch.eye(2)) == pytest.approx(0.5)  # cos^2 = (1, 1/2)
    assert nc3_row_alignment(torch.zeros(2, 2), torch.eye(2)) == 0.0  # a zero row: not aligned
    W = torch.tensor([[1.0, 1.0]])
    assert nc3_row_space_residual(W, t(2.0, 0.0).reshape(2, 1)) == pytest.approx(2**-0.5)
    assert nc3_row_space_residual(W, torch.eye(2)) == pytest.approx(0.0, abs=1e-15)
    torch.testing.assert_close(nc3_gram(torch.diag(t(2.0, 1.0))), torch.diag(t(1.6, 0.4)))
    # data average: mean of diag(4, 1) and diag(0, 1) = diag(2, 1), normalised by 3/2
    per_sample = torch.stack([torch.diag(t(2.0, 1.0)), torch.diag(t(0.0, 1.0))])
    torch.testing.assert_close(nc3_gram(per_sample), torch.diag(t(4 / 3, 2 / 3)))


# --------------------------------------------------------------------------------------------
# against explicit definitions at random points
# --------------------------------------------------------------------------------------------


def random_model(activation: str, loss: str, seed: int = 0) -> DeepUFM:
    cfg = UFMConfig(
        K=3, n=3, d=5, L=3, activation=activation, loss=loss, init_std=0.8, seed=seed, device="cpu"
    )
    return DeepUFM.init(cfg)


@pytest.mark.parametrize(
    ("activation", "loss"), [("linear", "mse"), ("relu", "mse"), ("linear", "ce")]
)
def test_alignment_matrix_and_coefficients_match_the_definitions(activation, loss):
    model = random_model(activation, loss)
    K = model.config.K
    Hs = model.features()
    for l in range(1, model.config.L + 1):
        mu_in, mu_out = class_means(Hs[l - 1], K), class_means(Hs[l], K)
        H = layer_hessian(model, l)
        D = H.dense()
        g = data_gradient(model, l)
        f, gamma = torch.zeros(K, K), torch.zeros(K, K)
        for c in range(K):
            for cp in range(K):
                v = torch.kron(mu_out[:, c], mu_in[:, cp])
                f[c, cp] = (v @ D @ v) ** 2 / ((v @ v) * (D @ v).pow(2).sum())
                gamma[c, cp] = (g @ v) ** 2 / ((g @ g) * (v @ v))
        torch.testing.assert_close(eigvec_alignment_matrix(H, mu_out, mu_in), f, rtol=1e-10, atol=0)
        torch.testing.assert_close(
            eigvec_alignment_matrix(DenseSymmetric(D), mu_out, mu_in), f, rtol=1e-10, atol=0
        )
        torch.testing.assert_close(gradient_coefficients(g, mu_out, mu_in), gamma)
        assert float(f.min()) < 0.999  # a random point is not aligned: the test can fail


def test_nc3_forms_match_the_definitions_at_a_random_point():
    model = random_model("relu", "mse", seed=3)
    cfg = model.config
    l = 2
    A = model.W[2] @ model.W[1]  # W_3 W_2
    torch.testing.assert_close(back_product(model, l), A)
    M = class_means(model.features()[l - 1], cfg.K)
    cos2 = torch.stack(
        [(A[c] @ M[:, c]) ** 2 / (A[c] @ A[c] * (M[:, c] @ M[:, c])) for c in range(3)]
    )
    assert nc3_alignment(model, l, "a") == pytest.approx(float(cos2.min()), rel=1e-12)
    P = M @ torch.linalg.pinv(M)
    W = model.W[l - 1]
    ref_b = float(torch.linalg.norm(W - W @ P) / torch.linalg.norm(W))
    assert nc3_alignment(model, l, "b") == pytest.approx(ref_b, rel=1e-10)
    G = A @ A.T
    torch.testing.assert_close(nc3_alignment(model, l, "c"), G / (torch.trace(G) / 3))
    with pytest.raises(ValueError):
        nc3_alignment(model, l, "e")


def normalised_average(J: torch.Tensor) -> torch.Tensor:
    avg = (J @ J.transpose(1, 2)).mean(dim=0)
    return avg / (torch.trace(avg) / avg.shape[0])


def test_nc3_form_d_is_the_pre_activation_jacobian_of_theory_section_1():
    """(d) with THEORY §1's ``A^{(l)}_{ic} = W_L D^{(L)} ... W_l D^{(l)} = dz_ic/du^{(l)}_ic``: by
    autograd through the ReLU network, sample by sample, at a random point where it differs from
    ``dz/dh^{(l)}`` (the trailing mask ``D^{(l)}`` matters); layer 1 has no activation, so there it
    is ``dz/dh^{(1)}``."""
    model = random_model("relu", "mse", seed=3)
    W1, W2, W3 = model.W
    H1 = model.H1
    relu = torch.relu

    def z_of_u2(u):  # u^(2) = W_1 h^(1) -> z
        return W3 @ relu(W2 @ relu(u))

    def z_of_h2(h):  # h^(2) -> z
        return W3 @ relu(W2 @ h)

    def z_of_u3(u):
        return W3 @ relu(u)

    def z_of_h1(h):
        return W3 @ relu(W2 @ relu(W1 @ h))

    U2 = W1 @ H1
    U3 = W2 @ relu(U2)
    N = model.config.N
    jac = lambda f, X: torch.stack([torch.func.jacrev(f)(X[:, i]) for i in range(N)])  # noqa: E731
    du2, dh2 = jac(z_of_u2, U2), jac(z_of_h2, relu(U2))
    assert not (U2 == 0).any() and not (U3 == 0).any()  # relu' is unambiguous at this point
    torch.testing.assert_close(nc3_alignment(model, 2, "d"), normalised_average(du2))
    torch.testing.assert_close(nc3_alignment(model, 3, "d"), normalised_average(jac(z_of_u3, U3)))
    torch.testing.assert_close(nc3_alignment(model, 1, "d"), normalised_average(jac(z_of_h1, H1)))
    torch.testing.assert_close(back_product(model, 2, per_sample=True), du2)
    # the two readings differ here, so the test tells them apart
    gap = (normalised_average(du2) - normalised_average(dh2)).abs().max()
    assert float(gap) > 0.05


def test_nc3_form_d_of_the_linear_model_is_form_c():
    model = random_model("linear", "mse", seed=1)
    for l in (1, 2, 3):
        torch.testing.assert_close(nc3_alignment(model, l, "d"), nc3_alignment(model, l, "c"))


# --------------------------------------------------------------------------------------------
# degenerate points: undefined metrics are nan with a note, never a number that looks collapsed
# --------------------------------------------------------------------------------------------


def nc1_numpy(H: np.ndarray, K: int) -> float:
    """NC1 of THEORY §4.1 written out in numpy (class-major columns)."""
    N = H.shape[1]
    n = N // K
    mus = [H[:, c * n : (c + 1) * n].mean(axis=1) for c in range(K)]
    mu_g = sum(mus) / K
    sw = sum(
        np.outer(H[:, c * n + i] - mus[c], H[:, c * n + i] - mus[c])
        for c in range(K)
        for i in range(n)
    )
    sb = sum(np.outer(m - mu_g, m - mu_g) for m in mus) / K
    return float(np.trace(sw / N @ np.linalg.pinv(sb)) / K)


@pytest.mark.parametrize("spread", [1.0, 1e-6])
def test_nc1_matches_a_direct_numpy_computation(spread):
    """At a generic point and at nearly (not exactly) coinciding means, which stay defined."""
    K, n, d = 3, 4, 5
    gen = torch.Generator().manual_seed(7)
    means = 1.0 + spread * torch.randn(d, K, generator=gen)
    H = (means.unsqueeze(2) + 0.3 * torch.randn(d, K, n, generator=gen)).reshape(d, K * n)
    value = nc1(H, K)
    assert math.isfinite(value) and collapse_note(H, K) is None
    assert value == pytest.approx(nc1_numpy(H.numpy(), K), rel=1e-8)


def identical_means_features(K: int = 3, n: int = 4, d: int = 5) -> torch.Tensor:
    """Features whose class means are all equal to one vector, with a real within-class spread."""
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(d, K, n, generator=gen)
    noise = noise - noise.mean(dim=2, keepdim=True)  # each class: zero-mean spread
    mu = torch.randn(d, 1, 1, generator=gen)
    return (mu + noise).reshape(d, K * n)


def test_nc1_is_nan_with_a_note_when_the_class_means_coincide_or_vanish():
    K = 3
    H = identical_means_features(K)
    assert math.isnan(nc1(H, K))
    assert "coincide" in collapse_note(H, K)
    # the pseudo-inverse of the round-off Sigma_B would give a meaningless number instead
    zero = torch.zeros(5, 12)
    assert math.isnan(nc1(zero, K))
    assert "trivial zero solution" in collapse_note(zero, K)
    assert means_degeneracy(class_means(zero, K)) == "zero"
    assert means_degeneracy(class_means(H, K), float(H.abs().max()), 4) == "coincide"


def test_frame_and_etf_distances_of_zero_and_equal_means():
    K = 3
    zero = torch.zeros(5, K)
    assert math.isnan(orthogonal_frame_distance(zero))
    assert math.isnan(etf_distance(zero))
    equal = torch.randn(5, 1).expand(5, K).clone()
    assert math.isnan(etf_distance(equal))
    # equal non-zero means are a frame, just not orthogonal: M^T M / ||.||_F = 11^T / K
    expected = math.sqrt(K * (K - 1) / K**2 + K * (1 / K - 1 / math.sqrt(K)) ** 2)
    assert orthogonal_frame_distance(equal) == pytest.approx(expected, rel=1e-12)


def test_projection_proportion_of_a_zero_gradient_is_nan():
    V = torch.eye(4)[:, :2]
    assert math.isnan(projection_proportion(torch.zeros(4), V))
    # a tiny gradient is still a direction (no underflow to 0/0)
    g = t(3.0, 4.0, 0.0, 0.0)
    assert projection_proportion(1e-200 * g, V[:, :1]) == pytest.approx(9 / 25, rel=1e-14)


# --------------------------------------------------------------------------------------------
# at the exact DNC optimum (THEORY §6)
# --------------------------------------------------------------------------------------------


def test_metrics_at_the_dnc_optimum():
    cfg = UFMConfig(K=3, n=2, d=5, L=3, lam=0.01, device="cpu")
    model = dnc_optimum(cfg)
    K = cfg.K
    Hs = model.features()
    for l in range(1, cfg.L + 1):
        mu_in, mu_out = class_means(Hs[l - 1], K), class_means(Hs[l], K)
        H = layer_hessian(model, l)
        vals, vecs = H.eigh()
        torch.testing.assert_close(
            eigvec_alignment_matrix(H, mu_out, mu_in), torch.ones(K, K), rtol=1e-10, atol=0
        )
        g = data_gradient(model, l)
        torch.testing.assert_close(
            gradient_coefficients(g, mu_out, mu_in), torch.eye(K) / K, rtol=0, atol=1e-12
        )
        assert projection_proportion(g, vecs[:, : K * K]) == pytest.approx(1.0, rel=1e-10)
        assert effective_rank(vals) == pytest.approx(K * K, rel=1e-9)
        assert outlier_count(vals) == K * K
        assert outlier_stats(vals, K * K)[1] < 1e-10 * float(vals[0])
        W = model.W[l - 1]
        assert effective_rank(torch.linalg.svdvals(W)) == pytest.approx(K, rel=1e-9)
        left, right = singular_vector_alignment(W, mu_out, mu_in)
        torch.testing.assert_close(left, torch.ones(K))
        torch.testing.assert_close(right, torch.ones(K))
        assert nc3_alignment(model, l, "a") == pytest.approx(1.0, rel=1e-12)
        assert nc3_alignment(model, l, "b") < 1e-12
        torch.testing.assert_close(nc3_alignment(model, l, "c"), torch.eye(K), rtol=0, atol=1e-12)
        torch.testing.assert_close(nc3_alignment(model, l, "d"), torch.eye(K), rtol=0, atol=1e-12)

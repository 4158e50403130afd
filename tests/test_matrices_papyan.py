"""Papyan's decomposition and knockouts (THEORY M3, §6) against explicit rows and dense autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepufm import UFMConfig
from deepufm.matrices import (
    KroneckerGram,
    RowGram,
    knockout_spectra,
    layer_hessian,
    papyan_decomposition,
)
from matrix_cases import (
    CASES,
    dense_hessian,
    dnc_optimum,
    jacobian_rows_ref,
    layer_outlier,
    random_model,
)


def by_definition(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """THEORY M3 term by term from rows v[c, i, c', :]."""
    K, n = v.shape[0], v.shape[1]
    N = K * n
    v_pair = v.mean(dim=1)  # (c, c', p)
    v_c = v_pair.mean(dim=1)  # (c, p)
    within = (v - v_pair.unsqueeze(1)).reshape(-1, v.shape[-1])
    cross = (v_pair - v_c.unsqueeze(1)).reshape(-1, v.shape[-1])
    flat = v.reshape(-1, v.shape[-1])
    return {
        "G": flat.T @ flat / N,
        "class": v_c.T @ v_c,
        "cross": cross.T @ cross / K,
        "within": within.T @ within / N,
    }


@pytest.mark.parametrize("name", list(CASES))
def test_components_match_the_definitions_and_sum_to_gauss_newton(name):
    model = random_model(name, seed=3)
    for l in range(1, model.config.L + 1):
        dec = papyan_decomposition(model, l)
        ref = by_definition(jacobian_rows_ref(model, l))
        H = dense_hessian(model, (l,))
        scale = float(H.abs().max())
        tol = dict(rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(ref["G"], H, **tol)  # Papyan's rows reproduce the Hessian
        torch.testing.assert_close(dec.gauss_newton.dense(), H, **tol)
        parts = {k: M.dense() for k, M in dec.components().items()}
        for key, M in parts.items():
            torch.testing.assert_close(M, ref[key], **tol)
            assert float(torch.linalg.eigvalsh(M).min()) >= -1e-12 * scale  # PSD
        torch.testing.assert_close(parts["class"] + parts["cross"] + parts["within"], H, **tol)
        # structured products and spectra of each component
        V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(l))
        for key, M in dec.components().items():
            torch.testing.assert_close(M.matmat(V), ref[key] @ V, **tol)
            ref_vals = torch.linalg.eigvalsh(ref[key]).flip(0)
            torch.testing.assert_close(M.eigvalsh(), ref_vals, rtol=0, atol=1e-10 * scale)


def test_form_is_stated_and_linear_mse_is_kronecker():
    mse, ce = random_model("lin-mse"), random_model("lin-ce")
    assert papyan_decomposition(mse, 2).form.startswith("mse")
    assert "loss-hessian-weighted" in papyan_decomposition(ce, 2).form
    dec = papyan_decomposition(mse, 2)
    assert all(isinstance(M, KroneckerGram) for M in [dec.gauss_newton, *dec.components().values()])
    relu = papyan_decomposition(random_model("relu-mse-dense"), 1)
    assert isinstance(relu.class_, RowGram) and isinstance(relu.cross, RowGram)
    assert relu.class_.F.shape[0] == 3 and relu.cross.F.shape[0] == 9  # K and K^2 rows


@pytest.mark.parametrize("name", ["lin-mse", "relu-mse-dense", "relu-mse-gram", "relu-ce-perlayer"])
def test_knockouts_equal_dense_differences(name):
    model = random_model(name, seed=5)
    for l in range(1, model.config.L + 1):
        H = dense_hessian(model, (l,))
        ref = by_definition(jacobian_rows_ref(model, l))
        got = knockout_spectra(model, l)
        tol = 1e-10 * float(H.abs().max())
        for key in ("class", "cross", "within"):
            want = torch.linalg.eigvalsh(H - ref[key]).flip(0)
            assert got[key].shape == want.shape
            torch.testing.assert_close(got[key], want, rtol=0, atol=tol)
        top3 = knockout_spectra(model, l, k=3)
        assert all(v.shape == (3,) for v in top3.values())


def test_low_rank_knockouts_use_the_row_route():
    """Linear MSE with d > N: H and the components are low rank, so H - G_X is a RowGram
    (thin QR of its rows, no p x p eigenproblem) and agrees with the dense difference."""
    model = random_model("lin-mse-wide", seed=1)
    dec = papyan_decomposition(model, 1)
    for key, M in dec.knockouts().items():
        assert isinstance(M, RowGram), key
        ref = dec.gauss_newton.dense() - dec.components()[key].dense()
        torch.testing.assert_close(M.dense(), ref, rtol=1e-10, atol=1e-13)
        want = torch.linalg.eigvalsh(ref).flip(0)
        torch.testing.assert_close(M.eigvalsh(), want, rtol=0, atol=1e-12)


DNC_CONFIGS = [
    dict(K=3, n=4, d=5, L=3, lam=0.01),
    dict(K=4, n=2, d=6, L=2, lam_W=[0.02, 0.05], lam_H=0.03),  # v1: per-layer lambda
    dict(K=2, n=3, d=3, L=4, lam=0.005),
]


@pytest.mark.parametrize("kw", DNC_CONFIGS)
def test_ranks_and_knockouts_at_the_dnc_optimum(kw):
    """THEORY §6 (Thm 2): ranks K, K(K-1), 0; knockouts keep K(K-1), K, K^2 outliers, all at
    Lambda_l = c lam_l / (1 - c)."""
    cfg = UFMConfig(**kw, device="cpu")
    model = dnc_optimum(cfg, seed=1)
    K = cfg.K
    Z = model.output()
    # the construction is the optimum: Z = c Y (THEORY §4.3)
    c_hat = float(Z[0, 0])
    torch.testing.assert_close(Z, c_hat * model.labels(), rtol=0, atol=1e-12)
    for l in range(1, cfg.L + 1):
        Lam = layer_outlier(cfg, l)
        H_vals = layer_hessian(model, l).eigvalsh()
        torch.testing.assert_close(H_vals[: K * K], torch.full((K * K,), Lam), rtol=1e-10, atol=0)
        dec = papyan_decomposition(model, l)
        ranks = {k: int((M.eigvalsh() > 1e-8 * Lam).sum()) for k, M in dec.components().items()}
        assert ranks == {"class": K, "cross": K * (K - 1), "within": 0}
        for M in dec.components().values():
            vals = M.eigvalsh()
            nz = vals[vals > 1e-8 * Lam]
            torch.testing.assert_close(nz, torch.full_like(nz, Lam), rtol=1e-9, atol=0)
        ko = knockout_spectra(model, l)
        counts = {k: int((v > 1e-8 * Lam).sum()) for k, v in ko.items()}
        assert counts == {"class": K * (K - 1), "cross": K, "within": K * K}
        for vals in ko.values():
            nz = vals[vals > 1e-8 * Lam]
            torch.testing.assert_close(nz, torch.full_like(nz, Lam), rtol=1e-9, atol=0)


def test_relu_definition_2_point_has_the_linear_decomposition():
    """Theorem 7: at a non-negative DNC point (permutation frames) the ReLU model's Papyan terms
    equal the linear model's (sigma'(0) = 1; relu_tol absorbs the round-off of U_0^T U_0 = I)."""
    kw = dict(K=3, n=2, d=4, L=3, lam=0.01, device="cpu")
    lin = dnc_optimum(UFMConfig(**kw), seed=2, permutations=True)
    relu = dnc_optimum(UFMConfig(**kw, activation="relu"), seed=2, permutations=True)
    for l in range(1, 4):
        a, b = papyan_decomposition(lin, l), papyan_decomposition(relu, l, relu_tol=1e-12)
        for key in ("class", "cross", "within"):
            torch.testing.assert_close(
                a.components()[key].dense(), b.components()[key].dense(), rtol=1e-12, atol=1e-14
            )


@given(
    K=st.integers(2, 3),
    n=st.integers(1, 3),
    extra=st.integers(0, 2),
    L=st.integers(1, 3),
    activation=st.sampled_from(["linear", "relu"]),
    loss=st.sampled_from(["mse", "ce"]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=20, deadline=None)
def test_property_components_sum_to_the_hessian(K, n, extra, L, activation, loss, seed):
    cfg = dict(K=K, n=n, d=K + extra, L=L, activation=activation, loss=loss, lam=0.01)
    model = random_model(cfg, seed=seed)
    for l in range(1, L + 1):
        dec = papyan_decomposition(model, l)
        H = dense_hessian(model, (l,))
        total = sum(M.dense() for M in dec.components().values())
        torch.testing.assert_close(total, H, rtol=1e-10, atol=1e-12 * float(H.abs().max()))

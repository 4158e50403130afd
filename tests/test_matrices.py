"""Structured matrices against dense torch.func computations at random, non-optimal points."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import hessian

from deepufm import DeepUFM, UFMConfig
from deepufm.matrices import (
    JacobianGram,
    KroneckerGram,
    hessian_residual,
    knockout_spectra,
    layer_hessian,
    papyan_decomposition,
)
from deepufm.models import functional as Fn
from deepufm.theory import dnc_optimum

REGISTRY = [
    dict(K=3, n=4, d=5, L=3, activation="linear", loss="mse", lam=0.01),
    dict(K=3, n=4, d=5, L=3, activation="relu", loss="mse", lam=0.01),
    dict(K=3, n=4, d=5, L=3, activation="linear", loss="ce", lam=0.01),
    dict(K=2, n=3, d=4, L=4, activation="relu", loss="ce", lam_W=[0.1, 0.2, 0.3, 0.4], lam_H=0.5),
    dict(K=4, n=2, d=4, L=2, activation="linear", loss="mse", lam_W=[0.02, 0.05], lam_H=0.1),
]
CASES = [(i, l) for i, c in enumerate(REGISTRY) for l in range(1, c["L"] + 1)]


def random_model(i: int, seed: int = 0) -> DeepUFM:
    # init_std 1 keeps ReLU masks and softmax probabilities far from degenerate.
    return DeepUFM.init(UFMConfig(**REGISTRY[i], init_std=0.8, seed=seed, device="cpu"))


def dense_data_hessian(model: DeepUFM, l: int) -> torch.Tensor:
    cfg = model.config

    def loss(w):
        Ws = list(model.W)
        Ws[l - 1] = w.reshape(model.W[l - 1].shape)
        return Fn.data_loss(Fn.forward(model.H1, Ws, cfg.activation)[-1], cfg.loss, cfg.K, cfg.n)

    return hessian(loss)(model.W[l - 1].reshape(-1))


@pytest.mark.parametrize(("i", "l"), CASES)
def test_layer_hessian_equals_dense_autograd(i, l):
    model = random_model(i)
    H = layer_hessian(model, l)
    ref = dense_data_hessian(model, l)
    scale = float(ref.abs().max())
    torch.testing.assert_close(H.dense(), ref, rtol=1e-10, atol=1e-12 * scale)
    V = torch.randn(H.size, 3, dtype=torch.float64)
    torch.testing.assert_close(H.matmat(V), ref @ V, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(H.matvec(V[:, 0]), ref @ V[:, 0], rtol=1e-10, atol=1e-12 * scale)
    # full spectrum, top-k eigenpairs and the scipy LinearOperator
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    vals = H.eigvalsh()
    assert vals.shape == ref_vals.shape
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=1e-10 * float(ref_vals[0]))
    k = min(4, H.size)
    top, vecs = H.topk(k)
    torch.testing.assert_close(top, ref_vals[:k], rtol=0, atol=1e-10 * float(ref_vals[0]))
    torch.testing.assert_close(ref @ vecs, vecs * top, rtol=0, atol=1e-9 * float(ref_vals[0]))
    op = H.as_linear_operator()
    x = V[:, 0].numpy()
    assert abs(op.matvec(x) - (ref @ V[:, 0]).numpy()).max() <= 1e-10 * scale
    # E_l = H_l - G_l = 0 for a single layer
    assert float(hessian_residual(model, l).dense().abs().max()) == 0.0


def test_linear_mse_uses_the_kronecker_form_and_others_the_jacobian_gram():
    assert isinstance(layer_hessian(random_model(0), 2), KroneckerGram)
    assert isinstance(layer_hessian(random_model(1), 2), JacobianGram)
    assert isinstance(layer_hessian(random_model(2), 2), JacobianGram)


@given(
    K=st.integers(2, 4),
    n=st.integers(1, 3),
    extra=st.integers(0, 3),
    L=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=15, deadline=None)
def test_kronecker_spectrum_property(K, n, extra, L, seed):
    cfg = UFMConfig(K=K, n=n, d=K + extra, L=L, lam=0.01, seed=seed, device="cpu")
    model = DeepUFM.init(cfg)
    for l in range(1, L + 1):
        H = layer_hessian(model, l)
        ref = torch.linalg.eigvalsh(dense_data_hessian(model, l)).flip(0)
        torch.testing.assert_close(H.eigvalsh(), ref, rtol=0, atol=1e-10 * float(ref[0]))


@pytest.mark.parametrize("i", range(len(REGISTRY)))
def test_papyan_components_sum_exactly_to_gauss_newton(i):
    model = random_model(i, seed=3)
    for l in range(1, model.config.L + 1):
        dec = papyan_decomposition(model, l)
        total = dec.class_.dense() + dec.cross.dense() + dec.within.dense()
        ref = dense_data_hessian(model, l)
        scale = float(ref.abs().max())
        torch.testing.assert_close(dec.gauss_newton.dense(), ref, rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(total, ref, rtol=1e-10, atol=1e-12 * scale)
        for part in dec.components().values():
            assert float(torch.linalg.eigvalsh(part.dense()).min()) >= -1e-12 * scale  # PSD


def test_papyan_mse_terms_by_hand_for_one_layer():
    """Build v_icc' = a_c' ⊗ h_ic by hand for the last layer (A = I): G_class = sum_c v_c v_c^T."""
    model = random_model(4)
    cfg = model.config
    H = model.features()[cfg.L - 1]  # input of W_L
    K, n = cfg.K, cfg.n
    v = torch.stack(
        [
            torch.stack([torch.kron(torch.eye(K)[cp], H[:, c * n + i]) for cp in range(K)])
            for c in range(K)
            for i in range(n)
        ]
    ).reshape(K, n, K, -1)
    v_c = v.mean(dim=(1, 2))
    dec = papyan_decomposition(model, cfg.L)
    torch.testing.assert_close(dec.class_.dense(), v_c.T @ v_c, rtol=1e-12, atol=1e-15)


def test_knockouts_at_the_dnc_optimum():
    cfg = UFMConfig(K=3, n=4, d=5, L=3, lam=0.01, device="cpu")
    model = dnc_optimum(cfg)
    K = cfg.K
    for l in range(1, cfg.L + 1):
        dec = papyan_decomposition(model, l)
        Lam = float(layer_hessian(model, l).eigvalsh()[0])
        ranks = {
            name: int((part.eigvalsh() > 1e-8 * Lam).sum())
            for name, part in dec.components().items()
        }
        assert ranks == {"class": K, "cross": K * (K - 1), "within": 0}
        ko = knockout_spectra(model, l)
        count = {name: int((vals > 1e-8 * Lam).sum()) for name, vals in ko.items()}
        assert count == {"class": K * (K - 1), "cross": K, "within": K * K}
        for vals in ko.values():
            nz = vals[vals > 1e-8 * Lam]
            torch.testing.assert_close(nz, torch.full_like(nz, Lam), rtol=1e-9, atol=0)


def test_knockout_matches_dense_difference_at_a_random_point():
    model = random_model(1, seed=5)
    dec = papyan_decomposition(model, 2)
    H = dense_data_hessian(model, 2)
    for name, part in dec.components().items():
        ref = torch.linalg.eigvalsh(H - part.dense()).flip(0)
        got = knockout_spectra(model, 2, k=H.shape[0])[name]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_head_of_a_network_from_its_input_features():
    """A linear head given features: H_1 need not be a free parameter, the Hessian is the same."""
    torch.manual_seed(0)
    cfg = UFMConfig(K=3, n=5, d=6, L=2, lam=0.01, device="cpu")
    features = torch.randn(6, 15, dtype=torch.float64)
    weights = [torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)]
    head = DeepUFM(cfg, features, weights)
    torch.testing.assert_close(
        layer_hessian(head, 1).dense(), dense_data_hessian(head, 1), rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_block_hessian_and_its_split_equal_dense_autograd(i):
    from deepufm.matrices import block_hessian

    model = random_model(i, seed=11)
    cfg = model.config
    layers = tuple(range(1, cfg.L + 1)) if i != 0 else (1, 3)
    blk = block_hessian(model, layers)
    shapes = [model.W[l - 1].shape for l in layers]
    w = torch.cat([model.W[l - 1].reshape(-1) for l in layers])

    def data(w_flat):
        Ws, start = list(model.W), 0
        for l, s in zip(layers, shapes):
            Ws[l - 1] = w_flat[start : start + s.numel()].reshape(s)
            start += s.numel()
        return Fn.data_loss(Fn.forward(model.H1, Ws, cfg.activation)[-1], cfg.loss, cfg.K, cfg.n)

    ref = hessian(data)(w)
    scale = float(ref.abs().max())
    torch.testing.assert_close(blk.hessian.dense(), ref, rtol=1e-10, atol=1e-12 * scale)
    # diagonal blocks of G_blk are the layer Hessians; E_blk = H - G has zero diagonal blocks
    G, E = blk.gauss_newton.dense(), blk.residual.dense()
    start = 0
    for l, p in zip(layers, blk.sizes):
        sl = slice(start, start + p)
        torch.testing.assert_close(
            G[sl, sl], layer_hessian(model, l).dense(), rtol=1e-10, atol=1e-12 * scale
        )
        assert float(E[sl, sl].abs().max()) <= 1e-10 * scale
        start += p
    torch.testing.assert_close(G + E, ref, rtol=1e-10, atol=1e-12 * scale)


def test_block_gauss_newton_at_the_optimum_is_theorem_5():
    from deepufm.matrices import block_hessian
    from deepufm.theory import dnc_constants

    cfg = UFMConfig(K=3, n=2, d=4, L=3, lam=0.01, device="cpu")
    model = dnc_optimum(cfg)
    blk = block_hessian(model)
    vals = blk.gauss_newton.eigvalsh()
    k = dnc_constants(cfg)
    torch.testing.assert_close(vals[:9], torch.full((9,), k.block_gn_eigenvalue), rtol=1e-9, atol=0)
    assert float(vals[9]) <= 1e-10 * float(vals[0])

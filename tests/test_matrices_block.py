"""The block Hessian over several layers (THEORY M6, §6 Thm 5) against dense ``torch.func``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepufm import UFMConfig
from deepufm.errors import ConfigError
from deepufm.matrices import BlockHessian, block_hessian, layer_hessian
from deepufm.models import functional as Fn
from matrix_cases import (
    CASES,
    assert_top_eigenpairs,
    dense_gauss_newton,
    dense_hessian,
    dnc_optimum,
    layer_outlier,
    output_scale,
    random_model,
)

BLOCK_CASES = [
    ("lin-mse", None),
    ("lin-mse", (1, 3)),  # non-adjacent layers: E couples them through W_2
    ("relu-mse-dense", None),
    ("relu-mse-gram", (2, 3)),
    ("lin-ce", None),
    ("relu-ce-perlayer", (1, 2, 4)),
    ("lin-mse-perlayer", None),
    ("lin-ce-gram", (2,)),
]


@pytest.mark.parametrize(("name", "layers"), BLOCK_CASES)
def test_block_hessian_and_its_split_equal_dense_autograd(name, layers):
    model = random_model(name, seed=11)
    cfg = model.config
    blk = block_hessian(model, layers)
    chosen = tuple(range(1, cfg.L + 1)) if layers is None else layers
    assert isinstance(blk, BlockHessian) and blk.layers == chosen
    ref_H, ref_G = dense_hessian(model, chosen), dense_gauss_newton(model, chosen)
    ref_E = ref_H - ref_G
    scale = float(ref_H.abs().max())
    tol = dict(rtol=1e-10, atol=1e-12 * scale)
    assert blk.hessian.shape == ref_H.shape
    torch.testing.assert_close(blk.hessian.dense(), ref_H, **tol)
    torch.testing.assert_close(blk.gauss_newton.dense(), ref_G, **tol)
    torch.testing.assert_close(blk.residual.dense(), ref_E, **tol)
    # matrix-free products (no dense matrix) of all three
    V = torch.randn(ref_H.shape[0], 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(blk.hessian.matmat(V), ref_H @ V, **tol)
    torch.testing.assert_close(blk.gauss_newton.matmat(V), ref_G @ V, **tol)
    torch.testing.assert_close(blk.residual.matmat(V), ref_E @ V, **tol)
    # block structure: G's diagonal blocks are the layer Hessians, E's diagonal blocks vanish
    start = 0
    for l, p in zip(blk.layers, blk.sizes):
        sl = slice(start, start + p)
        torch.testing.assert_close(
            blk.gauss_newton.dense()[sl, sl], layer_hessian(model, l).dense(), **tol
        )
        assert float(ref_E[sl, sl].abs().max()) <= 1e-12 * scale
        assert float(blk.residual.dense()[sl, sl].abs().max()) == 0.0
        start += p
    parts = blk.split(V)
    assert list(parts) == list(blk.layers) and [v.shape[0] for v in parts.values()] == list(
        blk.sizes
    )
    # spectra: G_blk from its NK x NK Gram (or dense), H_blk densely
    want = torch.linalg.eigvalsh(ref_G).flip(0)
    torch.testing.assert_close(blk.gauss_newton.eigvalsh(), want, rtol=0, atol=1e-10 * scale)
    k = 3
    assert_top_eigenpairs(*blk.gauss_newton.topk(k), ref_G, k)
    torch.testing.assert_close(
        blk.hessian.eigvalsh(), torch.linalg.eigvalsh(ref_H).flip(0), rtol=0, atol=1e-10 * scale
    )


def test_linear_residual_is_theory_m6():
    """For a linear net, <dW_m, E dW_l> = 1/N sum (z - y)^T A^(m+1) dW_m W_{m-1}..W_{l+1} dW_l h^(l)."""
    model = random_model("lin-mse", seed=4)
    cfg = model.config
    blk = block_hessian(model)
    Hs = model.features()
    R = Hs[-1] - model.labels()
    gen = torch.Generator().manual_seed(3)
    dW = [torch.randn(W.shape, generator=gen) for W in model.W]
    x = torch.cat([w.reshape(-1) for w in dW])
    form = 0.0
    for m in range(1, cfg.L + 1):
        for l in range(1, m):
            A = torch.eye(cfg.K)
            for W in reversed(model.W[m:]):
                A = A @ W
            mid = torch.eye(cfg.d)
            for W in reversed(model.W[l : m - 1]):
                mid = mid @ W
            form += (
                2 * float(torch.trace(R.T @ A @ dW[m - 1] @ mid @ dW[l - 1] @ Hs[l - 1])) / cfg.N
            )
    assert math.isclose(float(x @ blk.residual.matvec(x)), form, rel_tol=1e-11)


@pytest.mark.parametrize(
    "kw", [dict(K=3, n=2, d=4, L=3, lam=0.01), dict(K=2, n=3, d=3, L=4, lam=0.003)]
)
def test_theorem_5_at_a_hand_built_optimum(kw):
    """G_blk: rank K^2, every non-zero eigenvalue sum_l Lambda_l; E_blk / G_blk Frobenius ratio
    (1-c)/(cL) sqrt(2(L-1)(d/K + (L-2)/2)) (THEORY §6, single lambda)."""
    cfg = UFMConfig(**kw, device="cpu")
    model = dnc_optimum(cfg, seed=5)
    K, L, d = cfg.K, cfg.L, cfg.d
    blk = block_hessian(model)
    vals = blk.gauss_newton.eigvalsh()
    total = sum(layer_outlier(cfg, l) for l in range(1, L + 1))
    torch.testing.assert_close(vals[: K * K], torch.full((K * K,), total), rtol=1e-10, atol=0)
    assert float(vals[K * K :].abs().max()) <= 1e-10 * total
    c = output_scale(cfg)
    ratio = torch.linalg.norm(blk.residual.dense()) / torch.linalg.norm(blk.gauss_newton.dense())
    want = (1 - c) / (c * L) * math.sqrt(2 * (L - 1) * (d / K + (L - 2) / 2))
    assert math.isclose(float(ratio), want, rel_tol=1e-10)
    # and E_blk is the autograd one at this point too
    ref_E = dense_hessian(model, range(1, L + 1)) - dense_gauss_newton(model, range(1, L + 1))
    torch.testing.assert_close(blk.residual.dense(), ref_E, rtol=1e-10, atol=1e-13)


def test_validation():
    model = random_model("lin-mse")
    for bad in ([0], [1, 4], [], [1.0]):
        with pytest.raises(ConfigError, match="layers"):
            block_hessian(model, bad)
    assert block_hessian(model, [3, 1, 1]).layers == (1, 3)


@given(
    K=st.integers(2, 3),
    n=st.integers(1, 3),
    extra=st.integers(0, 2),
    L=st.integers(2, 4),
    activation=st.sampled_from(["linear", "relu"]),
    loss=st.sampled_from(["mse", "ce"]),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
@settings(max_examples=20, deadline=None)
def test_property_block_hessian(K, n, extra, L, activation, loss, seed, data):
    cfg = dict(K=K, n=n, d=K + extra, L=L, activation=activation, loss=loss, lam=0.01)
    model = random_model(cfg, seed=seed)
    layers = data.draw(st.sets(st.integers(1, L), min_size=1))
    blk = block_hessian(model, layers)
    ref = dense_hessian(model, sorted(layers))
    scale = float(ref.abs().max())
    torch.testing.assert_close(blk.hessian.dense(), ref, rtol=1e-10, atol=1e-12 * scale)


def test_block_hessian_via_the_objective_includes_no_regulariser():
    """The block Hessian is of the data loss: the total loss adds exactly lam_l I per block."""
    model = random_model(CASES["lin-mse-perlayer"], seed=2)
    cfg = model.config
    layers = tuple(range(1, cfg.L + 1))
    blk = block_hessian(model)

    def total(w):
        Ws, start = list(model.W), 0
        for l in layers:
            s = model.W[l - 1].shape
            Ws[l - 1] = w[start : start + s.numel()].reshape(s)
            start += s.numel()
        return Fn.total_loss(
            model.H1,
            Ws,
            K=cfg.K,
            n=cfg.n,
            activation=cfg.activation,
            loss=cfg.loss,
            lam_W=cfg.lam_W,
            lam_H=cfg.lam_H,
        )

    w = torch.cat([model.W[l - 1].reshape(-1) for l in layers])
    ref = torch.func.hessian(total)(w)
    shift = torch.diag(torch.cat([torch.full((p,), lam) for p, lam in zip(blk.sizes, cfg.lam_W)]))
    torch.testing.assert_close(blk.hessian.dense() + shift, ref, rtol=1e-10, atol=1e-12)

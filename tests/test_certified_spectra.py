"""Certified top-k where the theory lives: exactly repeated DNC outliers, exact zeros, k above the
rank, near-degenerate clusters, on every route (dense, Gram, Kronecker, Kronecker sum, row Gram,
block Lanczos, block Hessian, gradient covariance, nn.Module Hessian) and past every size switch,
in float64 and float32.

References share no code with the engine: dense ``torch.func``/autograd Hessians and Gauss–Newton
matrices (``matrix_cases``), dense ``torch.linalg.eigvalsh``, the closed-form outlier
``Lambda_l = c lam_l / (1 - c)`` (THEORY §6) and autograd Hessian-vector products.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from deepufm import UFMConfig
from deepufm.errors import UncertifiedError
from deepufm.matrices import (
    DenseSymmetric,
    JacobianGram,
    KroneckerGram,
    KroneckerSum,
    LinearCombination,
    ModuleHessian,
    RowGram,
    ZeroMatrix,
    block_hessian,
    gradient_covariance,
    lanczos_topk,
    layer_hessian,
    numerical_rank,
    papyan_decomposition,
    spectra,
)
from deepufm.metrics import outlier_count
from deepufm.metrics.layer_report import layer_report
from deepufm.models import functional as Fn
from deepufm.theory import ce_dnc_point
from matrix_cases import (
    data_loss_of,
    dense_gauss_newton,
    dense_hessian,
    dnc_optimum,
    flat_weights,
    jacobian_rows_ref,
    layer_outlier,
)
from test_matrices_papyan import by_definition


def linear_cfg(**kw) -> UFMConfig:
    base = dict(K=3, n=4, d=6, L=3, activation="linear", loss="mse", lam=0.01, device="cpu")
    return UFMConfig(**{**base, **kw})


def relu_cfg(**kw) -> UFMConfig:
    return linear_cfg(**{"activation": "relu", **kw})


def assert_top(result, ref: torch.Tensor, k: int, certified: bool = True) -> None:
    """The issue's bounds: |dlambda| <= 1e-8 lambda_max, max|V^T V - I| <= 1e-7,
    ||H v - theta v|| <= 1e-6 lambda_max, against the dense reference ``ref``; the values are
    the *largest* (descending, every copy) and the certificate says so."""
    vals, vecs = result
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    scale = float(ref_vals.abs().max())
    assert vals.shape == (k,) and vecs.shape == (ref.shape[0], k)
    assert result.certified == certified, result.certificate.reason
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-8 * scale)
    eye = torch.eye(k, dtype=vecs.dtype)
    assert float((vecs.T @ vecs - eye).abs().max()) <= 1e-7
    resid = torch.linalg.norm(ref @ vecs - vecs * vals, dim=0)
    assert float(resid.max()) <= 1e-6 * scale
    # the certificate's own numbers agree with the independent ones
    torch.testing.assert_close(result.residuals, resid, rtol=0, atol=1e-8 * scale)
    assert result.orthogonality <= 1e-7
    expected_next = float(ref_vals[k]) if k < ref.shape[0] else -math.inf
    if math.isfinite(expected_next):
        assert result.deflated_max <= expected_next + 1e-8 * scale


# -- exact DNC points, every exact route -------------------------------------------------------
def test_kronecker_route_at_the_linear_dnc_optimum():
    """K^2 = 9 equal outliers Lambda_l over exact zeros; k = 9 and k = 14 > rank."""
    cfg = linear_cfg()
    model = dnc_optimum(cfg, seed=0)
    for l in (1, 2, 3):
        H = layer_hessian(model, l)
        assert isinstance(H, KroneckerGram)
        ref = dense_hessian(model, (l,))
        K2 = min(9, H.size)
        for k in (K2, min(K2 + 5, H.size)):
            result = H.topk(k)
            assert result.certificate.method == "kronecker"
            assert_top(result, ref, k)
        torch.testing.assert_close(
            H.topk(K2)[0], torch.full((K2,), layer_outlier(cfg, l)), rtol=1e-12, atol=0
        )


def test_kronecker_sum_and_row_gram_knockouts_above_their_rank():
    """Linear knockouts (KroneckerSum, ranks K(K-1), K, K^2) and ReLU Papyan terms (RowGram,
    signed weights) with k beyond the rank: exact zeros with an orthonormal null basis.
    References: THEORY M3 term by term from jacrev rows."""
    model = dnc_optimum(linear_cfg(n=3, d=5), seed=1)
    dec = papyan_decomposition(model, 2)
    ref = by_definition(jacobian_rows_ref(model, 2))
    for name, M in dec.knockouts().items():
        assert isinstance(M, KroneckerSum), name
        for k in (6, 12):
            assert_top(M.topk(k), ref["G"] - ref[name], k)
    relu = dnc_optimum(relu_cfg(K=2, n=3, d=9, L=3), seed=2, permutations=True)
    rdec = papyan_decomposition(relu, 2)
    rref = by_definition(jacobian_rows_ref(relu, 2))
    for name in ("class", "cross"):
        part = rdec.components()[name]
        assert isinstance(part, RowGram)
        assert_top(part.topk(7), rref[name], 7)
    signed = rdec.class_ - rdec.cross  # indefinite: the zeros sit between + and -
    assert isinstance(signed, RowGram)
    assert_top(signed.topk(signed.size - 1), rref["class"] - rref["cross"], signed.size - 1)


@pytest.mark.parametrize(
    ("cfg", "route"),
    [
        (dict(K=4, n=10, d=20), "gram"),  # NR = 160 < p = 400
        (dict(K=3, n=30, d=8), "dense"),  # NR = 270 >= p = 64
    ],
)
def test_relu_definition_2_point_on_the_gram_and_dense_routes(cfg, route):
    model = dnc_optimum(relu_cfg(L=3, **cfg), seed=3, permutations=True)
    H = layer_hessian(model, 2)
    assert isinstance(H, JacobianGram)
    ref = dense_hessian(model, (2,))
    K2 = cfg["K"] ** 2
    for k in (K2, K2 + 4):
        result = H.topk(k)
        assert result.certificate.method == route
        assert_top(result, ref, k)
    assert numerical_rank(H.eigvalsh(), H.size) == K2


def test_ce_dnc_point_above_the_rank():
    """Theorem 9: rank (K - 1)^2 at the CE DNC point; a top-k beyond it completes the zeros."""
    cfg = UFMConfig(K=3, n=4, d=6, L=3, loss="ce", lam=0.01, device="cpu")
    model = ce_dnc_point(cfg, seed=0)
    for l in (1, 2, 3):
        H = layer_hessian(model, l)
        ref = dense_hessian(model, (l,))
        assert numerical_rank(torch.linalg.eigvalsh(ref), H.size) == 4
        assert_top(H.topk(7), ref, 7)


def test_gradient_covariance_and_zero_matrix_beyond_n():
    model = dnc_optimum(relu_cfg(K=2, n=3, d=5), seed=4, permutations=True)
    cov = gradient_covariance(model, 2)
    assert cov.N < 10 <= cov.size
    assert_top(cov.topk(10), cov.dense(), 10)
    Z = ZeroMatrix(12, torch.float64, "cpu")
    assert_top(Z.topk(5), torch.zeros(12, 12), 5)


def test_block_hessian_routes_at_dnc():
    """G_blk (a row-space Gram over the stacked layer rows) and H_blk = G_blk + E_blk (no shared
    structure: a LinearCombination) against dense autograd; G + E and E + G are one kind."""
    model = dnc_optimum(relu_cfg(K=3, n=4, d=5), seed=5, permutations=True)
    blk = block_hessian(model)
    layers = blk.layers
    assert_top(blk.gauss_newton.topk(12), dense_gauss_newton(model, layers), 12)
    assert isinstance(blk.hessian, LinearCombination)
    assert_top(blk.hessian.topk(12), dense_hessian(model, layers), 12)
    assert type(blk.gauss_newton + blk.residual) is type(blk.residual + blk.gauss_newton)


# -- the iterative route ------------------------------------------------------------------------
@pytest.mark.parametrize("block", [None, 4])
def test_lanczos_route_finds_every_copy(block, monkeypatch):
    """Past the switch (DENSE_LIMIT lowered): 16 equal outliers and exact zeros, with the default
    block (>= k by construction) and with a block of 4 < 16 (the deflated check finds the missing
    copies and the solve restarts with a larger block)."""
    monkeypatch.setattr(spectra, "DENSE_LIMIT", 32)
    model = dnc_optimum(relu_cfg(K=4, n=10, d=20), seed=6, permutations=True)
    H = layer_hessian(model, 2)
    ref = dense_hessian(model, (2,))
    for k in (16, 20):
        result = H.topk(k) if block is None else lanczos_topk(H, k, block=block)
        assert result.certificate.method.startswith("lanczos")
        assert_top(result, ref, k)


@pytest.mark.parametrize("spread", [0.0, 1e-14, 1e-11, 1e-9])
def test_near_degenerate_cluster(spread):
    """A cluster of 12 eigenvalues 3 + spread * j over a bulk: every copy, to 1e-8 relative."""
    gen = torch.Generator().manual_seed(0)
    p = 120
    Q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))[0]
    cluster = 3.0 + spread * torch.arange(12, dtype=torch.float64)
    spectrum = torch.cat([torch.tensor([5.0, 4.0]), cluster, torch.linspace(1.0, 0.0, p - 14)])
    M = DenseSymmetric(Q @ torch.diag(spectrum) @ Q.T)
    for block in (None, 3):
        assert_top(lanczos_topk(M, 14, tol=1e-12, block=block), M.dense(), 14)


def test_the_certificate_catches_missed_eigenvalues():
    """A route that returns the wrong space is flagged (and raises when strict); the deflated
    check sees the eigenvalue that was left out."""
    spectrum = torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0]
    M = DenseSymmetric(Q @ torch.diag(spectrum) @ Q.T)
    wrong = torch.cat([Q[:, :2], Q[:, 3:4]], dim=1)  # misses one copy of 3
    check, _ = spectra.deflated_ritz_max(M, wrong, seed=0, block=2, steps=2)
    assert check == pytest.approx(3.0, abs=1e-12)
    result = spectra.certify(M, spectrum[[0, 1, 3]], wrong, deflated_max=check, method="test")
    assert not result.certified and "outside the returned space" in result.certificate.reason
    with pytest.raises(UncertifiedError, match="could not be certified"):
        spectra.certify(
            M, spectrum[[0, 1, 3]], wrong, deflated_max=check, method="test", strict=True
        )
    # the right space in a skewed basis with rough values: Rayleigh–Ritz refines it ...
    skewed = Q[:, :3] @ torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0]]).double()
    result = spectra.certify(M, spectrum[:3] + 0.1, skewed, deflated_max=1.0, method="test")
    assert result.certified
    torch.testing.assert_close(result.values, spectrum[:3], rtol=0, atol=1e-12)
    # ... but a space 1e-3 off stays uncertified, whatever values are claimed
    noisy = torch.linalg.qr(Q[:, :3] + 1e-3 * Q[:, 3:6])[0]
    result = spectra.certify(M, spectrum[:3], noisy, deflated_max=1.0, method="test")
    assert not result.certified and "residual" in result.certificate.reason


def check_multiplicities() -> None:
    """Multiplicity 12 with blocks of 2 and 4 (and small bases that force thick restarts)."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64))[0]
    parts = [torch.tensor([5.0, 4.0]), torch.full((12,), 3.0), torch.linspace(2.0, 0.1, 30)]
    spectrum = torch.cat([*parts, torch.zeros(36)]).double()
    M = DenseSymmetric(Q @ torch.diag(spectrum) @ Q.T)
    for k, block, basis in [(14, 4, 30), (16, 4, 40), (10, 2, 16), (14, None, None)]:
        r = lanczos_topk(M, k, tol=1e-12, block=block, max_basis=basis)
        assert r.certified, r.certificate.reason
        assert float((r.values - spectrum[:k]).abs().max()) < 1e-10, (k, block, r.values)


def test_multiplicity_beyond_the_block_on_both_mkl_paths():
    """Right by the engine (deflated check, block growth), not by round-off: here, and on MKL's
    other code path (a fresh process with MKL_CBWR=COMPATIBLE)."""
    check_multiplicities()
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    here = os.path.dirname(__file__)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_certified_spectra as t; "
        "t.check_multiplicities(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- real sizes (p ~ 2500, N R > 2048) -----------------------------------------------------------
def autograd_hvp(model, layer):
    """``V -> H_l V`` by forward-over-reverse autograd of the data loss (no deepufm matrix)."""
    f = data_loss_of(model, (layer,))
    w = flat_weights(model, (layer,))
    return vmap(lambda v: jvp(grad(f), (w,), (v,))[1], in_dims=1, out_dims=1)


@pytest.mark.parametrize(
    ("n", "d", "route"),
    [
        (25, 50, "lanczos"),  # p = 2500, N R = 2500: past DENSE_LIMIT = 1024
        (10, 50, "gram"),  # N R = 1000 < p = 2500: just below the switch
        (25, 31, "dense"),  # p = 961 <= N R = 2500: just below the switch
    ],
)
def test_real_size_relu_definition_2_point(n, d, route):
    """K = 10: all K^2 = 100 outliers equal to the closed-form Lambda_l (THEORY §6, the linear
    value at the Definition-2 point) on each route at the largest size it serves; residuals by
    autograd."""
    cfg = relu_cfg(K=10, n=n, d=d, L=3)
    model = dnc_optimum(cfg, seed=7, permutations=True)
    H = layer_hessian(model, 2)
    result = H.topk(100)
    assert result.certificate.method.startswith(route)
    assert result.certified, result.certificate.reason
    Lam = layer_outlier(cfg, 2)
    torch.testing.assert_close(result.values, torch.full((100,), Lam), rtol=1e-9, atol=0)
    vals, vecs = result
    resid = torch.linalg.norm(autograd_hvp(model, 2)(vecs) - vecs * vals, dim=0)
    assert float(resid.max()) <= 1e-9 * Lam
    assert float((vecs.T @ vecs - torch.eye(100)).abs().max()) <= 1e-10
    assert result.deflated_max <= 1e-10 * Lam  # the rest of the spectrum is zero


class LinearUFMNet(nn.Module):
    """A deep linear UFM written as an nn.Module: features are the data, bias-free layers."""

    def __init__(self, W):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in W)
        with torch.no_grad():
            for layer, w in zip(self.layers, W, strict=True):
                layer.weight.copy_(w)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_module_hessian_of_a_linear_dnc_ufm_at_p_4225():
    """The issue's case: the layer-2 weight of a d = 65 linear DNC UFM as an nn.Module
    (p = 4225): 9 equal outliers Lambda_2, certified, vectors checked by autograd."""
    cfg = linear_cfg(K=3, n=4, d=65, L=3)
    model = dnc_optimum(cfg, seed=8)
    net = LinearUFMNet(model.W).double()
    Y = Fn.labels(cfg.K, cfg.n, torch.float64, "cpu").T
    loss_fn = lambda out, y: 0.5 * ((out - y) ** 2).sum(dim=1).mean()  # noqa: E731
    H = ModuleHessian(net, loss_fn, [(model.H1.T, Y)], params=["layers.1.weight"])
    assert H.size == 4225
    result = H.topk(9)
    assert result.certified, result.certificate.reason
    Lam = layer_outlier(cfg, 2)
    torch.testing.assert_close(result.values, torch.full((9,), Lam), rtol=1e-9, atol=0)
    vals, vecs = result
    resid = torch.linalg.norm(autograd_hvp(model, 2)(vecs) - vecs * vals, dim=0)
    assert float(resid.max()) <= 1e-9 * Lam
    assert result.deflated_max <= 1e-9 * Lam


# -- ranks that know their dtype -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ranks_at_an_exact_dnc_point_in_both_dtypes(dtype):
    """The default rank rule (p eps of the dtype) reports K^2, K, K(K-1), 0 at an exact DNC point
    built in float32 as well as in float64; the top K^2 are certified in both."""
    cfg = linear_cfg(K=3, n=4, d=12, L=3)
    model = dnc_optimum(cfg, seed=9).to(dtype=getattr(torch, dtype))
    for l in (1, 2, 3):
        r = layer_report(model, l)
        assert r.hessian_rank == 9
        assert r.papyan_ranks == {"class": 3, "cross": 6, "within": 0}
        assert r.projection_proportion == pytest.approx(1.0, abs=1e-5)
        H = layer_hessian(model, l)
        result = H.topk(9)
        assert result.certified and result.values.dtype == getattr(torch, dtype)
        assert outlier_count(H.eigvalsh(), size=H.size) == 9
    with pytest.raises(ValueError, match="rank_rtol"):
        layer_report(model, 1, rank_rtol=float("nan"))
    with pytest.raises(ValueError, match="rank_rtol"):
        layer_report(model, 1, rank_rtol=-1.0)


def test_layer_report_projection_past_the_switch(monkeypatch):
    """Where the top K^2 come from the iterative route, the projection proportion of the
    gradient at DNC is 1 (it lies in the top eigenspace, THEORY §6 Thm 3)."""
    monkeypatch.setattr(spectra, "DENSE_LIMIT", 16)
    model = dnc_optimum(relu_cfg(K=4, n=10, d=20), seed=10, permutations=True)
    r = layer_report(model, 2)
    assert r.projection_proportion == pytest.approx(1.0, abs=1e-10)
    assert r.hessian_rank == 16


def test_no_import_cycle_between_the_matrix_modules():
    """The module-level imports among ``deepufm.matrices.*`` form no cycle, no module imports a
    sibling inside a function, and the engine imports no operator class (it works on anything
    with size, dtype, device and matmat)."""
    import ast
    from pathlib import Path

    import deepufm.matrices as pkg

    root = Path(pkg.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "deepufm.matrices"
            ):
                parts = node.module.split(".")
                deps |= {parts[2]} if len(parts) > 2 else {a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom):
                        assert not (inner.module or "").startswith("deepufm"), (
                            path.stem,
                            node.name,
                        )
        graph[path.stem] = deps
    assert "operator" not in graph["spectra"] and "structured" not in graph["spectra"]
    state: dict[str, int] = {}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"import cycle: {' -> '.join((*trail, node))}"
        state[node] = 1
        for dep in graph.get(node, ()):
            visit(dep, (*trail, node))
        state[node] = 2

    for name in graph:
        visit(name, ())

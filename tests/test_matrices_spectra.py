"""Fast exact spectral routes (block Lanczos top-k, factor-basis and row-space knockouts) against
dense autograd and dense eigendecompositions."""

import pytest
import torch

from deepufm.errors import ConfigError
from deepufm.matrices import (
    DenseSymmetric,
    JacobianGram,
    KroneckerGram,
    KroneckerSum,
    RowGram,
    knockout_spectra,
    lanczos_topk,
    layer_hessian,
    papyan_decomposition,
    spectra,
)
from matrix_cases import dense_hessian, jacobian_rows_ref, random_model
from test_matrices_papyan import by_definition

# Layer 2: N K = 64 rows >= p = 49 (dense route); N K = 40 < p = 64 and N K = 15 < p = 49 (Gram
# route; CE has rank <= N (K - 1) = 10, so a top 12 includes exact zeros)
RELU_DENSE = dict(K=4, n=16, d=7, L=3, activation="relu", loss="mse", lam=0.01)
RELU_GRAM = dict(K=4, n=10, d=8, L=3, activation="relu", loss="mse", lam=0.01)
RELU_CE_GRAM = dict(K=3, n=5, d=7, L=3, activation="relu", loss="ce", lam=0.01)


def assert_topk(vals, vecs, ref, k):
    ref_vals = torch.linalg.eigvalsh(ref).flip(0)
    top = float(ref_vals[0])
    assert vals.shape == (k,) and vecs.shape == (ref.shape[0], k)
    torch.testing.assert_close(vals, ref_vals[:k], rtol=0, atol=1e-10 * top)
    torch.testing.assert_close(ref @ vecs, vecs * vals, rtol=0, atol=1e-9 * top)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=vecs.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cfg", [RELU_DENSE, RELU_GRAM, RELU_CE_GRAM])
@pytest.mark.parametrize(("k", "block"), [(1, None), (9, None), (9, 3), (12, 16)])
def test_lanczos_topk_on_the_structured_hessian(cfg, k, block):
    model = random_model(cfg, seed=1)
    H = layer_hessian(model, 2)
    assert isinstance(H, JacobianGram)
    ref = dense_hessian(model, (2,))
    vals, vecs = lanczos_topk(H, k, tol=1e-10, block=block)
    assert_topk(vals, vecs, ref, k)
    again, _ = lanczos_topk(H, k, tol=1e-10, block=block)
    assert torch.equal(vals, again)  # seeded start block


def test_lanczos_topk_restarts_and_multiple_eigenvalues():
    """A small basis forces thick restarts; an eigenvalue of multiplicity 12 > block size 4 needs
    fresh directions after the Krylov space becomes invariant (and a zero eigenvalue in the top k
    counts as well)."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.cat(
        [torch.tensor([5.0, 4.0]), torch.full((12,), 3.0), torch.linspace(2.0, 0.1, 30)]
    ).to(torch.float64)
    spectrum = torch.cat([spectrum, torch.zeros(80 - spectrum.numel(), dtype=torch.float64)])
    M = DenseSymmetric(Q @ torch.diag(spectrum) @ Q.T)
    for k, block, basis in [(14, 4, 30), (16, 4, 40), (10, 2, 16)]:
        vals, vecs = lanczos_topk(M, k, tol=1e-12, block=block, max_basis=basis)
        assert_topk(vals, vecs, M.dense(), k)
    low = DenseSymmetric(Q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0]).double()) @ Q[:, :3].T)
    vals, vecs = lanczos_topk(low, 6, block=2)  # rank 3: three exact zeros in the top 6
    assert_topk(vals, vecs, low.dense(), 6)
    with pytest.raises(ConfigError):
        lanczos_topk(M, 0)
    vals, _ = lanczos_topk(M, 30)  # k >= p / 4: dense
    torch.testing.assert_close(vals, spectrum[:30], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cfg", [RELU_DENSE, RELU_GRAM])
def test_layer_hessian_topk_switches_to_lanczos_beyond_the_limit(cfg, monkeypatch):
    model = random_model(cfg, seed=2)
    H = layer_hessian(model, 2)
    ref = dense_hessian(model, (2,))
    exact = H.topk(9)
    assert exact.certificate.method in ("dense", "gram")
    monkeypatch.setattr(spectra, "DENSE_LIMIT", 16)
    calls = []
    original = spectra.iterative_topk
    monkeypatch.setattr(
        spectra, "iterative_topk", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    vals, vecs = H.topk(9, tol=1e-12)
    assert calls == [1]
    assert_topk(vals, vecs, ref, 9)
    torch.testing.assert_close(vals, exact[0], rtol=0, atol=1e-12 * float(exact[0][0]))


def test_jacobian_gram_rejects_an_unknown_part():
    with pytest.raises(ConfigError, match="part"):
        JacobianGram(torch.ones(2, 2, 3), torch.ones(4, 2), class_size=1, part="class")


@pytest.mark.parametrize("cfg", [RELU_DENSE, RELU_GRAM, RELU_CE_GRAM])
def test_row_space_knockouts_equal_dense_differences(cfg):
    """ReLU/CE: H - G_class = V^T (I - M_class) V and H - G_cross = V^T (I - M_pair + M_class) V
    keep N R rows; products, dense forms, row Grams and spectra all equal the dense differences."""
    model = random_model(cfg, seed=3)
    l = 2
    H = dense_hessian(model, (l,))
    ref = by_definition(jacobian_rows_ref(model, l))
    scale = float(H.abs().max())
    tol = dict(rtol=1e-10, atol=1e-12 * scale)
    ko = papyan_decomposition(model, l).knockouts()
    K = model.config.K
    for key, part in [("class", "minus_class"), ("cross", "minus_cross")]:
        M = ko[key]
        assert isinstance(M, JacobianGram) and M.part == part
        want = H - ref[key]
        torch.testing.assert_close(M.dense(), want, **tol)
        V = torch.randn(M.size, 3, generator=torch.Generator().manual_seed(0), dtype=H.dtype)
        torch.testing.assert_close(M.matmat(V), want @ V, **tol)
        rows = M.rows()
        torch.testing.assert_close(rows.T @ rows, want, **tol)
        torch.testing.assert_close(M.gram(), rows @ rows.T, **tol)
        torch.testing.assert_close(M.trace(), torch.trace(want), **tol)
        want_vals = torch.linalg.eigvalsh(want).flip(0)
        torch.testing.assert_close(M.eigvalsh(), want_vals, rtol=0, atol=1e-10 * scale)
        assert int((want_vals > 1e-9 * scale).sum()) <= M.rank_bound
        assert_topk(*M.topk(3), want, 3)
    N, R = model.config.N, K
    assert ko["class"].rank_bound == min(N * R - K, H.shape[0])
    assert ko["cross"].rank_bound == min(N * R - (K * R - K), H.shape[0])
    assert isinstance(ko["within"], RowGram) and ko["within"].F.shape[0] == K + K * K


def test_kronecker_knockouts_in_the_factor_basis():
    """Linear MSE, d < N and d > N: knockouts are KroneckerSums of size K min(d, N) at most (the
    class means and mean row share the spans of H and A), their
    spectra (zeros counted), vectors, rows and traces equal the dense differences."""
    for cfg, l in [
        (dict(K=3, n=4, d=5, L=3, activation="linear", loss="mse", lam=0.01), 2),
        (dict(K=2, n=2, d=6, L=2, activation="linear", loss="mse", lam=0.01), 1),
        (dict(K=3, n=2, d=7, L=3, activation="linear", loss="mse", lam=0.01), 3),
    ]:
        model = random_model(cfg, seed=4)
        H = dense_hessian(model, (l,))
        ref = by_definition(jacobian_rows_ref(model, l))
        scale = float(H.abs().max())
        K, N, d = cfg["K"], cfg["K"] * cfg["n"], cfg["d"]
        dec = papyan_decomposition(model, l)
        got = knockout_spectra(model, l)
        for key, M in dec.knockouts().items():
            assert isinstance(M, KroneckerSum)
            assert M.rank_bound <= K * min(d, N)
            want = H - ref[key]
            torch.testing.assert_close(M.dense(), want, rtol=1e-10, atol=1e-12 * scale)
            want_vals = torch.linalg.eigvalsh(want).flip(0)
            torch.testing.assert_close(M.eigvalsh(), want_vals, rtol=0, atol=1e-12 * scale)
            torch.testing.assert_close(got[key], want_vals, rtol=0, atol=1e-12 * scale)
            F, w = M.row_factor()
            torch.testing.assert_close(F.T @ (w.unsqueeze(1) * F), want, rtol=0, atol=1e-12 * scale)
            torch.testing.assert_close(M.trace(), torch.trace(want), rtol=1e-10, atol=0)
            k = int((want_vals > 1e-9 * scale).sum())
            assert_topk(*M.topk(k), want, k)


def test_kronecker_sum_combines_and_flattens():
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    P1, Q1, P2, Q2 = r(2, 4), r(3, 2), r(1, 4), r(3, 1)
    A, B = KroneckerGram(P1, Q1), KroneckerGram(P2, Q2)
    S = A - 0.5 * B
    assert isinstance(S, KroneckerSum) and len(S.terms) == 2
    T = S + B  # flattened: three Kronecker terms, one basis
    assert isinstance(T, KroneckerSum) and [c for c, _ in T.terms] == [1.0, -0.5, 1.0]
    want = A.dense() + 0.5 * B.dense()
    torch.testing.assert_close(T.dense(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        T.eigvalsh(), torch.linalg.eigvalsh(want).flip(0), rtol=0, atol=1e-12
    )
    assert T.eigvalsh().shape == (12,) and T.rank_bound == 3 * 3  # B's factors count once
    V = r(12, 2)
    torch.testing.assert_close(T.matmat(V), want @ V, rtol=1e-12, atol=1e-12)

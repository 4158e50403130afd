"""`deepufm.analyze` beyond dense layers: the matrix-free route of curved layers (certified top-k
of H and of E = H - G), the full-network Hessian and its SLQ density, the class-size-weighted
Papyan decomposition, and refusals. References are built here from dense autograd
(`torch.func.hessian`, `torch.func.jacrev`) and Kronecker algebra, not from the code under test."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import deepufm
from deepufm.errors import ConfigError, UncertifiedError
from deepufm.matrices import labelled_papyan, papyan_decomposition
from report_checks import check_report

K = 4


class Head(nn.Module):
    """A biased head, curved after its first layer (GELU) and tanh upstream."""

    def __init__(self, d_in=6, width=20, hidden=12) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.Tanh())
        self.fc = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, K)

    def forward(self, x):
        return self.out(F.gelu(self.fc(self.body(x))))


def unbalanced(N=30, d_in=6, seed=0, classes=K):
    """Unbalanced classes in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    base, move = N // classes, N // classes // 2
    sizes = [base] * classes
    sizes[0] += N - base * classes + move
    sizes[1] -= move
    y = torch.repeat_interleave(torch.arange(classes), torch.tensor(sizes))
    return X, y[torch.randperm(N, generator=g)]


def data_loss(name, k=K):
    if name == "mse":
        return lambda z, y: 0.5 * ((z - F.one_hot(y, k).double()) ** 2).sum(1).mean()
    return lambda z, y: F.cross_entropy(z, y)


def homogeneous(d_out, d_in):
    """perm with [vec(W), b][perm] = vec([W b]) (row-major, CONVENTIONS in deepufm.analysis)."""
    idx = torch.arange(d_out * d_in).reshape(d_out, d_in)
    return torch.cat([idx, d_out * d_in + torch.arange(d_out)[:, None]], dim=1).reshape(-1)


def dense_layer_hessian(net, X, y, layer, loss):
    """torch.func.hessian of the data loss w.r.t. (weight, bias), in the vec([W b]) order."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    kw, kb = f"{layer}.weight", f"{layer}.bias"
    W, b = params[kw], params[kb]

    def f(theta):
        p = dict(params)
        p[kw], p[kb] = theta[: W.numel()].reshape(W.shape), theta[W.numel() :]
        return data_loss(loss)(functional_call(net, p, (X,)), y)

    Hd = hessian(f)(torch.cat([W.reshape(-1), b]))
    perm = homogeneous(*W.shape)
    return Hd[perm][:, perm]


def jacobian_rows(net, X, layer):
    """Per-sample Jacobian of the logits w.r.t. (weight, bias) by jacrev: (N, K, p), vec([W b])."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    kw, kb = f"{layer}.weight", f"{layer}.bias"
    W = params[kw]

    def z_one(w, b, x):
        p = dict(params)
        p[kw], p[kb] = w, b
        return functional_call(net, p, (x.unsqueeze(0),))[0]

    jw, jb = vmap(jacrev(z_one, argnums=(0, 1)), in_dims=(None, None, 0))(W, params[kb], X)
    N, k = X.shape[0], jw.shape[1]
    flat = torch.cat([jw.reshape(N, k, -1), jb.reshape(N, k, -1)], dim=2)
    return flat[:, :, homogeneous(*W.shape)]


def loss_factor(z, loss):
    """M_n with M_n^T M_n = d2l/dz2: I (MSE) or Papyan's diag(sqrt p)(I - 1 p^T) (CE)."""
    N, k = z.shape
    eye = torch.eye(k, dtype=z.dtype)
    if loss == "mse":
        return eye.expand(N, k, k)
    p = torch.softmax(z, 1)
    return p.sqrt()[:, :, None] * (eye - p[:, None, :])


@pytest.fixture
def iterative_route(monkeypatch):
    """Small operators here stand for large ones: the engine's switch (which would decompose
    these few-hundred-parameter Hessians exactly) sends matrix-free operators to the certified
    block Lanczos route unless k is a large part of them, so that route is what is tested."""
    from deepufm.analysis import layer as layer_mod
    from deepufm.matrices import spectra

    def switch(size, k, matrix_free=False):
        return 4 * k >= size or (not matrix_free and size <= spectra.DENSE_LIMIT)

    monkeypatch.setattr(spectra, "use_exact", switch)
    monkeypatch.setattr(layer_mod, "use_exact", switch)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_matrix_free_topk_and_residual_match_dense_autograd(loss, iterative_route):
    torch.manual_seed(0)
    net = Head().double()
    X, y = unbalanced()
    a = deepufm.analyze(net, (X, y), loss, layers=["fc"])
    r = a.layers[0]
    p = 12 * 21
    assert r["parameters"] == p and r["hessian_route"].startswith("matrix-free")
    assert "lanczos" in r["hessian_certificate"]["method"]  # p = 252: the route forced
    assert r["hessian_certificate"]["certified"] and r["uncertified"] == []
    Hd = dense_layer_hessian(net, X, y, "fc", loss)
    ref = torch.linalg.eigvalsh(Hd).flip(0)
    got = torch.tensor(r["hessian_eigenvalues"])
    scale = float(ref.abs().max())
    assert got.shape == (K * K + K,)
    assert float((got - ref[: K * K + K]).abs().max()) <= 1e-8 * scale
    # E = H - G with G from jacrev rows: its top and bottom, and ||E||_F / ||H||_F within 4 errors
    V = jacobian_rows(net, X, "fc")
    rows = loss_factor(net(X).detach(), loss) @ V
    G = torch.einsum("nrp,nrq->pq", rows, rows) / len(y)
    E = torch.linalg.eigvalsh(Hd - G).flip(0)
    e_scale = float(E.abs().max())
    assert np.allclose(r["residual_eigenvalues"], E[: K * K + K], rtol=0, atol=1e-8 * e_scale)
    assert np.allclose(
        r["residual_eigenvalues_bottom"], E.flip(0)[: K * K + K], rtol=0, atol=1e-8 * e_scale
    )
    exact = float(torch.linalg.norm(Hd - G) / torch.linalg.norm(Hd))
    err = r["residual_relative_norm_stderr"]
    assert 0 < err < 0.1 * exact and abs(r["residual_relative_norm"] - exact) <= 4 * err
    assert "Hutchinson" in r["residual_relative_norm_method"]
    # ranks from the top k only: stated, and saturated (all 20 above the rank rule)
    assert r["hessian_rank"] == K * K + K and r["hessian_rank_saturated"]
    assert "top 20 only" in r["hessian_spectrum"]
    assert all(c["certified"] for c in r["certificates"].values())
    # the dense route where the engine's switch prefers it (p = 13 * 4 = 52 <= 4 k) agrees
    small = deepufm.analyze(net, (X, y), loss, layers=["out"], route="matrix-free")
    s = small.layers[0]
    Hs = dense_layer_hessian(net, X, y, "out", loss)
    ref_s = torch.linalg.eigvalsh(Hs).flip(0)[: K * K + K]
    assert s["hessian_certificate"]["method"].startswith("dense")
    assert np.allclose(
        s["hessian_eigenvalues"], ref_s, rtol=0, atol=1e-10 * float(ref_s.abs().max())
    )
    assert s["residual_relative_norm_stderr"] == 0.0 and not s["hessian_rank_saturated"]


def test_curved_layer_above_the_old_dense_limit():
    """d_in = 128, d_out = 64 with bias: 8,256 parameters, curved (tanh) downstream. Reference:
    H = 1/N sum_n (d2 l_n / du_n^2) ⊗ h~_n h~_n^T (u = W~ h~), whose non-zero spectrum lives in
    R^64 ⊗ span{h~_n}: a (64 N x 64 N) dense matrix from per-sample autograd Hessians in u."""
    k, N = 3, 10
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, k)).double()
    X, y = unbalanced(N=N, d_in=128, seed=2, classes=k)
    a = deepufm.analyze(net, (X, y), "mse", layers=["0"])
    r = a.layers[0]
    assert r["parameters"] == 8256 and r["hessian_certificate"]["certified"]
    assert "lanczos" in r["hessian_certificate"]["method"]
    with torch.no_grad():
        U = net[0](X)

    def tail(u, t):  # the per-sample loss as a function of the layer output u
        return 0.5 * ((net[2](torch.tanh(u)) - t) ** 2).sum()

    A = vmap(hessian(tail))(U, F.one_hot(y, k).double()).detach()  # (N, 64, 64)
    Ht = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1)  # (N, 129)
    Q = torch.linalg.qr(Ht.T)[0]  # (129, N): an orthonormal basis of span{h~_n}
    q = Ht @ Q  # coordinates of h~_n
    small = torch.einsum("nij,na,nb->iajb", A, q, q).reshape(64 * N, 64 * N) / N
    vals = torch.linalg.eigvalsh(small).flip(0)
    ref = torch.cat([vals, torch.zeros(8256 - 64 * N, dtype=vals.dtype)]).sort(descending=True)
    want = ref.values[: k * k + k]
    scale = float(vals.abs().max())
    assert np.allclose(r["hessian_eigenvalues"], want, rtol=0, atol=1e-8 * scale)
    with pytest.raises(ConfigError, match=r"full.*8192"):
        deepufm.analyze(net, (X, y), "mse", layers=["0"], full=True)


def flat_hessian(net, X, y, loss, k):
    """Dense Hessian of the data loss w.r.t. every parameter (named_parameters order)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def f(t):
        parts, start = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = t[start : start + s.numel()].reshape(s)
            start += s.numel()
        return data_loss(loss, k)(functional_call(net, parts, (X,)), y)

    return hessian(f)(theta)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_network_topk_and_density_against_dense_hessian(loss, tmp_path, iterative_route):
    k = 3
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, k)).double()  # 103 params
    X, y = unbalanced(N=21, d_in=6, seed=5, classes=k)
    a = deepufm.analyze(net, (X, y), loss, layers=["2"], network_topk=5, network_density=40)
    net_rec = a.network
    Hd = flat_hessian(net, X, y, loss, k)
    p = Hd.shape[0]
    assert net_rec["parameters"] == p == 103
    ref = torch.linalg.eigvalsh(Hd).flip(0)
    top = net_rec["topk"]
    assert top["certificate"]["certified"] and "lanczos" in top["certificate"]["method"]
    assert np.allclose(top["eigenvalues"], ref[:5], rtol=0, atol=1e-8 * float(ref.abs().max()))
    dens = net_rec["density"]
    grid, phi = np.asarray(dens["grid"]), np.asarray(dens["density"])
    assert abs(np.trapezoid(phi, grid) - 1) < 1e-3
    tr1, tr2 = float(torch.trace(Hd)) / p, float(torch.trace(Hd @ Hd)) / p
    assert abs(dens["trace_over_p"] - tr1) <= 4 * dens["trace_over_p_stderr"]
    assert abs(dens["second_moment"] - tr2) <= 4 * dens["second_moment_stderr"]
    assert dens["trace_over_p_stderr"] < 0.2 * abs(tr2) ** 0.5
    # results.json gains "network" only when asked; the figure is drawn
    assert set(json.loads(a.to_json())) == {"config", "layers", "network"}
    plain = deepufm.analyze(net, (X, y), loss, layers=["2"])
    assert plain.network is None and set(json.loads(plain.to_json())) == {"config", "layers"}
    if loss == "mse":
        a.write(tmp_path / "out")
        _, page = check_report(tmp_path / "out")
        assert len(page.images) == 3 and (tmp_path / "out/figures/network-hessian.png").exists()
        only_top = deepufm.analyze(net, (X, y), loss, layers=["2"], network_topk=2)
        assert only_top.network["density"] is None
        only_top.write(tmp_path / "top")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unbalanced_papyan_sums_to_g_and_matches_jacobian_rows(loss):
    """labelled_papyan on shuffled, unbalanced labels against the unbalanced definition from
    explicit jacrev rows; with balanced labels in any order it equals the class-major form."""
    torch.manual_seed(2)
    net = Head().double()
    X, y = unbalanced(N=26)
    V = jacobian_rows(net, X, "fc")  # (N, K, p)
    z = net(X).detach()
    rows = loss_factor(z, loss) @ V  # (N, R, p)
    # the inputs of labelled_papyan: M_n dz_n/du_n and h~ (by jacrev in u, not in the weights)
    with torch.no_grad():
        U = net.fc(net.body(X))
        h = net.body(X)
    J = vmap(jacrev(lambda u: net.out(F.gelu(u))))(U)  # (N, K, d_out)
    A = loss_factor(z, loss) @ J
    Ht = torch.cat([h, torch.ones(len(y), 1, dtype=h.dtype)], 1).T
    dec = labelled_papyan(A, Ht, y, K, form="test")
    N = len(y)
    G = torch.einsum("nrp,nrq->pq", rows, rows) / N
    ref = {
        "class": torch.zeros_like(G),
        "cross": torch.zeros_like(G),
        "within": torch.zeros_like(G),
    }
    for c in range(K):
        idx = (y == c).nonzero().flatten()
        pair = rows[idx].mean(0)  # (R, p)
        v_c = pair.mean(0)
        ref["class"] += (K * len(idx) / N) * torch.outer(v_c, v_c)
        ref["cross"] += (len(idx) / N) * (pair - v_c).T @ (pair - v_c)
        dev = (rows[idx] - pair).reshape(-1, G.shape[0])
        ref["within"] += dev.T @ dev / N
    scale = float(G.abs().max())
    torch.testing.assert_close(dec.gauss_newton.dense(), G, rtol=0, atol=1e-12 * scale)
    parts = {n: M.dense() for n, M in dec.components().items()}
    for n, M in parts.items():
        torch.testing.assert_close(M, ref[n], rtol=0, atol=1e-12 * scale)
    total = parts["class"] + parts["cross"] + parts["within"]
    torch.testing.assert_close(total, G, rtol=0, atol=1e-12 * scale)
    for n, M in dec.knockouts().items():
        want = torch.linalg.eigvalsh(G - ref[n]).flip(0)[:K]
        torch.testing.assert_close(M.topk(K).values, want, rtol=0, atol=1e-10 * scale)
    # balanced labels: any order gives the class-major (THEORY M3) matrices
    yb = torch.arange(K).repeat_interleave(6)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    major = labelled_papyan(A[:24], Ht[:, :24], yb, K, "m")
    shuffled = labelled_papyan(A[:24][perm], Ht[:, :24][:, perm], yb[perm], K, "s")
    for (n, M1), M2 in zip(major.components().items(), shuffled.components().values()):
        torch.testing.assert_close(M1.dense(), M2.dense(), rtol=0, atol=1e-12 * scale, msg=n)


def test_shared_kronecker_papyan_unbalanced():
    """Linear MSE downstream (shared rows): Kronecker terms, weighted by the class sizes."""
    torch.manual_seed(3)
    A = torch.randn(K, 5, dtype=torch.float64)
    X, y = unbalanced(N=19, d_in=6, seed=7)
    H = X.T
    dec = labelled_papyan(A, H, y, K, "mse")
    rows = torch.einsum("rd,en->nrde", A, H).reshape(len(y), K, -1)
    N = len(y)
    G = torch.einsum("nrp,nrq->pq", rows, rows) / N
    class_ = torch.zeros_like(G)
    for c in range(K):
        idx = (y == c).nonzero().flatten()
        v_c = rows[idx].mean(0).mean(0)
        class_ += (K * len(idx) / N) * torch.outer(v_c, v_c)
    torch.testing.assert_close(dec.gauss_newton.dense(), G, rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.class_.dense(), class_, rtol=0, atol=1e-12)
    total = sum(M.dense() for M in dec.components().values())
    torch.testing.assert_close(total, G, rtol=0, atol=1e-12)
    assert type(dec.class_).__name__ == "KroneckerGram"


def test_papyan_decomposition_is_the_balanced_labelled_form():
    from matrix_cases import random_model

    model = random_model("relu-ce-perlayer", seed=3)
    dec = papyan_decomposition(model, 1)
    assert type(dec.within).__name__ == "JacobianGram"  # the class-major row-space form kept


def test_uncertified_results_are_flagged_and_strict_raises(monkeypatch, tmp_path, iterative_route):
    """When the engine's check finds a missed eigenvalue (forced here) the top-k is not
    certified: the record and the report say so, and strict=True raises instead."""
    from deepufm.matrices import spectra

    torch.manual_seed(0)
    net = Head().double()
    X, y = unbalanced()
    certify = spectra.certify

    def claims_a_missed_eigenvalue(op, values, vectors, **kw):
        kw["deflated_max"] = 10 * float(values.abs().max()) + 1.0
        return certify(op, values, vectors, **kw)

    monkeypatch.setattr(spectra, "certify", claims_a_missed_eigenvalue)
    a = deepufm.analyze(net, (X, y), "mse", layers=["fc"])
    r = a.layers[0]
    assert "hessian" in r["uncertified"] and not r["hessian_certificate"]["certified"]
    assert r["hessian_certificate"]["reason"]
    a.write(tmp_path / "out")
    assert "NOT certified" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(UncertifiedError):
        deepufm.analyze(net, (X, y), "mse", layers=["fc"], strict=True)


class Augmenting:
    """A re-iterable whose batches are the same samples with fresh noise on every pass."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        yield self.X + 1e-3 * torch.randn_like(self.X), self.y


def test_refusals_of_inputs_and_options():
    torch.manual_seed(0)
    net = Head().double()
    X, y = unbalanced()
    with pytest.raises(ConfigError, match="Two passes over the data differ"):
        deepufm.analyze(net, Augmenting(X, y), "mse")
    bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, K)).double()
    bn[1].running_var[2] = float("nan")
    with pytest.raises(ConfigError, match=r"buffer.*1\.running_var"):
        deepufm.analyze(bn, (X, y), "mse")
    conv = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, K))
    with pytest.raises(ConfigError, match="Conv1d"):
        deepufm.analyze(conv.double(), (X, y), "mse", layers=["1"])
    seq = nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Linear(3, 2), nn.Flatten(), nn.Linear(4, K))
    with pytest.raises(ConfigError, match="extra axes"):
        deepufm.analyze(seq.double(), (X, y), "mse", layers=["1"])
    total = sum(p.numel() for p in net.parameters())
    for kw, match in [
        (dict(network_topk=0), rf"network_topk.*\[1, {total}\]"),
        (dict(network_topk=total + 1), "network_topk"),
        (dict(network_topk=True), "network_topk"),
        (dict(network_density=-1), "network_density"),
        (dict(network_density=1.5), "network_density"),
        (dict(network_density=True, density_steps=0), "density_steps"),
        (dict(residual_probes=1), "residual_probes"),
        (dict(strict="yes"), "strict"),
    ]:
        with pytest.raises(ConfigError, match=match):
            deepufm.analyze(net, (X, y), "mse", **kw)


def test_a_small_curved_layer_is_decomposed_exactly_by_default():
    """p = 252, top 20: a certified block Lanczos would cost more Hessian-vector products than
    forming H (252), so the engine's switch forms it; the numbers are exact (dense autograd)."""
    torch.manual_seed(0)
    net = Head().double()
    X, y = unbalanced()
    r = deepufm.analyze(net, (X, y), "mse", layers=["fc"]).layers[0]
    assert r["hessian_certificate"]["method"].startswith("dense")
    assert r["hessian_certificate"]["certified"] and r["residual_relative_norm_stderr"] == 0.0
    ref = torch.linalg.eigvalsh(dense_layer_hessian(net, X, y, "fc", "mse")).flip(0)
    got = torch.tensor(r["hessian_eigenvalues"])
    assert float((got - ref[: K * K + K]).abs().max()) <= 1e-10 * float(ref.abs().max())

"""`deepufm.analyze` on users' models, against references built here from dense autograd and
numpy: the Hessian of the data loss w.r.t. (weight, bias) by `torch.func.hessian`, explicit
per-sample Jacobian rows by `torch.func.jacrev`, NC1 and gradient coefficients in numpy."""

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

import deepufm
from deepufm.errors import ConfigError
from report_checks import check_report

K = 4


class Net(nn.Module):
    """Unequal widths, biases, tanh upstream, GELU inside the head."""

    def __init__(self, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(7, 6), act(), nn.Linear(6, K))

    def forward(self, x):
        return self.head(self.body(x))


def make_data(N=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3] * 5 + [0, 0, 1])[torch.randperm(N, generator=g)]  # unbalanced
    return X, y


def make_net(act=nn.GELU, seed=0):
    torch.manual_seed(seed)
    return Net(act).double()


def loss_of(name):
    if name == "mse":
        return lambda z, y: 0.5 * ((z - F.one_hot(y, K).double()) ** 2).sum(1).mean()
    return lambda z, y: F.cross_entropy(z, y)


def dense_layer_hessian(net, X, y, layer, loss):
    """Reference: torch.func.hessian of the data loss w.r.t. (weight, bias) of one layer."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    keys = [f"{layer}.weight", f"{layer}.bias"]

    def f(w, b):
        p = dict(params)
        p[keys[0]], p[keys[1]] = w, b
        return loss_of(loss)(functional_call(net, p, (X,)), y)

    W, b = params[keys[0]], params[keys[1]]
    blocks = hessian(f, argnums=(0, 1))(W, b)
    p_w, p_b = W.numel(), b.numel()
    Hd = torch.zeros(p_w + p_b, p_w + p_b)
    Hd[:p_w, :p_w] = blocks[0][0].reshape(p_w, p_w)
    Hd[:p_w, p_w:] = blocks[0][1].reshape(p_w, p_b)
    Hd[p_w:, :p_w] = blocks[1][0].reshape(p_b, p_w)
    Hd[p_w:, p_w:] = blocks[1][1].reshape(p_b, p_b)
    return Hd


def jacobian_rows(net, X, layer):
    """Reference: per-sample Jacobian of the logits w.r.t. (weight, bias): (N, K, p)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    keys = [f"{layer}.weight", f"{layer}.bias"]

    def z_of(w, b):
        p = dict(params)
        p[keys[0]], p[keys[1]] = w, b
        return functional_call(net, p, (X,))

    jw, jb = jacrev(z_of, argnums=(0, 1))(params[keys[0]], params[keys[1]])
    N = X.shape[0]
    return torch.cat([jw.reshape(N, K, -1), jb.reshape(N, K, -1)], dim=2)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_every_hessian_eigenvalue_matches_dense_autograd(loss):
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), loss, full=True)
    assert [r["name"] for r in a.layers] == ["body.0", "head.0", "head.2"]
    assert [r["layer"] for r in a.layers] == [1, 2, 3]
    for r in a.layers:
        ref = torch.linalg.eigvalsh(dense_layer_hessian(net, X, y, r["name"], loss)).flip(0)
        got = torch.tensor(r["hessian_eigenvalues"])
        assert got.shape == ref.shape
        tol = 1e-10 * float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol, r["name"]
        assert r["hessian_rank"] == int((ref.abs() > 1e-8 * ref.abs().max()).sum())
    # the default keeps the K^2 + K algebraically largest, descending
    short = deepufm.analyze(net, (X, y), loss)
    for r, full in zip(short.layers, a.layers):
        assert r["hessian_eigenvalues"] == pytest.approx(
            full["hessian_eigenvalues"][: K * K + K], abs=1e-12
        )
    # the curved layers report E = H - G; the last layer's downstream is the identity
    routes = [r["hessian_route"].split(":")[0] for r in a.layers]
    assert routes == ["matrix-free", "matrix-free", "structured"]
    assert [r["downstream"]["linear"] for r in a.layers] == [False, False, True]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gauss_newton_and_residual_against_explicit_rows(loss):
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), loss, full=True)
    for r in a.layers:
        V = jacobian_rows(net, X, r["name"])  # (N, K, p)
        z = net(X).detach()
        B = torch.eye(K).expand(len(y), K, K)
        if loss == "ce":
            p = torch.softmax(z, 1)
            B = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        G = torch.einsum("nkp,nkl,nlq->pq", V, B, V) / len(y)
        Hd = dense_layer_hessian(net, X, y, r["name"], loss)
        assert torch.tensor(r["gauss_newton_eigenvalues"]) == pytest.approx(
            torch.linalg.eigvalsh(G).flip(0), abs=1e-10 * float(G.abs().max())
        )
        if r["downstream"]["linear"]:
            assert r["residual_eigenvalues"] is None
            assert float((Hd - G).abs().max()) < 1e-12
        else:
            E = torch.linalg.eigvalsh(Hd - G).flip(0)
            assert torch.tensor(r["residual_eigenvalues"]) == pytest.approx(E, abs=1e-10)
            assert float(E.abs().max()) > 1e-3  # a real residual, not round-off


def papyan_reference(V, z, loss, y, rtol):
    """Unbalanced Papyan terms from explicit rows v_{n r}: the Jacobian rows themselves (MSE) or
    Papyan's (2020) sqrt(p_r) (v_r - sum_k p_k v_k) (CE)."""
    rows = V
    if loss == "ce":
        p = torch.softmax(z, 1)
        rows = p.sqrt()[:, :, None] * (V - torch.einsum("nk,nkq->nq", p, V)[:, None, :])
    N = rows.shape[0]
    G = torch.einsum("nrp,nrq->pq", rows, rows) / N
    G_class = torch.zeros_like(G)
    G_cross = torch.zeros_like(G)
    G_within = torch.zeros_like(G)
    for c in range(K):
        idx = (y == c).nonzero().flatten()
        n_c = len(idx)
        pair = rows[idx].mean(0)  # (R, p)
        v_c = pair.mean(0)
        G_class += (K * n_c / N) * torch.outer(v_c, v_c)
        G_cross += (n_c / N) * (pair - v_c).T @ (pair - v_c)
        dev = rows[idx] - pair
        G_within += torch.einsum("nrp,nrq->pq", dev, dev) / N
    assert float((G_class + G_cross + G_within - G).abs().max()) < 1e-12
    top = float(torch.linalg.eigvalsh(G).abs().max())
    rank = lambda S: int((torch.linalg.eigvalsh(S).abs() > rtol * top).sum())  # noqa: E731
    ranks = {"class": rank(G_class), "cross": rank(G_cross), "within": rank(G_within)}
    knock = {
        "class": torch.linalg.eigvalsh(G - G_class).flip(0)[: K * K],
        "cross": torch.linalg.eigvalsh(G - G_cross).flip(0)[: K * K],
        "within": torch.linalg.eigvalsh(G - G_within).flip(0)[: K * K],
    }
    return ranks, knock


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_papyan_ranks_and_knockouts_against_explicit_jacobian_rows(loss):
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), loss)
    z = net(X).detach()
    for r in a.layers:
        ranks, knock = papyan_reference(jacobian_rows(net, X, r["name"]), z, loss, y, 1e-8)
        assert r["papyan_ranks"] == ranks, r["name"]
        for key, ref in knock.items():
            got = torch.tensor(r["knockout_eigenvalues"][key])
            assert got == pytest.approx(ref, abs=1e-10 * float(ref.abs().max())), (r["name"], key)


def test_nc1_gradient_and_alignment_against_numpy():
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), "mse")
    yy = y.numpy()
    feats = {}
    hooks = [
        net.get_submodule(r["name"]).register_forward_hook(
            lambda m, i, o, n=r["name"]: feats.__setitem__(n, (i[0].detach(), o.detach()))
        )
        for r in a.layers
    ]
    z = net(X)
    for h in hooks:
        h.remove()
    for r in a.layers:
        h, u = (t.numpy() for t in feats[r["name"]])
        mu = np.stack([h[yy == c].mean(0) for c in range(K)], 1)  # (d, K)
        within = h - mu[:, yy].T
        sw = within.T @ within / len(yy)
        cen = mu - mu.mean(1, keepdims=True)
        sb = cen @ cen.T / K
        nc1 = np.trace(sw @ np.linalg.pinv(sb)) / K
        assert r["nc1"] == pytest.approx(nc1, rel=1e-9)
        # gamma_cc' = cos^2(g, mu'_c ⊗ [mu_c'; 1]) with g the autograd gradient of (W, b)
        mod = net.get_submodule(r["name"])
        loss = 0.5 * ((z - F.one_hot(y, K).double()) ** 2).sum(1).mean()
        gW, gb = torch.autograd.grad(loss, (mod.weight, mod.bias), retain_graph=True)
        Gt = torch.cat([gW, gb[:, None]], 1).numpy()
        mu_out = np.stack([u[yy == c].mean(0) for c in range(K)], 1)
        mu_in = np.vstack([mu, np.ones((1, K))])
        gamma = np.array(
            [
                [
                    (mu_out[:, a_] @ Gt @ mu_in[:, b_]) ** 2
                    / ((Gt**2).sum() * (mu_out[:, a_] ** 2).sum() * (mu_in[:, b_] ** 2).sum())
                    for b_ in range(K)
                ]
                for a_ in range(K)
            ]
        )
        assert np.asarray(r["gradient_coefficients"]) == pytest.approx(gamma, abs=1e-12)
        assert r["data_gradient_norm"] == pytest.approx(np.linalg.norm(Gt), rel=1e-10)
        Hd = dense_layer_hessian(net, X, y, r["name"], "mse").numpy()
        # to the homogeneous ordering vec([W b])
        d_out, d_in = mod.weight.shape
        perm = np.hstack(
            [np.arange(d_out * d_in).reshape(d_out, d_in), d_out * d_in + np.arange(d_out)[:, None]]
        ).ravel()
        Hh = Hd[np.ix_(perm, perm)]
        f = np.empty((K, K))
        for a_ in range(K):
            for b_ in range(K):
                v = np.outer(mu_out[:, a_], mu_in[:, b_]).ravel()
                Hv = Hh @ v
                f[a_, b_] = (v @ Hv) ** 2 / ((v @ v) * (Hv @ Hv))
        assert np.asarray(r["eigvec_alignment"]) == pytest.approx(f, abs=1e-10)


def test_structured_and_matrix_free_routes_agree_where_both_apply():
    net = make_net(act=nn.ReLU)  # piecewise-linear head: structured for head.0 and head.2
    X, y = make_data()
    for loss in ("mse", "ce"):
        auto = deepufm.analyze(net, (X, y), loss, layers=["head.0", "head.2"], full=True)
        free = deepufm.analyze(
            net, (X, y), loss, layers=["head.0", "head.2"], full=True, route="matrix-free"
        )
        for s, m in zip(auto.layers, free.layers):
            assert s["hessian_route"].startswith("structured")
            assert m["hessian_route"].startswith("matrix-free")
            scale = max(abs(v) for v in s["hessian_eigenvalues"])
            assert m["hessian_eigenvalues"] == pytest.approx(
                s["hessian_eigenvalues"], abs=1e-10 * scale
            )
            assert m["residual_relative_norm"] < 1e-12
            for key in ("eigvec_alignment", "gradient_coefficients"):
                assert np.asarray(m[key]) == pytest.approx(np.asarray(s[key]), abs=1e-9)
            assert m["papyan_ranks"] == s["papyan_ranks"]
    with pytest.raises(ConfigError, match="curved"):
        deepufm.analyze(make_net(), (X, y), "mse", layers=["head.0"], route="structured")


def test_batches_float32_model_and_unchanged_state():
    """A float32 CNN with BatchNorm in train mode, analysed from a non-shuffling DataLoader:
    the same numbers as from the tensors, and the model (dtype, flags, buffers) untouched."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).float()
    X = torch.randn(17, 1, 4, 4, dtype=torch.float32)
    y = torch.tensor([0, 1, 2] * 5 + [2, 2])
    net.train()
    with torch.no_grad():
        net(X)  # running statistics away from their initial values
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=False)
    a = deepufm.analyze(net, loader, "mse")
    b = deepufm.analyze(net, (X, y), "mse")
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert next(net.parameters()).dtype == torch.float32
    assert a.config["batches"] == 4 and a.config["dtype"] == "float64"
    for ra, rb in zip(a.layers, b.layers):
        assert ra["hessian_eigenvalues"] == pytest.approx(rb["hessian_eigenvalues"], rel=1e-10)
    # eval-mode BatchNorm: the reference is the float64 copy in eval mode
    ref_net = copy.deepcopy(net).double().eval()
    z = ref_net(X.double())
    mse = 0.5 * ((z - F.one_hot(y, 3).double()) ** 2).sum(1).mean()
    assert a.config["data_loss"] == pytest.approx(mse.item(), rel=1e-12)
    # the paper's data loss is K/2 times nn.MSELoss
    assert float(mse) == pytest.approx(1.5 * float(nn.MSELoss()(z, F.one_hot(y, 3).double())))


def test_refusals_name_what_and_why():
    net = make_net()
    X, y = make_data()
    with pytest.raises(ConfigError, match="Tanh"):
        deepufm.analyze(net, (X, y), "mse", layers=["body.1"])
    with pytest.raises(ConfigError, match="nope"):
        deepufm.analyze(net, (X, y), "mse", layers=["nope"])
    with pytest.raises(ConfigError, match=r"at least one nn\.Linear"):
        deepufm.analyze(nn.Sequential(nn.Flatten(), nn.Tanh()), (X, y), "mse")
    with pytest.raises(ConfigError, match=r"before torch\.jit\.script"):
        deepufm.analyze(torch.jit.trace(net, X), (X, y), "mse")
    with pytest.raises(ConfigError, match="at least 2 logits"):
        deepufm.analyze(nn.Linear(5, 1).double(), (X, torch.zeros(23, dtype=torch.long)), "mse")
    with pytest.raises(ConfigError, match="no sample of class 3"):
        deepufm.analyze(net, (X, y % 3), "mse")
    with pytest.raises(ConfigError, match=r"labels in \[0, K-1=3\]"):
        deepufm.analyze(net, (X, y + 1), "mse")
    bad = make_net()
    with torch.no_grad():
        bad.head[0].bias[1] = float("nan")
    with pytest.raises(ConfigError, match=r"head\.0\.bias"):
        deepufm.analyze(bad, (X, y), "mse")
    shuffled = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True)
    with pytest.raises(ConfigError, match="Two passes over the data differ"):
        deepufm.analyze(net, shuffled, "mse")
    with pytest.raises(ConfigError, match="one-shot iterator"):
        deepufm.analyze(net, iter([(X, y)]), "mse")
    with pytest.raises(ConfigError, match="integer"):
        deepufm.analyze(net, (X, y.double()), "mse")
    with pytest.raises(ConfigError, match="loss"):
        deepufm.analyze(net, (X, y), "hinge")
    # numpy arrays are taken as tensors; a numpy float label is refused like a tensor one
    a_np = deepufm.analyze(net, (X.numpy(), y.numpy()), "mse", layers=["head.2"])
    a_t = deepufm.analyze(net, (X, y), "mse", layers=["head.2"])
    assert a_np.to_dict() == a_t.to_dict()
    with pytest.raises(ConfigError, match="integer"):
        deepufm.analyze(net, (X.numpy(), y.numpy().astype(float)), "mse")
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"data X.*batch 0.*1 of its 115 entries are NaN"):
        deepufm.analyze(net, (Xn, y), "mse")

    class Overflow(nn.Module):
        def forward(self, z):
            return z * 1e308 * 1e308  # finite parameters, infinite logits

    with pytest.raises(
        ConfigError, match=r"non-finite logits for samples \[0, 1, 2, 3, 4\] \.\.\."
    ):
        deepufm.analyze(nn.Sequential(net, Overflow()), (X, y), "mse")
    huge = make_net()
    with torch.no_grad():
        huge.head[0].weight.mul_(1e300)  # finite logits, but their curvature overflows
    with pytest.raises(ConfigError, match=r"layers.*'body\.0'.*overflow or hold NaN in float64"):
        deepufm.analyze(huge, (X, y), "mse")
    with pytest.raises(ConfigError, match=r"X of shape \(23, 6\).*forward pass .* failed: mat1"):
        deepufm.analyze(net, (torch.randn(23, 6), y), "mse")  # not the model's input width
    with pytest.raises(ConfigError, match="batch mean"):
        deepufm.analyze(net, (X, y), lambda z, t: F.cross_entropy(z, t, reduction="sum"))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(ConfigError, match="called 2 times"):
        deepufm.analyze(Twice().double(), (torch.randn(8, 4), torch.arange(8) % 4), "mse")


def test_callable_loss_equals_built_in():
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), "ce", layers=["head.0"])
    b = deepufm.analyze(net, (X, y), nn.CrossEntropyLoss(), layers=["head.0"])
    ra, rb = a.layers[0], b.layers[0]
    assert rb["hessian_eigenvalues"] == pytest.approx(ra["hessian_eigenvalues"], abs=1e-12)
    assert rb["gauss_newton_eigenvalues"] == pytest.approx(
        ra["gauss_newton_eigenvalues"], abs=1e-12
    )
    assert rb["residual_eigenvalues"] == pytest.approx(ra["residual_eigenvalues"], abs=1e-12)
    # Papyan's terms depend on the square-root factor of d2l/dz2: Papyan's own for "ce", the
    # symmetric eigen-factor for a callable (stated in papyan_form)
    assert ra["papyan_form"] != rb["papyan_form"]


def test_write_results_figures_and_report(tmp_path):
    net = make_net(act=nn.ReLU)
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), "mse", layers=["head.0"])
    out = tmp_path / "analysis"
    html = a.write(out)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "layers"}
    assert results == json.loads(a.to_json())
    assert list(results["layers"][0])[:2] == ["name", "layer"]
    md, page = check_report(out)  # the max |gamma_cc - 1/K| column no longer splits the table
    assert md[0][0][7] == "max |γ_cc - 1/K|" and [r[0] for r in md[0][1:]] == ["head.0"]
    assert len(page.images) == 2 and html == out / "report.html"
    a.write(out)  # rewriting an earlier analysis is fine
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="other files"):
        a.write(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="a folder"):
        a.write(out / "results.json")
    (out / "extra.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"extra\.txt"):
        a.write(out)


FACTORY = """
import torch
from torch import nn


def build():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)
    ).double()
"""


def test_cli_model_form_matches_the_api(tmp_path, monkeypatch, capsys):
    from deepufm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodels

    model = mymodels.build()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # the weights file differs from the factory's initialisation
    torch.save(model.state_dict(), tmp_path / "w.pt")
    X, y = make_data()
    np.savez(tmp_path / "d.npz", X=X.numpy().astype(np.float32), y=y.numpy())
    argv = ["analyze", "--model", "mymodels:build", "--weights", "w.pt", "--data", "d.npz"]
    two = ["--linear", "4", "--linear", "2"]  # two layers keep the figures quick; forward order
    assert main([*argv, "--loss", "ce", *two, "--out", "out"]) == 0
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    # the .npz X is float32: cast to the model's dtype (float64), as the API gets it here
    X32 = torch.as_tensor(X.numpy().astype(np.float32)).double()
    ref = deepufm.analyze(model, (X32, y), "ce", layers=["2", "4"])
    assert [r["name"] for r in got["layers"]] == ["2", "4"]
    assert got == json.loads(ref.to_json())
    assert (tmp_path / "out" / "report.html").exists()
    # refusals: a foreign state_dict, a bad spec, RUN_DIR with --model, no data
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pt")
    capsys.readouterr()
    assert (
        main(["analyze", "--model", "mymodels:build", "--weights", "bad.pt", "--data", "d.npz"])
        == 2
    )
    assert "--weights" in capsys.readouterr().err
    assert main(["analyze", "--model", "mymodels", "--data", "d.npz"]) == 2
    assert "PKG.MODULE:FACTORY" in capsys.readouterr().err
    assert main(["analyze", "--model", "nosuch:build", "--data", "d.npz"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["analyze", "--model", "mymodels:build"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["analyze"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_the_example_runs_tiny(tmp_path):
    pytest.importorskip("mlxtend")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "own_classifier.py"
    spec = importlib.util.spec_from_file_location("own_classifier", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "report"
    analysis = example.main(["--epochs", "1", "--per-class", "3", "--out", str(out)])
    assert [r["name"] for r in analysis.layers] == ["head.0", "head.2", "head.4"]
    assert analysis.config["N"] == 30 and analysis.config["class_counts"] == [3] * 10
    # BatchNorm upstream, ReLU between the head layers: every head layer is structured
    assert all(r["hessian_route"].startswith("structured") for r in analysis.layers)
    assert (out / "report.html").exists() and (out / "results.json").exists()
    # the probe in the training loop: epochs 0 and 1 of the middle head layer, and its figures
    from deepufm.training.rundir import read_metrics

    rows = read_metrics(tmp_path / "report-training")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [rec["name"] for rec in rows[-1]["layers"]] == ["head.2"]
    final = analysis.layer("head.2")
    for key in ("nc1", "effective_rank_hessian", "outlier_mean_std", "eigvec_alignment"):
        np.testing.assert_allclose(rows[-1]["layers"][0][key], final[key], rtol=1e-9, err_msg=key)
    figures = tmp_path / "report-training" / "figures"
    assert {p.name for p in figures.glob("v2-fig*.png")} == {
        f"v2-fig{n}-head-2.png" for n in (6, 16, 17, 18)
    }


def test_cli_model_form_refusals(tmp_path, monkeypatch, capsys):
    """Each bad input of ``analyze --model``: exit 2, one paragraph naming the parameter and the
    value, no traceback; a float32 model gets float64 .npz data cast (from the current directory,
    no PYTHONPATH); an occupied --out is refused before the analysis and left as it was."""
    from deepufm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "qa_cli_models.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 4)).float()\n\n\n"
        "def number():\n    return 3\n"
    )
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 4)).float()
    torch.save(model.state_dict(), "w.pt")
    state = model.state_dict()
    del state["0.bias"]
    state["extra"] = torch.zeros(1)
    torch.save(state, "keys.pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"][1, 2] = float("nan")
    torch.save(state, "nan.pt")
    torch.save(model, "whole.pt")  # a pickled module, not a state_dict
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, "ckpt.pt")
    X, y = make_data()
    X64, yn = (X.double() + 1e-9).numpy(), y.numpy()  # not representable in float32
    np.savez("d.npz", X=X64, y=yn)
    np.savez("noy.npz", X=X64)
    np.savez("floaty.npz", X=X64, y=yn.astype(np.float64))
    np.savez("one.npz", X=X64, y=np.zeros_like(yn))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    base = ["analyze", "--model", "qa_cli_models:build", "--weights", "w.pt", "--data"]
    cases = [
        (["analyze", "--model", "qa_cli_models:nothere", "--data", "d.npz"], r"--model.*nothere"),
        (["analyze", "--model", "qa_cli_models:number", "--data", "d.npz"], r"--model.*int"),
        (["analyze", "--model", "no_such_module:build", "--data", "d.npz"], "no_such_module"),
        ([*base[:4], "keys.pt", "--data", "d.npz"], r"--weights.*0\.bias.*extra"),
        ([*base[:4], "missing.pt", "--data", "d.npz"], r"--weights.*missing\.pt"),
        ([*base[:4], "whole.pt", "--data", "d.npz"], r"--weights.*pickled model.*state_dict\(\)"),
        ([*base[:4], "ckpt.pt", "--data", "d.npz"], r"key 'state_dict' holds a dict"),
        ([*base, "noy.npz"], r"--data.*noy\.npz.*missing \['y'\]"),
        ([*base, "floaty.npz"], r"--data.*floaty\.npz.*integer.*float64"),
        ([*base, "one.npz"], r"no sample of class 1"),
        ([*base[:4], "nan.pt", "--data", "d.npz"], r"2\.weight.*NaN"),
        ([*base, "d.npz", "--out", "occupied"], r"--out.*occupied.*other files"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepufm analyze: error: invalid ") and "Traceback" not in err
        assert re.search(pattern, " ".join(err.split())), (argv, err)
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]
    # the float64 .npz is cast to the float32 model (the analysis itself in float64)
    assert main([*base, "d.npz", "--linear", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = deepufm.analyze(model, (torch.as_tensor(X64).float(), y), "mse", layers=["2"])
    assert got == json.loads(ref.to_json())
    uncast = deepufm.analyze(model, (torch.as_tensor(X64), y), "mse", layers=["2"])
    assert got["config"]["data_loss"] != uncast.config["data_loss"]


def test_write_never_deletes_a_file_it_did_not_write(tmp_path):
    """A rewrite replaces the earlier analysis's figures, but a user's file put into figures/
    makes it refuse, and that file (and everything else) stays."""
    net = make_net()
    X, y = make_data()
    a = deepufm.analyze(net, (X, y), "mse", layers=["head.2"])
    out = tmp_path / "out"
    a.write(out)
    a.write(out)
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["effective-ranks.png", "layer-head.2.png"]
    (out / "figures" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"figures/ also holds \['mine\.png'\]"):
        a.write(out)
    assert sorted(p.name for p in (out / "figures").iterdir()) == [*figs[:1], *figs[1:], "mine.png"]
    assert (out / "figures" / "mine.png").read_bytes() == b"not ours"
    assert (out / "results.json").exists()


def test_analyze_leaves_a_float64_model_bitwise_unchanged():
    """Analysed in its own dtype (no copy is made): parameters and buffers bitwise equal,
    train/eval flags, requires_grad and .grad as they were."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Dropout(0.2), nn.Linear(6, K)
    ).double()
    X, y = make_data()
    net.train()
    net(X.double()).sum().backward()  # running statistics moved, gradients present
    net[0].weight.requires_grad_(False)
    net[4].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    flags = [m.training for m in net.modules()]
    deepufm.analyze(net, (X.double(), y), "ce", dtype=None)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for n, p in net.named_parameters():
        assert p.requires_grad == (n != "0.weight")
        g = grads[n]
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g)), n


def test_a_stalled_lanczos_falls_back_to_the_dense_hessian(monkeypatch):
    """Block Lanczos on a curved layer that cannot converge (as it can on E's near-null
    cluster): a layer small enough is formed densely instead, every eigenvalue against dense
    autograd, and the record says so. (The stall is simulated: use_exact forced off, the
    iterative solver raising for the matrix-free operators.)"""
    from deepufm.analysis import layer as layer_mod
    from deepufm.errors import ConvergenceError
    from deepufm.matrices import spectra

    net = make_net()
    X, y = make_data()
    original = spectra.iterative_topk

    def stalls(op, k, tol=0.0, **kw):
        if op.matrix_free:
            raise ConvergenceError("block Lanczos", k, 1234)
        return original(op, k, tol, **kw)

    monkeypatch.setattr(layer_mod, "use_exact", lambda *a, **kw: False)
    monkeypatch.setattr(spectra, "use_exact", lambda *a, **kw: False)
    monkeypatch.setattr(spectra, "iterative_topk", stalls)
    a = deepufm.analyze(net, (X, y), "mse", layers=["head.0"])
    r = a.layer("head.0")
    assert "did not converge after 1234 products, so H was formed densely" in r["hessian_route"]
    ref = torch.linalg.eigvalsh(dense_layer_hessian(net, X, y, "head.0", "mse")).flip(0)
    got = torch.tensor(r["hessian_eigenvalues"])
    assert float((got - ref[: K * K + K]).abs().max()) <= 1e-10 * float(ref.abs().max())
    assert r["residual_relative_norm_method"] == "exact (dense H and G)"


def test_a_large_layer_whose_residual_stalls_is_flagged_not_fatal(monkeypatch, tmp_path):
    """Above the dense limit, a stalled Lanczos on E = H - G (H itself certified) leaves H's
    numbers, against dense autograd, and flags E: ``uncertified``, no residual, the route says
    why; with ``strict=True`` it raises. (The limit is lowered and the stall simulated.)"""
    from deepufm.analysis import layer as layer_mod
    from deepufm.errors import ConvergenceError
    from deepufm.matrices import spectra
    from deepufm.matrices.operator import LinearCombination

    net = make_net()
    X, y = make_data()
    original = spectra.iterative_topk

    def stalls_on_e(op, k, tol=0.0, **kw):
        if isinstance(op, LinearCombination) and op.matrix_free:
            raise ConvergenceError("block Lanczos", k, 999)
        return original(op, k, tol, **kw)

    monkeypatch.setattr(layer_mod, "MAX_DENSE", 10)
    monkeypatch.setattr(layer_mod, "use_exact", lambda *a, **kw: False)
    monkeypatch.setattr(spectra, "use_exact", lambda *a, **kw: False)
    monkeypatch.setattr(spectra, "iterative_topk", stalls_on_e)
    a = deepufm.analyze(net, (X, y), "mse", layers=["head.0"])
    r = a.layer("head.0")
    a.write(tmp_path / "out")  # the report states it
    assert (
        "head.0: the top 20 of residual_top by block Lanczos are NOT certified"
        in (tmp_path / "out" / "report.md").read_text()
    )
    assert "its extreme eigenvalues NOT found" in r["hessian_route"]
    assert r["uncertified"] == ["residual_top"] and r["certificates"]["hessian"]["certified"]
    assert r["residual_eigenvalues"] is None and r["residual_relative_norm"] is None
    ref = torch.linalg.eigvalsh(dense_layer_hessian(net, X, y, "head.0", "mse")).flip(0)
    got = torch.tensor(r["hessian_eigenvalues"])
    assert float((got - ref[: K * K + K]).abs().max()) <= 1e-8 * float(ref.abs().max())
    with pytest.raises(ConvergenceError):
        deepufm.analyze(net, (X, y), "mse", layers=["head.0"], strict=True)


def test_compiled_models_and_submodules_are_measured_eagerly():
    # A torch.compile'd graph skips forward hooks: without running it eagerly the analysis saw
    # no layer at all. The whole model compiled, and one submodule compiled, against dense
    # autograd on the uncompiled network (the same parameters).
    net = make_net()
    X, y = make_data()
    whole = deepufm.analyze(torch.compile(net), (X, y), "mse", full=True)
    assert [r["name"] for r in whole.layers] == [
        "_orig_mod.body.0",
        "_orig_mod.head.0",
        "_orig_mod.head.2",
    ]
    inner = copy.deepcopy(net)
    inner.head = torch.compile(inner.head)
    part = deepufm.analyze(inner, (X, y), "mse", full=True)
    assert [r["name"] for r in part.layers] == ["body.0", "head._orig_mod.0", "head._orig_mod.2"]
    for a, b, name in zip(whole.layers, part.layers, ["body.0", "head.0", "head.2"]):
        ref = torch.linalg.eigvalsh(dense_layer_hessian(net, X, y, name, "mse")).flip(0)
        tol = 1e-10 * float(ref.abs().max())
        for r in (a, b):
            assert float((torch.tensor(r["hessian_eigenvalues"]) - ref).abs().max()) <= tol

"""`deepufm analyze` and the metrics: predictions at a trained run, dense autograd at random points,
hand-worked metric cases."""

import json
import math

import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev

from deepufm import DeepUFM, UFMConfig
from deepufm.cli import main
from deepufm.matrices import (
    backprop_error_matrix,
    data_gradient,
    gradient_covariance,
    per_sample_gradients,
)
from deepufm.metrics import (
    effective_rank,
    eigvec_alignment,
    negative_fraction,
    outlier_count,
    outlier_stats,
    projection_proportion,
    singular_vector_alignment,
    subspace_overlap,
)
from deepufm.models import functional as Fn
from deepufm.theory import dnc_constants
from deepufm.training import rundir as rd

KEYS = {
    "layer",
    "hessian_eigenvalues",
    "hessian_rank",
    "papyan_ranks",
    "knockout_eigenvalues",
    "gradient_coefficients",
    "eigvec_alignment",
    "projection_proportion",
    "weight_singular_values",
    "grad_cov_eigenvalues",
    "backprop_eigenvalues",
    "feature_gram_eigenvalues",
    "nc1",
    "orthogonal_frame_distance",
    "effective_rank_hessian",
    "effective_rank_weight",
    "negative_fraction",
}


def analyze_json(capsys, *argv):
    assert main(["analyze", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_analyze_a_trained_run_shows_the_theory(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--K",
        "3",
        "--n",
        "8",
        "--d",
        "10",
        "--L",
        "3",
        "--lam",
        "0.01",
        "--epochs",
        "6000",
        "--lr",
        "0.5",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    res = analyze_json(capsys, str(out))
    k = dnc_constants(rd.read_config(out)[0])
    assert res["grad_norm"] < 1e-9 and res["loss"] == pytest.approx(k.loss, rel=1e-10)
    assert [e["layer"] for e in res["layers"]] == [1, 2, 3]
    for e in res["layers"]:
        assert KEYS <= set(e)
        assert e["hessian_rank"] == 9 and e["papyan_ranks"] == {"class": 3, "cross": 6, "within": 0}
        np.testing.assert_allclose(
            e["hessian_eigenvalues"][:9], k.hessian_eigenvalue[e["layer"] - 1], rtol=1e-8
        )
        np.testing.assert_allclose(np.diag(e["gradient_coefficients"]), 1 / 3, atol=1e-8)
        assert np.min(e["eigvec_alignment"]) > 1 - 1e-8 and e["projection_proportion"] > 1 - 1e-8
        ko = e["knockout_eigenvalues"]
        assert sum(v > 1e-8 for v in ko["class"]) == 6 and sum(v > 1e-8 for v in ko["cross"]) == 3
        assert e["effective_rank_hessian"] == pytest.approx(9, rel=1e-6)
        assert e["effective_rank_weight"] == pytest.approx(3, rel=1e-6)
        assert e["negative_fraction"] is None
    # --layer selects, and a bad layer is a clear error
    assert [e["layer"] for e in analyze_json(capsys, str(out), "--layer", "2")["layers"]] == [2]
    assert main(["analyze", str(out), "--layer", "7"]) == 2
    assert "--layer=7" in capsys.readouterr().err


def _write_params_only(tmp_path, cfg, model):
    """A directory holding only config.json (model section) and params.npz."""
    d = tmp_path / "params-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    rd.save_params(d, model)
    return d


@pytest.mark.parametrize(
    ("activation", "loss"), [("linear", "mse"), ("relu", "mse"), ("linear", "ce"), ("relu", "ce")]
)
def test_analyze_at_a_random_point_matches_dense_autograd(tmp_path, capsys, activation, loss):
    cfg = UFMConfig(
        K=3,
        n=3,
        d=4,
        L=3,
        activation=activation,
        loss=loss,
        init_std=0.8,
        seed=7,
        lam_W=[0.01, 0.02, 0.03],
        lam_H=0.04,
        device="cpu",
    )
    model = DeepUFM.init(cfg)
    d = _write_params_only(tmp_path, cfg, model)
    res = analyze_json(capsys, str(d), "--full")
    params = [p.clone().requires_grad_(True) for p in model.params]
    total = model.loss_fn()(params[0], params[1:])
    grads = torch.autograd.grad(total, params)
    assert res["loss"] == pytest.approx(float(total.detach()), rel=1e-13)
    assert res["grad_norm"] == pytest.approx(
        math.sqrt(sum(float((g**2).sum()) for g in grads)), rel=1e-12
    )
    for e in res["layers"]:
        l = e["layer"]

        def data(w, l=l):
            Ws = list(model.W)
            Ws[l - 1] = w.reshape(model.W[l - 1].shape)
            return Fn.data_loss(Fn.forward(model.H1, Ws, activation)[-1], loss, cfg.K, cfg.n)

        w = model.W[l - 1].reshape(-1)
        ref = torch.linalg.eigvalsh(hessian(data)(w)).flip(0)
        np.testing.assert_allclose(
            e["hessian_eigenvalues"], ref.numpy(), rtol=0, atol=1e-10 * float(ref[0])
        )
        np.testing.assert_allclose(
            e["weight_singular_values"], torch.linalg.svdvals(model.W[l - 1]).numpy(), rtol=1e-12
        )


@pytest.mark.parametrize(
    ("activation", "loss"), [("linear", "mse"), ("relu", "mse"), ("relu", "ce")]
)
def test_gradients_covariance_and_backprop_against_autograd(activation, loss):
    cfg = UFMConfig(
        K=3, n=2, d=4, L=3, activation=activation, loss=loss, init_std=0.8, seed=1, device="cpu"
    )
    model = DeepUFM.init(cfg)
    for l in range(1, cfg.L + 1):

        def per_sample(w, l=l):
            Ws = list(model.W)
            Ws[l - 1] = w.reshape(model.W[l - 1].shape)
            Z = Fn.forward(model.H1, Ws, activation)[-1]
            if loss == "mse":
                return 0.5 * ((Z - Fn.labels(cfg.K, cfg.n)) ** 2).sum(dim=0)
            return -torch.log_softmax(Z, dim=0)[Fn.class_index(cfg.K, cfg.n), torch.arange(cfg.N)]

        G = jacrev(per_sample)(model.W[l - 1].reshape(-1))
        torch.testing.assert_close(per_sample_gradients(model, l), G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(data_gradient(model, l), G.mean(dim=0), rtol=1e-12, atol=1e-14)
        C = G - G.mean(dim=0)
        torch.testing.assert_close(
            gradient_covariance(model, l).dense(), C.T @ C / cfg.N, rtol=1e-11, atol=1e-14
        )
        ref = torch.linalg.eigvalsh(C.T @ C / cfg.N).flip(0)
        torch.testing.assert_close(
            gradient_covariance(model, l).eigvalsh(), ref, rtol=0, atol=1e-12 * float(ref[0])
        )
    # back-propagated errors by autograd of 1/2||z - e_c'||^2 w.r.t. the pre-activation u^(l+1)
    l = 1
    Hs = model.features()
    U = model.W[0] @ Hs[0]

    def z_of_u(u):
        X = Fn.activate(u, activation) if cfg.L > 1 else u
        return Fn.forward(X, model.W[1:], activation)[-1] if cfg.L > 1 else u

    Z = z_of_u(U)
    total = torch.zeros(cfg.d, cfg.d)
    for cp in range(cfg.K):
        target = torch.zeros(cfg.K, cfg.N)
        target[cp] = 1
        delta = jacrev(lambda u, t=target: 0.5 * ((z_of_u(u) - t) ** 2).sum())(U)  # (d, N)
        total += delta @ delta.T
    torch.testing.assert_close(
        backprop_error_matrix(model, l).dense(), total / cfg.N, rtol=1e-11, atol=1e-14
    )
    assert Z.shape == (cfg.K, cfg.N)


def test_metrics_on_hand_worked_cases():
    M = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    e = torch.eye(3)
    torch.testing.assert_close(eigvec_alignment(e, M), torch.tensor([1.0, 1.0, 0.0]))
    v = torch.tensor([[1.0], [1.0], [0.0]])
    # v^T M v = 4, ||v||^2 = 2, ||Mv||^2 = 10
    assert float(eigvec_alignment(v, M)[0]) == pytest.approx(16 / 20)
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 1e-18 * 0])) == pytest.approx(2.0)
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(
        math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    )
    assert outlier_count(torch.tensor([5.0, 5.0, 4.9, 1e-3, 5e-4, 1e-16])) == 3
    assert outlier_count(torch.tensor([2.0, 2.0, 2.0])) == 3
    assert outlier_stats(torch.tensor([3.0, 1.0, 2.0]), 2) == (
        pytest.approx(2.5),
        pytest.approx(0.5),
    )
    assert negative_fraction(torch.tensor([[-1.0, 0.0], [2.0, -1e-9]])) == 0.5
    assert negative_fraction(torch.tensor([[-1.0, 0.0], [2.0, -1e-9]]), tol=1e-6) == 0.25
    g = torch.tensor([3.0, 4.0, 0.0])
    assert projection_proportion(g, e[:, :1]) == pytest.approx(9 / 25)
    assert subspace_overlap(e[:, :2], e[:, 1:]) == pytest.approx(0.5)
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    left, right = singular_vector_alignment(W, torch.eye(2), torch.eye(2))
    torch.testing.assert_close(left, torch.ones(2))
    torch.testing.assert_close(right, torch.ones(2))

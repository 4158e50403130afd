"""The real-network experiment on a tiny preset: run contract, figures, results, Theorem 6."""

import json

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from deepufm.cli import main
from deepufm.errors import ConfigError
from deepufm.experiments import resnet_head
from deepufm.experiments.registry import catalogue
from deepufm.matrices import DenseSymmetric, block_hessian, module_hessian
from deepufm.training import network as net
from report_checks import check_report
from test_data import write_cifar


def tiny_config(**changes):
    """ResNet-8 at quarter width, a 4-layer head of width 12, a few images per class."""
    base = dict(
        dataset="mnist-embedded",
        per_class=3,
        epochs=4,
        lr=0.05,
        lr_halve_at=(2,),
        d=12,
        L=4,
        width=0.25,
        blocks=1,
        dtype="float64",
        probes_per_decade=2,
        checkpoint_every=2,
    )
    return net.NetworkTrainConfig(**(base | changes))


@pytest.fixture
def tiny_network(monkeypatch):
    def tiny(name, dataset):
        cfg = tiny_config(dataset=dataset)
        return resnet_head.Preset(cfg, 2, (0, 4), 12, 8, full_hessian_per_class=2)

    monkeypatch.setattr(resnet_head, "preset", tiny)


def test_mnist_resnet_experiment_end_to_end(tmp_path, tiny_network):
    out = tmp_path / "mnist"
    assert main(["run", "mnist-resnet", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert data["config"]["experiment"] == "mnist-resnet" and data["config"]["layer"] == 2
    assert data["config"]["training"]["per_class"] == 3 and data["constants"]["outliers"] == 100
    quantities = {r["quantity"] for r in results}
    assert "Hessian outliers (log-gap rule)" in quantities
    # every structural row is at head layer 2; the Theorem 6 verdict is of the whole network
    (thm6_row,) = [r for r in results if r["layer"] is None]
    assert all(r["layer"] == 2 for r in results if r is not thm6_row)
    assert thm6_row["theorem"] == "v2 Thm 6" and thm6_row["predicted"] == pytest.approx(0.1)
    assert "Hutchinson standard error" in thm6_row["note"]
    assert thm6_row["scope"] == "in" or "||off-head||_F / ||H_WW||_F" in thm6_row["scope"]
    assert any(r["quantity"].endswith("over training") for r in results)
    figures = {p.name for p in (out / "figures").iterdir()}
    for item, exp, _ in catalogue():
        if exp == "mnist-resnet":
            assert f"{item}.png" in figures, item
    md, _ = check_report(out)
    thm6 = next(t for t in md if t[0] == ["quantity", "value"])
    cells = {row[0]: row[1] for row in thm6[1:]}
    assert float(cells["||H||_F (Hutchinson)"]) > 0 and float(cells["||H_WW||_F"]) > 0
    departures = next(t for t in md if t[0][:3] == ["setting", "this run", "paper"])
    rows = {row[0]: row for row in departures[1:]}
    assert rows["images per class"][1:3] == ["3", "5000"] and rows["images per class"][4] == "yes"
    assert rows["epochs"][1:3] == ["4", "4000"]
    gamma = next(row for row in md[0][1:] if row[0] == "max |gamma_cc - 1/K|")
    assert len(gamma) == len(md[0][0])
    assert (out / "params.npz").is_file() or (out / "checkpoint.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert (
        last["epoch"] == 4
        and len(last["eigvec_alignment"]) == 10
        and len(last["sv_align_left"]) == 10
    )


def test_cifar_resnet_runs_on_cifar_files_and_names_missing_ones(tmp_path, tiny_network, capsys):
    write_cifar(tmp_path / "cifar", N=30)  # the official python pickles, written by the tests
    out = tmp_path / "run"
    args = ["run", "cifar-resnet", "--out", str(out), "--quiet"]
    assert main([*args, "--data-dir", str(tmp_path / "cifar"), "--per-class", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["results"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records[-1]["nc1"]) == 4  # one per head input
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["per_class"] == 3 and config["data"]["N"] == 30
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"v2-fig14.png", "v2-fig15.png", "v2-fig6.png"} <= figures
    _, page = check_report(out)
    assert len(page.images) == sum(e == "cifar-resnet" for _, e, _ in catalogue())
    assert config["data"]["name"] == "cifar10"
    capsys.readouterr()
    assert main([*args, "--data-dir", str(tmp_path / "empty")]) != 0
    assert "data_batch_1" in capsys.readouterr().err
    assert main(["run", "linear-ufm", "--per-class", "3", "--out", str(tmp_path / "x")]) != 0
    assert "--per-class" in capsys.readouterr().err


def test_full_hessian_comparison_against_independent_computations():
    cfg = tiny_config(per_class=1, epochs=0, width=0.16)
    data = net.load_network_data(cfg)
    model = net.build_model(cfg, data).eval()
    head = net.NetworkSnapshot(model, data, cfg, 0).head()
    cmp = resnet_head.full_hessian_comparison(model, data, cfg, k=5, probes=16)
    X, y = data.X.to(torch.float64), data.y
    loss = lambda out, t: resnet_head.batch_data_loss(out, t, "mse")  # noqa: E731
    H = module_hessian(model, loss, [(X, y)], reduction="mean")
    assert cmp.parameters == H.size == sum(p.numel() for p in model.parameters())
    # top eigenvalues: our Lanczos against scipy's ARPACK on the same matrix-free operator
    ref = eigsh(H.as_linear_operator(), k=5, which="LA", tol=1e-12)[0][::-1]
    np.testing.assert_allclose(cmp.full * cmp.full_fro, ref, rtol=1e-7)
    # the head block: the structured block Hessian of the head UFM equals the network's own
    # Hessian restricted to the head weights (autograd through the whole network)
    names = [n for n, _ in model.named_parameters() if n.startswith("head.")]
    H_WW = module_hessian(model, loss, [(X, y)], params=names, reduction="mean")
    V = torch.randn(H_WW.size, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    B = block_hessian(head).hessian
    torch.testing.assert_close(B.matmat(V), H_WW.matmat(V), rtol=1e-10, atol=1e-12)
    assert cmp.head_parameters == H_WW.size


def test_frobenius_estimate_is_unbiased_within_its_error():
    A = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M = DenseSymmetric(A + A.T)
    exact = float(torch.linalg.norm(M.dense()))
    fro, err = resnet_head.frobenius_estimate(M, 400, seed=3)
    assert abs(fro - exact) < 4 * err and err < 0.05 * exact
    with pytest.raises(ConfigError, match="probes"):
        resnet_head.frobenius_estimate(M, 1)


def test_first_per_class_keeps_the_first_images_of_every_class():
    data = net.load_network_data(tiny_config(per_class=3))
    sub = data.first_per_class(2)
    assert sub.n == 2 and sub.K == data.K
    torch.testing.assert_close(sub.X[2:4], data.X[3:5], rtol=0, atol=0)
    assert sub.y.tolist() == [c for c in range(data.K) for _ in range(2)]
    with pytest.raises(ConfigError, match="per_class"):
        data.first_per_class(4)

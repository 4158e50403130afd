"""The experiments on a tiny preset: run directory, figures, results and report."""

import json

import pytest
import torch

from deepufm.cli import main
from deepufm.experiments import linear_ufm, relu_ufm
from deepufm.experiments.registry import catalogue
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training.config import TrainConfig
from test_faults import two_figures


@pytest.fixture
def tiny_linear(monkeypatch):
    def tiny(name):
        return linear_ufm.Preset(
            UFMConfig(K=3, n=4, d=5, L=3, lam=0.01, device="cpu"),
            TrainConfig(lr=0.5, epochs=3000, probes_per_decade=3),
            2,
            (0, 3000),
            1e-6,
        )

    monkeypatch.setattr(linear_ufm, "preset", tiny)


def test_linear_ufm_experiment_end_to_end(tmp_path, capsys, tiny_linear):
    out = tmp_path / "lin"
    assert main(["run", "linear-ufm", "--out", str(out), "--quiet"]) == 0
    assert "predictions hold" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results and all(r["holds"] for r in results), [r for r in results if not r["holds"]]
    assert {
        "quantity",
        "theorem",
        "layer",
        "predicted",
        "measured",
        "rel_error",
        "tolerance",
        "holds",
    } <= set(results[0])
    layers = {r["layer"] for r in results}
    assert layers == {1, 2, 3}
    figures = {p.name for p in (out / "figures").iterdir()}
    for item in linear_ufm_items():
        assert f"{item}.png" in figures and f"{item}.pdf" in figures
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Theory vs measurement" in html
    assert (
        (out / "report.md").is_file()
        and (out / "params.npz").is_file()
        and (out / "spectra.npz").is_file()
    )


def linear_ufm_items():
    return [fid for fid, exp, _ in catalogue() if exp == "linear-ufm"]


def test_run_list_names_every_figure(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for fid in ("v1-fig3", "v1-fig14", "v2-fig9"):
        assert fid in out
    assert main(["run", "no-such-experiment"]) == 2
    assert "experiment" in capsys.readouterr().err


def test_ce_ufm_experiment_reproduces_theorem_9(tmp_path, capsys):
    out = tmp_path / "ce"
    assert main(["run", "ce-ufm", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(r["holds"] for r in results), [r for r in results if not r["holds"]]
    assert any(r["quantity"].startswith("Hessian dominant spike") for r in results)
    assert (out / "figures" / "ce-thm9.png").is_file()


@pytest.fixture
def tiny_relu(monkeypatch):
    # Seeded so that gradient descent ends, as it typically does (THEORY §7), on the flat family
    # of the first ReLU: u^(2) keeps negative entries, the deeper ones do not.
    def tiny(name):
        return relu_ufm.Preset(
            UFMConfig(K=3, n=4, d=8, L=3, lam=0.01, activation="relu", device="cpu"),
            TrainConfig(lr=0.5, epochs=20_000, probes_per_decade=3),
            2,
            (0, 20_000),
            relu_tol=1e-5,
            zero_below=0.0,
            tolerance=1e-2,
            reference_epochs=3000,
        )

    monkeypatch.setattr(relu_ufm, "preset", tiny)


def test_relu_ufm_experiment_end_to_end(tmp_path, capsys, tiny_relu):
    out = tmp_path / "relu"
    assert main(["run", "relu-ufm", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    # Every prediction either holds or says why it does not apply.
    assert all(r["holds"] or r["note"] for r in results), [
        r for r in results if not (r["holds"] or r["note"])
    ]
    by_layer = lambda l: [r for r in results if r["layer"] == l and "Hessian" in r["quantity"]]  # noqa: E731
    assert all("flat family" in r["note"] for r in by_layer(1))
    assert not any(r["note"] for r in by_layer(2) + by_layer(3))
    rank = next(r for r in by_layer(2) if r["quantity"] == "Hessian rank")
    assert rank["measured"] == 9 and rank["holds"]
    neg = {r["quantity"]: r for r in results if r["quantity"].startswith("negative fraction")}
    assert neg["negative fraction of u^(2)"]["measured"] > 0.1
    assert neg["negative fraction of u^(3)"]["measured"] == 0
    figures = {p.name for p in (out / "figures").iterdir()}
    tables = {p.name for p in (out / "tables").iterdir()}
    for item, exp, _ in catalogue():
        if exp != "relu-ufm":
            continue
        if "table" in item:
            assert f"{item}.md" in tables and f"{item}.csv" in tables
        else:
            assert f"{item}.png" in figures and f"{item}.pdf" in figures
    report = (out / "report.md").read_text()
    assert "v1 Table 4" in report and "not predicted" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
@pytest.mark.parametrize(
    "args",
    [
        ["linear-ufm", "--device", "cuda"],
        ["relu-ufm", "--device", "cuda:1"],
        ["mnist-resnet", "--device", "cuda"],
        ["mnist-resnet", "--preset", "paper"],  # the paper preset's own device is CUDA
    ],
)
def test_run_refuses_a_cuda_device_this_machine_lacks_before_writing(tmp_path, capsys, args):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "cuda" in err
    assert not out.exists()


def test_run_puts_the_models_on_the_device_given(tmp_path, monkeypatch):
    def short(name):
        return linear_ufm.Preset(
            UFMConfig(K=3, n=2, d=4, L=2, lam=0.01),  # device "auto" unless --device says
            TrainConfig(lr=0.5, epochs=20, probes_per_decade=1),
            2,
            (0, 20),
            1e-6,
        )

    monkeypatch.setattr(linear_ufm, "preset", short)
    monkeypatch.setattr(linear_ufm, "_figures", two_figures)  # drawing is not what is tested
    seen = []
    real = DeepUFM.init
    monkeypatch.setattr(DeepUFM, "init", lambda cfg: seen.append(cfg.torch_device) or real(cfg))
    out = tmp_path / "lin"
    assert main(["run", "linear-ufm", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["device"] == "cpu"
    assert seen == [torch.device("cpu")]

"""The experiments on a tiny preset: run directory, figures, results and report."""

import json

import pytest

from deepufm.cli import main
from deepufm.experiments import linear_ufm
from deepufm.experiments.registry import catalogue
from deepufm.models.config import UFMConfig
from deepufm.training.config import TrainConfig


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

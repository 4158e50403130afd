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
from report_checks import check_departures, check_report
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
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"config", "constants", "results"}
    results, config, constants = data["results"], data["config"], data["constants"]
    assert results and all(r["holds"] for r in results), [r for r in results if not r["holds"]]
    assert {
        "quantity",
        "theorem",
        "layer",
        "predicted",
        "measured",
        "abs_error",
        "rel_error",
        "tolerance",
        "holds",
        "scope",
    } <= set(results[0])
    layers = {r["layer"] for r in results}
    assert layers == {1, 2, 3}
    assert (config["experiment"], config["preset"], config["layer"]) == ("linear-ufm", "quick", 2)
    assert config["model"]["K"] == 3 and config["training"]["epochs"] == 3000
    # The constants are those of the closed form (THEORY §4.2: Lambda_l = c lam_l / (1-c)),
    # and every Hessian prediction is one of them.
    c = constants["c"]
    assert constants["hessian_eigenvalue"] == pytest.approx([c * 0.01 / (1 - c)] * 3, rel=1e-14)
    for r in results:
        if r["quantity"].startswith("Hessian outlier eigenvalue"):
            assert r["predicted"] == constants["hessian_eigenvalue"][r["layer"] - 1]
        err = abs(r["measured"] - r["predicted"])
        assert r["abs_error"] == pytest.approx(err, rel=1e-12, abs=1e-300)
        if r["predicted"] == 0:  # e.g. rank G_within: no relative error, the tolerance is absolute
            assert r["rel_error"] is None
        else:
            assert r["rel_error"] == pytest.approx(err / abs(r["predicted"]), rel=1e-12, abs=1e-300)
    assert any(r["rel_error"] is None for r in results)
    figures = {p.name for p in (out / "figures").iterdir()}
    for item in linear_ufm_items():
        assert f"{item}.png" in figures and f"{item}.pdf" in figures
    md, page = check_report(out)
    assert len(page.images) == len(linear_ufm_items())
    # this run's settings from results.json's config; the paper's: v1 §5.1 via THEORY §10
    check_departures(
        out,
        {
            "K (classes)": (str(config["model"]["K"]), "3"),
            "n (samples per class)": ("4", "40"),
            "d (width)": ("5", "60"),
            "L (layers)": ("3", "5"),
            "studied layer l": (str(config["layer"]), "3"),
            "epochs": ("3000", "not stated"),
            "learning rate": ("0.5", "not stated"),
        },
    )
    header, *rows = md[0]  # theory vs measurement: one row per record of results.json
    assert header[:3] == ["quantity", "theorem", "layer"] and len(rows) == len(results)
    assert [r[0] for r in rows] == [r["quantity"] for r in results]
    col = {name: i for i, name in enumerate(header)}
    for row, r in zip(rows, results):
        assert float(row[col["abs. error"]]) == pytest.approx(r["abs_error"], rel=1e-2, abs=1e-300)
        assert (row[col["rel. error"]] == "—") == (r["rel_error"] is None)
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
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert all(r["holds"] for r in results), [r for r in results if not r["holds"]]
    assert any(r["quantity"].startswith("Hessian dominant spike") for r in results)
    lam0 = data["constants"]["lambda0"]  # the mini-bulk: lambda0 = alpha lam_l / K (THEORY §8)
    assert lam0 == pytest.approx([data["constants"]["alpha"] * 0.01 / 3] * 3, rel=1e-14)
    bulk = [r for r in results if r["quantity"].startswith("Hessian mini-bulk")]
    assert [r["predicted"] for r in bulk] == lam0 and data["config"]["experiment"] == "ce-ufm"
    md, page = check_report(out)
    assert len(page.images) == 1 and len(md[0]) == len(results) + 1
    cfg = data["config"]
    rows = check_departures(out, {"K (classes)": (str(cfg["model"]["K"]), "not stated")})
    assert rows["epochs"][1] == str(cfg["training"]["epochs"]) == "20000"
    # the global-minimum row: DNC is the lowest loss reached at the preset's K=3, L=3
    gap = next(r for r in results if r["quantity"].startswith("DNC loss minus the lowest"))
    assert gap["holds"] and gap["theorem"] == "v2 App. B" and abs(gap["measured"]) < 1e-9
    report = (out / "report.md").read_text()
    assert "Measured at K=4, L=2" in report and "DNC is not the global minimum" in report


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
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert data["config"]["relu_tol"] == 1e-5 and data["config"]["model"]["activation"] == "relu"
    # Inside Theorem 7's hypotheses every prediction holds, except the non-negativity of u^(2)
    # (Definition 2), which gradient descent does not reproduce: it ends on the flat family.
    misses = [r for r in results if r["scope"] == "in" and not r["holds"]]
    assert [r["quantity"] for r in misses] == ["negative fraction of u^(2)"]
    assert misses[0]["note"].startswith("not reproduced") and misses[0]["layer"] == 2
    by_layer = lambda l: [r for r in results if r["layer"] == l and "Hessian" in r["quantity"]]  # noqa: E731
    # Layer 1's Jacobian carries the masks of u^(2): out of scope, with the hypothesis named.
    assert all(r["scope"].startswith("out: v2 Thm 7 needs u^(2)..u^(3) >= 0") for r in by_layer(1))
    assert all("flat family" in r["note"] and "[D]" in r["note"] for r in by_layer(1))
    assert all(r["scope"] == "in" and not r["note"] for r in by_layer(2) + by_layer(3))
    rank = next(r for r in by_layer(2) if r["quantity"] == "Hessian rank")
    assert rank["measured"] == 9 and rank["holds"]
    neg = {r["quantity"]: r for r in results if r["quantity"].startswith("negative fraction")}
    assert neg["negative fraction of u^(2)"]["measured"] > 0.1
    assert neg["negative fraction of u^(3)"]["measured"] == 0
    assert [r["layer"] for r in neg.values()] == [2, 3]  # u^(m) is the input of H_m
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
    assert "v1 Table 4" in report and "not predicted" not in report
    inside = [r for r in results if r["scope"] == "in"]
    outside = len(results) - len(inside)
    held = f"{len(inside) - 1}/{len(inside)} in-scope predictions hold; {outside} out of scope"
    assert f"## Theory vs measurement ({held}" in report
    md, page = check_report(out)
    assert len(page.images) == sum("fig" in i for i, e, _ in catalogue() if e == "relu-ufm")
    check_departures(
        out,
        {
            "d (width)": ("8", "65"),
            "L (layers)": ("3", "5"),
            "epochs": ("20000", "1000000"),
            "non-negativity tolerance of u (relative)": ("1e-05", "not stated"),
        },
    )
    assert "this project's own derivation [D]" in report and "Not reproduced" in report
    # v1 Tables 3 (ReLU, linear) and 4: layer, K diagonal entries, max |off-diag|, the matrix
    header, *rows = md[0]
    scope = header.index("scope")
    assert [row[scope] for row in rows] == [r["scope"] for r in results]
    grams = [t for t in md if "max |off-diag|" in t[0]]
    assert len(grams) == 3
    for table in grams:
        assert table[0] == ["layer", "O_11", "O_22", "O_33", "max |off-diag|", "O"]
        assert [row[0] for row in table[1:]] == ["1", "2", "3"]


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
    assert json.loads((out / "results.json").read_text())["config"]["model"]["device"] == "cpu"
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_probe_rows_are_layer_report_rows(activation):
    """One schema: every key of a spectral-probe row (but the per-layer ReLU list) is a
    ``LayerReport`` field with the value ``layer_report`` gives at the same point, knockouts
    included (the exact ``dec.knockouts()`` route, no ``G - G_X`` subtraction)."""
    from deepufm.experiments.probes import PROBE_KEYS, SpectralProbe
    from deepufm.matrices import papyan_decomposition
    from deepufm.metrics.layer_report import KEYS, layer_report

    cfg = UFMConfig(K=3, n=4, d=5, L=3, lam=0.01, activation=activation, seed=1)
    model = DeepUFM.init(cfg)
    row = SpectralProbe(layer=2, snapshot_epochs=(7,))(model, 7)
    assert set(PROBE_KEYS) <= set(KEYS)
    extra = {"negative_fraction_by_layer"} if activation == "relu" else set()
    assert set(row) == set(PROBE_KEYS) | extra
    ref = layer_report(model, 2).to_dict()
    for key in PROBE_KEYS:
        assert row[key] == ref[key], key
    ko = papyan_decomposition(model, 2).knockouts()
    for name, vals in row["knockout_eigenvalues"].items():
        assert vals == ko[name].eigvalsh()[: 3 * 3 + 3].tolist()

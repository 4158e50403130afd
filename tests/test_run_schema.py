"""Schema versions of run directories: ``manifest.json`` records the version of the measurement
files' keys; a directory of an older version whose kind's keys changed since is refused on
resume (nothing written), one whose kind's keys did not change is continued and marked current,
and a finished old run run again is rewritten whole in the current keys (no mixed schemas)."""

import json
from pathlib import Path

import pytest

from deepufm.cli import main
from deepufm.errors import ConfigError
from deepufm.experiments import linear_ufm
from deepufm.experiments import plotting as P
from deepufm.experiments.probes import PROBE_KEYS, SpectralProbe
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd
from deepufm.training.config import TrainConfig

# The experiments' probe-row keys of schema version 2 (layer_report's names). A change to what
# SpectralProbe writes must bump manifest.SCHEMA_VERSION (and say what changed in SCHEMA_CHANGES),
# so that directories written before it are not continued with mixed keys.
V2_PROBE_KEYS = {
    "layer",
    "hessian_eigenvalues",
    "effective_rank_hessian",
    "eigvec_alignment",
    "gradient_coefficients",
    "knockout_eigenvalues",
    "weight_singular_values",
    "effective_rank_weight",
    "feature_gram_eigenvalues",
}


def tiny_preset(name):
    return linear_ufm.Preset(
        UFMConfig(K=2, n=3, d=4, L=2, lam=0.01, device="cpu"),
        TrainConfig(lr=0.5, epochs=100, probes_per_decade=2, checkpoint_every=1e-9),
        1,
        (0, 100),
        1e-2,
    )


def one_figure(fig_dir, records, snaps, cfg, l, k):
    # the family's figures dominate the run; one small one goes through the same writer
    fig, axes = P.new_figure()
    axes[0, 0].plot([r["epoch"] for r in records], [r["loss"] for r in records])
    return [("v1-fig3", "loss", P.save(fig, fig_dir, "v1-fig3"))]


@pytest.fixture
def tiny_linear(monkeypatch):
    monkeypatch.setattr(linear_ufm, "preset", tiny_preset)
    monkeypatch.setattr(linear_ufm, "_figures", one_figure)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, " ".join(err.split())  # the message is wrapped at 100 columns


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def old_row(row: dict) -> dict:
    """A probe row as deepufm wrote it before schema version 2 (hand-written from the old
    SpectralProbe: its key names, the top K + 2 eigenvalues of W^T W, no effective_rank_weight)."""
    if "layer" not in row:
        return row
    out = {k: v for k, v in row.items() if k not in V2_PROBE_KEYS}
    K = len(row["eigvec_alignment"])
    out |= {
        "probe_layer": row["layer"],
        "hessian_top": row["hessian_eigenvalues"],
        "hessian_effective_rank": row["effective_rank_hessian"],
        "f": row["eigvec_alignment"],
        "gamma": row["gradient_coefficients"],
        "weight_gram_top": [s * s for s in row["weight_singular_values"]][: K + 2],
        "feature_gram_top": row["feature_gram_eigenvalues"] + [0.0],
        "nc1_probe_layer": row["nc1"][row["layer"] - 1],
    }
    out |= {f"knockout_{n}": v for n, v in row["knockout_eigenvalues"].items()}
    return out


def make_v1(out: Path, status: str) -> None:
    """Rewrite the finished run in ``out`` as a version-1 directory: old probe keys, no
    ``schema`` in the manifest, and ``status``."""
    rd.rewrite_metrics(out, [old_row(r) for r in rd.read_metrics(out)])
    data = json.loads((out / mf.MANIFEST).read_text())
    del data["schema"]
    data["status"] = status
    (out / mf.MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    assert mf.read_manifest(out).schema == 1


def test_the_probe_keys_are_those_of_the_current_schema():
    assert mf.SCHEMA_VERSION == 2
    assert set(PROBE_KEYS) == V2_PROBE_KEYS
    model = DeepUFM.init(UFMConfig(K=2, n=2, d=3, L=2, lam=0.01, dtype="float64", device="cpu"))
    assert set(SpectralProbe(1, ())(model, 0)) == V2_PROBE_KEYS
    assert [k for k, _ in mf.SCHEMA_CHANGES[2]] == ["experiment"]


def test_a_new_run_records_the_current_schema(tmp_path, capsys, tiny_linear):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    assert json.loads((out / mf.MANIFEST).read_text())["schema"] == mf.SCHEMA_VERSION
    probe_rows = [r for r in rd.read_metrics(out) if "layer" in r]
    assert probe_rows and all(V2_PROBE_KEYS <= set(r) for r in probe_rows)
    code, err = run_cli(capsys, "train", *TRAIN, "--out", tmp_path / "tr")
    assert code == 0, err
    assert mf.read_manifest(tmp_path / "tr").schema == mf.SCHEMA_VERSION


@pytest.mark.parametrize("flag", [(), ("--resume",)])
def test_resuming_an_old_schema_experiment_is_refused_and_changes_nothing(
    tmp_path, capsys, tiny_linear, flag
):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    make_v1(out, "running")  # an interrupted run of before the rename
    before = snapshot(out)
    code, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet", *flag)
    assert code == 2, err
    assert str(out) in err and "schema version 1" in err and "version 2" in err
    assert "--overwrite" in err and "another --out" in err and "hessian_top" in err
    assert snapshot(out) == before  # nothing written, nothing deleted
    # what the message says to do works, and the directory is then current
    code, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet", "--overwrite")
    assert code == 0, err
    manifest = mf.read_manifest(out)
    assert manifest.schema == mf.SCHEMA_VERSION and manifest.complete
    rows = [r for r in rd.read_metrics(out) if "epoch" in r]
    assert all("hessian_top" not in r and "f" not in r for r in rows)


def test_a_finished_old_schema_run_is_rerun_whole_in_the_new_keys(tmp_path, capsys, tiny_linear):
    ref, out = tmp_path / "ref", tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", ref, "--quiet")[0] == 0
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    make_v1(out, "complete")
    code, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")  # a rerun
    assert code == 0, err
    assert mf.read_manifest(out).schema == mf.SCHEMA_VERSION
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(rd.read_metrics(out)) == strip(rd.read_metrics(ref))  # no old row left


TRAIN = ["--K", "2", "--n", "3", "--d", "4", "--L", "2", "--quiet", "--device", "cpu"]
TRAIN += ["--epochs", "20"]


def test_an_old_schema_train_run_whose_keys_did_not_change_resumes(tmp_path, capsys):
    out = tmp_path / "tr"
    assert run_cli(capsys, "train", *TRAIN, "--out", out)[0] == 0
    data = json.loads((out / mf.MANIFEST).read_text())
    del data["schema"]
    (out / mf.MANIFEST).write_text(json.dumps(data))
    rows = rd.read_metrics(out)
    code, err = run_cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 0, err
    assert mf.read_manifest(out).schema == mf.SCHEMA_VERSION  # its keys are version 2's
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(rd.read_metrics(out)) == strip(rows)  # finished: the same rows, none mixed in


@pytest.mark.parametrize("kind", mf.KINDS)
def test_begin_applies_the_version_rule_per_kind(tmp_path, kind):
    run_dir = tmp_path / kind
    run_dir.mkdir()
    old = mf.Manifest(kind, "linear-ufm/quick" if kind == "experiment" else "", schema=1)
    mf.write_manifest(run_dir, old)
    if kind == "experiment":
        with pytest.raises(ConfigError, match="schema version 1") as info:
            mf.begin(run_dir, kind, old.name, resume=True, param="--resume")
        assert info.value.param == "--resume" and info.value.value == str(run_dir)
        assert mf.read_manifest(run_dir) == old
    else:
        assert mf.begin(run_dir, kind, old.name, resume=True) is True
        assert mf.read_manifest(run_dir).schema == mf.SCHEMA_VERSION
    # a current directory of every kind is continued as it is
    mf.write_manifest(run_dir, mf.Manifest(kind, old.name))
    assert mf.begin(run_dir, kind, old.name, resume=True) is True
    assert mf.schema_changes(kind, mf.SCHEMA_VERSION) == []

"""`deepufm train` end to end: the reference run, bad input, resume, and a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepufm.cli import main

SMALL = ["--K", "2", "--n", "3", "--d", "4", "--L", "2", "--quiet", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_reference_run_reaches_the_theoretical_optimum(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--K",
        "3",
        "--n",
        "40",
        "--d",
        "60",
        "--L",
        "5",
        "--lam",
        "0.01",
        "--epochs",
        "6000",
        "--lr",
        "0.5",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # THEORY §10: optimum loss 0.1648378727 for this configuration.
    assert last["loss"] == pytest.approx(0.1648379, abs=1e-6)
    assert last["loss"] == pytest.approx(0.1648378727, abs=1e-9)
    assert max(last["nc1"]) < 1e-10
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "params.npz"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--K", "1"], ["K=1", ">= 2"]),
        (["--n", "0"], ["n=0"]),
        (["--K", "5", "--d", "4"], ["d=4", "K=5"]),
        (["--L", "0"], ["L=0"]),
        (["--lam", "-1"], ["lam=-1.0", ">= 0"]),
        (["--lam", "nan"], ["lam=nan"]),
        (["--lr", "-0.1"], ["lr=-0.1", "> 0"]),
        (["--lr", "inf"], ["lr=inf"]),
        (["--epochs", "-5"], ["epochs=-5", ">= 0"]),
        (["--lam-W", "0.1,0.2,0.3", "--lam-H", "0.1"], ["lam_W=[0.1, 0.2, 0.3]", "L=2"]),
        (["--lam", "0.5"], ["threshold", "b =", "zero solution is then the global optimum"]),
        (["--loss", "ce", "--lam", "5"], ["lam=5.0", "root"]),
        (["--momentum", "1.5"], ["momentum=1.5"]),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, capsys, flags, needles):
    argv = ["train", *SMALL, "--out", str(tmp_path / "r")]
    # later flags override earlier ones in argparse
    code, _, err = run_cli(capsys, *argv, *flags)
    assert code == 2
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_unknown_activation_and_loss_are_rejected_by_argparse(capsys):
    for flags in (["--activation", "tanh"], ["--loss", "hinge"]):
        with pytest.raises(SystemExit) as info:
            main(["train", *SMALL, *flags])
        assert info.value.code == 2
        assert flags[1] in capsys.readouterr().err


def test_allow_trivial_trains_above_the_threshold(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        *SMALL,
        "--lam",
        "0.5",
        "--epochs",
        "3",
        "--allow-trivial",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err


def test_toml_config_unknown_key_wrong_type_and_override(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("K = 3\nwidht = 4\n")
    code, _, err = run_cli(capsys, "train", "--config", str(bad), "--out", str(tmp_path / "a"))
    assert code == 2 and "'widht'" in err
    bad.write_text('K = "three"\n')
    code, _, err = run_cli(capsys, "train", "--config", str(bad), "--out", str(tmp_path / "b"))
    assert code == 2 and "'K'" in err and "integer" in err
    good = tmp_path / "good.toml"
    good.write_text(
        "K = 2\nn = 3\nd = 4\nL = 2\nepochs = 5\nlr = 0.1\nlam_W = [0.01, 0.02]\nlam_H = 0.03\n"
    )
    out = tmp_path / "c"
    code, _, err = run_cli(
        capsys, "train", "--config", str(good), "--epochs", "7", "--quiet", "--out", str(out)
    )
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["epochs"] == 7 and cfg["model"]["lam_W"] == [0.01, 0.02]


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)[0] == 0
    code, _, err = run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert run_cli(capsys, "train", *SMALL, "--epochs", "4", "--out", out, "--overwrite")[0] == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["training"]["epochs"] == 4


def test_resume_with_a_different_config_names_the_keys(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", out, "--K", "3", "--lr", "0.9", "--quiet")
    assert code == 2 and "K" in err and "lr" in err and "stored" in err
    # Matching flags and presentation flags are accepted.
    assert run_cli(capsys, "train", "--resume", out, "--K", "2", "--quiet")[0] == 0


def test_divergence_stops_with_epoch_and_lr_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    # lr slightly above the stability limit: the loss grows geometrically and overflows late.
    code, _, err = run_cli(
        capsys,
        "train",
        *SMALL,
        "--lr",
        "3.0",
        "--epochs",
        "100000",
        "--checkpoint-every",
        "1e-9",
        "--out",
        str(out),
    )
    assert code == 2
    assert "diverged at epoch" in err and "lr=3.0" in err
    import torch

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] > 0 and all(bool(torch.isfinite(p).all()) for p in ckpt["params"])
    assert not (out / "params.npz").exists()


def _train_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "deepufm",
        "train",
        "--K",
        "3",
        "--n",
        "10",
        "--d",
        "24",
        "--L",
        "4",
        "--activation",
        "relu",
        "--momentum",
        "0.5",
        "--lr",
        "0.1",
        "--epochs",
        "60000",
        "--lr-halve-at",
        "30000",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(ref), check=True, env=env)
    proc = subprocess.Popen(_train_cmd(killed, "--checkpoint-every", "0.05"), env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # an arbitrary point after the first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "params.npz").exists(), "the run finished before it could be killed"
    subprocess.run(
        [sys.executable, "-m", "deepufm", "train", "--resume", str(killed), "--quiet"],
        check=True,
        env=env,
    )
    with np.load(ref / "params.npz") as a, np.load(killed / "params.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    epochs = [json.loads(x)["epoch"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 60000

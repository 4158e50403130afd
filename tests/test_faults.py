"""Nothing lost, nothing silently accepted: the manifest and overwrite rule, atomic outputs under a
full disk, one writer per directory, trustworthy checkpoints, signals, metrics repair, resume.

Every test writes the damage itself (foreign files, corrupt checkpoints, a mocked full disk, a
second writer, a real signal) and then byte-compares the files that must survive."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepufm.cli import main
from deepufm.experiments import linear_ufm
from deepufm.models.config import UFMConfig
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd
from deepufm.training.config import TrainConfig

SMALL = ["--K", "2", "--n", "3", "--d", "4", "--L", "2", "--quiet", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, " ".join(err.split())  # the message is wrapped at 100 columns


def same_npz(a: Path, b: Path) -> bool:
    """Equal arrays (the .npz bytes hold the time of writing)."""
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(
            np.array_equal(x[k], y[k]) for k in x.files
        )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def tiny_preset(name):
    return linear_ufm.Preset(
        UFMConfig(K=3, n=4, d=5, L=3, lam=0.01, device="cpu"),
        TrainConfig(lr=0.5, epochs=400, probes_per_decade=2, checkpoint_every=1e-9),
        2,
        (0, 400),
        1e-2,
    )


def two_figures(fig_dir, records, snaps, cfg, l, k):
    # Drawing the family's 13 figures dominates the run; two small ones go through the same
    # writer (atomic, recorded in the manifest).
    from deepufm.experiments import plotting as P

    out = []
    for fid in ("v1-fig3", "v1-fig5"):
        fig, axes = P.new_figure()
        axes[0, 0].plot([r["epoch"] for r in records], [r["loss"] for r in records])
        out.append((fid, "loss", P.save(fig, fig_dir, fid)))
    return out


@pytest.fixture
def tiny_linear(monkeypatch):
    monkeypatch.setattr(linear_ufm, "preset", tiny_preset)
    monkeypatch.setattr(linear_ufm, "_figures", two_figures)


# -- 1. outputs are a manifest, not a sweep --------------------------------------------------------


def test_run_refuses_a_directory_of_foreign_files_and_overwrite_leaves_them(
    tmp_path, capsys, tiny_linear
):
    out = tmp_path / "project"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "mine.png").write_bytes(b"my own figure")
    (out / "tables").mkdir()
    (out / "tables" / "v1-fig3.md").write_text("my notes\n")
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 2 and "files deepufm did not write" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing written, nothing deleted (no manifest either)
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet", "--overwrite")
    assert code == 0, err
    after = snapshot(out)
    for name, data in before.items():
        assert after[name] == data, name
    manifest = mf.read_manifest(out)
    assert manifest.complete and "figures/v1-fig3.png" in manifest.files
    assert "notes.txt" not in manifest.files and "figures/mine.png" not in manifest.files


def test_run_refuses_a_finished_train_run_and_overwrite_replaces_only_its_files(
    tmp_path, capsys, tiny_linear
):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *SMALL, "--epochs", "5", "--out", out)[0] == 0
    (out / "keep.txt").write_text("mine\n")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 2 and "a train run" in err and "(keep.txt)" in err
    assert snapshot(out) == before
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet", "--overwrite")
    assert code == 0, err
    assert (out / "keep.txt").read_text() == "mine\n"
    assert json.loads((out / "config.json").read_text())["model"]["K"] == 3
    assert not (out / "checkpoint.prev.pt").exists() or rd.load_checkpoint(out)["epoch"] == 400


def test_rerun_replaces_its_own_files_and_removes_only_its_stale_ones(
    tmp_path, capsys, tiny_linear
):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    first = snapshot(out)
    # A stale output of an earlier version (recorded) and a file of the user's (not recorded).
    manifest = mf.read_manifest(out)
    (out / "figures" / "old-fig.png").write_bytes(b"stale")
    mf.write_manifest(
        out, mf.Manifest(**{**manifest.__dict__, "files": (*manifest.files, "figures/old-fig.png")})
    )
    (out / "figures" / "user.png").write_bytes(b"user")
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 0, err
    assert not (out / "figures" / "old-fig.png").exists()
    assert (out / "figures" / "user.png").read_bytes() == b"user"
    second = snapshot(out)
    # The same experiment again: bitwise the same results, and every file it wrote before.
    assert second["results.json"] == first["results.json"]
    assert set(first) <= set(second)


def test_full_disk_while_writing_the_report_keeps_the_previous_one(
    tmp_path, capsys, tiny_linear, monkeypatch
):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    before = snapshot(out)
    real_fsync = os.fsync

    def full_disk(fd):
        if ".report.html." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(rd.os, "fsync", full_disk)
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 1
    assert "report.html" in err and "No space left on device" in err and "kept" in err
    assert (out / "report.html").read_bytes() == before["report.html"]
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left behind"


def test_a_killed_rerun_keeps_the_earlier_results(tmp_path, capsys, tiny_linear, monkeypatch):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    before = snapshot(out)
    import deepufm.experiments.runs as runs

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill while training

    monkeypatch.setattr(runs, "train", killed)
    code, _, _ = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 130
    after = snapshot(out)
    for name in ("params.npz", "results.json", "report.md", "report.html", "spectra.npz"):
        assert after[name] == before[name], name
    assert all(after[n] == before[n] for n in before if n.startswith("figures/"))


# `deepufm run linear-ufm` in a subprocess, with the tiny preset of `tiny_linear`; with
# DEEPUFM_TEST_SLOW each checkpoint takes 0.2 s longer, so that a kill lands mid-training.
RUNNER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import test_faults as T
from deepufm.experiments import linear_ufm
from deepufm.training import rundir as rd
linear_ufm.preset, linear_ufm._figures = T.tiny_preset, T.two_figures
if os.environ.get("DEEPUFM_TEST_SLOW"):
    save = rd.save_checkpoint
    def slow(*args, **kwargs):
        save(*args, **kwargs)
        time.sleep(0.2)
    rd.save_checkpoint = slow
from deepufm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigkilled_rerun_keeps_the_earlier_results_and_the_next_run_completes(
    tmp_path, capsys, tiny_linear
):
    out = tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")[0] == 0
    before = snapshot(out)
    old_ckpt = (out / "checkpoint.pt").stat().st_ino
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(tests=str(Path(__file__).resolve().parent)))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = os.environ | {"DEEPUFM_TEST_SLOW": "1", "PYTHONPATH": src}
    cmd = [sys.executable, str(runner), "run", "linear-ufm", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        # Kill once the rerun owns the directory and has replaced the checkpoint with its own.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = mf.read_manifest(out)
            with contextlib.suppress(FileNotFoundError):
                if manifest.status == "running" and (
                    (out / "checkpoint.pt").stat().st_ino != old_ckpt
                ):
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stderr.close()
    assert mf.read_manifest(out).status == "running"  # it was killed mid-run
    after = snapshot(out)
    assert set(before) <= set(after), set(before) - set(after)  # every earlier file is there
    finals = ["params.npz", "results.json", "report.md", "report.html", "spectra.npz"]
    finals += [n for n in before if n.startswith("figures/") or n.startswith("tables/")]
    for name in finals:
        assert after[name] == before[name], name  # the earlier results, byte for byte
    assert 0 < rd.load_checkpoint(out)["epoch"] < 400  # the rerun's own, readable
    # The next run continues the killed one (its lock is stale) and ends as the first did.
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 0, err
    assert mf.read_manifest(out).complete
    assert (out / "results.json").read_bytes() == before["results.json"]
    for name in ("params.npz", "spectra.npz"):
        (tmp_path / name).write_bytes(before[name])
        assert same_npz(out / name, tmp_path / name), name  # resumed exactly


def test_out_under_a_file_read_only_target_and_config_directory(tmp_path, capsys, monkeypatch):
    f = tmp_path / "a-file"
    f.write_text("x")
    code, _, err = run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", f / "sub")
    assert code == 2 and "lies under the file" in err
    assert f.read_text() == "x"
    code, _, err = run_cli(capsys, "train", "--config", tmp_path, "--out", tmp_path / "c")
    assert code == 2 and "--config" in err and "a directory" in err
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "ro-run":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", tmp_path / "ro-run")
    assert code == 1 and "Read-only file system" in err and "ro-run" in err


def test_a_failed_start_leaves_nothing_so_the_corrected_command_works(tmp_path, capsys):
    out = tmp_path / "r"
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code, _, err = run_cli(capsys, "train", *SMALL, "--device", "cuda", "--out", out)
    assert code == 2 and "device" in err and "CUDA" in err
    assert not out.exists()
    assert run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)[0] == 0


def test_run_list_into_a_closed_pipe_is_quiet(monkeypatch, capsys):
    r, w = os.pipe()
    os.close(r)  # like `deepufm run --list | head -1` once head has exited
    pipe = os.fdopen(w, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        assert main(["run", "--list"]) == 0
    finally:
        monkeypatch.undo()
        pipe.close()
    assert "Traceback" not in capsys.readouterr().err


# -- 2. one writer per run directory ---------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    # Another writer, holding the lock as deepufm does (flock + its pid), without importing torch.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, time; "
            f"fd = os.open({str(out / '.deepufm.lock')!r}, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        code, _, err = run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)
        assert code == 2 and f"pid {holder.pid}" in err and "another deepufm process" in err
        assert sorted(p.name for p in out.iterdir()) == [".deepufm.lock"]
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file (a dead pid) is stale.
    assert (out / ".deepufm.lock").read_text().strip() == str(holder.pid)
    assert run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)[0] == 0
    assert not (out / ".deepufm.lock").exists()


# -- 3. checkpoints you can trust ------------------------------------------------------------------


def _reference_and_partial(tmp_path, capsys):
    flags = [*SMALL, "--momentum", "0.5", "--lr", "0.3", "--checkpoint-every", "1e-9"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert run_cli(capsys, "train", *flags, "--epochs", "1000", "--out", ref)[0] == 0
    # A run stopped at epoch 700, with a checkpoint at 700 and a previous one before it.
    assert run_cli(capsys, "train", *flags, "--epochs", "700", "--out", part)[0] == 0
    cfg = json.loads((part / "config.json").read_text())
    cfg["training"]["epochs"] = 1000
    (part / "config.json").write_text(json.dumps(cfg))
    (part / "params.npz").unlink()
    return ref, part


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "other-shape"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    ref, part = _reference_and_partial(tmp_path, capsys)
    prev = torch.load(part / "checkpoint.prev.pt", weights_only=True)["epoch"]
    assert 0 < prev < 700
    ckpt = part / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        payload = torch.load(ckpt, weights_only=True)
        payload["params"] = [torch.zeros(3, 3) for _ in payload["params"]]
        torch.save(payload, ckpt)
    code, _, err = run_cli(capsys, "train", "--resume", part, "--quiet")
    assert code == 0, err
    assert (
        "checkpoint.pt" in err
        and "using the previous checkpoint" in err
        and f"epoch {prev})" in err
    )
    with np.load(ref / "params.npz") as a, np.load(part / "params.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)  # exact from that epoch on


def test_both_checkpoints_corrupt_is_a_clear_error(tmp_path, capsys):
    _, part = _reference_and_partial(tmp_path, capsys)
    (part / "checkpoint.pt").write_bytes(b"junk")
    (part / "checkpoint.prev.pt").write_bytes(b"")
    before = snapshot(part)
    code, _, err = run_cli(capsys, "train", "--resume", part, "--quiet")
    assert code == 2 and "No usable checkpoint" in err and "unreadable" in err
    assert {k: v for k, v in snapshot(part).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }


def test_a_diverging_run_never_checkpoints_a_diverged_state(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run_cli(
        capsys, "train", *SMALL, "--lr", "15", "--epochs", "100000", "--checkpoint-every",
        "1e-9", "--out", out,
    )  # fmt: skip
    assert code == 2 and "diverged" in err and "lr=15.0" in err
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if (out / name).exists():
            params = torch.load(out / name, weights_only=True)["params"]
            assert max(float(p.abs().max()) for p in params) < 1e3, name


def _train_cmd(out, *extra):
    return [
        sys.executable, "-m", "deepufm", "train", "--K", "3", "--n", "10", "--d", "24", "--L",
        "4", "--lr", "0.1", "--epochs", "10000000", "--device", "cpu", "--quiet", "--out",
        str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "r"
    proc = subprocess.Popen(_train_cmd(out), stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    err = " ".join(proc.stderr.read().decode().split())
    assert proc.wait(60) == code, err
    assert "Traceback" not in err and signal.Signals(sig).name in err
    assert f"deepufm train --resume {out}" in err
    epoch = rd.load_checkpoint(out)["epoch"]
    assert epoch > 0 and f"at epoch {epoch}" in err
    assert not (out / ".deepufm.lock").exists() and not (out / "params.npz").exists()


# -- 4. metrics.jsonl repair -----------------------------------------------------------------------


def test_metrics_repair_keeps_every_intact_record(tmp_path, capsys):
    _, part = _reference_and_partial(tmp_path, capsys)
    lines = (part / "metrics.jsonl").read_text().splitlines()
    lines[3] = lines[3][:20]  # a corrupted record in the middle
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    intact = [json.loads(x) for i, x in enumerate(lines) if i != 3]
    code, _, err = run_cli(capsys, "train", "--resume", part, "--quiet")
    assert code == 0, err
    assert "dropped 1 unreadable line(s) (line 4)" in err
    records = rd.read_metrics(part)
    kept = [r for r in intact if r["epoch"] < 700]
    assert records[: len(kept)] == kept
    assert records[-1]["epoch"] == 1000


# -- 5. resume -------------------------------------------------------------------------------------


def test_run_resumes_an_interrupted_experiment_exactly(tmp_path, capsys, tiny_linear, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "lin"
    assert run_cli(capsys, "run", "linear-ufm", "--out", ref, "--quiet")[0] == 0
    from deepufm.training import probes

    real = probes.loss_probe

    def interrupting(model, epoch):
        if epoch == 100:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C in the middle of training
        return real(model, epoch)

    monkeypatch.setattr(linear_ufm, "DEFAULT_PROBES", (interrupting, *probes.DEFAULT_PROBES[1:]))
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")
    assert code == 130 and "SIGINT" in err and f"--out {out} --resume" in err
    assert not (out / "results.json").exists()
    assert 100 <= rd.load_checkpoint(out)["epoch"] < 400
    monkeypatch.setattr(linear_ufm, "DEFAULT_PROBES", probes.DEFAULT_PROBES)
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", out, "--quiet")  # the default
    assert code == 0, err
    assert (out / "results.json").read_bytes() == (ref / "results.json").read_bytes()
    for name in ("params.npz", "spectra.npz"):
        assert same_npz(out / name, ref / name), name
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(rd.read_metrics(out)) == strip(rd.read_metrics(ref))


def test_run_resume_needs_the_same_experiment(tmp_path, capsys, tiny_linear):
    code, _, err = run_cli(capsys, "run", "linear-ufm", "--out", tmp_path / "x", "--resume")
    assert code == 2 and "--resume" in err and "linear-ufm run" in err
    assert not (tmp_path / "x").exists()


def test_train_resume_on_a_network_run_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "net"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"kind": "network", "training": {}, "data": {}}))
    code, _, err = run_cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 2 and "real-network run" in err and "resume=True" in err


def _tiny_network():
    from deepufm.data import ClassificationData
    from deepufm.training import network as nw

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(9, 1, 8, 8, generator=gen, dtype=torch.float64)
    X += torch.arange(3, dtype=torch.float64).repeat_interleave(3).view(-1, 1, 1, 1)
    data = ClassificationData(X, torch.arange(3).repeat_interleave(3), 3, "toy", ("0", "1", "2"))
    config = nw.NetworkTrainConfig(
        epochs=6, lr=0.05, d=4, L=3, width=0.25, blocks=1, lam=1e-2, lam_H=1e-3,
        momentum=0.5, checkpoint_every_epochs=1,
    )  # fmt: skip
    return nw, config, data


def test_network_trainer_falls_back_to_the_previous_checkpoint(tmp_path):
    nw, config, data = _tiny_network()
    ref = nw.train(config, data, tmp_path / "ref")
    part = tmp_path / "part"
    nw.train(config, data, part)
    assert torch.load(part / "checkpoint.prev.pt", weights_only=True)["epoch"] == 5
    (part / "checkpoint.pt").write_bytes(b"\x80garbage")
    with pytest.warns(UserWarning, match=r"checkpoint\.pt is unreadable.*epoch 5"):
        resumed = nw.train(config, data, part, resume=True)
    assert resumed.epoch == 6
    for key, value in ref.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_network_trainer_refuses_another_kind_of_run(tmp_path, capsys):
    nw, config, data = _tiny_network()
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *SMALL, "--epochs", "3", "--out", out)[0] == 0
    before = snapshot(out)
    with pytest.raises(Exception, match="a train run"):
        nw.train(config, data, out)
    assert snapshot(out) == before

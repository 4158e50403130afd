"""SIGTERM under data-parallel training, for real: two gloo ranks of
``python -m deepufm.training.distributed`` on the CPU, launched by hand (one rank signalled) and by
``torchrun`` (the launcher signalled, which passes the signal on to every rank).

Every rank must stop after the same epoch with exit status 143, rank 0 having written a readable
checkpoint and printed the command that resumes; resuming must then end bitwise equal to an
uninterrupted run (the same two ranks, the same sharding and reduction order)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# A tiny network on ten 8x8 images (one per class), BatchNorm frozen (no collectives but DDP's
# and the per-epoch ones); probes at every early epoch show when training runs.
SETS = ["per_class=1", "width=0.25", "blocks=1", "d=10", "L=2", "dtype=float64"]
SETS += ["bn_train=frozen", "momentum=0.5", "checkpoint_every=1000"]
TIMEOUT = 300  # seconds: generous, a loaded 2-core machine starts four torch processes


def write_idx(folder: Path) -> None:
    """``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` of ten random 8x8 images."""
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, size=(10, 8, 8), dtype=np.uint8), np.arange(10, dtype=np.uint8)
    folder.mkdir(parents=True)
    for name, a, magic in (("images-idx3", X, 2051), ("labels-idx1", y, 2049)):
        dims = b"".join(int(s).to_bytes(4, "big") for s in a.shape)
        (folder / f"train-{name}-ubyte").write_bytes(magic.to_bytes(4, "big") + dims + a.tobytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_args(out: Path, data: Path, epochs: int, *extra: str) -> list[str]:
    sets = [a for s in [*SETS, f"epochs={epochs}"] for a in ("--set", s)]
    return ["--dataset", "mnist", "--data-dir", str(data), "--out", str(out), *sets, *extra]


def env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def launch_ranks(args: list[str], log: Path) -> list[subprocess.Popen]:
    """Two ranks as torchrun starts them (the environment it sets), without its agent."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        rank_env = env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        rank_env |= {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        cmd = [sys.executable, "-m", "deepufm.training.distributed", *args]
        with open(log.with_suffix(f".rank{rank}.err"), "wb") as err:  # the child keeps its copy
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.DEVNULL, stderr=err))
    return procs


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    return [p.wait(TIMEOUT) for p in procs]


def wait_for_training(out: Path, procs: list[subprocess.Popen], epoch: int = 2) -> None:
    """Poll until rank 0 has probed ``epoch`` (every rank is then inside the epoch loop)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a rank exited before training"
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if any(json.loads(x)["epoch"] >= epoch for x in lines if x.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError("training did not start")


def stopped_epoch(err: str, out: Path) -> int:
    """The epoch of rank 0's message, after checking the message and the checkpoint."""
    err = " ".join(err.split())
    # torchrun itself ends with the traceback of its SignalException; none from deepufm
    assert all("deepufm/" not in tb for tb in err.split("Traceback")[1:]), err
    match = re.search(r"interrupted by SIGTERM at epoch (\d+); checkpoint written to (\S+);", err)
    assert match, err
    epoch = int(match[1])
    assert match[2] == str(out / "checkpoint.pt")
    assert "continue with `torchrun --nproc-per-node 2 -m deepufm.training.distributed" in err
    assert f"--out {out} " in err and "--resume`" in err
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert type(payload["epoch"]) is int and payload["epoch"] == epoch >= 2
    assert not (out / ".deepufm.lock").exists()
    return epoch


def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint_and_resumes_exactly(tmp_path):
    data, out, ref = tmp_path / "data", tmp_path / "run", tmp_path / "ref"
    write_idx(data)
    ranks = launch_ranks(module_args(out, data, 10**6), tmp_path / "first")
    try:
        wait_for_training(out, ranks)
        ranks[1].send_signal(signal.SIGTERM)  # rank 0 gets no signal: it learns it at the epoch end
        codes = wait_all(ranks)
    finally:
        for p in ranks:
            p.kill()
    errs = [(tmp_path / f"first.rank{r}.err").read_text() for r in range(2)]
    assert codes == [143, 143], errs
    epoch = stopped_epoch(errs[0], out)
    assert "Traceback" not in errs[1] and "interrupted" not in errs[1]  # rank 0 speaks for all
    # Finish at a few epochs later: the stopped run (its config says so) and a fresh one, together.
    final = epoch + 3
    config = json.loads((out / "config.json").read_text())
    config["training"]["epochs"] = final
    (out / "config.json").write_text(json.dumps(config))
    resumed = launch_ranks(module_args(out, data, final, "--resume"), tmp_path / "resumed")
    fresh = launch_ranks(module_args(ref, data, final), tmp_path / "fresh")
    assert wait_all(resumed) == [0, 0] and wait_all(fresh) == [0, 0]
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == final
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key  # bitwise
    for x, y in zip(a["optimizer"]["buffers"], b["optimizer"]["buffers"], strict=True):
        assert torch.equal(x, y)  # the momentum too
    assert torch.equal(a["generator"], b["generator"])


def test_sigterm_to_torchrun_stops_both_ranks_with_one_checkpoint(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_idx(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "deepufm.training.distributed", *module_args(out, data, 10**6)]
    log = tmp_path / "torchrun.err"
    with open(log, "wb") as err:
        launcher = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for_training(out, [launcher])
            launcher.send_signal(signal.SIGTERM)  # as a scheduler or `kill` would
            code = launcher.wait(TIMEOUT)
        finally:
            launcher.kill()
    text = log.read_text()
    stopped_epoch(text, out)
    # torchrun passed SIGTERM on to both ranks, which stopped on their own (it escalates to
    # SIGKILL for a rank still running after its --shutdown-timeout); it fails itself.
    assert code != 0, text
    assert text.count("closing signal SIGTERM") == 2 and "SIGKILL" not in text, text

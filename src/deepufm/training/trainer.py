"""The training loop: fused full-batch steps between scheduled probes, checkpoints, exact resume.

Between two stops (a probe epoch, a step-size change, or every ``CHECK_EVERY`` epochs) the loop
runs nothing but the fused step. At a stop it checks for divergence and writes a checkpoint when
``checkpoint_every`` seconds have passed. Probes and checkpoints read the state but never change
it, so a run resumed from any checkpoint ends bitwise equal to an uninterrupted run (CPU, float64).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deepufm import __version__
from deepufm.errors import DeepUFMError, DivergenceError
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training import rundir as rd
from deepufm.training.config import TrainConfig, probe_epochs
from deepufm.training.gradients import FusedStep, step_threads, torch_threads
from deepufm.training.probes import DEFAULT_PROBES, Probe

CHECK_EVERY = 100


@dataclass
class TrainState:
    """Everything needed to continue a run exactly: parameters, epoch, momentum, elapsed time."""

    model: DeepUFM
    epoch: int = 0
    buffers: list[torch.Tensor] | None = None
    elapsed: float = 0.0


@dataclass
class TrainResult:
    model: DeepUFM
    epoch: int
    elapsed: float
    records: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


def train(
    state: TrainState,
    cfg: TrainConfig,
    run_dir: Path | None = None,
    probes: Sequence[Probe] = DEFAULT_PROBES,
    progress: bool = False,
) -> TrainResult:
    """Run ``state`` forward to ``cfg.epochs``, probing on schedule; in place on ``state.model``.

    With ``run_dir`` the probe records are appended to ``metrics.jsonl`` and checkpoints written.
    """
    model = state.model
    step = FusedStep(model.config, model.params, cfg.momentum, state.buffers)
    probe_at = probe_epochs(cfg.epochs, cfg.probes_per_decade, cfg.probe_at)
    stops = sorted(set(probe_at) | set(cfg.lr_halve_at))
    records: list[dict[str, Any]] = []
    # Decided once per run from the shapes, so a resumed run computes with the same threads.
    threads = (
        step_threads(model.config) if model.H1.device.type == "cpu" else torch.get_num_threads()
    )
    epoch, elapsed = state.epoch, state.elapsed
    t_start = time.perf_counter() - elapsed
    last_ckpt = time.perf_counter()
    bar = tqdm(
        total=cfg.epochs,
        initial=epoch,
        disable=not progress,
        unit="epoch",
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        with torch.no_grad():
            while True:
                if probe_at[bisect.bisect_left(probe_at, epoch) % len(probe_at)] == epoch:
                    record = _probe(model, epoch, cfg, probes, time.perf_counter() - t_start)
                    records.append(record)
                    if run_dir is not None:
                        rd.append_metrics(run_dir, record)
                    _show(bar, record, model.config)
                if epoch >= cfg.epochs:
                    break
                nxt = min(
                    stops[bisect.bisect_right(stops, epoch)] if stops[-1] > epoch else cfg.epochs,
                    (epoch // CHECK_EVERY + 1) * CHECK_EVERY,
                    cfg.epochs,
                )
                lr = cfg.lr_at(epoch)
                with torch_threads(threads):
                    step.run(lr, nxt - epoch)
                bar.update(nxt - epoch)
                epoch = nxt
                if not _finite(model):
                    raise DivergenceError(epoch, lr, rd.kept_checkpoint_message(run_dir))
                if run_dir is not None and time.perf_counter() - last_ckpt >= cfg.checkpoint_every:
                    _checkpoint(run_dir, model, epoch, step, time.perf_counter() - t_start)
                    last_ckpt = time.perf_counter()
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    state.epoch, state.elapsed, state.buffers = epoch, elapsed, step.buffers
    if run_dir is not None:
        _checkpoint(run_dir, model, epoch, step, elapsed)
        rd.save_params(run_dir, model)
    return TrainResult(model, epoch, elapsed, records, run_dir)


def _probe(model, epoch, cfg, probes, elapsed) -> dict[str, Any]:
    # Diverged parameters would only make the probes fail in obscure ways: stop first.
    if not (_finite(model) and torch.isfinite(model.total_loss())):
        raise DivergenceError(epoch, cfg.lr_at(max(epoch - 1, 0)))
    record: dict[str, Any] = {"epoch": epoch, "lr": cfg.lr_at(epoch)}
    for probe in probes:
        record.update(probe(model, epoch))
    record["elapsed"] = elapsed
    return record


def _finite(model: DeepUFM) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.params)


def _show(bar, record: dict[str, Any], config: UFMConfig) -> None:
    post = {"loss": f"{record['loss']:.7g}"} if "loss" in record else {}
    if "nc1" in record:
        post["NC1(H_L)"] = f"{record['nc1'][config.L - 1]:.2e}"
    bar.set_postfix(post, refresh=False)


def _checkpoint(run_dir: Path, model: DeepUFM, epoch: int, step: FusedStep, elapsed: float) -> None:
    cpu = lambda ts: None if ts is None else [t.detach().cpu().clone() for t in ts]  # noqa: E731
    rd.save_checkpoint(
        run_dir,
        {
            "deepufm_version": __version__,
            "epoch": epoch,
            "elapsed": elapsed,
            "params": cpu(model.params),
            "buffers": cpu(step.buffers),
        },
    )


# -- runs on disk ---------------------------------------------------------------------------------


def start_run(
    model_cfg: UFMConfig,
    train_cfg: TrainConfig,
    run_dir: Path | str,
    overwrite: bool = False,
    probes: Sequence[Probe] = DEFAULT_PROBES,
    progress: bool = False,
) -> TrainResult:
    """A new run in ``run_dir``: validate, write ``config.json``, initialise, train."""
    from deepufm.theory import check_admissible

    check_admissible(model_cfg, allow_trivial=train_cfg.allow_trivial)
    run_dir = Path(run_dir)
    rd.prepare_new_run(run_dir, overwrite)
    rd.write_config(run_dir, model_cfg, train_cfg)
    state = TrainState(DeepUFM.init(model_cfg))
    return train(state, train_cfg, run_dir, probes, progress)


def resume_run(
    run_dir: Path | str,
    probes: Sequence[Probe] = DEFAULT_PROBES,
    progress: bool = False,
    device: str | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if none yet)."""
    run_dir = Path(run_dir)
    model_cfg, train_cfg = rd.read_config(run_dir)
    if train_cfg is None:
        raise DeepUFMError(f"{run_dir / rd.CONFIG} has no training section: nothing to resume.")
    ckpt = rd.load_checkpoint(run_dir)
    if ckpt is None:
        state = TrainState(DeepUFM.init(model_cfg, device=device))
    else:
        dev = model_cfg.torch_device if device is None else torch.device(device)
        params = [p.to(dev) for p in ckpt["params"]]
        model = DeepUFM(model_cfg, params[0], params[1:])
        buffers = None if ckpt["buffers"] is None else [b.to(dev) for b in ckpt["buffers"]]
        state = TrainState(model, ckpt["epoch"], buffers, ckpt["elapsed"])
    # Records past the checkpoint are recomputed identically; drop them (and a torn last line).
    kept = [r for r in rd.read_metrics(run_dir) if r.get("epoch", -1) < state.epoch]
    rd.rewrite_metrics(run_dir, kept)
    return train(state, train_cfg, run_dir, probes, progress)

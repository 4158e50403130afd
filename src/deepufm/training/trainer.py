"""The training loop: fused full-batch steps between scheduled probes, checkpoints, exact resume.

Between two stops (a probe epoch, a step-size change, or every ``CHECK_EVERY`` epochs) the loop
runs nothing but the fused step. At a stop it checks for divergence and writes a checkpoint when
``checkpoint_every`` seconds have passed, or when SIGINT/SIGTERM arrived (then it stops with
:class:`~deepufm.errors.Interrupted`). A checkpoint is written only for a finite state whose loss
has not grown ``DIVERGED`` times above the loss the call started from. Probes and checkpoints read
the state but never change it, so a run resumed from any checkpoint ends bitwise equal to an
uninterrupted run (CPU, float64).
"""

from __future__ import annotations

import bisect
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deepufm import __version__
from deepufm.errors import DeepUFMError, DivergenceError, Interrupted
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd
from deepufm.training import signals
from deepufm.training.config import TrainConfig, probe_epochs
from deepufm.training.gradients import FusedStep, step_threads, torch_threads
from deepufm.training.probes import DEFAULT_PROBES, Probe

CHECK_EVERY = 100
# Gradient descent at a stable step size never raises the loss this far above where it started:
# such a state is diverging, however finite, and is never checkpointed as good.
DIVERGED = 1e6
# Output norm, relative to that of the targets, below which a run has reached the zero solution.
ZERO_OUTPUT = 1e-6


@dataclass
class TrainState:
    """Everything needed to continue a run exactly: parameters, epoch, momentum, elapsed time."""

    model: DeepUFM
    epoch: int = 0
    buffers: list[torch.Tensor] | None = None
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        from deepufm import validate as V

        self.epoch = V.integer("epoch", self.epoch, 0, V.MAX_EPOCHS)
        self.elapsed = V.number("elapsed", self.elapsed, 0)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, the epoch and seconds reached, this call's
    probe records and the run directory (``None`` in memory)."""

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

    With ``run_dir`` the probe records are appended to ``metrics.jsonl`` and checkpoints written;
    SIGINT/SIGTERM then write a checkpoint and raise :class:`~deepufm.errors.Interrupted`.
    The regularisation must be below the threshold of the zero solution (v1 eq. 2, v2 eq. 17) unless
    ``cfg.allow_trivial``; a run that ends at the zero solution anyway warns.
    """
    from deepufm.theory import check_admissible

    model = state.model
    check_admissible(model.config, allow_trivial=cfg.allow_trivial)
    if state.epoch > cfg.epochs:
        from deepufm.errors import ConfigError

        raise ConfigError(
            "epoch",
            state.epoch,
            f"an epoch in [0, epochs={cfg.epochs}] (the state is past the end)",
        )
    step = FusedStep(model.config, model.params, cfg.momentum, state.buffers)
    probe_at = probe_epochs(cfg.epochs, cfg.probes_per_decade, cfg.probe_at)
    stops = sorted(set(probe_at) | set(cfg.lr_halve_at))
    records: list[dict[str, Any]] = []
    # Decided once per run from the shapes, so a resumed run computes with the same threads.
    threads = (
        step_threads(model.config) if model.H1.device.type == "cpu" else torch.get_num_threads()
    )
    epoch, elapsed = state.epoch, state.elapsed
    start_loss = float(model.total_loss())
    t_start = time.perf_counter() - elapsed
    last_ckpt, ckpt_epoch = time.perf_counter(), None
    bar = tqdm(
        total=cfg.epochs,
        initial=epoch,
        disable=not progress,
        unit="epoch",
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        with torch.no_grad(), signals.deferred(run_dir is not None) as pending:
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
                if run_dir is None:
                    continue
                signum = pending()
                if signum or time.perf_counter() - last_ckpt >= cfg.checkpoint_every:
                    now = time.perf_counter() - t_start
                    _checkpoint(run_dir, model, epoch, step, now, start_loss, lr)
                    last_ckpt, ckpt_epoch = time.perf_counter(), epoch
                if signum:
                    where = (
                        f"checkpoint written to {run_dir / rd.CHECKPOINT}; continue with "
                        f"`{mf.resume_hint(run_dir)}`."
                    )
                    raise Interrupted(signum, epoch, where)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    state.epoch, state.elapsed, state.buffers = epoch, elapsed, step.buffers
    if run_dir is not None:
        if ckpt_epoch != epoch:  # else checkpoint.prev.pt would only repeat checkpoint.pt
            _checkpoint(run_dir, model, epoch, step, elapsed, start_loss, cfg.lr_at(epoch))
        rd.save_params(run_dir, model)
    _warn_if_zero(model, cfg)
    return TrainResult(model, epoch, elapsed, records, run_dir)


def _warn_if_zero(model: DeepUFM, cfg: TrainConfig) -> None:
    """Warn when the run ended at the zero solution (a step size too large, or a regularisation
    above the threshold with ``allow_trivial``)."""
    from deepufm.theory.threshold import b_crit, regularisation_b

    Y = model.labels()
    if not float(model.output().norm()) <= ZERO_OUTPUT * float(Y.norm()):
        return
    c = model.config
    threshold = (
        f"b = {regularisation_b(c):.6g} against the threshold b_crit(L={c.L}) = {b_crit(c.L):.6g}"
        if c.loss == "mse"
        else f"lam_W={list(c.lam_W)}, lam_H={c.lam_H}"
    )
    warnings.warn(
        f"training ended at the zero solution (every output is 0) after {cfg.epochs} epochs with "
        f"lr={cfg.lr}: {threshold}. Below the threshold a smaller learning rate (--lr) avoids "
        "it; above, the zero solution is the global optimum (v1 eq. 2, v2 eq. 17; docs: "
        "Concepts, Deep neural collapse).",
        stacklevel=3,
    )


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


def _checkpoint(
    run_dir: Path,
    model: DeepUFM,
    epoch: int,
    step: FusedStep,
    elapsed: float,
    start_loss: float,
    lr: float,
) -> None:
    # Check before writing: the previous checkpoint stays the last good one.
    loss = float(model.total_loss())
    if not (_finite(model) and math.isfinite(loss)):
        raise DivergenceError(epoch, lr, rd.kept_checkpoint_message(run_dir))
    if loss > DIVERGED * start_loss:
        raise DivergenceError(
            epoch,
            lr,
            f"The loss grew from {start_loss:.6g} to {loss:.6g}. "
            + rd.kept_checkpoint_message(run_dir),
        )
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
    """A new run in ``run_dir``: validate, write ``config.json``, initialise, train.

    Everything is validated before anything is written; the directory must be new or empty, or
    ``overwrite`` (files deepufm did not write stay, :mod:`deepufm.training.manifest`). One
    writer at a time (:mod:`deepufm.training.lock`).
    """
    from deepufm.theory import check_admissible

    check_admissible(model_cfg, allow_trivial=train_cfg.allow_trivial)
    check_memory(model_cfg, check_device(model_cfg.device))
    run_dir = Path(run_dir)
    with rd.open_run(run_dir, "train", overwrite=overwrite):
        state = TrainState(DeepUFM.init(model_cfg))
        rd.write_config(run_dir, model_cfg, train_cfg)
        rd.rewrite_metrics(run_dir, [])
        result = train(state, train_cfg, run_dir, probes, progress)
        mf.finish(run_dir)
    return result


def check_device(device: str, param: str = "device") -> torch.device:
    """``device`` resolved, refused (before anything is written) when this torch cannot use it."""
    from deepufm.errors import ConfigError
    from deepufm.models.config import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            param, device, "cpu or auto here", "This PyTorch build or machine has no CUDA device."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            param, device, f"a CUDA index below {torch.cuda.device_count()} (the devices present)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(param, device, "auto, cpu, cuda or cuda:<index>")
    return dev


# Training holds the parameters, their gradients, momentum buffers and the layer features: about
# this many copies of the parameters.
MEMORY_COPIES = 4


def check_memory(model_cfg: UFMConfig, device: torch.device) -> None:
    """Refuse, before allocating, a model whose training cannot fit in the device's memory."""
    from deepufm.errors import RunError

    sizes = [(model_cfg.input_dim, model_cfg.N), *model_cfg.layer_shapes()]
    itemsize = torch.empty((), dtype=model_cfg.torch_dtype).element_size()
    need = MEMORY_COPIES * itemsize * sum(r * c for r, c in sizes)
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise RunError(
            f"training this model (K={model_cfg.K}, n={model_cfg.n}, d={model_cfg.d}, "
            f"L={model_cfg.L}, {model_cfg.dtype}) needs about {need / 2**30:.3g} GiB, more than "
            f"the {have / 2**30:.3g} GiB of {device.type} memory here: choose a smaller d or n."
        )


def checkpoint_state(
    run_dir: Path, model_cfg: UFMConfig, device: str | None = None
) -> TrainState | None:
    """The training state of the newest usable checkpoint in ``run_dir`` (``None``: none yet).

    A corrupt ``checkpoint.pt`` falls back to ``checkpoint.prev.pt`` with a warning; one from
    another configuration (other shapes) counts as corrupt.
    """
    shapes = [(model_cfg.input_dim, model_cfg.N), *model_cfg.layer_shapes()]

    def check(payload: dict[str, Any]) -> None:
        try:
            params, buffers = payload["params"], payload["buffers"]
            got = [tuple(p.shape) for p in params]
            ok = got == shapes and (buffers is None or [tuple(b.shape) for b in buffers] == got)
            ok = ok and all(p.is_floating_point() for p in params)
            float(payload["elapsed"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise rd.CorruptCheckpoint(f"lacks {exc}") from None
        if not ok:
            raise rd.CorruptCheckpoint(
                f"holds parameters of shapes {got}, not the {shapes} of the run's {rd.CONFIG}"
            )

    ckpt = rd.load_checkpoint(run_dir, check)
    if ckpt is None:
        return None
    dev = check_device(model_cfg.device if device is None else device, "device")
    dtype = model_cfg.torch_dtype
    params = [p.to(dev, dtype) for p in ckpt["params"]]
    model = DeepUFM(model_cfg, params[0], params[1:])
    buffers = None if ckpt["buffers"] is None else [b.to(dev, dtype) for b in ckpt["buffers"]]
    return TrainState(model, ckpt["epoch"], buffers, float(ckpt["elapsed"]))


def resume_run(
    run_dir: Path | str,
    probes: Sequence[Probe] = DEFAULT_PROBES,
    progress: bool = False,
    device: str | None = None,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its checkpoint (or from the start if none yet).

    Intact ``metrics.jsonl`` records before the checkpoint are kept (dropped lines are named in
    a warning); the later ones are recomputed identically.
    """
    run_dir = Path(run_dir)
    model_cfg, train_cfg = rd.read_config(run_dir)
    if train_cfg is None:
        raise DeepUFMError(f"{run_dir / rd.CONFIG} has no training section: nothing to resume.")
    manifest = mf.read_manifest(run_dir)
    if manifest is not None and manifest.kind != "train":
        raise DeepUFMError(
            f"{run_dir} holds a {manifest.owner} run, not a `deepufm train` run; continue it "
            f"with `{mf.resume_hint(run_dir)}`."
        )
    if manifest is None:  # a run directory from before manifests: its run files are ours
        present = tuple(n for n in rd.RUN_FILES if (run_dir / n).exists())
        mf.write_manifest(run_dir, mf.Manifest("train", files=present))
    with rd.open_run(run_dir, "train", resume=True, param="--resume"):
        state = checkpoint_state(run_dir, model_cfg, device)
        if state is None:
            state = TrainState(
                DeepUFM.init(model_cfg, device=check_device(device or model_cfg.device))
            )
        rd.repair_metrics(run_dir, state.epoch)
        result = train(state, train_cfg, run_dir, probes, progress)
        mf.finish(run_dir)
    return result

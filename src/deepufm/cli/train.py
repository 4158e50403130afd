"""``deepufm train``: train a deep UFM to collapse, or resume a run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from deepufm.cli.common import (
    MODEL_KEYS,
    add_model_arguments,
    given,
    parse_int_list,
    read_toml,
)
from deepufm.errors import ConfigError
from deepufm.models.config import UFMConfig, resolve_device
from deepufm.training import rundir as rd
from deepufm.training.config import TrainConfig
from deepufm.training.trainer import resume_run, start_run

TRAIN_KEYS = (
    "lr",
    "momentum",
    "epochs",
    "lr_halve_at",
    "probes_per_decade",
    "probe_at",
    "checkpoint_every",
    "allow_trivial",
)
# Flags that change how a run is shown or saved, not what it computes: they may differ on resume.
PRESENTATION_KEYS = ("quiet", "checkpoint_every", "device")


def register(sub) -> None:
    """Add the ``deepufm train`` subcommand and its options to ``sub``."""
    p = sub.add_parser(
        "train",
        help="train a deep UFM by full-batch gradient descent",
        description=(
            "Train a deep unconstrained feature model by full-batch gradient descent and write a "
            "run directory (config.json, metrics.jsonl, checkpoint.pt, params.npz). Options come "
            "from flags and/or --config FILE.toml (flat keys named like the flags, with '_' for "
            "'-'); flags override the file."
        ),
    )
    add_model_arguments(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="step size [default: 0.5]")
    g.add_argument("--momentum", type=float, help="heavy-ball momentum in [0, 1) [default: 0]")
    g.add_argument("--epochs", type=int, help="full-batch steps [default: 6000]")
    g.add_argument(
        "--lr-halve-at",
        type=parse_int_list,
        help="comma-separated epochs at which the step size halves [default: none]",
    )
    g.add_argument(
        "--probes-per-decade",
        type=int,
        help="log-spaced metric probes per factor 10 of epochs [default: 10]",
    )
    g.add_argument(
        "--probe-at",
        type=parse_int_list,
        help="extra comma-separated epochs to probe [default: none]",
    )
    g.add_argument(
        "--checkpoint-every", type=float, help="seconds between atomic checkpoints [default: 60]"
    )
    g.add_argument(
        "--allow-trivial",
        action="store_true",
        default=None,
        help="train even above the threshold where the zero solution is optimal",
    )
    r = p.add_argument_group("run directory")
    r.add_argument("--config", help="TOML file with any of the options above")
    r.add_argument(
        "--out",
        help="run directory [default: runs/ufm-K<K>-n<n>-d<d>-L<L>-<activation>-<loss>-seed<seed>]",
    )
    r.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (flags given must match its config)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.config:
        opts.update(read_toml(args.config))
        known = set(MODEL_KEYS) | set(TRAIN_KEYS)
        for key in opts:
            if key not in known:
                raise ConfigError(
                    f"--config key {key!r}", opts[key], f"one of {', '.join(sorted(known))}"
                )
    opts.update(given(args, MODEL_KEYS + TRAIN_KEYS))
    return opts


def _configs(opts: dict[str, Any]) -> tuple[UFMConfig, TrainConfig]:
    model = UFMConfig.from_dict({k: v for k, v in opts.items() if k in MODEL_KEYS}, source="model")
    train_opts = {k: v for k, v in opts.items() if k in TRAIN_KEYS}
    for key, value in train_opts.items():
        if key in ("lr", "momentum", "checkpoint_every") and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ConfigError(key, value, "a number")
    return model, TrainConfig(**train_opts)


def run(args: argparse.Namespace) -> int:
    """``deepufm train``: train a deep UFM into a run directory; exit status."""
    opts = _options(args)
    progress = not args.quiet
    if opts.get("device") is not None:  # a CUDA device this machine lacks: refused before writing
        resolve_device(opts["device"], "--device")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / rd.CONFIG).is_file():
            raise ConfigError("--resume", str(run_dir), f"a run directory holding {rd.CONFIG}")
        _check_matches(run_dir, opts)
        result = resume_run(run_dir, progress=progress, device=opts.get("device"))
    else:
        model_cfg, train_cfg = _configs(opts)
        run_dir = Path(args.out or _default_out(model_cfg))
        result = start_run(
            model_cfg, train_cfg, run_dir, overwrite=args.overwrite, progress=progress
        )
    if progress and result.records:
        last = result.records[-1]
        nc1 = ", ".join(f"{v:.2e}" for v in last.get("nc1", []))
        print(
            f"epoch {result.epoch}: loss {last['loss']:.10g}, grad norm {last['grad_norm']:.3e}, "
            f"NC1 per layer [{nc1}]; {result.elapsed:.1f} s"
        )
        print(f"run directory: {run_dir}{os.sep}")
    return 0


def _default_out(c: UFMConfig) -> str:
    return os.path.join(
        "runs", f"ufm-K{c.K}-n{c.n}-d{c.d}-L{c.L}-{c.activation}-{c.loss}-seed{c.seed}"
    )


def _check_matches(run_dir: Path, opts: dict[str, Any]) -> None:
    """Flags given with --resume must agree with the stored configuration."""
    stored_model, stored_train = rd.read_config(run_dir)
    stored = stored_model.to_dict() | (stored_train.to_dict() if stored_train else {})
    checked = {k: v for k, v in opts.items() if k not in PRESENTATION_KEYS}
    if not checked:
        return
    model_cfg, train_cfg = _configs({**stored, **checked})
    wanted = model_cfg.to_dict() | train_cfg.to_dict()
    differing = sorted(k for k in checked if k in wanted and wanted[k] != stored.get(k))
    differing += sorted(
        k for k in ("lam", "lam_W", "lam_H") if wanted[k] != stored[k] and k not in differing
    )
    if differing:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, given {wanted[k]!r}" for k in differing)
        raise ConfigError(
            "--resume",
            str(run_dir),
            "flags that match the run's config.json",
            f"These keys differ: {detail}. Start a new run with --out instead.",
        )

"""The run directory, a public contract (read by ``deepufm analyze`` and by users).

* ``config.json``: ``{"deepufm_version", "model": UFMConfig fields, "training": TrainConfig fields}``;
* ``metrics.jsonl``: one JSON object per probe (``epoch``, ``lr``, ``elapsed``, probe entries;
  an undefined metric is ``null``, with the reason under ``<name>_note``, e.g. ``nc1_note``);
* ``checkpoint.pt``: the exact training state, written atomically (temp file, fsync, rename);
* ``params.npz``: float arrays ``H1``, ``W1`` ... ``WL``, written only when the run completes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepufm import __version__
from deepufm.errors import ConfigError, DeepUFMError
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training.config import TrainConfig

CONFIG, METRICS, CHECKPOINT, PARAMS = "config.json", "metrics.jsonl", "checkpoint.pt", "params.npz"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PARAMS)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` to a temporary file in the same directory, fsync, rename.

    A kill at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_config(run_dir: Path, model_cfg: UFMConfig, train_cfg: TrainConfig) -> None:
    payload = {
        "deepufm_version": __version__,
        "model": model_cfg.to_dict(),
        "training": train_cfg.to_dict(),
    }
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(run_dir / CONFIG, lambda f: f.write(text), mode="w")


def read_config(run_dir: Path) -> tuple[UFMConfig, TrainConfig | None]:
    """Model and training configuration of a run (training is ``None`` if absent)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DeepUFMError(f"{path} not found: a run directory holds {CONFIG} (and params.npz).")
    try:
        payload = json.loads(path.read_text())
        model = UFMConfig.from_dict(payload["model"], source=CONFIG)
        train = payload.get("training")
        return model, None if train is None else TrainConfig.from_dict(train)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DeepUFMError(f"{path} is not a deepufm run configuration ({exc}).") from exc


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Probe records; a truncated last line (a run killed mid-write) is ignored."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def json_record(record: Any) -> Any:
    """``record`` with every non-finite float (an undefined metric such as the NC1 of coinciding
    class means) replaced by ``None``: strict JSON has no NaN, and ``null`` is what readers get."""
    if isinstance(record, float):
        return record if math.isfinite(record) else None
    if isinstance(record, dict):
        return {k: json_record(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [json_record(v) for v in record]
    return record


def _metrics_line(record: dict[str, Any]) -> str:
    return json.dumps(json_record(record), allow_nan=False) + "\n"


def rewrite_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(_metrics_line(r) for r in records)
    atomic_write(Path(run_dir) / METRICS, lambda f: f.write(text), mode="w")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(_metrics_line(record))
        f.flush()


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_params(run_dir: Path, model: DeepUFM) -> None:
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_arrays().items()}
    atomic_write(Path(run_dir) / PARAMS, lambda f: np.savez(f, **arrays))


def load_params(run_dir: Path, config: UFMConfig | None = None, device=None) -> DeepUFM:
    """The final state of a completed run (``config.json`` + ``params.npz``)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)[0] if config is None else config
    path = run_dir / PARAMS
    if not path.is_file():
        raise DeepUFMError(
            f"{path} not found: params.npz is written when a run completes "
            f"(resume an unfinished run with `deepufm train --resume {run_dir}`)."
        )
    with np.load(path) as arrays:
        missing = [k for k in ["H1"] + [f"W{l}" for l in range(1, config.L + 1)] if k not in arrays]
        if missing:
            raise DeepUFMError(f"{path} lacks the arrays {missing} required by {CONFIG}.")
        return DeepUFM.from_arrays(config, arrays, device=device)


def prepare_new_run(run_dir: Path, overwrite: bool) -> None:
    """Create ``run_dir``; refuse an existing non-empty run unless ``overwrite``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--out", str(run_dir), "a directory path (a file exists there)")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                "--out",
                str(run_dir),
                "a new or empty directory",
                "It already holds files; continue the run with --resume DIR or replace it "
                "with --overwrite.",
            )
        # Remove only what a run writes, never unrelated files the user keeps there.
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def kept_checkpoint_message(run_dir: Path | None) -> str:
    """What a diverged run keeps: its last good checkpoint (empty without a run directory)."""
    if run_dir is None:
        return ""
    ckpt = load_checkpoint(run_dir)
    where = f"epoch {ckpt['epoch']}" if ckpt else "none written yet"
    return f"The last good checkpoint ({where}) is kept in {run_dir}."

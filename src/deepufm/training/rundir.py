"""The run directory, a public contract (read by ``deepufm analyze`` and by users).

* ``config.json``: ``{"deepufm_version", "model": UFMConfig fields, "training": TrainConfig fields}``;
* ``metrics.jsonl``: one JSON object per probe (``epoch``, ``lr``, ``elapsed``, probe entries;
  an undefined metric is ``null``, with the reason under ``<name>_note``, e.g. ``nc1_note``);
* ``checkpoint.pt``: the exact training state, written atomically (temp file, fsync, rename) and
  read back before it replaces the previous one, which is kept as ``checkpoint.prev.pt``;
* ``params.npz``: float arrays ``H1``, ``W1`` ... ``WL``, written only when the run completes;
* ``manifest.json``: what deepufm wrote there (:mod:`deepufm.training.manifest`).

Every file is written atomically, so a kill or a full disk leaves the previous version whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepufm import __version__
from deepufm.errors import DeepUFMError, RunError
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training import lock
from deepufm.training import manifest as mf
from deepufm.training.config import TrainConfig

CONFIG, METRICS, CHECKPOINT, PARAMS = "config.json", "metrics.jsonl", "checkpoint.pt", "params.npz"
PREV_CHECKPOINT = "checkpoint.prev.pt"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PREV_CHECKPOINT, PARAMS)


def write_failed(path: Path, exc: OSError) -> RunError:
    """The message of a failed write (full disk, read-only target ...): the old file is kept."""
    reason = exc.strerror or str(exc)
    return RunError(
        f"could not write {path}: {reason} (errno {exc.errno}). Its previous version, if any, "
        "is kept unchanged; free space or fix the permissions, then run the command again."
    )


def atomic_write(
    path: Path, write: Callable[[Any], None], mode: str = "wb", record: bool = True
) -> None:
    """Write through ``write(fileobj)`` to a temporary file in the same directory, fsync, rename.

    A kill or an ``OSError`` (full disk) at any moment leaves either the old file or the new one,
    never a torn file; the error becomes a :class:`RunError`. Inside a run directory this process
    holds, the path is first recorded in its manifest (``record``).
    """
    path = Path(path)
    try:
        if record:
            mf.record(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed(path, exc) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_config(run_dir: Path, model_cfg: UFMConfig, train_cfg: TrainConfig) -> None:
    """Write a deep-UFM run's ``config.json`` (module docstring) atomically."""
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
        if isinstance(payload, dict) and payload.get("kind") == "network":
            raise DeepUFMError(
                f"{run_dir} holds a real-network run, not a deep-UFM run: `deepufm train "
                f"--resume` and `deepufm analyze` read deep-UFM runs only. Continue it with "
                f"`{mf.resume_hint(Path(run_dir))}`."
            )
        model = UFMConfig.from_dict(payload["model"], source=CONFIG)
        train = payload.get("training")
        return model, None if train is None else TrainConfig.from_dict(train)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DeepUFMError(f"{path} is not a deepufm run configuration ({exc}).") from exc


def scan_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Every intact probe record (a JSON object with an integer ``epoch``) and the 1-based line
    numbers of the lines that are not (a line torn by a kill, a corrupted one)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return [], []
    records, dropped = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        ok = isinstance(record, dict) and isinstance(record.get("epoch"), int)
        if ok and not isinstance(record["epoch"], bool):
            records.append(record)
        else:
            dropped.append(i)
    return records, dropped


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every intact probe record; unreadable lines (a torn last line ...) are skipped."""
    return scan_metrics(run_dir)[0]


def repair_metrics(run_dir: Path, before_epoch: int) -> list[dict[str, Any]]:
    """Rewrite ``metrics.jsonl`` to its intact records before ``before_epoch`` (a resumed run
    recomputes the later ones identically), warning with the line numbers of what is dropped."""
    records, dropped = scan_metrics(run_dir)
    kept = [r for r in records if r["epoch"] < before_epoch]
    if dropped:
        lines = ", ".join(map(str, dropped[:10])) + (" ..." if len(dropped) > 10 else "")
        warnings.warn(
            f"{Path(run_dir) / METRICS}: dropped {len(dropped)} unreadable line(s) (line "
            f"{lines}); kept {len(kept)} intact record(s) before epoch {before_epoch}.",
            stacklevel=2,
        )
    if dropped or len(kept) != len(records) or not (Path(run_dir) / METRICS).is_file():
        rewrite_metrics(run_dir, kept)
    return kept


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
    """Replace ``metrics.jsonl`` by ``records``, one strict-JSON line each, atomically."""
    text = "".join(_metrics_line(r) for r in records)
    atomic_write(Path(run_dir) / METRICS, lambda f: f.write(text), mode="w")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one strict-JSON line to ``metrics.jsonl`` (a kill mid-write leaves
    at most a torn last line, which :func:`scan_metrics` skips and :func:`repair_metrics` drops)."""
    path = Path(run_dir) / METRICS
    line = _metrics_line(record)
    try:
        mf.record(path)
        with open(path, "a") as f:
            f.write(line)
            f.flush()
    except OSError as exc:
        raise write_failed(path, exc) from None


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt``, read it back, and only then move the one it replaces to
    ``checkpoint.prev.pt``: at every moment one whole, verified checkpoint is on disk."""
    run_dir = Path(run_dir)
    new = run_dir / ".checkpoint.new.pt"
    atomic_write(new, lambda f: torch.save(state, f), record=False)
    try:
        back = _read_checkpoint(new)
        if back["epoch"] != state["epoch"]:
            raise DeepUFMError(f"{new} reads back epoch {back['epoch']}, not {state['epoch']}")
        for name in (PREV_CHECKPOINT, CHECKPOINT):
            mf.record(run_dir / name)
        if (run_dir / CHECKPOINT).is_file():
            os.replace(run_dir / CHECKPOINT, run_dir / PREV_CHECKPOINT)
        os.replace(new, run_dir / CHECKPOINT)
    except OSError as exc:
        raise write_failed(run_dir / CHECKPOINT, exc) from None
    finally:
        new.unlink(missing_ok=True)


class CorruptCheckpoint(DeepUFMError):
    """A checkpoint file that cannot be read (truncated, empty, not a deepufm checkpoint)."""


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (EOFError, RuntimeError, UnpicklingError)
        raise CorruptCheckpoint(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    epoch = payload.get("epoch") if isinstance(payload, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CorruptCheckpoint(f"{path} is not a deepufm checkpoint (no integer epoch >= 0)")
    return payload


def load_checkpoint(
    run_dir: Path, check: Callable[[dict[str, Any]], Any] | None = None
) -> dict[str, Any] | None:
    """The newest usable checkpoint: ``checkpoint.pt``, else ``checkpoint.prev.pt`` (with a
    warning saying why); ``None`` when there is none. ``check(payload)`` may raise
    :class:`CorruptCheckpoint` (wrong shapes ...; its message follows the file's path) to
    reject one. Both unusable: a clear error."""
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREV_CHECKPOINT):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            payload = _read_checkpoint(path)
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            continue
        try:
            if check is not None:
                check(payload)
        except CorruptCheckpoint as exc:
            problems.append(f"{path} {exc}")
            continue
        if problems:
            warnings.warn(
                f"{problems[0]}; using the previous checkpoint {path} (epoch {payload['epoch']}).",
                stacklevel=2,
            )
        return payload
    if problems:
        raise CorruptCheckpoint(
            "; ".join(problems) + ". No usable checkpoint is left: start the run again with "
            "--overwrite (or restore a checkpoint from a backup)."
        )
    return None


def save_params(run_dir: Path, model: DeepUFM) -> None:
    """Write ``params.npz`` (``H1``, ``W1`` ... ``WL`` as float arrays) atomically."""
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
    manifest = mf.read_manifest(run_dir)
    if manifest is not None and PARAMS not in manifest.files:
        raise DeepUFMError(
            f"{path} belongs to the run that the unfinished one in {run_dir} replaces, not to "
            f"its {CONFIG}: finish the run first (`{mf.resume_hint(run_dir)}`)."
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = ["H1"] + [f"W{l}" for l in range(1, config.L + 1)]
            missing = [k for k in names if k not in arrays.files]
            if missing:
                raise DeepUFMError(f"{path} lacks the arrays {missing} required by {CONFIG}.")
            loaded = {k: arrays[k] for k in names}
    except DeepUFMError:
        raise
    except Exception as exc:  # not an .npz, a torn file, object arrays (pickles) ...
        raise DeepUFMError(
            f"{path} is not a readable params.npz of float arrays ({type(exc).__name__}: {exc})."
        ) from None
    for name, a in loaded.items():
        if a.dtype.kind not in "fiu":
            raise DeepUFMError(f"{path}: array {name} has dtype {a.dtype}, not a float type.")
        if not np.isfinite(a).all():
            raise DeepUFMError(
                f"{path}: array {name} holds non-finite values (NaN or inf): the run diverged "
                "or the file was damaged."
            )
    try:
        return DeepUFM.from_arrays(config, loaded, device=device)
    except ValueError as exc:
        raise DeepUFMError(f"{path} does not match its {CONFIG}: {exc}.") from None


@contextlib.contextmanager
def open_run(
    run_dir: Path | str,
    kind: str,
    name: str = "",
    *,
    overwrite: bool = False,
    resume: bool = False,
    rerun: bool = False,
    param: str = "--out",
) -> Iterator[bool]:
    """Create and lock ``run_dir`` for one writer and apply the overwrite rule
    (:func:`deepufm.training.manifest.begin`); yields whether an unfinished run continues.

    A failure before the run wrote anything restores the directory as it was (a directory this
    call created is removed), so that the corrected command into the same directory just works.
    """
    run_dir = Path(run_dir)
    mf.check_directory(run_dir, param)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create the run directory {run_dir}: {exc.strerror}.") from None
    try:
        with lock.locked(run_dir):
            old = mf.read_manifest(run_dir)
            try:
                yield mf.begin(
                    run_dir,
                    kind,
                    name,
                    overwrite=overwrite,
                    resume=resume,
                    rerun=rerun,
                    param=param,
                )
            except BaseException:
                now = mf.read_manifest(run_dir)
                if now is not None and not now.files and now != old:
                    if old is None:
                        (run_dir / mf.MANIFEST).unlink(missing_ok=True)
                    else:
                        mf.write_manifest(run_dir, old)
                raise
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty


def prepare_new_run(run_dir: Path, overwrite: bool) -> None:
    """Create ``run_dir`` for a new ``deepufm train`` run: refuse a non-empty directory unless
    ``overwrite``. Prefer :func:`open_run`, which also holds the directory's lock."""
    with open_run(run_dir, "train", overwrite=overwrite):
        pass


def kept_checkpoint_message(run_dir: Path | None) -> str:
    """What a diverged run keeps: its last good checkpoint (empty without a run directory)."""
    if run_dir is None:
        return ""
    try:
        ckpt = load_checkpoint(run_dir)
    except DeepUFMError:
        ckpt = None
    where = f"epoch {ckpt['epoch']}" if ckpt else "none written yet"
    return f"The last good checkpoint ({where}) is kept in {run_dir}."

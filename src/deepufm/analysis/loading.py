"""What ``deepufm analyze --model`` loads: a model factory, a ``state_dict``, the data."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deepufm.errors import ConfigError


def load_factory(spec: str) -> nn.Module:
    """``"PKG.MODULE:FACTORY"`` -> ``FACTORY()``, importable from the current directory or
    ``PYTHONPATH``; the call must return an ``nn.Module``."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError("--model", spec, "PKG.MODULE:FACTORY (a callable returning an nn.Module)")
    module_name, attr = spec.split(":")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            "--model",
            spec,
            "a module importable from the current directory or PYTHONPATH",
            f"Importing {module_name!r} failed: {exc}",
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError("--model", spec, f"a callable {attr!r} in module {module_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "--model", spec, "a factory returning an nn.Module", f"It returned {type(model)}."
        )
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a ``state_dict`` saved with ``torch.save`` into ``model``, strictly (every key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--weights", str(path), "an existing file saved with torch.save")
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        text = " ".join(str(exc).split())
        if "Weights only load failed" in text or "Unsupported global" in text:
            # torch's message is a page long; what the user needs is what to save instead
            detail = (
                "It holds more than tensors (a whole pickled model?); deepufm loads state_dicts "
                "only, with weights_only=True: save one with torch.save(model.state_dict(), path)."
            )
        else:
            detail = text[:300]
        raise ConfigError(
            "--weights", str(path), "a state_dict saved with torch.save", detail
        ) from exc
    if not isinstance(state, dict):
        raise ConfigError("--weights", str(path), "a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())  # torch's message spans indented lines
        nested = [k for k, v in state.items() if isinstance(v, dict)]
        if nested:
            detail += (
                f" Its key {nested[0]!r} holds a dict (a training checkpoint?): save that "
                f"state_dict on its own, torch.save(checkpoint[{nested[0]!r}], path)."
            )
        raise ConfigError(
            "--weights", str(path), "a state_dict with exactly the model's keys and shapes", detail
        ) from exc


def load_data(
    spec: str, model: nn.Module, data_dir: str | None = None, per_class: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(X, y)`` from an ``.npz`` with arrays ``X`` and ``y`` (``X`` cast to the model's floating
    type and device) or a built-in data set name (``deepufm.data.DATASETS``)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float64
    device = params[0].device if params else torch.device("cpu")
    if spec.endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError("--data", spec, "an existing .npz file with arrays X and y")
        with np.load(path) as f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                raise ConfigError(
                    "--data", spec, "an .npz with arrays X and y", f"missing {missing}"
                )
            X, y = f["X"], f["y"]
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(
                "--data",
                spec,
                "an .npz whose y holds integer class labels 0..K-1",
                f"Its y has dtype {y.dtype}; save y.astype(np.int64) if the labels are whole "
                "numbers.",
            )
        if y.ndim != 1 or X.shape[:1] != y.shape:
            raise ConfigError(
                "--data",
                spec,
                "an .npz with X of shape (N, ...) and y of shape (N,)",
                f"X has shape {X.shape}, y {y.shape}.",
            )
        return (
            torch.as_tensor(X).to(device=device, dtype=dtype),
            torch.as_tensor(y, dtype=torch.long).to(device),
        )
    from deepufm.data import DATASETS, load_dataset

    if spec not in DATASETS:
        raise ConfigError("--data", spec, f"an .npz file or one of {', '.join(DATASETS)}")
    data = load_dataset(spec, data_dir, per_class, dtype=dtype)
    return data.X.to(device), data.y.to(device)

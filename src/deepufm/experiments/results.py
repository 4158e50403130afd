"""Theory-vs-measurement records: the rows of ``results.json`` and of the report's table.

``results.json`` = ``{"config": {...}, "constants": {...}, "results": [...]}``: what was run
(experiment, preset, model and training settings, tolerances), the closed-form constants the
predictions come from (plain numbers), and one record per prediction (:class:`Result`). Strict
JSON: an undefined number (a NaN measurement, the relative error of a zero prediction) is
``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepufm.errors import DeepUFMError


@dataclass(frozen=True)
class Result:
    """One prediction beside its measurement.

    ``abs_error = |measured - predicted|``; ``rel_error = abs_error / |predicted|``, ``None``
    where the prediction is 0 (there the tolerance bounds the absolute error). ``holds``:
    ``rel_error <= tolerance``, or ``abs_error <= tolerance`` for a zero prediction. ``layer`` is
    ``None`` for whole-model quantities. ``scope`` is ``"in"`` where the theorem's hypotheses hold,
    else ``"out: <the hypothesis that fails>"``: such a row is reported, not counted as a miss.
    """

    quantity: str
    theorem: str
    layer: int | None
    predicted: float
    measured: float
    abs_error: float
    rel_error: float | None
    tolerance: float
    holds: bool
    note: str = ""
    scope: str = "in"

    @property
    def in_scope(self) -> bool:
        """Whether the theorem's hypotheses hold for this row (``scope == "in"``)."""
        return self.scope == "in"


def compare(
    quantity: str,
    theorem: str,
    layer: int | None,
    predicted: float,
    measured: float,
    tolerance: float,
    note: str = "",
) -> Result:
    """A :class:`Result` for ``measured`` against ``predicted``: the relative error bounded by
    ``tolerance``, or the absolute error where the prediction is 0 (a NaN measurement never
    holds)."""
    predicted, measured = float(predicted), float(measured)
    err = abs(measured - predicted)
    if math.isnan(err):
        err = math.inf  # a NaN measurement never holds
    rel = err / abs(predicted) if predicted != 0 else None
    held = (err if rel is None else rel) <= tolerance
    return Result(
        quantity,
        theorem,
        layer,
        predicted,
        measured,
        err,
        rel,
        float(tolerance),
        bool(held),
        note,
    )


def plain(value: Any) -> Any:
    """``value`` as JSON-ready plain data: dataclasses to dicts, tuples and arrays to lists,
    NumPy/torch scalars to Python numbers."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def experiment_config(experiment: str, preset: str, **settings: Any) -> dict[str, Any]:
    """The ``config`` of ``results.json``: the experiment, its preset and every setting used."""
    from deepufm import __version__

    return {"deepufm_version": __version__, "experiment": experiment, "preset": preset, **settings}


def write_results(
    path: Path, results: list[Result], *, config: dict[str, Any], constants: dict[str, Any]
) -> None:
    """``results.json`` (module docstring), written atomically (a kill or a full disk keeps the
    previous one)."""
    from deepufm.training.rundir import json_record, write_text

    payload = {
        "config": plain(config),
        "constants": plain(constants),
        "results": [asdict(r) for r in results],
    }
    write_text(Path(path), json.dumps(json_record(payload), indent=2, allow_nan=False) + "\n")


@dataclass(frozen=True)
class RunResults:
    """A ``results.json`` read back."""

    config: dict[str, Any]
    constants: dict[str, Any]
    results: list[Result]


def read_results(path: Path) -> RunResults:
    """``results.json`` of an experiment's run directory."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not {"config", "constants", "results"} <= set(data):
        raise DeepUFMError(
            f"{path} is not a results.json of this deepufm version (an object with config, "
            "constants and results); run the experiment again to rewrite it."
        )
    names = {f.name for f in fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in names}) for r in data["results"]]
    return RunResults(data["config"], data["constants"], results)

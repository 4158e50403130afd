"""Theory-vs-measurement records: the rows of ``results.json`` and of the report's table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """One prediction set beside its measurement.

    ``rel_error = |measured - predicted| / |predicted|`` (absolute error when ``predicted == 0``);
    ``holds`` is ``rel_error <= tolerance``. ``layer`` is ``None`` for whole-model quantities.
    """

    quantity: str
    theorem: str
    layer: int | None
    predicted: float
    measured: float
    rel_error: float
    tolerance: float
    holds: bool
    note: str = ""


def compare(
    quantity: str,
    theorem: str,
    layer: int | None,
    predicted: float,
    measured: float,
    tolerance: float,
    note: str = "",
) -> Result:
    predicted, measured = float(predicted), float(measured)
    err = abs(measured - predicted)
    rel = err / abs(predicted) if predicted != 0 else err
    if math.isnan(rel):
        rel = math.inf
    return Result(
        quantity,
        theorem,
        layer,
        predicted,
        measured,
        rel,
        float(tolerance),
        bool(rel <= tolerance),
        note,
    )


def write_results(path: Path, results: list[Result]) -> None:
    """``results.json``, written atomically (a kill or a full disk keeps the previous one)."""
    from deepufm.training.rundir import write_text

    write_text(Path(path), json.dumps([asdict(r) for r in results], indent=2) + "\n")


def read_results(path: Path) -> list[Result]:
    return [Result(**r) for r in json.loads(Path(path).read_text())]

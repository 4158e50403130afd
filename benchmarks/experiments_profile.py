"""Where the time of ``deepufm run all --preset PRESET`` goes, per experiment and per phase.

Phases, timed by wrapping the functions that carry them (no profiler: cProfile's per-call cost
triples the time of the ~11 small GEMMs of one fused training step):

- ``steps``: gradient-descent steps (``training.trainer.train`` minus its probes),
- ``probes``: the scheduled probes (``trainer._probe``: loss, collapse, spectral probe and its
  snapshot spectra),
- ``figures``: drawing and saving every figure (the experiments' ``_figures``),
- ``report``: ``report.md`` / ``report.html`` (``write_report``),
- ``rest``: everything else (the final measurements and checks, reference models, I/O).

Run with one thread for numbers comparable across machines::

    OMP_NUM_THREADS=1 python benchmarks/experiments_profile.py --preset quick
    OMP_NUM_THREADS=1 python benchmarks/experiments_profile.py --preset paper

Writes nothing outside a temporary directory; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from deepufm.experiments import ce_ufm, linear_ufm, relu_ufm, report
from deepufm.experiments.registry import run_experiment
from deepufm.training import trainer

EXPERIMENTS = {"linear-ufm": linear_ufm, "ce-ufm": ce_ufm, "relu-ufm": relu_ufm}


def timed(totals: dict[str, float], phase: str, fn):
    """``fn`` wrapped so that its wall time (outermost calls only) adds to ``totals[phase]``."""
    depth = [0]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[phase] += time.perf_counter() - start

    return wrapper


def patch_everywhere(original, replacement) -> list[tuple[object, str]]:
    """Replace ``original`` by ``replacement`` in every loaded ``deepufm`` module that holds it
    (modules import functions by name); returns what to restore."""
    done = []
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("deepufm"):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)
                done.append((mod, attr))
    return done


def profile(preset: str) -> list[tuple[str, dict[str, float]]]:
    """Run every deep-UFM experiment of ``run all`` at ``preset``; the phase times of each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in EXPERIMENTS.items():
            totals: dict[str, float] = defaultdict(float)
            wrapped = [
                (trainer.train, "train"),
                (trainer._probe, "probes"),
                (module._figures, "figures"),
                (report.write_report, "report"),
            ]
            restore = []
            for fn, phase in wrapped:
                restore += [(m, a, fn) for m, a in patch_everywhere(fn, timed(totals, phase, fn))]
            try:
                start = time.perf_counter()
                run_experiment(name, preset, Path(tmp) / name, progress=False)
                totals["total"] = time.perf_counter() - start
            finally:
                for m, a, fn in restore:
                    setattr(m, a, fn)
            totals["steps"] = totals.pop("train") - totals["probes"]
            totals["rest"] = totals["total"] - sum(
                totals[p] for p in ("steps", "probes", "figures", "report")
            )
            rows.append((name, dict(totals)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("quick", "paper"), default="quick")
    args = parser.parse_args()
    rows = profile(args.preset)
    phases = ("steps", "probes", "figures", "report", "rest", "total")
    print(f"| `run all --preset {args.preset}` | " + " | ".join(phases) + " |")
    print("|---|" + "---:|" * len(phases))
    for name, t in rows:
        print(f"| {name} | " + " | ".join(f"{t[p]:.1f}" for p in phases) + " |")
    sums = {p: sum(t[p] for _, t in rows) for p in phases}
    print("| **all** | " + " | ".join(f"**{sums[p]:.1f}**" for p in phases) + " |")


if __name__ == "__main__":
    main()

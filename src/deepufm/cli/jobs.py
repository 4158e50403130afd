"""Experiments side by side in child processes: ``deepufm run all --jobs N``.

Each experiment runs in its own process (``spawn``: no state inherited from this one) with
``threads`` torch and BLAS threads, so N jobs share the CPUs instead of fighting over them. A
child reports back its :class:`~deepufm.experiments.report.Report`, or prints its error the way
the command line does and reports the exit status.

Signals: children run in their own session, so a terminal's Ctrl-C (which signals the whole
foreground process group) reaches only this process, which forwards each SIGINT or SIGTERM it
receives to every running child exactly once. A child thus sees what a single ``deepufm run``
would see: the first signal checkpoints and stops, a second stops at once. No new experiment is
started after a signal.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Job:
    """One experiment to run: ``target(name, **kwargs)`` returns its report."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a job ended: ``status`` 0 with its ``report``, or the exit status it failed with."""

    name: str
    status: int
    report: Any = None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    threads: int,
    target: Callable[..., Any],
    on_done: Callable[[Outcome], None] | None = None,
) -> tuple[list[Outcome], int | None]:
    """Run ``jobs`` in at most ``workers`` child processes, ``threads`` threads each.

    ``target`` must be importable by name (a module-level function); ``on_done`` is called with
    each outcome as it arrives. Returns the outcomes in the order of ``jobs`` (those never
    started after a signal are left out) and the first signal received, or ``None``.
    """
    ctx = mp.get_context("spawn")
    queue = list(jobs)
    running: dict[Connection, tuple[Job, Any]] = {}
    outcomes: dict[str, Outcome] = {}
    received: list[int] = []

    def send_signal(proc, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    def forward(signum, frame):
        received.append(signum)
        for _, proc in running.values():
            send_signal(proc, signum)

    old = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        while running or (queue and not received):
            while queue and len(running) < workers and not received:
                job = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child, args=(send, target, job, threads), name=f"deepufm-{job.name}"
                )
                proc.start()
                send.close()  # the child holds the other end: EOF here when it exits
                running[recv] = (job, proc)
                for signum in received:  # arrived while it was starting: not yet forwarded
                    send_signal(proc, signum)
            for conn in wait(list(running)):
                job, proc = running.pop(conn)
                try:
                    status, report = conn.recv()
                except EOFError:  # died without a word (killed, or out of memory)
                    status, report = None, None
                conn.close()
                proc.join()
                if status is None:
                    code = proc.exitcode or 1
                    status = 128 - code if code < 0 else code
                outcomes[job.name] = Outcome(job.name, status, report)
                if on_done is not None:
                    on_done(outcomes[job.name])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    done = [outcomes[j.name] for j in jobs if j.name in outcomes]
    return done, (received[0] if received else None)


def _child(conn: Connection, target: Callable[..., Any], job: Job, threads: int) -> None:
    # Own session: signals come only from the parent, which forwards each one once.
    if hasattr(os, "setsid"):
        os.setsid()
    import threadpoolctl
    import torch

    from deepufm.cli import error_status, warnings_said

    torch.set_num_threads(threads)
    try:
        with threadpoolctl.threadpool_limits(limits=threads), warnings_said(f"run {job.name}"):
            report = target(job.name, **job.kwargs)
        result = (0, report)
    except BaseException as exc:
        status = error_status(f"run {job.name}", exc)
        if isinstance(exc, SystemExit):  # a second signal: stopped at once
            status = exc.code if isinstance(exc.code, int) else 1
        elif status is None:
            traceback.print_exc()
            status = 1
        result = (status, None)
    conn.send(result)
    conn.close()

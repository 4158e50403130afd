"""The ``deepufm`` command line: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` (``run(args) -> int``). Every error is printed as one paragraph without a traceback.

Exit status: 0 success; 2 bad input (``ConfigError`` and the other ``DeepUFMError`` types, a
diverged run); 1 a runtime failure (``RunError``: full disk, read-only target, out of memory);
130 / 143 interrupted by SIGINT / SIGTERM after writing a checkpoint (``Interrupted``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator

from deepufm import __version__
from deepufm.errors import DeepUFMError, Interrupted, RunError

# Subcommand modules, in the order `deepufm --help` lists them.
COMMANDS = ("train", "theory", "analyze", "run")


def build_parser() -> argparse.ArgumentParser:
    """The ``deepufm`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deepufm",
        description=(
            "Deep unconstrained feature models: train to deep neural collapse, measure the "
            "Hessian and related matrices exactly, and compare with the closed-form theory of "
            "Garrod & Keating (arXiv 2404.06106)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deepufm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"deepufm.cli.{name}").register(sub)
    return parser


def _say(command: str, kind: str, message: object) -> None:
    # Paths and commands stay whole (copy-pasteable): no breaks at hyphens or inside words.
    text = textwrap.fill(
        f"deepufm {command}: {kind}: {message}",
        width=100,
        break_on_hyphens=False,
        break_long_words=False,
    )
    print(text, file=sys.stderr)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text or "allocate" in text
    )


def error_status(command: str, exc: BaseException) -> int | None:
    """Print ``exc`` as the command line reports it (one paragraph, no traceback) and return the
    exit status; ``None`` for an exception that is not ours to explain (the caller re-raises)."""
    if isinstance(exc, Interrupted):
        _say(command, "stopped", exc)
        return exc.exit_code
    if isinstance(exc, RunError):
        _say(command, "error", exc)
        return 1
    if isinstance(exc, DeepUFMError):
        _say(command, "error", exc)
        return 2
    if isinstance(exc, KeyboardInterrupt):
        _say(command, "error", "interrupted (nothing was being trained, no checkpoint written)")
        return 130
    if isinstance(exc, BrokenPipeError):
        # The reader went away (`deepufm run --list | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        code = errno.errorcode.get(exc.errno or 0, "")
        _say(command, "error", f"{exc.strerror or exc}{where} [{code}]")
        return 1
    if _is_out_of_memory(exc):
        _say(
            command,
            "error",
            f"out of memory ({str(exc).splitlines()[0][:300]}). Choose a smaller problem "
            "(d, n, K, per-class) or a device with more memory.",
        )
        return 1
    return None


@contextlib.contextmanager
def warnings_said(command: str) -> Iterator[None]:
    """Within the block, warnings print as ``deepufm COMMAND: warning: ...`` (no source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        _say(command, "warning", message)

    old_show, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = old_show


def main(argv: list[str] | None = None) -> int:
    """Run the ``deepufm`` command line with ``argv`` (default ``sys.argv[1:]``); exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = args.command
    with warnings_said(command):
        try:
            return int(args.func(args) or 0)
        except Exception as exc:
            status = error_status(command, exc)
            if status is None:
                raise
            return status
        except KeyboardInterrupt as exc:
            return error_status(command, exc)  # type: ignore[return-value]

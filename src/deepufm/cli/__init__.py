"""The ``deepufm`` command line: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` (``run(args) -> int``). Errors deepufm raises on purpose (``DeepUFMError``) are printed
as one paragraph without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from deepufm import __version__
from deepufm.errors import DeepUFMError

# Subcommand modules, in the order `deepufm --help` lists them.
COMMANDS = ("train", "theory", "analyze", "run")


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DeepUFMError as exc:
        msg = textwrap.fill(f"deepufm {args.command}: error: {exc}", width=100)
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepufm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

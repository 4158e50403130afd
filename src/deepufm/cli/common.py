"""Options shared by subcommands: the model flags and TOML configuration files."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from deepufm.errors import ConfigError


def parse_float_list(text: str) -> float | list[float]:
    """``"0.01"`` -> 0.01; ``"0.01,0.02"`` -> [0.01, 0.02]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list, got {text!r}"
        ) from exc
    return values[0] if len(values) == 1 else values


def parse_int_list(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (empty items skipped); a non-integer raises argparse's
    ``ArgumentTypeError`` (argparse reports it with the option)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The deep-UFM flags. Defaults are ``None`` so that flags given can be told from defaults."""
    g = p.add_argument_group("model (the deep UFM of v1 §3 / v2 §2; docs: Concepts)")
    g.add_argument("--K", type=int, help="number of classes (>= 2) [default: 3]")
    g.add_argument("--n", type=int, help="samples per class (>= 1) [default: 40]")
    g.add_argument("--d", type=int, help="width of the layers (>= K) [default: 60]")
    g.add_argument("--L", type=int, help="number of weight layers W_1..W_L (>= 1) [default: 5]")
    g.add_argument(
        "--activation",
        choices=["linear", "relu"],
        help="activation on layers 2..L [default: linear]",
    )
    g.add_argument("--loss", choices=["mse", "ce"], help="data loss [default: mse]")
    g.add_argument(
        "--lam",
        type=float,
        help="one regularisation coefficient for every W_l and H_1 (v2) [default: 0.01 unless --lam-W/--lam-H]",
    )
    g.add_argument(
        "--lam-W",
        type=parse_float_list,
        help="weight decay of W_l: one value or L comma-separated values (v1; with --lam-H)",
    )
    g.add_argument(
        "--lam-H", type=float, help="regularisation of the features H_1 (v1; with --lam-W)"
    )
    g.add_argument(
        "--init-std",
        type=float,
        help="std of the i.i.d. normal initialisation [default: 1/sqrt(d)]",
    )
    g.add_argument(
        "--dtype", choices=["float64", "float32"], help="floating-point type [default: float64]"
    )
    g.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N [default: auto]")
    g.add_argument("--seed", type=int, help="seed of the initialisation [default: 0]")


MODEL_KEYS = (
    "K",
    "n",
    "d",
    "L",
    "activation",
    "loss",
    "lam",
    "lam_W",
    "lam_H",
    "init_std",
    "dtype",
    "device",
    "seed",
)


def given(args: argparse.Namespace, keys) -> dict[str, Any]:
    """The options among ``keys`` that were given on the command line (not ``None``)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a missing, unreadable or invalid file, or a
    directory, raises ``ConfigError`` naming ``--config``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("--config", str(path), "a TOML file", "It is a directory.")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError("--config", str(path), "an existing TOML file") from exc
    except OSError as exc:
        raise ConfigError("--config", str(path), "a readable TOML file", exc.strerror) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", str(path), "a valid TOML file", str(exc)) from exc

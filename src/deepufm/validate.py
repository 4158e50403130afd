"""One set of checks for every numeric option and configuration field.

Each check returns the value as a plain Python ``int``/``float``/``bool`` (NumPy scalars are
accepted when they meet the range) or raises :class:`~deepufm.errors.ConfigError` naming the
parameter, its value and the valid range. Booleans are never numbers, and numbers never booleans
(TOML ``allow_trivial = "no"`` is refused, not read as true).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deepufm.errors import ConfigError

# Epoch counts beyond 2**53 cannot be told apart as float64 (the probe schedule is log-spaced).
MAX_EPOCHS = 2**53
# torch.Generator seeds are unsigned 64-bit integers.
MAX_SEED = 2**64 - 1


def _range_text(kind: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def integer(param: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``[lo, hi]`` (``None``: that side is open-ended).

    Raises:
        ConfigError: ``value`` is not an integer (a ``bool``, a ``float`` such as ``3.0`` or a
            string is refused) or lies outside ``[lo, hi]``; the message names ``param``.

    Example:
        >>> integer("K", 3, 2)
        3
    """
    valid = _range_text("an integer", lo, hi, False, False)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ConfigError(param, value, valid)
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(param, value, valid)
    return v


def number(
    param: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``lo`` to ``hi`` (closed unless
    ``lo_open``/``hi_open``; ``None``: that side is unbounded). Integers are accepted.

    Raises:
        ConfigError: ``value`` is a ``bool``, not a real number, not finite or outside the
            interval; the message names ``param`` and the interval.

    Example:
        >>> number("lr", 1, 0, lo_open=True)
        1.0
    """
    valid = _range_text("a finite number", lo, hi, lo_open, hi_open)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise ConfigError(param, value, valid)
    if isinstance(value, np.complexfloating):
        raise ConfigError(param, value, valid)
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(param, value, valid)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ConfigError(param, value, valid)
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ConfigError(param, value, valid)
    return v


def boolean(param: str, value: Any) -> bool:
    """``value`` as a ``bool``: only ``True``/``False`` (``np.bool_`` too), never a string.

    Raises:
        ConfigError: anything else (``0``, ``1``, ``"no"``, ``None``); the message names ``param``.
    """
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(param, value, "true or false (a boolean)")
    return bool(value)


def epochs_list(param: str, values: Any) -> tuple[int, ...]:
    """A sorted tuple of distinct epochs in ``[0, MAX_EPOCHS]`` (duplicates dropped).

    Raises:
        ConfigError: ``values`` is not a list or tuple, or one entry is not an integer in that
            range; the message names ``param`` and shows the whole list.

    Example:
        >>> epochs_list("probe_epochs", [10, 0, 10])
        (0, 10)
    """
    if not isinstance(values, list | tuple):
        raise ConfigError(param, values, f"a list of integer epochs in [0, {MAX_EPOCHS}]")
    try:
        return tuple(sorted({integer(param, v, 0, MAX_EPOCHS) for v in values}))
    except ConfigError:
        raise ConfigError(param, values, f"a list of integer epochs in [0, {MAX_EPOCHS}]") from None

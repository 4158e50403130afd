"""`UFMConfig`: every hyperparameter of a deep unconstrained feature model (Concepts: *Deep
unconstrained feature models*)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from deepufm import validate as V
from deepufm.errors import ConfigError

ACTIVATIONS = ("linear", "relu")
LOSSES = ("mse", "ce")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_LAM = 1e-2
MAX_SIZE = 2**31 - 1


def _check_nonneg(name: str, value: Any) -> float:
    return V.number(name, value, 0)


@dataclass(frozen=True)
class UFMConfig:
    """Hyperparameters of a deep UFM.

    Regularisation is given either as one ``lam`` (v2: every ``W_l`` and ``H_1``), or as per-layer
    ``lam_W`` (a scalar or a list of ``L`` values) plus ``lam_H`` (v1). After construction the three
    fields are always consistent: ``lam_W`` is a tuple of ``L`` floats and ``lam_H`` a float, and
    ``lam`` is the common value when one was given (else ``None``). With none given, ``lam`` is
    ``DEFAULT_LAM``.

    Attributes:
        K: classes (>= 2). n: samples per class (>= 1). d: width (>= K). L: weight layers (>= 1).
        d_in: rows of ``H_1`` (columns of ``W_1``) when they differ from ``d`` — the feature
            dimension of a real network's head input (v2 App. G.2); ``None`` (the default, and the
            stored value whenever ``d_in == d``) means ``d``. See :attr:`input_dim`.
        activation: ``"linear"`` or ``"relu"`` (on the pre-activations of layers 2..L).
        loss: ``"mse"`` or ``"ce"``.
        init_std: standard deviation of the i.i.d. normal initialisation; default ``1/sqrt(d)``.
        dtype: ``"float64"`` (default) or ``"float32"``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        seed: seed of the initialisation.
    """

    K: int = 3
    n: int = 40
    d: int = 60
    L: int = 5
    activation: str = "linear"
    loss: str = "mse"
    lam: float | None = None
    lam_W: Any = None
    lam_H: float | None = None
    init_std: float | None = None
    dtype: str = "float64"
    device: str = "auto"
    seed: int = 0
    d_in: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        # Sizes beyond 2**31 cannot be allocated anyway; the bound keeps the messages exact.
        for name, lo in (("K", 2), ("n", 1), ("L", 1)):
            set_(name, V.integer(name, getattr(self, name), lo, MAX_SIZE))
        try:
            set_("d", V.integer("d", self.d, self.K, MAX_SIZE))
        except ConfigError:
            raise ConfigError(
                "d", self.d, f"an integer >= K={self.K} (the width must hold K classes)"
            ) from None
        if self.d_in is not None:
            try:
                set_("d_in", V.integer("d_in", self.d_in, self.K, MAX_SIZE))
            except ConfigError:
                raise ConfigError(
                    "d_in", self.d_in, f"an integer >= K={self.K}, or None for d_in = d"
                ) from None
            if self.d_in == self.d:
                # One spelling per model, so that equal models compare and serialise equal.
                object.__setattr__(self, "d_in", None)
        if self.activation not in ACTIVATIONS:
            raise ConfigError("activation", self.activation, f"one of {', '.join(ACTIVATIONS)}")
        if self.loss not in LOSSES:
            raise ConfigError("loss", self.loss, f"one of {', '.join(LOSSES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        set_("seed", V.integer("seed", self.seed, 0, V.MAX_SEED))
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError("device", self.device, "a torch device string such as cpu or cuda")
        init_std = 1.0 / math.sqrt(self.d) if self.init_std is None else self.init_std
        if _check_nonneg("init_std", init_std) == 0:
            raise ConfigError("init_std", init_std, "a finite number > 0")
        object.__setattr__(self, "init_std", float(init_std))
        self._resolve_regularisation()

    def _resolve_regularisation(self) -> None:
        lam, lam_W, lam_H = self.lam, self.lam_W, self.lam_H
        if lam is None and lam_W is None and lam_H is None:
            lam = DEFAULT_LAM
        if lam is not None:
            lam = _check_nonneg("lam", lam)
            common_W = (lam,) * self.L
            given_W = None if lam_W is None else self._layer_lams(lam_W)
            if (given_W is not None and given_W != common_W) or (
                lam_H is not None and float(lam_H) != lam
            ):
                raise ConfigError(
                    "lam", lam, "either one lam (v2) or lam_W plus lam_H (v1), not both"
                )
            lam_W, lam_H = common_W, lam
        else:
            if lam_W is None or lam_H is None:
                missing = "lam_W" if lam_W is None else "lam_H"
                raise ConfigError(missing, None, "a value: lam_W and lam_H are given together")
            lam_W = self._layer_lams(lam_W)
            lam_H = _check_nonneg("lam_H", lam_H)
        object.__setattr__(self, "lam", lam)
        object.__setattr__(self, "lam_W", lam_W)
        object.__setattr__(self, "lam_H", lam_H)

    def _layer_lams(self, lam_W: Any) -> tuple[float, ...]:
        if isinstance(lam_W, list | tuple):
            if len(lam_W) != self.L:
                raise ConfigError("lam_W", list(lam_W), f"a scalar or a list of L={self.L} values")
            return tuple(_check_nonneg(f"lam_W[{i}]", v) for i, v in enumerate(lam_W))
        return (_check_nonneg("lam_W", lam_W),) * self.L

    # -- derived quantities ------------------------------------------------------------------
    @property
    def N(self) -> int:
        """Number of samples, ``K * n``."""
        return self.K * self.n

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` that ``dtype`` names (``torch.float64`` or ``torch.float32``)."""
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` of ``device`` through :func:`resolve_device` (``"auto"``
        resolved; a CUDA device this machine lacks raises :class:`~deepufm.errors.ConfigError`)."""
        return resolve_device(self.device)

    @property
    def input_dim(self) -> int:
        """Rows of ``H_1``: ``d_in`` when given, else ``d``."""
        return self.d if self.d_in is None else self.d_in

    def layer_shapes(self) -> list[tuple[int, int]]:
        """Shapes of ``W_1 .. W_L``: ``(d, d)`` for hidden layers, ``(K, d)`` for the last.

        ``W_1`` has ``input_dim`` columns (``(d, d_in)``, or ``(K, d_in)`` when ``L = 1``).
        """
        shapes = [(self.d, self.d)] * (self.L - 1) + [(self.K, self.d)]
        shapes[0] = (shapes[0][0], self.input_dim)
        return shapes

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready ``dict`` (``lam_W`` as a list), the inverse of
        :meth:`from_dict`; ``d_in`` is left out when ``None`` so square models keep the keys of
        older stored ``config.json`` files."""
        out = asdict(self)
        out["lam_W"] = list(self.lam_W)
        if out["d_in"] is None:
            # Square models keep the key set they had before d_in existed (stored config.json).
            del out["d_in"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> UFMConfig:
        """Build from a mapping (TOML, JSON); unknown keys and wrong types name the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source} key {unknown[0]!r}",
                data[unknown[0]],
                f"one of {', '.join(sorted(known))}",
            )
        for key, value in data.items():
            _check_type(key, value, source)
        return cls(**data)


_INT_KEYS = {"K", "n", "d", "L", "seed", "d_in"}
_STR_KEYS = {"activation", "loss", "dtype", "device"}


def _check_type(key: str, value: Any, source: str) -> None:
    name = f"{source} key {key!r}"
    if value is None:
        return
    if key in _INT_KEYS:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif key in _STR_KEYS:
        ok, want = isinstance(value, str), "a string"
    elif key == "lam_W":
        items = value if isinstance(value, list | tuple) else [value]
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)
        want = "a number or a list of numbers"
    else:
        ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    if not ok:
        raise ConfigError(name, value, f"{want} (got {type(value).__name__})")


def resolve_device(device: str, param: str = "device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    A CUDA device that this machine does not have (no CUDA build or driver, or an index past
    ``torch.cuda.device_count()``) is refused with a :class:`ConfigError` naming ``param``, before
    anything is allocated or written, instead of failing later inside PyTorch.
    """
    valid = "auto, cpu, cuda or cuda:<index>"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(param, device, valid) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                param, device, f"{valid} on a machine that has it", "CUDA is not available here."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(param, device, f"cuda or cuda:<index> with index < {count}")
    return dev

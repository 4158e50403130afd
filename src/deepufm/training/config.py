"""`TrainConfig`: the optimisation hyperparameters of a full-batch run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deepufm import validate as V


@dataclass(frozen=True)
class TrainConfig:
    """Full-batch gradient descent with optional heavy-ball momentum (PyTorch's SGD convention).

    Attributes:
        lr: step size (> 0). The step at epoch ``e`` uses ``lr * 0.5**k`` with ``k`` the number of
            entries of ``lr_halve_at`` that are ``<= e``.
        momentum: heavy-ball coefficient in ``[0, 1)``: ``v <- momentum*v + grad``, ``p <- p - lr*v``.
        epochs: number of full-batch steps (``>= 0``).
        lr_halve_at: epochs at which the step size halves.
        probes_per_decade: log-spaced probe epochs per factor 10 of epochs (epoch 0 and the last
            epoch are always probed).
        probe_at: extra epochs to probe.
        checkpoint_every: seconds of training between atomic checkpoints (one is also written at
            the end). Checkpoints do not change the trajectory.
        allow_trivial: train even when the regularisation is above the threshold where the zero
            solution is the global optimum (v1 eq. 2, v2 eq. 17; docs: Concepts, Deep neural collapse).
    """

    lr: float = 0.5
    momentum: float = 0.0
    epochs: int = 6000
    lr_halve_at: tuple[int, ...] = field(default_factory=tuple)
    probes_per_decade: int = 10
    probe_at: tuple[int, ...] = field(default_factory=tuple)
    checkpoint_every: float = 60.0
    allow_trivial: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        set_("lr", V.number("lr", self.lr, 0, lo_open=True))
        set_("momentum", V.number("momentum", self.momentum, 0, 1, hi_open=True))
        set_("epochs", V.integer("epochs", self.epochs, 0, V.MAX_EPOCHS))
        set_("probes_per_decade", V.integer("probes_per_decade", self.probes_per_decade, 1, 1000))
        set_(
            "checkpoint_every",
            V.number("checkpoint_every", self.checkpoint_every, 0, lo_open=True),
        )
        set_("allow_trivial", V.boolean("allow_trivial", self.allow_trivial))
        for name in ("lr_halve_at", "probe_at"):
            set_(name, V.epochs_list(name, getattr(self, name)))

    def lr_at(self, epoch: int) -> float:
        """Step size used by the step that starts at ``epoch``."""
        return halved_lr(self.lr, self.lr_halve_at, epoch)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples as lists), as ``config.json`` stores them."""
        out = asdict(self)
        out["lr_halve_at"] = list(self.lr_halve_at)
        out["probe_at"] = list(self.probe_at)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config :meth:`to_dict` wrote (validated again)."""
        return cls(**data)


def halved_lr(lr: float, halve_at: tuple[int, ...], epoch: int) -> float:
    """``lr * 0.5**k`` with ``k`` the number of ``halve_at`` epochs ``<= epoch``."""
    return lr * 0.5 ** sum(1 for e in halve_at if e <= epoch)


def probe_epochs(epochs: int, per_decade: int = 10, extra: tuple[int, ...] = ()) -> list[int]:
    """Log-spaced probe epochs in ``[0, epochs]``: 0, the last epoch, ``round(10**(k/per_decade))``.

    Metrics are evaluated only at these epochs, never every step.
    """
    points = {0, epochs}
    k = 0
    while (e := round(10 ** (k / per_decade))) <= epochs:
        points.add(e)
        k += 1
    points.update(e for e in extra if 0 <= e <= epochs)
    return sorted(points)

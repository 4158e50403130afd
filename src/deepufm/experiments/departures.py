"""Where each experiment's setting departs from the paper's: the "Departures from the paper"
table of every report, built from the run's ``config`` (``results.json``) and a record of the
paper's setting per experiment.

The paper's values are those of its text (v1 §5, v2 §3–4 and App. G.2). Many of the v1 numbers
were lost when the paper was extracted; for those the project takes the values of an independent
reproduction of v1 and marks them provisional [U] (docs: Concepts › Provisional settings, which
lists every stand-in). Each record says which it is: ``stated`` (readable in the paper),
``provisional`` (a stand-in the project chose for a number that is not stated or could not be
read) or ``not stated`` (the paper does not give it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deepufm.experiments.report import markdown_table

STATED, PROVISIONAL, NOT_STATED = "stated", "provisional", "not stated"
STATUSES = (STATED, PROVISIONAL, NOT_STATED)


@dataclass(frozen=True)
class PaperSetting:
    """One setting of the paper's experiment beside the way to read it off a run's ``config``.

    ``value`` is the paper's (``None`` when ``status`` is ``not stated``), ``status`` one of
    :data:`STATUSES`, ``source`` where the value comes from; ``here`` maps the run's ``config``
    (the ``config`` of ``results.json``) to this run's value.
    """

    setting: str
    value: Any
    status: str
    source: str
    here: Callable[[Mapping[str, Any]], Any]

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r} must be one of {STATUSES}")
        if (self.value is None) != (self.status == NOT_STATED):
            raise ValueError(
                f"setting {self.setting!r}: value={self.value!r} must be None exactly when the "
                "status is 'not stated'"
            )


def _same(a: Any, b: Any) -> bool:
    """Equal settings; numbers compare to 1e-12 relative (0.01 from a config is 0.01)."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def departure(setting: PaperSetting, config: Mapping[str, Any]) -> tuple[Any, str]:
    """``(this run's value, verdict)``: ``"yes"`` (differs from a stated value), ``"yes (from
    the provisional value)"``, ``"no"``, or ``"unknown (not stated)"``."""
    here = setting.here(config)
    if setting.status == NOT_STATED:
        return here, "unknown (not stated)"
    if _same(here, setting.value):
        return here, "no"
    return here, "yes" if setting.status == STATED else "yes (from the provisional value)"


def departure_rows(
    settings: tuple[PaperSetting, ...], config: Mapping[str, Any]
) -> list[list[object]]:
    """One row per setting: setting, here, paper, status and source, departure."""
    rows = []
    for s in settings:
        here, verdict = departure(s, config)
        paper = "not stated" if s.value is None else s.value
        rows.append([s.setting, _show(here), _show(paper), f"{s.status} ({s.source})", verdict])
    return rows


DEPARTURES_HEADER = ["setting", "this run", "paper", "paper's value is", "departure"]


def departures_table(experiment: str, config: Mapping[str, Any]) -> str:
    """The Markdown "Departures from the paper" table of ``experiment`` for a run's ``config``."""
    if experiment not in PAPER_SETTINGS:
        raise ValueError(
            f"experiment={experiment!r} has no paper-setting record ({', '.join(PAPER_SETTINGS)})"
        )
    return markdown_table(DEPARTURES_HEADER, departure_rows(PAPER_SETTINGS[experiment], config))


def departures_caption(experiment: str) -> str:
    """The report's caption of the table: what the columns mean."""
    return (
        f"Departures from the paper ({experiment}): this run's settings against the paper's; "
        "'provisional' values are this project's stand-ins for numbers the paper does not state "
        "or that were lost from the extracted v1 text (docs: Concepts › Provisional settings), "
        "'not stated' ones the paper does not give"
    )


def _show(value: Any) -> object:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    return value


# -- the paper's settings --------------------------------------------------------------------------


def _model(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda c: c["model"][key]


def _train(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda c: c["training"][key]


def _optimiser(c: Mapping[str, Any]) -> str:
    m = c["training"].get("momentum", 0.0)
    batch = c["training"].get("batch_size")
    kind = "gradient descent" if not m else f"heavy-ball momentum {m:g}"
    return kind + ("" if batch is None else f", batch {batch}")


_V1 = "v1 §5.1"
# where the project's stand-ins are listed, with the reason for each
_PROVISIONAL = "docs: Concepts › Provisional settings"
_V1_LOST = f"v1's number lost in extraction; a v1 reproduction's value, {_PROVISIONAL}"


def _ufm_common(source: str) -> tuple[PaperSetting, ...]:
    return (
        PaperSetting("K (classes)", 3, STATED, source, _model("K")),
        PaperSetting("n (samples per class)", 40, PROVISIONAL, _V1_LOST, _model("n")),
        PaperSetting("lambda (lambda_W = lambda_H)", 0.01, PROVISIONAL, _V1_LOST, _model("lam")),
        PaperSetting("optimiser", "gradient descent", STATED, source, _optimiser),
        PaperSetting("learning rate", None, NOT_STATED, source, _train("lr")),
        PaperSetting(
            "initialisation std",
            None,
            NOT_STATED,
            f"{source}: 'normally distributed'",
            _model("init_std"),
        ),
        PaperSetting("dtype", None, NOT_STATED, source, _model("dtype")),
    )


LINEAR_SETTINGS = (
    *_ufm_common(_V1),
    PaperSetting("d (width)", 60, PROVISIONAL, _V1_LOST, _model("d")),
    PaperSetting("L (layers)", 5, PROVISIONAL, _V1_LOST, _model("L")),
    PaperSetting("studied layer l", 3, STATED, _V1, lambda c: c["layer"]),
    PaperSetting("epochs", None, NOT_STATED, _V1, _train("epochs")),
)

_V1_RELU = "v1 §5.2"
RELU_SETTINGS = (
    *_ufm_common(_V1_RELU),
    PaperSetting("d (width)", 65, PROVISIONAL, _V1_LOST, _model("d")),
    PaperSetting("L (layers)", 5, PROVISIONAL, _V1_LOST, _model("L")),
    PaperSetting("studied layer l", 4, PROVISIONAL, _V1_LOST, lambda c: c["layer"]),
    PaperSetting("epochs", 1_000_000, PROVISIONAL, _V1_LOST, _train("epochs")),
    PaperSetting(
        "zeroing threshold of tiny parameters",
        None,
        NOT_STATED,
        "v2 §4: 'we zero out parameters with magnitude below' (number lost)",
        lambda c: c["zero_below"],
    ),
    PaperSetting(
        "non-negativity tolerance of u (relative)",
        None,
        NOT_STATED,
        "v2 §4 counts entries below a threshold (number lost)",
        lambda c: c["relu_tol"],
    ),
)

_CE = "v2 App. B: Theorem 9 is analytic; no CE training setting in the paper"
CE_SETTINGS = tuple(
    PaperSetting(name, None, NOT_STATED, _CE, get)
    for name, get in (
        ("K (classes)", _model("K")),
        ("n (samples per class)", _model("n")),
        ("d (width)", _model("d")),
        ("L (layers)", _model("L")),
        ("lambda", _model("lam")),
        ("optimiser", _optimiser),
        ("learning rate", _train("lr")),
        ("epochs", _train("epochs")),
        ("dtype", _model("dtype")),
    )
)


def _network_settings(source: str, per_class: int, epochs: int, lr: float, halve: int):
    g2 = source
    return (
        PaperSetting("images per class", per_class, STATED, g2, _images_per_class),
        PaperSetting("epochs", epochs, STATED, g2, _train("epochs")),
        PaperSetting("learning rate", lr, STATED, g2, _train("lr")),
        PaperSetting("learning rate halved at", [halve], STATED, g2, _train("lr_halve_at")),
        PaperSetting(
            "optimiser",
            "gradient descent, batch 10000",
            STATED,
            f"{g2}: 'batch gradient descent with a batch size of 10,000'; no momentum mentioned",
            _optimiser,
        ),
        PaperSetting("feature map", "ResNet-20", STATED, g2, _resnet),
        PaperSetting("head layers L", 4, STATED, f"{g2}: 'four linear layers'", _train("L")),
        PaperSetting(
            "head width d",
            64,
            PROVISIONAL,
            f"not stated; as the companion paper, {_PROVISIONAL}",
            _train("d"),
        ),
        PaperSetting(
            "lambda (head)", 5e-3, PROVISIONAL, f"not stated; {_PROVISIONAL}", _train("lam")
        ),
        PaperSetting(
            "lambda_H (features)", 1e-6, PROVISIONAL, f"not stated; {_PROVISIONAL}", _train("lam_H")
        ),
        PaperSetting("loss", "mse", PROVISIONAL, f"MSE implied; {_PROVISIONAL}", _train("loss")),
        PaperSetting("dtype", None, NOT_STATED, g2, _train("dtype")),
    )


def _images_per_class(c: Mapping[str, Any]) -> Any:
    """The images per class the run trained on (``per_class=None`` means all the data set has)."""
    return c.get("images_per_class", c["training"]["per_class"])


def _resnet(c: Mapping[str, Any]) -> str:
    t = c["training"]
    depth = 6 * t["blocks"] + 2
    return f"ResNet-{depth}" + ("" if t["width"] == 1 else f", width x{t['width']:g}")


_G2 = "v2 App. G.2"
MNIST_SETTINGS = _network_settings(_G2, 5000, 4000, 0.04, 2000)
FASHION_SETTINGS = _network_settings(
    f"{_G2} (MNIST's: the paper has no Fashion-MNIST run)", 5000, 4000, 0.04, 2000
)
CIFAR_SETTINGS = _network_settings(_G2, 5000, 5000, 0.05, 2500)

PAPER_SETTINGS: dict[str, tuple[PaperSetting, ...]] = {
    "linear-ufm": LINEAR_SETTINGS,
    "relu-ufm": RELU_SETTINGS,
    "ce-ufm": CE_SETTINGS,
    "mnist-resnet": MNIST_SETTINGS,
    "fashion-resnet": FASHION_SETTINGS,
    "cifar-resnet": CIFAR_SETTINGS,
}

__all__ = [
    "CE_SETTINGS",
    "CIFAR_SETTINGS",
    "DEPARTURES_HEADER",
    "FASHION_SETTINGS",
    "LINEAR_SETTINGS",
    "MNIST_SETTINGS",
    "NOT_STATED",
    "PAPER_SETTINGS",
    "PROVISIONAL",
    "RELU_SETTINGS",
    "STATED",
    "STATUSES",
    "PaperSetting",
    "departure",
    "departure_rows",
    "departures_caption",
    "departures_table",
]

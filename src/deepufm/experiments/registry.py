"""The experiments that regenerate the paper's figures and tables (v1 §5; v2 §3–5, App. G).

Each experiment is one model family; it trains (or builds) its models, measures every matrix,
draws every figure of that family, and writes the run directory with ``results.json`` and the
report. ``deepufm run --list`` prints the catalogue below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepufm.errors import ConfigError
from deepufm.models.config import resolve_device

PRESETS = ("quick", "paper")


@dataclass(frozen=True)
class Item:
    """A figure or table of the paper: ``id`` like ``"v1-fig3"`` (also the PNG's name)."""

    id: str
    description: str


@dataclass(frozen=True)
class Experiment:
    """One model family of the paper's experiments: its name, a description, the module whose
    ``run`` it calls, the figures and tables it draws, extra ``run`` options, and whether it reads
    a data set."""

    name: str
    description: str
    # module defining `run(preset: str, out: Path, progress: bool, device=None, resume=False,
    # ...) -> Report`; with `resume` it continues the unfinished run in `out` (held for it)
    module: str
    items: tuple[Item, ...]
    # Extra keyword arguments of `run` (e.g. which data set); `needs_data` experiments also take
    # `data_dir` (data sets that cannot ship are read from there).
    options: tuple[tuple[str, Any], ...] = ()
    needs_data: bool = False

    def runner(self) -> Callable:
        """The experiment's ``run`` function (its module imported on first use)."""
        return importlib.import_module(self.module).run


LINEAR = Experiment(
    "linear-ufm",
    "deep linear UFM with MSE loss (v1 §4, v2 §3): Hessian, Papyan, gradient, weight, "
    "gradient-covariance, back-propagated-error and feature-Gram spectra during training",
    "deepufm.experiments.linear_ufm",
    (
        Item(
            "v1-fig3",
            "layer-Hessian spectrum (bulk, zeros counted, top K² outliers) and λ1/λK² over epochs",
        ),
        Item("v1-fig4", "alignment f_cc' of the K² predicted eigenvectors during early training"),
        Item("v1-fig5", "top layer-Hessian eigenvalues and the G_within knockout (removes none)"),
        Item("v1-fig6", "G_cross and G_class knockouts (remove K(K-1) and K outliers)"),
        Item("v1-fig7", "gradient coefficients γ_cc' during training (diagonal -> 1/K)"),
        Item("v1-fig8", "spectrum of W_l^T W_l (K outliers) during training"),
        Item("v1-fig12", "gradient-covariance scree plot (K-1 equal outliers, then zeros)"),
        Item("v1-fig13", "back-propagated-error scree plot (K-1 equal + 1 small, then zeros)"),
        Item("v1-fig14", "feature-Gram scree plot (K equal outliers, then zeros)"),
        Item("v2-fig1", "f_cc' and γ_cc' during training"),
        Item("v2-fig2", "layer-Hessian outliers converging to one value"),
        Item("v2-fig7", "W_l^T W_l spectra during training"),
        Item("v2-fig9", "Hessian outliers (H_l panel) with the G_cross and G_class knockouts"),
    ),
)

CE = Experiment(
    "ce-ufm",
    "deep linear UFM with cross-entropy loss (v2 App. B): the Theorem 9 layer-Hessian spectrum",
    "deepufm.experiments.ce_ufm",
    (Item("ce-thm9", "Theorem 9: K spikes, one dominant, over a mini-bulk of K^2-3K+1"),),
)

RELU = Experiment(
    "relu-ufm",
    "deep ReLU UFM with MSE loss (v1 §4.2, v2 §4): Theorem 7 layer by layer, the "
    "flat family at the first ReLU, negative pre-activations, NC3-type Grams",
    "deepufm.experiments.relu_ufm",
    (
        Item("v1-fig9", "ReLU layer-Hessian spectra over training (K² outliers separate)"),
        Item("v1-fig10", "ReLU knockouts of G_within, G_cross and G_class"),
        Item("v1-fig11", "ReLU W_l^T W_l spectra (K outliers equalise)"),
        Item("v1-table1", "f_cc' of the K² predicted eigenvectors after long training"),
        Item("v1-table2", "cos² of the data gradient with the K² true top eigenvectors"),
        Item("v1-table3", "O^(l) = normalised A^(l) A^(l)T per layer (ReLU and linear)"),
        Item("v1-table4", "data-averaged O^(l) with the ReLU masks"),
        Item("v2-fig3", "fraction of negative pre-activations and orthogonal-frame distance"),
        Item("v2-fig4", "f_cc' and γ_cc' of the ReLU model (sigma'(0)=1, zeros rounded)"),
        Item("v2-fig5", "ReLU Hessian outliers converging to the linear value"),
        Item("v2-fig8", "ReLU W_l^T W_l spectra during training"),
        Item(
            "v2-fig10", "ReLU Hessian outliers (H_l panel) with the G_cross and G_class knockouts"
        ),
        Item("v2-fig11", "feature-Gram eigenvalues: the global-mean spike decays onto K-1"),
    ),
)

_NETWORK_ITEMS = (
    Item("v2-fig6", "f_cc' and γ_cc' of head layer l during training"),
    Item("v2-fig16", "singular-vector alignment of W_l (left and right)"),
    Item("v2-fig17", "effective ranks of H_l (-> K²) and W_l (-> K)"),
    Item("v2-fig18", "mean ± std of the outlier eigenvalues of H_l and W_l, and std/mean"),
    Item("v2-thm6", "whole-network Hessian vs its head block, Frobenius-normalised (Theorem 6)"),
)


def _network(name: str, data: str, hessian: str, weights: str) -> Experiment:
    return Experiment(
        name,
        f"ResNet-20 + four linear layers on {data} (v2 §5, App. G.2): the head's matrices "
        "during training and the whole-network Hessian",
        "deepufm.experiments.resnet_head",
        (
            Item(hessian, f"{data}: head-layer Hessian outliers and knockouts"),
            Item(weights, f"{data}: head weight spectra"),
            *_NETWORK_ITEMS,
        ),
        options=(("experiment", name),),
        needs_data=True,
    )


MNIST_RESNET = _network("mnist-resnet", "MNIST (embedded 5,000 images)", "v2-fig12", "v2-fig13")
FASHION_RESNET = _network("fashion-resnet", "Fashion-MNIST", "v2-fig12", "v2-fig13")
CIFAR_RESNET = _network("cifar-resnet", "CIFAR-10", "v2-fig14", "v2-fig15")

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (LINEAR, RELU, CE, MNIST_RESNET, FASHION_RESNET, CIFAR_RESNET)
}


def catalogue() -> list[tuple[str, str, str]]:
    """``(item id, experiment name, description)`` for every figure/table, sorted by id."""
    rows = [(it.id, e.name, it.description) for e in EXPERIMENTS.values() for it in e.items]
    return sorted(rows, key=lambda r: _item_key(r[0]))


def _item_key(item_id: str) -> tuple[str, str, int]:
    """``"v1-fig12"`` -> ``("v1", "fig", 12)``: figures in numeric order, then tables."""
    version, rest = item_id.split("-", 1)
    digits = "".join(ch for ch in rest if ch.isdigit())
    return version, rest.rstrip("0123456789"), int(digits or 0)


def run_experiment(
    name: str,
    preset: str,
    out: Path,
    progress: bool = True,
    data_dir: str | None = None,
    per_class: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    resume: bool | None = None,
):
    """Run experiment ``name`` into ``out`` (one writer at a time).

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``None``: the preset's — ``auto`` for the
    deep-UFM experiments, ``cpu`` for quick and ``cuda`` for paper real-network runs) is resolved
    and checked here, so a CUDA device this machine lacks is refused before anything is written.

    ``out`` may be new or empty, or hold this same experiment and preset: unfinished, it is
    continued from its checkpoints (``resume=None``, the default, or ``True``); finished, it is
    run again (``resume=None``) and only the files deepufm wrote there are replaced. Anything else
    (another kind of run, files deepufm did not write) needs ``overwrite``, and files deepufm did
    not write are left alone even then.
    """
    from deepufm.training import manifest as mf
    from deepufm.training import rundir as rd

    exp = EXPERIMENTS[name]
    kwargs = dict(exp.options)
    if device is not None:
        device = str(resolve_device(device, "--device"))
    kwargs["device"] = device
    if exp.needs_data:
        kwargs |= {"data_dir": data_dir, "per_class": per_class}
    elif per_class is not None:
        raise ConfigError(
            "--per-class", per_class, "only for the real-network experiments (*-resnet)"
        )
    out, owner = Path(out), f"{name}/{preset}"
    old = mf.read_manifest(out) if out.is_dir() else None
    same = old is not None and (old.kind, old.name) == ("experiment", owner)
    if resume and not same:
        raise ConfigError(
            "--resume",
            str(out),
            f"a directory holding a {name} run with preset {preset}",
            "Run without --resume to start it.",
        )
    cont = bool(resume) or (resume is None and not overwrite and same and not old.complete)
    with rd.open_run(out, "experiment", owner, overwrite=overwrite, resume=cont, rerun=True) as r:
        report = exp.runner()(preset, out, progress, resume=r, **kwargs)
        mf.finish(out)
    return report

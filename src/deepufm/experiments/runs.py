"""Training an experiment's deep UFM inside its run directory: afresh or continued.

The experiment's directory is held and its overwrite rule applied by
:func:`deepufm.experiments.registry.run_experiment`; here the model is trained from epoch 0, or
from the newest usable checkpoint when the run continues (``resume``), with every earlier probe
record and spectral snapshot kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepufm.errors import ConfigError
from deepufm.experiments.probes import SpectralProbe
from deepufm.models.config import UFMConfig
from deepufm.models.ufm import DeepUFM
from deepufm.training import rundir as rd
from deepufm.training.config import TrainConfig
from deepufm.training.probes import Probe
from deepufm.training.trainer import TrainResult, TrainState, checkpoint_state, train

SPECTRA = "spectra.npz"


def check_stored(out: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """A continued run must have the settings of the preset it continues."""
    if stored != wanted:
        keys = sorted(k for k in wanted if stored.get(k) != wanted[k])
        raise ConfigError(
            "--resume",
            str(out),
            "a run with this preset's settings",
            f"Its {rd.CONFIG} differs in {', '.join(keys)}; start it again with --overwrite.",
        )


def train_ufm(
    out: Path,
    cfg: UFMConfig,
    tcfg: TrainConfig,
    probes: Sequence[Probe],
    progress: bool,
    resume: bool,
    spectral: SpectralProbe | None = None,
) -> tuple[TrainResult, list[dict[str, Any]]]:
    """Train ``cfg`` with ``tcfg`` into ``out``; returns the result and every probe record of the
    run (those of earlier sessions included). ``spectral`` (one of ``probes``) saves its
    snapshots to ``out/spectra.npz`` as it takes them."""
    if spectral is not None:
        spectral.path = out / SPECTRA
    state = None
    if resume and (out / rd.CONFIG).is_file():
        stored_model, stored_train = rd.read_config(out)
        check_stored(
            out,
            {"model": stored_model.to_dict(), "training": stored_train and stored_train.to_dict()},
            {"model": cfg.to_dict(), "training": tcfg.to_dict()},
        )
        state = checkpoint_state(out, cfg)
        epoch = 0 if state is None else state.epoch
        rd.repair_metrics(out, epoch)
        if spectral is not None:
            spectral.load(out / SPECTRA, epoch)
    else:
        rd.write_config(out, cfg, tcfg)
        rd.rewrite_metrics(out, [])
    state = TrainState(DeepUFM.init(cfg)) if state is None else state
    result = train(state, tcfg, out, probes, progress)
    return result, rd.read_metrics(out)

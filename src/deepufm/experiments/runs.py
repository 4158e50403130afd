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
# Snapshots of the training in progress: ``spectra.npz`` is replaced only once training is done,
# so that a rerun killed mid-training leaves the earlier run's spectra whole.
PARTIAL_SPECTRA = "spectra.partial.npz"


def track_spectra(out: Path, spectral: SpectralProbe, resume_before: int | None = None) -> None:
    """Save ``spectral``'s snapshots to ``out/spectra.partial.npz`` as they are taken; when the
    run continues, first restore those of epochs before ``resume_before`` (from the partial file,
    else from ``spectra.npz``)."""
    partial = out / PARTIAL_SPECTRA
    if resume_before is not None:
        spectral.load(partial if partial.is_file() else out / SPECTRA, resume_before)
    spectral.path = partial


def finish_spectra(out: Path, spectral: SpectralProbe) -> None:
    """Training is done: every snapshot into ``out/spectra.npz`` (atomically), the partial file
    removed."""
    spectral.save(out / SPECTRA)
    spectral.path = None
    (out / PARTIAL_SPECTRA).unlink(missing_ok=True)


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
    snapshots as it takes them (:func:`track_spectra`), and all of them to ``out/spectra.npz``
    when training is done."""
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
            track_spectra(out, spectral, epoch)
    else:
        rd.write_config(out, cfg, tcfg)
        rd.rewrite_metrics(out, [])
        if spectral is not None:
            track_spectra(out, spectral)
    state = TrainState(DeepUFM.init(cfg)) if state is None else state
    result = train(state, tcfg, out, probes, progress)
    if spectral is not None:
        finish_spectra(out, spectral)
    return result, rd.read_metrics(out)

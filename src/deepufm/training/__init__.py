"""Training deep UFMs to collapse: fast full-batch gradient descent, probes, checkpoints, resume."""

from deepufm.training.config import TrainConfig, probe_epochs
from deepufm.training.gradients import FusedStep, data_gradients, loss_gradients
from deepufm.training.probes import DEFAULT_PROBES, collapse_probe, loss_probe
from deepufm.training.rundir import load_params, read_config, read_metrics
from deepufm.training.trainer import TrainResult, TrainState, resume_run, start_run, train

__all__ = [
    "DEFAULT_PROBES",
    "FusedStep",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "collapse_probe",
    "data_gradients",
    "load_params",
    "loss_gradients",
    "loss_probe",
    "probe_epochs",
    "read_config",
    "read_metrics",
    "resume_run",
    "start_run",
    "train",
]

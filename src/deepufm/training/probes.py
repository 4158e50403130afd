"""Probes: measurements taken at scheduled epochs and appended to ``metrics.jsonl``.

**One convention** for the three places that probe a run:

* the deep-UFM trainer (:func:`deepufm.training.train`): a probe is any callable
  ``probe(model, epoch) -> dict`` (``model`` the :class:`~deepufm.models.ufm.DeepUFM`);
* a user's own training loop: :class:`deepufm.TrainingProbe` is called the same way,
  ``probe(model, epoch)``, with the user's ``nn.Module``;
* the network trainer (:mod:`deepufm.training.network`): ``probe(snapshot) -> dict``, where the
  :class:`~deepufm.training.network.NetworkSnapshot` carries the model *and* the epoch
  (``snapshot.epoch``) and shares the head state among the probes; its probes are named
  ``network_*`` (:func:`~deepufm.training.network.network_loss_probe`), so that no name here
  stands for two signatures.

Every record is one JSON object per line with an integer ``"epoch"``, the probes' entries merged
into it (an undefined metric is ``null``). The checkpoint cadence is in seconds everywhere
(``checkpoint_every``; the network trainer can add ``checkpoint_every_epochs``), and a run is
continued with ``resume_run(run_dir)`` (:func:`deepufm.training.resume_run`,
:func:`deepufm.training.network.resume_run`; a restarted user loop just calls its
``TrainingProbe`` again). Later analyses plug in here without touching the training loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deepufm.metrics.collapse import class_means, collapse_note, nc1, orthogonal_frame_distance
from deepufm.models.ufm import DeepUFM
from deepufm.training.gradients import loss_gradients

Probe = Callable[[DeepUFM, int], dict[str, Any]]
"""A deep-UFM probe: ``probe(model, epoch) -> dict`` (module docstring)."""


def loss_probe(model: DeepUFM, epoch: int) -> dict[str, Any]:
    """Total loss, data loss, regulariser and the norm of the full gradient (all parameters)."""
    data, reg = model.data_loss(), model.regulariser()
    grads = loss_gradients(model.H1, model.W, model.config)
    grad_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    return {
        "loss": float(data + reg),
        "data_loss": float(data),
        "regulariser": float(reg),
        "grad_norm": float(grad_norm),
    }


def collapse_record(Hs: list[torch.Tensor], K: int) -> dict[str, Any]:
    """NC1 and orthogonal-frame distance of each feature matrix in ``Hs``; where a layer's are
    undefined (``nan``: zero or coinciding class means), ``nc1_note`` lists the reason per layer
    (``None`` where defined). ``metrics.jsonl`` stores the ``nan`` as ``null``."""
    record: dict[str, Any] = {
        "nc1": [nc1(H, K) for H in Hs],
        "orthogonal_frame_distance": [orthogonal_frame_distance(class_means(H, K)) for H in Hs],
    }
    notes = [collapse_note(H, K) for H in Hs]
    if any(notes):
        record["nc1_note"] = notes
    return record


def collapse_probe(model: DeepUFM, epoch: int) -> dict[str, Any]:
    """Per-layer NC1 and orthogonal-frame distance of the input features ``H_1 .. H_L``."""
    return collapse_record(model.features()[:-1], model.config.K)


DEFAULT_PROBES: tuple[Probe, ...] = (loss_probe, collapse_probe)

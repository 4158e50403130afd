"""A spectral probe for experiments: layer-wise spectra and alignments during training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepufm.metrics.layer_report import LayerMeasurement
from deepufm.metrics.spectral import negative_fraction
from deepufm.models.ufm import DeepUFM

PROBE_KEYS: tuple[str, ...] = (
    "layer",
    "hessian_eigenvalues",
    "effective_rank_hessian",
    "eigvec_alignment",
    "gradient_coefficients",
    "knockout_eigenvalues",
    "weight_singular_values",
    "effective_rank_weight",
    "feature_gram_eigenvalues",
)
"""The :class:`~deepufm.metrics.layer_report.LayerReport` keys a probe row carries: the cheap
ones (no ranks, no certified eigenvectors). NC1 and the frame distance of every layer are in the
collapse probe's ``nc1`` / ``orthogonal_frame_distance`` lists (``nc1[l - 1]`` is this layer's)."""

SNAPSHOT_SPECTRA: dict[str, str] = {
    "hessian": "hessian_spectrum",
    "weight_gram": "weight_gram_spectrum",
    "grad_cov": "grad_cov_spectrum",
    "backprop": "backprop_spectrum",
    "feature_gram": "feature_gram_spectrum",
}
"""Snapshot array name -> the :class:`LayerMeasurement` full spectrum it stores (descending)."""


@dataclass
class SpectralProbe:
    """At each probe: the :data:`PROBE_KEYS` of ``layer`` (computed by
    :class:`~deepufm.metrics.layer_report.LayerMeasurement`, the one schema of ``deepufm
    analyze`` and ``results.json``: ``hessian_eigenvalues``, ``eigvec_alignment`` (``f_cc'``),
    ``gradient_coefficients`` (``gamma_cc'``), ``knockout_eigenvalues`` ``{class, cross,
    within}`` from the exact ``dec.knockouts()``, ...) go into ``metrics.jsonl``; at
    ``snapshot_epochs`` the full spectra of :data:`SNAPSHOT_SPECTRA` are kept in ``snapshots``
    (written to ``path``, ``spectra.npz``, as each is taken, so that a resumed run keeps them:
    :meth:`load`).

    ReLU models (v2 Theorem 7; docs: Concepts › Conventions): pre-activations
    ``>= -relu_tol * max|u|`` count as non-negative (sigma'(0) = 1), also in
    ``negative_fraction_by_layer`` (``u^(2) .. u^(L)``); with ``zero_below > 0`` the
    measurements are taken on a copy whose parameter entries below it are set to 0 (training is
    not touched).
    """

    layer: int
    snapshot_epochs: tuple[int, ...] = ()
    relu_tol: float = 0.0
    zero_below: float = 0.0
    snapshots: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    path: Path | None = None  # where every new snapshot is saved at once (``spectra.npz``)

    def measure(self, model: DeepUFM) -> LayerMeasurement:
        """The lazy measurement of ``layer`` (on the zeroed copy when ``zero_below > 0``)."""
        if self.zero_below > 0:
            model = model.zeroed(self.zero_below)
        return LayerMeasurement(model, self.layer, relu_tol=self.relu_tol)

    def __call__(self, model: DeepUFM, epoch: int) -> dict[str, Any]:
        """One probe row for ``epoch`` (and a snapshot when ``epoch`` is a snapshot epoch)."""
        m = self.measure(model)
        out = m.record(PROBE_KEYS)
        if model.config.activation == "relu":
            U = m.model.preactivations()
            out["negative_fraction_by_layer"] = [
                negative_fraction(u, self.relu_tol) for u in U[:-1]
            ]
        if epoch in self.snapshot_epochs:
            with torch.no_grad():
                self.snapshots[epoch] = {
                    name: getattr(m, attr).cpu().numpy() for name, attr in SNAPSHOT_SPECTRA.items()
                }
            if self.path is not None:
                self.save(self.path)  # at once: a resumed run needs the earlier snapshots
        return out

    def save(self, path) -> None:
        """Every snapshot as ``spectra.npz`` (arrays ``e<epoch>_<matrix>``), atomically."""
        from deepufm.training.rundir import atomic_write

        arrays = {f"e{e}_{k}": v for e, d in self.snapshots.items() for k, v in d.items()}
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))

    def load(self, path, before_epoch: int) -> None:
        """Restore the snapshots of epochs before ``before_epoch`` from a :meth:`save`d file (a
        resumed run recomputes the later ones)."""
        path = Path(path)
        if not path.is_file():
            return
        try:
            with np.load(path) as arrays:
                for key in arrays.files:
                    head, _, matrix = key.partition("_")
                    epoch = int(head[1:])
                    if epoch < before_epoch:
                        self.snapshots.setdefault(epoch, {})[matrix] = arrays[key]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: its snapshots are lost, the figures show the ones recomputed

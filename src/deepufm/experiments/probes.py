"""A spectral probe for experiments: layer-wise spectra and alignments during training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepufm.matrices import (
    backprop_error_matrix,
    data_gradient,
    feature_gram,
    gradient_covariance,
    layer_hessian,
    papyan_decomposition,
    weight_gram,
)
from deepufm.metrics import (
    class_means,
    effective_rank,
    eigvec_alignment_matrix,
    gradient_coefficients,
    nc1,
)
from deepufm.metrics.spectral import negative_fraction
from deepufm.models.ufm import DeepUFM


@dataclass
class SpectralProbe:
    """At each probe: for ``layer``, the top Hessian eigenvalues, ``f_cc'``, ``gamma_cc'``, the
    knockouts and the top ``W^T W`` eigenvalues go into ``metrics.jsonl``; at ``snapshot_epochs``
    the full spectra are kept in ``snapshots`` (written to ``path``, ``spectra.npz``, as each is
    taken, so that a resumed run keeps them: :meth:`load`).

    ReLU models (THEORY §7): pre-activations ``>= -relu_tol * max|u|`` count as non-negative
    (sigma'(0) = 1), also in ``negative_fraction``; with ``zero_below > 0`` the measurements are
    taken on a copy whose parameter entries below it are set to 0 (training is not touched).
    """

    layer: int
    snapshot_epochs: tuple[int, ...] = ()
    relu_tol: float = 0.0
    zero_below: float = 0.0
    snapshots: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    path: Path | None = None  # where every new snapshot is saved at once (``spectra.npz``)

    def __call__(self, model: DeepUFM, epoch: int) -> dict[str, Any]:
        K, l = model.config.K, self.layer
        if self.zero_below > 0:
            model = model.zeroed(self.zero_below)
        Hs = model.features()
        M_in, M_out = class_means(Hs[l - 1], K), class_means(Hs[l], K)
        H = layer_hessian(model, l, self.relu_tol)
        vals = H.eigvalsh()
        dec = papyan_decomposition(model, l, self.relu_tol)
        knock = {
            f"knockout_{n}": (dec.gauss_newton - p).eigvalsh()[: K * K + K].tolist()
            for n, p in dec.components().items()
        }
        w_vals = weight_gram(model, l).eigvalsh()
        out: dict[str, Any] = {
            "probe_layer": l,
            "hessian_top": vals[: K * K + K].tolist(),
            "hessian_effective_rank": effective_rank(vals),
            "f": eigvec_alignment_matrix(H, M_out, M_in).tolist(),
            "gamma": gradient_coefficients(
                data_gradient(model, l, self.relu_tol), M_out, M_in
            ).tolist(),
            "weight_gram_top": w_vals[: K + 2].tolist(),
            "feature_gram_top": feature_gram(model, l).eigvalsh()[: K + 1].tolist(),
            "nc1_probe_layer": nc1(Hs[l - 1], K),
            **knock,
        }
        if model.config.activation == "relu":
            U = model.preactivations()
            out["negative_fraction"] = [negative_fraction(u, self.relu_tol) for u in U[:-1]]
        if epoch in self.snapshot_epochs:
            with torch.no_grad():
                self.snapshots[epoch] = {
                    "hessian": vals.cpu().numpy(),
                    "weight_gram": w_vals.cpu().numpy(),
                    "grad_cov": gradient_covariance(model, l, self.relu_tol)
                    .eigvalsh()
                    .cpu()
                    .numpy(),
                    "backprop": backprop_error_matrix(model, l, self.relu_tol)
                    .eigvalsh()
                    .cpu()
                    .numpy(),
                    "feature_gram": feature_gram(model, l).eigvalsh().cpu().numpy(),
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

"""The Hessian of the data loss with respect to *every* parameter of a model, on request.

``deepufm.analyze(..., network_topk=k, network_density=P)`` adds ``Analysis.network``:

* the ``k`` algebraically largest eigenvalues of ``H = d^2 D / d theta^2`` (``theta`` every
  parameter, in ``named_parameters()`` order, row-major), from the certified engine
  (``deepufm.matrices.spectra.topk`` on a matrix-free :class:`~deepufm.matrices.ModuleHessian`:
  exact from ``p`` products where its switch says that is cheaper, else block Lanczos), with the
  certificate, and
* the Gaussian-broadened eigenvalue density by stochastic Lanczos quadrature
  (``deepufm.matrices.lanczos.spectral_density``; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan &
  Xiao 2019) from ``P`` Rademacher probes, with its quadrature nodes and weights, its first two
  moments (estimates of ``tr(H)/p`` and ``tr(H^2)/p``) and their standard errors over the probes.

The model is measured as for the layers: eval mode, the analysis dtype, its state unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepufm.analysis.inputs import Batches, DataLoss
from deepufm.analysis.layer import certificate_summary
from deepufm.errors import ConfigError
from deepufm.matrices import ModuleHessian, numerical_rank, spectral_density

# Rademacher probes of ``network_density=True``
DENSITY_PROBES = 10
# points of the density's grid in ``results.json``
DENSITY_GRID = 400


def check_network_request(topk: object, density: object, steps: object, parameters: int) -> int:
    """Validate ``network_topk`` (``None`` or an integer in ``[1, parameters]``),
    ``network_density`` (``False``, ``True`` or a number of probes ``>= 1``) and
    ``density_steps`` (an integer ``>= 1``); returns the number of density probes (0: none)."""
    if topk is not None and (
        isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= parameters
    ):
        raise ConfigError(
            "network_topk",
            topk,
            f"None or an integer in [1, {parameters}] (the model's number of parameters)",
        )
    if isinstance(density, bool):
        probes = DENSITY_PROBES if density else 0
    elif isinstance(density, int) and density >= 1:
        probes = density
    else:
        raise ConfigError(
            "network_density",
            density,
            f"False, True ({DENSITY_PROBES} probes) or a number of Rademacher probes >= 1",
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError("density_steps", steps, "an integer >= 1 (Lanczos steps per probe)")
    return probes


def network_hessian(
    model: nn.Module,
    loss: DataLoss,
    batches: Batches,
    topk: int | None,
    probes: int,
    steps: int,
    chunk_size: int | None,
    rank_rtol: float | None,
    strict: bool,
    seed: int,
) -> dict:
    """``Analysis.network`` (module docstring): ``{"parameters", "parameter_names",
    "topk": {"k", "eigenvalues", "rank_among_topk", "certificate"} | None, "density": {...} |
    None}``. ``model`` in eval mode and the analysis dtype; ``batches`` the data."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    H = ModuleHessian(
        model, loss.batch_mean, batches, names, reduction="mean", chunk_size=chunk_size
    )
    out: dict = {
        "parameters": H.size,
        "parameter_names": names,
        "definition": (
            "Hessian of the data loss over the whole data set with respect to every parameter "
            "(named_parameters() order, each row-major), eval mode"
        ),
        "topk": None,
        "density": None,
    }
    if topk is not None:
        res = H.topk(topk, strict=strict)
        out["topk"] = {
            "k": topk,
            "eigenvalues": res.values.tolist(),
            "rank_among_topk": numerical_rank(
                res.values, H.size, rank_rtol, scale=float(res.values.abs().max()) or 1.0
            ),
            "certificate": certificate_summary(res),
        }
    if probes:
        dens = spectral_density(H, probes, steps, DENSITY_GRID, seed=seed)
        per_probe = [(dens.weights * dens.nodes**j).sum(dim=1) for j in (1, 2)]  # (P,) each

        def stderr(x: torch.Tensor) -> float:
            """Standard error of the mean of the per-probe estimates ``x`` ``(P,)``."""
            return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else math.nan

        out["density"] = {
            "method": (
                f"stochastic Lanczos quadrature, {probes} Rademacher probes, "
                f"{dens.nodes.shape[1]} Lanczos steps each, Gaussian broadening sigma"
            ),
            "probes": probes,
            "lanczos_steps": int(dens.nodes.shape[1]),
            "sigma": dens.sigma,
            "grid": dens.grid.tolist(),
            "density": dens.density.tolist(),
            "nodes": dens.nodes.tolist(),
            "weights": dens.weights.tolist(),
            "trace_over_p": float(per_probe[0].mean()),
            "trace_over_p_stderr": stderr(per_probe[0]),
            "second_moment": float(per_probe[1].mean()),
            "second_moment_stderr": stderr(per_probe[1]),
        }
    return out

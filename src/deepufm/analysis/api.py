"""`deepufm.analyze`: the paper's per-layer analysis for any trained PyTorch classifier."""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepufm.analysis.capture import capture, check_batch_independent, downstream, linear_calls
from deepufm.analysis.inputs import LossFn, as_batches, check_labels, check_mean_loss, data_loss
from deepufm.analysis.layer import (
    RESIDUAL_PROBES,
    ROUTES,
    LayerData,
    check_residual_probes,
    layer_record,
)
from deepufm.analysis.network import check_network_request, network_hessian
from deepufm.errors import ConfigError
from deepufm.models.resnet import curvature_mode

CONVENTIONS = {
    "vec": "row-major: w = vec([W b]) = [W b].reshape(-1) (deepufm.vec)",
    "bias": "homogeneous coordinates: parameters [W b] (d_out x (d_in+1)), inputs h~ = [h; 1]",
    "class_means": (
        "mu_c = mean of the samples of class c (any order, any class sizes); global mean = "
        "unweighted mean of the class means; NC1 = tr(Sigma_W Sigma_B^+)/K with Sigma_W over all "
        "N samples, Sigma_B over the K classes (Papyan, Han & Donoho 2020 for balanced classes)"
    ),
    "natural_basis": (
        "mu'_c ⊗ [mu_c'; 1] with mu' the class means of the layer's output u = W h + b and mu "
        "those of its input h"
    ),
    "papyan": (
        "G_class = sum_c (K n_c/N) v_c v_c^T, G_cross = sum_c (n_c/N) sum_r (v_cr - v_c)(...)^T, "
        "G_within the rest (exact for any class sizes n_c; v1 Thm 4.2 / v2 Thm 2 when balanced); ranks and "
        "knockouts of the Gauss-Newton part G"
    ),
    "mode": "eval mode (BatchNorm running statistics, no dropout); the model is left unchanged",
    "spectra": (
        "top-k eigenvalues from the certified engine (deepufm.matrices.spectra): exact where "
        "the structure or a dense matrix is cheaper, else block Lanczos; certificates in each "
        "record, failures listed under 'uncertified' (or raised with strict=True)"
    ),
}


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` measured: ``config`` (what was analysed and how), one record per
    layer, in forward order (keys as ``deepufm analyze --json``, plus ``name`` first), and
    ``network`` (the full-network Hessian's top-k and spectral density) when it was requested,
    else ``None``."""

    config: dict
    layers: tuple[dict, ...]
    network: dict | None = None

    def layer(self, name: str) -> dict:
        """The record of the layer called ``name``."""
        for rec in self.layers:
            if rec["name"] == name:
                return rec
        raise KeyError(f"no analysed layer {name!r}; analysed: {[r['name'] for r in self.layers]}")

    def to_dict(self) -> dict:
        """``{"config": ..., "layers": [...]}`` (and ``"network"`` when it was requested) with
        non-finite numbers as ``None`` (strict JSON)."""
        out = {"config": self.config, "layers": list(self.layers)}
        if self.network is not None:
            out["network"] = self.network
        return _finite(out)

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON text (what ``results.json`` holds)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``results.json``, ``figures/`` and a self-contained ``report.html`` into
        ``out_dir`` (created, or an existing empty folder, or one an earlier ``write`` made)."""
        from deepufm.analysis.report import write_analysis

        return write_analysis(self, Path(out_dir))


def _finite(obj: object) -> object:
    """``obj`` with every non-finite float replaced by ``None``, lists for tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite parameter or buffer, naming it."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ConfigError(
                    f"model {kind}",
                    name,
                    "finite values everywhere",
                    f"'{name}' holds NaN or infinite entries (a diverged run?).",
                )


def _choose_layers(
    model: nn.Module, calls: dict[str, int], layers: Sequence[str] | None
) -> list[str]:
    """The analysed ``nn.Linear`` names in forward order; refusals name what and why."""
    modules = dict(model.named_modules())
    linears = [k for k, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            "model",
            type(model).__name__,
            "a model with at least one nn.Linear layer (the layers deepufm analyses)",
        )
    if layers is None:
        chosen = list(calls)
        if not chosen:
            raise ConfigError(
                "model", type(model).__name__, "a forward pass that calls an nn.Linear"
            )
    else:
        if isinstance(layers, str):
            layers = [layers]
        for name in layers:
            if name not in modules:
                raise ConfigError("layers", name, f"the name of an nn.Linear module: {linears}")
            if not isinstance(modules[name], nn.Linear):
                raise ConfigError(
                    "layers",
                    name,
                    f"the name of an nn.Linear module: {linears}",
                    f"'{name}' is a {type(modules[name]).__name__}; only nn.Linear layers "
                    "(weight and bias) have the structured layer Hessian analysed here.",
                )
            if name not in calls:
                raise ConfigError(
                    "layers",
                    name,
                    "an nn.Linear that the forward pass calls",
                    "It is never called.",
                )
        chosen = [k for k in calls if k in set(layers)]
    for name in chosen:
        if calls[name] > 1:
            raise ConfigError(
                "layers",
                name,
                "nn.Linear modules called once per forward pass",
                f"'{name}' is called {calls[name]} times: its weight is shared between places.",
            )
        _check_not_tied(model, name)
    return chosen


def _check_not_tied(model: nn.Module, name: str) -> None:
    """Refuse a layer whose weight or bias is also registered under another module (tied)."""
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters()}
    for full, p in model.named_parameters(remove_duplicate=False):
        owner = full.rsplit(".", 1)[0] if "." in full else ""
        if id(p) in own and owner != name:
            raise ConfigError(
                "layers",
                name,
                "nn.Linear modules whose parameters no other module uses",
                f"its parameter is also '{full}' (tied weights).",
            )


def _eagerly(fn):
    """``fn`` with every ``torch.compile``'d module (the model or any submodule) run eagerly.

    A compiled graph skips the forward hooks that capture each layer's input and output (the
    analysis would see no layer at all), and the curvature products go through ``torch.func``,
    which wants eager code: the compiled modules are measured as the functions they compile,
    under the names ``named_modules()`` gives them (``_orig_mod.0``, ...).
    """

    @functools.wraps(fn)
    def eager(model, *args, **kwargs):
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            with set_stance("force_eager"):
                return fn(model, *args, **kwargs)
        if isinstance(model, nn.Module) and any(
            type(m).__name__ == "OptimizedModule" for m in model.modules()
        ):
            raise ConfigError(
                "model",
                type(model).__name__,
                "an uncompiled model (pass `compiled._orig_mod`: the same parameters)",
                f"torch {torch.__version__} cannot run a torch.compile'd module eagerly, and its "
                "compiled graph skips the hooks the analysis needs.",
            )
        return fn(model, *args, **kwargs)

    return eager


@_eagerly
def analyze(
    model: nn.Module,
    data,
    loss: str | LossFn = "mse",
    layers: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    full: bool = False,
    rank_rtol: float | None = None,
    route: str = "auto",
    chunk_size: int | None = 64,
    seed: int = 0,
    strict: bool = False,
    residual_probes: int = RESIDUAL_PROBES,
    network_topk: int | None = None,
    network_density: bool | int = False,
    density_steps: int = 80,
) -> Analysis:
    """The paper's per-layer analysis (docs: Concepts › The curvature matrices, The metrics) of the ``nn.Linear`` layers of ``model``.

    Args:
        model: any ``nn.Module`` mapping a batch ``X`` to logits ``(B, K)``. Measured in eval mode
            (BatchNorm running statistics, no dropout) on its own device; its parameters, buffers
            and train/eval flags are left as they were. ``torch.compile``'d models and
            submodules are run eagerly (their layers keep the ``_orig_mod`` in their names).
        data (tuple | Iterable): ``(X, y)`` tensors (or numpy arrays) or a re-iterable of
            ``(X, y)`` batches (a ``DataLoader`` without shuffling or augmentation: the data are
            read twice and must agree); ``y`` integer labels in ``[0, K)``, any order, classes
            of any size (none empty); ``X`` finite (NaN or infinite inputs are refused).
        loss: ``"mse"`` — the paper's ``1/(2N) sum ||z - e_y||^2``, i.e. ``K/2`` times
            ``nn.MSELoss()`` — ``"ce"`` (mean cross-entropy) or a callable
            ``(output, y) -> batch mean of a per-sample loss``.
        layers: qualified names (``named_modules()``) of ``nn.Linear`` modules; default every
            ``nn.Linear`` the forward pass calls, in the order it calls them.
        batch_size: split tensor data into batches of this size (memory only; results agree).
        dtype: analyse a copy of the model and the data in this floating type (default float64,
            the accuracy the records are stated in); ``None``: the model's own.
        full: every Hessian eigenvalue in the records, not only the top ``K^2 + K``.
        rank_rtol: ranks count eigenvalues above this times the largest ``|lambda|``; default
            the rank rule of ``deepufm.matrices.spectra`` (``p * eps`` of the analysis dtype).
        route: ``"auto"`` (structured where the downstream is linear, else matrix-free),
            ``"structured"`` (refused where it would be wrong) or ``"matrix-free"``.
        chunk_size: Hessian-vector products per ``vmap`` call on the matrix-free route.
        seed: seed of the linearity probe's random directions (and of the Hutchinson and SLQ
            probes).
        strict: raise :class:`~deepufm.errors.UncertifiedError` when a top-k eigenproblem cannot
            be certified; by default it is flagged (``uncertified`` in the record, the report).
        residual_probes: Hutchinson probes (``>= 2``) for ``residual_relative_norm`` where ``H``
            is matrix-free (exact where it is formed); the standard error is recorded.
        network_topk: also the ``network_topk`` algebraically largest eigenvalues (certified) of
            the Hessian of the data loss with respect to *every* parameter of the model
            (``Analysis.network``); ``None``: not computed.
        network_density: also the spectral density of that Hessian by stochastic Lanczos
            quadrature: ``True`` (10 Rademacher probes) or a number of probes ``>= 1``.
        density_steps: Lanczos steps per probe of the density (``>= 1``, capped at the number
            of parameters).

    Returns:
        an :class:`Analysis`; ``results.json`` / ``report.html`` via ``Analysis.write``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            "model",
            type(model).__name__,
            "an eager torch.nn.Module (the model as it was before torch.jit.script or trace)",
            "A TorchScript module's layers are not nn.Linear modules, and torch.func cannot "
            "differentiate through it.",
        )
    if route not in ROUTES:
        raise ConfigError("route", route, f"one of {', '.join(ROUTES)}")
    check_residual_probes(residual_probes)
    if not isinstance(strict, bool):
        raise ConfigError("strict", strict, "True or False")
    total = sum(p.numel() for p in model.parameters())
    network_probes = check_network_request(network_topk, network_density, density_steps, total)
    lossd = data_loss(loss)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ConfigError(
            "model",
            type(model).__name__,
            "a model with at least one nn.Linear layer (the layers deepufm analyses)",
        )
    _check_finite(model)
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ConfigError("model", type(model).__name__, "a model with floating-point parameters")
    own_dtype, device = params[0].dtype, params[0].device
    work = model
    if dtype is not None and dtype != own_dtype:
        work = copy.deepcopy(model).to(dtype=dtype)  # the user's model is never cast
    dtype = dtype or own_dtype
    batches = [
        (X.to(device=device, dtype=dtype) if X.is_floating_point() else X.to(device), y.to(device))
        for X, y in as_batches(data, batch_size)
    ]
    for i, (X, _) in enumerate(batches):
        if X.is_floating_point() and not bool(torch.isfinite(X).all()):
            bad = int((~torch.isfinite(X)).sum())
            raise ConfigError(
                "data X",
                f"batch {i}",
                "finite inputs",
                f"{bad} of its {X.numel()} entries are NaN or infinite.",
            )
    with curvature_mode(work, "eval") as m:
        X0 = batches[0][0]
        calls = linear_calls(m, X0)
        names = _choose_layers(m, calls, layers)
        check_batch_independent(m, X0)
        modules = {k: m.get_submodule(k) for k in names}
        cap = capture(m, batches, modules)
        K = cap.z.shape[1]
        if not bool(torch.isfinite(cap.z).all()):
            rows = torch.nonzero(~torch.isfinite(cap.z).all(dim=1)).flatten().tolist()
            raise ConfigError(
                "model output",
                f"non-finite logits for samples {rows[:5]}{' ...' if len(rows) > 5 else ''}",
                "finite logits on every sample",
                f"{len(rows)} of {cap.z.shape[0]} samples overflow; the curvature "
                "of a non-finite loss is not defined.",
            )
        counts = check_labels(cap.y, K)
        check_mean_loss(lossd, cap.z[: X0.shape[0]], cap.y[: X0.shape[0]])
        records = []
        for pos, name in enumerate(names, start=1):
            down = downstream(m, batches, modules[name], cap.outputs[name], seed)
            layer = LayerData(
                name, pos, modules[name], cap.inputs[name], cap.outputs[name], cap.z, cap.y,
                counts, down,
            )  # fmt: skip
            options = dict(strict=strict, residual_probes=residual_probes, seed=seed)
            try:
                record = layer_record(
                    m, layer, lossd, batches, route, full, rank_rtol, chunk_size, **options
                )
            except torch.linalg.LinAlgError as exc:
                # finite logits whose curvature overflows (or is NaN): no spectrum to certify
                raise ConfigError(
                    "layers",
                    name,
                    "a layer whose Hessian and Gram matrices are finite",
                    f"An eigensolver failed on '{name}' ({' '.join(str(exc).split())[:160]}): "
                    f"its matrices overflow or hold NaN in {str(dtype).removeprefix('torch.')} "
                    f"(logits up to {float(cap.z.abs().max()):.3g}).",
                ) from exc
            records.append(record)
        per_sample = lossd.value(cap.z, cap.y)
        network = None
        if network_topk is not None or network_probes:
            network = network_hessian(
                m, lossd, batches, network_topk, network_probes, density_steps, chunk_size,
                rank_rtol, strict, seed,
            )  # fmt: skip
    from deepufm import __version__

    config = {
        "deepufm_analysis": __version__,
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "K": K,
        "N": cap.z.shape[0],
        "class_counts": counts.tolist(),
        "batches": len(batches),
        "loss": lossd.name,
        "loss_definition": lossd.description,
        "data_loss": float(per_sample.mean()),
        "accuracy": float((cap.z.argmax(dim=1) == cap.y).to(torch.float64).mean()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "forward_order": list(calls),
        "layers": names,
        "route": route,
        "rank_rtol": rank_rtol,
        "strict": strict,
        "residual_probes": residual_probes,
        "network_topk": network_topk,
        "network_density_probes": network_probes,
        "conventions": CONVENTIONS,
    }
    return Analysis(config, tuple(records), network)

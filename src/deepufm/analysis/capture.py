"""What a forward pass reveals about the ``nn.Linear`` layers of any model.

* :func:`linear_calls` — every ``nn.Linear`` in the order the forward pass *calls* it (hooks, not
  registration order), with its call count (a module called twice shares its weight between two
  places: its layer Hessian is not the structured one, so it is refused).
* :func:`capture` — each chosen layer's input ``h`` and output ``u = W h + b`` for every sample, and
  the logits ``z``.
* :func:`downstream` — for one layer, the per-sample Jacobian ``J_n = dz_n/du_n`` ``(K, d_out)`` of
  the computation after it (autograd through the model, the layer's output replaced by a leaf),
  and a *linearity probe*: the second directional derivative ``sum_k w_k d^2 z_k/du^2 [v]`` along
  random ``v``, ``w``. It vanishes identically when ``z`` is (piecewise) linear in ``u`` — then
  ``E = H - G = 0`` and the layer Hessian is exactly the structured Gauss–Newton form.

Per-sample Jacobians come from ``K`` backward passes of ``sum_n z_{n,k}``: correct because in eval
mode each sample's logits depend on its own input only (checked by :func:`check_batch_independent`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepufm.analysis.inputs import Batches
from deepufm.errors import ConfigError, DeepUFMError


@contextmanager
def replaced_output(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Within the block, ``module``'s forward returns ``value`` (a forward hook)."""
    handle = module.register_forward_hook(lambda m, inp, out: value)
    try:
        yield
    finally:
        handle.remove()


def logits(model: nn.Module, X: Tensor) -> Tensor:
    """``model(X)``, refused unless it is a ``(B, K)`` floating tensor."""
    z = model(X)
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != X.shape[0]:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ConfigError(
            "model output", shape, f"a (batch, K) tensor of logits (batch = {X.shape[0]})"
        )
    return z


def linear_calls(model: nn.Module, X: Tensor) -> dict[str, int]:
    """``{name: calls}`` of every ``nn.Linear`` called by ``model(X)``, in first-call order."""
    names = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls: dict[str, int] = {}

    def hook(m: nn.Module, inp, out) -> None:
        """Count one call of ``m``."""
        calls[names[m]] = calls.get(names[m], 0) + 1

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            logits(model, X)
    except DeepUFMError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if "out of memory" in str(exc) or isinstance(exc, torch.OutOfMemoryError):
            raise
        # the first forward pass: a failure here is data the model does not take
        raise ConfigError(
            "data",
            f"X of shape {tuple(X.shape)} ({str(X.dtype).removeprefix('torch.')})",
            f"inputs that {type(model).__name__} accepts",
            f"Its forward pass on the first batch failed: {' '.join(str(exc).split())[:300]}",
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def check_batch_independent(model: nn.Module, X: Tensor) -> None:
    """The first sample's logits alone and within its batch must agree: per-sample Jacobians from
    batch sums, and the per-sample data loss, need samples that do not interact."""
    if X.shape[0] < 2:
        return
    with torch.no_grad():
        whole, alone = logits(model, X)[:1], logits(model, X[:1])
    scale = float(whole.abs().max()) or 1.0
    # different batch sizes may take different GEMM kernels: allow round-off, not interaction
    if float((whole - alone).abs().max()) > 1e4 * torch.finfo(whole.dtype).eps * scale:
        raise ConfigError(
            "model",
            type(model).__name__,
            "a model whose outputs for one sample do not depend on the other samples of its batch",
            "In eval mode the first sample's logits differ between a batch and alone.",
        )


@dataclass(frozen=True, eq=False)
class Captured:
    """``inputs[name]`` ``(N, d_in)``, ``outputs[name]`` ``(N, d_out)``, ``z`` ``(N, K)``,
    ``y`` ``(N,)``, each the concatenation over the batches in order."""

    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    z: Tensor
    y: Tensor


def capture(model: nn.Module, batches: Batches, modules: dict[str, nn.Linear]) -> Captured:
    """Inputs and outputs of the chosen ``nn.Linear`` modules and the logits, over all batches."""
    ins: dict[str, list[Tensor]] = {k: [] for k in modules}
    outs: dict[str, list[Tensor]] = {k: [] for k in modules}

    def hook_for(name: str):
        """A forward hook recording the input and output of the layer ``name``."""

        def hook(m: nn.Module, inp, out) -> None:
            """Keep ``h`` and ``u`` of this batch (refusing inputs with extra axes)."""
            h = inp[0]
            if h.dim() != 2:
                raise ConfigError(
                    "layers",
                    name,
                    "nn.Linear modules applied to (batch, features) inputs",
                    f"'{name}' receives an input of shape {tuple(h.shape)}: a Linear applied "
                    "along extra axes shares its weight between positions, which the layer "
                    "Hessian's structure does not cover.",
                )
            ins[name].append(h.detach())
            outs[name].append(out.detach())

        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in modules.items()]
    zs = []
    try:
        with torch.no_grad():
            for X, _ in batches:
                zs.append(logits(model, X))
    finally:
        for h in handles:
            h.remove()
    return Captured(
        {k: torch.cat(v) for k, v in ins.items()},
        {k: torch.cat(v) for k, v in outs.items()},
        torch.cat(zs),
        torch.cat([y for _, y in batches]),
    )


@dataclass(frozen=True, eq=False)
class Downstream:
    """The computation after one layer: ``J`` ``(N, K, d_out)`` with ``J[n] = dz_n/du_n``;
    ``curvature`` the probe's ``||sum_k w_k d^2 z_k/du^2 [v]|| / ||J^T w||`` (max over batches,
    ``v`` of the size of ``u``); ``linear`` when it is below :data:`LINEAR_BELOW`; ``shared``
    when every sample has the same ``J`` (a linear map after the layer)."""

    J: Tensor
    curvature: float
    linear: bool
    shared: bool


# A (piecewise) linear downstream gives an exactly zero second derivative in autograd; any smooth
# nonlinearity at ordinary pre-activation scales gives O(1) (tanh, GELU: ~0.1-1).
LINEAR_BELOW = 1e-12


def downstream(
    model: nn.Module, batches: Batches, module: nn.Module, U: Tensor, seed: int = 0
) -> Downstream:
    """Per-sample Jacobians of the logits in the layer output and the linearity probe (module
    docstring). ``U`` ``(N, d_out)``: the layer's outputs, batches in order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    J_parts, ratio, start = [], 0.0, 0
    for X, _ in batches:
        u = U[start : start + X.shape[0]]
        start += X.shape[0]
        leaf = u.detach().clone().requires_grad_(True)
        with torch.enable_grad(), replaced_output(module, leaf):
            z = logits(model, X)
            K = z.shape[1]
            w = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
            rms = float(u.pow(2).mean().sqrt()) or 1.0
            v = rms * torch.randn(u.shape, generator=gen, dtype=u.dtype).to(u.device)
            (g,) = torch.autograd.grad((z * w).sum(), leaf, create_graph=True, allow_unused=True)
            cols = [
                torch.autograd.grad(z[:, k].sum(), leaf, retain_graph=True, allow_unused=True)[0]
                for k in range(K)
            ]
            hv = None
            if g is not None and g.requires_grad:
                (hv,) = torch.autograd.grad((g * v).sum(), leaf, allow_unused=True)
        cols = [torch.zeros_like(u) if c is None else c for c in cols]
        J_parts.append(torch.stack(cols, dim=1).detach())
        if hv is not None:
            num, den = float(torch.linalg.norm(hv)), float(torch.linalg.norm(g.detach()))
            if num > 0:
                ratio = max(ratio, num / den if den > 0 else float("inf"))
    J = torch.cat(J_parts)
    scale = float(J.abs().max())
    shared = float((J - J[:1]).abs().max()) <= 1e-12 * scale if scale > 0 else True
    return Downstream(J, ratio, ratio <= LINEAR_BELOW, shared)

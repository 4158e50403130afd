"""Every matrix and metric of one ``nn.Linear`` layer of any model (THEORY §5, §9).

**Homogeneous coordinates.** The layer's parameters are its weight *and* bias, taken together as
``W~ = [W b]`` ``(d_out, d_in + 1)`` with ``w~ = vec(W~)`` (row-major, THEORY §2) and inputs
``h~ = [h; 1]``, so that ``u = W~ h~``. The layer then has exactly the form of a deep-UFM layer and
every structured matrix of ``deepufm.matrices`` applies with ``H~`` in place of ``H``; a layer
without bias has ``W~ = W``, ``h~ = h``.

**Gauss–Newton part.** With ``J_n = dz_n/du_n`` ``(K, d_out)`` (autograd through the downstream
computation) and ``M_n^T M_n = d^2 l/dz^2`` (``inputs.DataLoss.factor``),

    G = 1/N sum_n (J_n^T B_n J_n) ⊗ (h~_n h~_n^T) = V^T V,   rows  (M_n J_n)_r ⊗ h~_n / sqrt(N),

a ``KroneckerGram`` ``(J^T J) ⊗ (H~ H~^T / N)`` when the loss is MSE and ``J`` is the same for
every sample (a linear downstream map), else a ``JacobianGram``. ``H = G + E``; ``E = 0`` when the
linearity probe finds the downstream (piecewise) linear in ``u`` (``capture.downstream``), else
``H`` comes from the matrix-free ``ModuleHessian`` restricted to (weight, bias) and
``E = H - G`` is reported with its spectrum.

**Papyan's decomposition with unbalanced classes.** Rows ``v_{n r} = (M_n J_n)_r ⊗ h~_n`` (unit
weights for MSE; Papyan 2020's loss-Hessian-weighted rows for CE), class-pair means
``v_{cr} = mean_{n in c} v_{nr}``, class means ``v_c = mean_r v_{cr}``, class sizes ``n_c``:

    G_class  = sum_c (K n_c / N) v_c v_c^T
    G_cross  = sum_c (n_c / N) sum_r (v_{cr} - v_c)(v_{cr} - v_c)^T
    G_within = 1/N sum_n sum_r (v_{nr} - v_{c_n r})(v_{nr} - v_{c_n r})^T

sum exactly to ``G`` for any class sizes and reduce to THEORY M3 for balanced classes
(``n_c = N/K``). Papyan ranks and knockouts (``G - G_X``) are those of ``G``.

**Class means.** ``mu_c`` (input side, ``h``) and ``mu'_c`` (output side, the layer's output
``u``) average the samples of class ``c``; NC1 uses the unweighted mean of the class means as the
global mean (``metrics.collapse``). The natural basis of the eigenvector alignment and gradient
coefficients is ``mu'_c ⊗ mu~_c'`` with ``mu~ = [mu; 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepufm.analysis.capture import Downstream
from deepufm.analysis.inputs import Batches, DataLoss
from deepufm.errors import ConfigError
from deepufm.matrices import (
    DenseSymmetric,
    JacobianGram,
    KroneckerGram,
    ModuleHessian,
    RowGram,
    SymmetricMatrix,
    numerical_rank,
)
from deepufm.metrics import (
    effective_rank,
    eigvec_alignment_matrix,
    gradient_coefficients,
    labelled_class_means,
    labelled_nc1,
    orthogonal_frame_distance,
    outlier_count,
    outlier_stats,
    projection_proportion,
    singular_vector_alignment,
)

ROUTES = ("auto", "structured", "matrix-free")
# Largest layer (parameters) whose matrix-free Hessian is formed densely (p Hessian-vector products)
MAX_DENSE = 8192


@dataclass(frozen=True, eq=False)
class LayerData:
    """One layer at the analysed point: its name and 1-based position, the module, inputs ``h``
    ``(N, d_in)``, outputs ``u`` ``(N, d_out)``, logits ``z`` ``(N, K)``, labels ``y`` ``(N,)``,
    class sizes ``counts`` ``(K,)`` and the downstream Jacobians."""

    name: str
    position: int
    module: nn.Linear
    h: Tensor
    u: Tensor
    z: Tensor
    y: Tensor
    counts: Tensor
    down: Downstream

    @property
    def K(self) -> int:
        """Number of classes (logits per sample)."""
        return self.z.shape[1]

    @property
    def N(self) -> int:
        """Number of samples."""
        return self.z.shape[0]

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (then in homogeneous coordinates)."""
        return self.module.bias is not None

    @property
    def h_tilde(self) -> Tensor:
        """``[h; 1]`` per sample: ``(N, d_in + 1)`` (``h`` without a bias)."""
        if not self.has_bias:
            return self.h
        return torch.cat([self.h, self.h.new_ones(self.N, 1)], dim=1)

    @property
    def weight_tilde(self) -> Tensor:
        """``[W b]``: ``(d_out, d_in + 1)`` (``W`` without a bias)."""
        W = self.module.weight.detach()
        if not self.has_bias:
            return W
        return torch.cat([W, self.module.bias.detach().unsqueeze(1)], dim=1)


# -- the structured matrices -----------------------------------------------------------------------
def weighted_jacobians(layer: LayerData, loss: DataLoss) -> Tensor:
    """``M_n J_n``: ``(N, R, d_out)``."""
    return loss.factor(layer.z, layer.y) @ layer.down.J


def gauss_newton(layer: LayerData, loss: DataLoss) -> SymmetricMatrix:
    """``G`` over ``w~`` (module docstring): ``(p, p)``, ``p = d_out (d_in + 1)``."""
    Ht = layer.h_tilde.T.contiguous()  # (d_in + 1, N)
    if loss.name == "mse" and layer.down.shared:
        return KroneckerGram(layer.down.J[0], Ht / math.sqrt(layer.N))
    return JacobianGram(weighted_jacobians(layer, loss), Ht)


@dataclass(frozen=True, eq=False)
class Papyan:
    """``G = class_ + cross + within`` (module docstring) and the knockouts ``G - G_X``."""

    gauss_newton: SymmetricMatrix
    class_: SymmetricMatrix
    cross: SymmetricMatrix
    within: SymmetricMatrix
    form: str

    def components(self) -> dict[str, SymmetricMatrix]:
        """``{"class", "cross", "within"}``: the three terms, each ``(p, p)``."""
        return {"class": self.class_, "cross": self.cross, "within": self.within}

    def knockouts(self) -> dict[str, SymmetricMatrix]:
        """``G - G_X`` for each term ``X`` of :meth:`components`."""
        # G - G_within is G_class + G_cross (K + K R rows): the same matrix without cancelling the
        # large within-class part against itself
        G = self.gauss_newton
        return {
            "class": G - self.class_,
            "cross": G - self.cross,
            "within": self.class_ + self.cross,
        }


FORMS = {
    "mse": "mse (unit weights, THEORY M3; class sizes n_c)",
    "ce": "ce-loss-hessian-weighted (Papyan 2020; class sizes n_c)",
    "callable": "loss-hessian-weighted, M = Lambda^(1/2) Q^T of d2l/dz2 = Q Lambda Q^T (class sizes n_c)",
}


def papyan(layer: LayerData, loss: DataLoss, G: SymmetricMatrix) -> Papyan:
    """Papyan's three terms of ``G`` with class sizes ``n_c`` (module docstring)."""
    K, N = layer.K, layer.N
    A = weighted_jacobians(layer, loss)  # (N, R, d_out)
    R = A.shape[1]
    onehot = F.one_hot(layer.y.to(torch.long), K).to(A.dtype)  # (N, K)
    n_c = layer.counts.to(A.dtype)
    # v_{cr} = mean over class c of A_{n r} ⊗ h~_n, without forming any per-sample row: (K, R, p)
    pair = torch.einsum("nrd,ne,nc->crde", A, layer.h_tilde, onehot / n_c).reshape(K, R, -1)
    mean = pair.mean(dim=1)  # (K, p)
    class_ = RowGram(mean, K * n_c / N)
    cross = RowGram((pair - mean.unsqueeze(1)).reshape(K * R, -1), (n_c / N).repeat_interleave(R))
    within = G - RowGram(pair.reshape(K * R, -1), (n_c / N).repeat_interleave(R))
    return Papyan(G, class_, cross, within, FORMS[loss.name])


class PermutedHessian(SymmetricMatrix):
    """A :class:`ModuleHessian` over ``(vec(W), b)`` seen in the homogeneous ordering ``vec([W b])``:
    ``M~ = P^T M P`` with ``theta[perm] = w~``."""

    def __init__(self, inner: ModuleHessian, perm: Tensor) -> None:
        super().__init__(inner.size, inner.dtype, inner.device)
        self.inner, self.perm = inner, perm

    def matmat(self, V: Tensor) -> Tensor:
        """``M~ V`` for ``V`` ``(p, m)`` in the homogeneous ordering."""
        full = torch.zeros_like(V)
        full[self.perm] = V
        return self.inner.matmat(full)[self.perm]


def homogeneous_permutation(d_out: int, d_in: int, bias: bool, device: torch.device) -> Tensor:
    """``perm`` with ``[vec(W), b][perm] = vec([W b])``: ``(d_out (d_in + 1),)``."""
    idx = torch.arange(d_out * d_in, device=device).reshape(d_out, d_in)
    if bias:
        b = d_out * d_in + torch.arange(d_out, device=device).unsqueeze(1)
        idx = torch.cat([idx, b], dim=1)
    return idx.reshape(-1)


def matrix_free_hessian(
    model: nn.Module,
    layer: LayerData,
    loss: DataLoss,
    batches: Batches,
    chunk_size: int | None,
) -> SymmetricMatrix:
    """``H`` over ``w~`` from Hessian-vector products on the layer's weight and bias only."""
    params = [f"{layer.name}.weight"] + ([f"{layer.name}.bias"] if layer.has_bias else [])
    inner = ModuleHessian(
        model, loss.batch_mean, batches, params, reduction="mean", chunk_size=chunk_size
    )
    d_out, d_in = layer.module.weight.shape
    return PermutedHessian(
        inner, homogeneous_permutation(d_out, d_in, layer.has_bias, inner.device)
    )


# -- the record --------------------------------------------------------------------------------------
def _top(vals: Tensor, k: int) -> list[float]:
    return vals[: min(k, vals.numel())].tolist()


def data_gradient(layer: LayerData, loss: DataLoss) -> tuple[Tensor, Tensor]:
    """``grad_{w~} D = vec(1/N sum_n delta_n h~_n^T)`` ``(p,)`` (exact chain rule) and the
    per-sample ``delta_n = J_n^T dl/dz_n = dl_n/du_n`` ``(N, d_out)``."""
    r, _ = loss.derivatives(layer.z, layer.y)
    delta = torch.einsum("nkd,nk->nd", layer.down.J, r)  # dl/du per sample
    return (delta.T @ layer.h_tilde / layer.N).reshape(-1), delta


def layer_record(
    model: nn.Module,
    layer: LayerData,
    loss: DataLoss,
    batches: Batches,
    route: str = "auto",
    full: bool = False,
    rank_rtol: float | None = None,
    chunk_size: int | None = None,
) -> dict:
    """The per-layer record of :func:`deepufm.analyze` (keys as ``deepufm analyze --json``)."""
    if route not in ROUTES:
        raise ConfigError("route", route, f"one of {', '.join(ROUTES)}")
    K = layer.K
    d_out, d_in = layer.module.weight.shape
    G = gauss_newton(layer, loss)
    p = G.size
    linear = layer.down.linear
    if route == "structured" and not linear:
        raise ConfigError(
            "route",
            route,
            "'auto' or 'matrix-free' for this layer",
            f"The computation after '{layer.name}' is curved (linearity probe "
            f"{layer.down.curvature:.3g}), so H = G + E with E != 0: the structured form alone "
            "would be wrong.",
        )
    structured = linear and route != "matrix-free"
    kind = "Kronecker (J^T J) ⊗ (H~ H~^T / N)" if isinstance(G, KroneckerGram) else "Jacobian Gram"
    if structured:
        H: SymmetricMatrix = G
        E = None
        how = f"structured: H = G, {kind}; E = 0 (downstream (piecewise) linear by the probe)"
    else:
        if p > MAX_DENSE:
            raise ConfigError(
                "layers",
                layer.name,
                f"layers with at most {MAX_DENSE} parameters (weight and bias) where the "
                "downstream computation is curved",
                f"'{layer.name}' has {p}; its matrix-free Hessian would need {p} Hessian-vector "
                "products.",
            )
        H = DenseSymmetric(matrix_free_hessian(model, layer, loss, batches, chunk_size).dense())
        E = DenseSymmetric(H.M - G.dense())
        why = "curved by the probe" if not linear else "forced by route='matrix-free'"
        how = (
            f"matrix-free: H from Hessian-vector products on (weight, bias) ({why}); "
            f"G structured, {kind}; E = H - G"
        )
    vals = H.eigvalsh()
    top = float(vals.abs().max()) or 1.0
    k2 = min(K * K, p)
    _, vecs = H.topk(k2, strict=True)
    g_vals = G.eigvalsh() if E is not None else vals
    g_top = float(g_vals.abs().max()) or 1.0
    dec = papyan(layer, loss, G)
    ranks = {
        n: numerical_rank(M.eigvalsh(), p, rank_rtol, scale=g_top)
        for n, M in dec.components().items()
    }
    knockouts = {n: _top(M.eigvalsh(), k2) for n, M in dec.knockouts().items()}
    g, delta = data_gradient(layer, loss)
    M_in = labelled_class_means(layer.h.T, layer.y, K)  # (d_in, K)
    M_out = labelled_class_means(layer.u.T, layer.y, K)  # (d_out, K)
    M_in_t = torch.cat([M_in, M_in.new_ones(1, K)]) if layer.has_bias else M_in
    W = layer.module.weight.detach()
    sv = torch.linalg.svdvals(W)
    sv_left, sv_right = singular_vector_alignment(W, M_out, M_in)
    grad_cov = JacobianGram(delta.unsqueeze(1), layer.h_tilde.T.contiguous()) - RowGram(
        g.unsqueeze(0)
    )
    keep = K * K + K
    out = {
        "name": layer.name,
        "layer": layer.position,
        "d_in": d_in,
        "d_out": d_out,
        "bias": layer.has_bias,
        "parameters": p,
        "hessian_route": how,
        "downstream": {
            "linear": linear,
            "curvature_probe": layer.down.curvature,
            "jacobian_shared": layer.down.shared,
        },
        "hessian_eigenvalues": vals.tolist() if full else _top(vals, keep),
        "hessian_rank": numerical_rank(vals, p, rank_rtol, scale=top),
        "outlier_count": outlier_count(vals, floor=rank_rtol, size=p),
        "outlier_mean_std": list(outlier_stats(vals, k2)),
        "gauss_newton_eigenvalues": g_vals.tolist() if full else _top(g_vals, keep),
        "residual_eigenvalues": None,
        "residual_eigenvalues_bottom": None,
        "residual_relative_norm": 0.0,
        "papyan_form": dec.form,
        "papyan_ranks": ranks,
        "knockout_eigenvalues": knockouts,
        "gradient_coefficients": gradient_coefficients(g, M_out, M_in_t).tolist(),
        "eigvec_alignment": eigvec_alignment_matrix(H, M_out, M_in_t).tolist(),
        "projection_proportion": projection_proportion(g, vecs[:, :k2]),
        "data_gradient_norm": float(torch.linalg.norm(g)),
        "weight_singular_values": sv.tolist(),
        "singular_vector_alignment": {"left": sv_left.tolist(), "right": sv_right.tolist()},
        "weight_bias_singular_values": torch.linalg.svdvals(layer.weight_tilde).tolist(),
        "grad_cov_eigenvalues": _top(grad_cov.eigvalsh(), K),
        "backprop_eigenvalues": _backprop(layer) if loss.name == "mse" else None,
        "feature_gram_eigenvalues": _top(torch.linalg.eigvalsh(layer.h.T @ layer.h).flip(0), K),
        "nc1": labelled_nc1(layer.h.T, layer.y, K),
        "orthogonal_frame_distance": orthogonal_frame_distance(M_in),
        "effective_rank_hessian": effective_rank(vals),
        "effective_rank_weight": effective_rank(sv),
        "negative_fraction": float((layer.u < 0).to(torch.float64).mean()),
    }
    if E is not None:
        e_vals = E.eigvalsh()
        out["residual_eigenvalues"] = e_vals.tolist() if full else _top(e_vals, keep)
        out["residual_eigenvalues_bottom"] = _top(e_vals.flip(0), keep)
        out["residual_relative_norm"] = float(
            torch.linalg.norm(E.M) / (torch.linalg.norm(H.M) or 1.0)
        )
    return out


def _backprop(layer: LayerData) -> list[float]:
    """Top-``K`` eigenvalues of ``Sigma_delta = 1/N sum_n sum_c' J_n^T (z_n - e_c')(z_n - e_c')^T
    J_n`` (THEORY M9, MSE), using ``sum_c' (z - e_c')(z - e_c')^T = K z z^T - z 1^T - 1 z^T + I``."""
    z, J, K = layer.z, layer.down.J, layer.K
    ones = torch.ones_like(z)
    inner = (
        K * z.unsqueeze(2) * z.unsqueeze(1)
        - z.unsqueeze(2) * ones.unsqueeze(1)
        - ones.unsqueeze(2) * z.unsqueeze(1)
        + torch.eye(K, dtype=z.dtype, device=z.device)
    )
    S = torch.einsum("nkd,nkl,nle->de", J, inner, J) / layer.N
    return _top(torch.linalg.eigvalsh(0.5 * (S + S.T)).flip(0), K)

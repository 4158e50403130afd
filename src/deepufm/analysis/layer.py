"""Every matrix and metric of one ``nn.Linear`` layer of any model (docs: Concepts › The curvature matrices, The metrics).

**Homogeneous coordinates.** The layer's parameters are its weight *and* bias, taken together as
``W~ = [W b]`` ``(d_out, d_in + 1)`` with ``w~ = vec(W~)`` (row-major, ``deepufm.vec``) and inputs
``h~ = [h; 1]``, so that ``u = W~ h~``. The layer then has exactly the form of a deep-UFM layer and
every structured matrix of ``deepufm.matrices`` applies with ``H~`` in place of ``H``; a layer
without bias has ``W~ = W``, ``h~ = h``.

**Gauss–Newton part.** With ``J_n = dz_n/du_n`` ``(K, d_out)`` (autograd through the downstream
computation) and ``M_n^T M_n = d^2 l/dz^2`` (``inputs.DataLoss.factor``),

    G = 1/N sum_n (J_n^T B_n J_n) ⊗ (h~_n h~_n^T) = V^T V,   rows  (M_n J_n)_r ⊗ h~_n / sqrt(N),

a ``KroneckerGram`` ``(J^T J) ⊗ (H~ H~^T / N)`` when the loss is MSE and ``J`` is the same for
every sample (a linear downstream map), else a ``JacobianGram``. ``H = G + E``; ``E = 0`` when the
linearity probe finds the downstream (piecewise) linear in ``u`` (``capture.downstream``), else
``H`` is the matrix-free ``ModuleHessian`` restricted to (weight, bias) and ``E = H - G`` an
operator (their sum, :func:`~deepufm.matrices.combine`).

**Matrix-free spectra.** The top ``K^2 + K`` of ``H`` and the top and bottom of ``E`` come from
the certified engine (``deepufm.matrices.spectra.topk``): its one switch ``use_exact`` forms the
dense matrix (``p`` Hessian-vector products) where that is cheaper, else block Lanczos. Every
certificate is in the record (``certificates``; failures listed in ``uncertified`` and in the
report, or raised with ``strict=True``). Without the full spectrum, ``hessian_rank`` counts the
top-``k`` eigenvalues above the rank rule (``hessian_rank_saturated``: all ``k`` are, so the rank
is at least ``k``), and ``residual_relative_norm`` ``||E||_F / ||H||_F`` is a Hutchinson estimate
with the certified extreme eigenpairs counted exactly, its standard error recorded.

**Papyan's decomposition with unbalanced classes.** Rows ``v_{n r} = (M_n J_n)_r ⊗ h~_n`` (unit
weights for MSE; Papyan 2020's loss-Hessian-weighted rows for CE), class-pair means
``v_{cr} = mean_{n in c} v_{nr}``, class means ``v_c = mean_r v_{cr}``, class sizes ``n_c``:

    G_class  = sum_c (K n_c / N) v_c v_c^T
    G_cross  = sum_c (n_c / N) sum_r (v_{cr} - v_c)(v_{cr} - v_c)^T
    G_within = 1/N sum_n sum_r (v_{nr} - v_{c_n r})(v_{nr} - v_{c_n r})^T

sum exactly to ``G`` for any class sizes and reduce to v1 Thm 4.2 / v2 Thm 2's terms for balanced classes
(``n_c = N/K``): :func:`deepufm.matrices.papyan.labelled_papyan`, the one implementation (the
deep UFM's ``papyan_decomposition`` is its balanced case). Papyan ranks and knockouts
(``G - G_X``) are those of ``G``.

**Class means.** ``mu_c`` (input side, ``h``) and ``mu'_c`` (output side, the layer's output
``u``) average the samples of class ``c``; NC1 uses the unweighted mean of the class means as the
global mean (``metrics.collapse``). The natural basis of the eigenvector alignment and gradient
coefficients is ``mu'_c ⊗ mu~_c'`` with ``mu~ = [mu; 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepufm.analysis.capture import Downstream
from deepufm.analysis.inputs import Batches, DataLoss
from deepufm.errors import ConfigError, ConvergenceError, UncertifiedError
from deepufm.matrices import (
    DenseSymmetric,
    JacobianGram,
    KroneckerGram,
    ModuleHessian,
    PapyanDecomposition,
    RowGram,
    SymmetricMatrix,
    TopK,
    frobenius_estimate,
    labelled_papyan,
    numerical_rank,
)
from deepufm.matrices.spectra import certify, dense_eigh, use_exact
from deepufm.matrices.spectra import topk as spectra_topk
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
# Largest curved layer (parameters) whose Hessian ``full=True`` forms densely (p Hessian-vector
# products and a p x p eigh): every eigenvalue is only available that way
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
        """Whether the layer has a bias (then its parameters are ``[W b]``)."""
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
    """``G`` over ``w~`` (module docstring): ``(p, p)``, ``p = d_out (d_in + 1)``; the same matrix
    as ``papyan(layer, loss).gauss_newton``."""
    Ht = layer.h_tilde.T.contiguous()  # (d_in + 1, N)
    if loss.name == "mse" and layer.down.shared:
        return KroneckerGram(layer.down.J[0], Ht / math.sqrt(layer.N))
    return JacobianGram(weighted_jacobians(layer, loss), Ht)


FORMS = {
    "mse": "mse (unit weights, v1 Thm 4.2 / v2 Thm 2; class sizes n_c)",
    "ce": "ce-loss-hessian-weighted (Papyan 2020; class sizes n_c)",
    "callable": "loss-hessian-weighted, M = Lambda^(1/2) Q^T of d2l/dz2 = Q Lambda Q^T (class sizes n_c)",
}


def papyan(layer: LayerData, loss: DataLoss) -> PapyanDecomposition:
    """Papyan's three terms of ``G`` with class sizes ``n_c`` (module docstring), from the one
    implementation :func:`deepufm.matrices.papyan.labelled_papyan`; its ``gauss_newton`` is
    :func:`gauss_newton` of the layer."""
    Ht = layer.h_tilde.T.contiguous()  # (d_in + 1, N)
    if loss.name == "mse" and layer.down.shared:
        A = layer.down.J[0]  # (K, d_out): a Kronecker G, and Kronecker terms
    else:
        A = weighted_jacobians(layer, loss)
    return labelled_papyan(A, Ht, layer.y, layer.K, FORMS[loss.name])


class PermutedHessian(SymmetricMatrix):
    """A :class:`ModuleHessian` over ``(vec(W), b)`` seen in the homogeneous ordering ``vec([W b])``:
    ``M~ = P^T M P`` with ``theta[perm] = w~``. Matrix-free like its inner operator (``dense()``
    costs ``p`` Hessian-vector products), which the spectral engine's switch takes into account."""

    matrix_free = True

    def __init__(self, inner: ModuleHessian, perm: Tensor) -> None:
        """``inner`` over ``theta = [vec(W), b]``; ``perm`` ``(p,)`` with ``theta[perm] = w~``."""
        super().__init__(inner.size, inner.dtype, inner.device)
        self.inner, self.perm = inner, perm

    def matmat(self, V: Tensor) -> Tensor:
        """``M~ V`` for ``V`` ``(p, m)``: one pass over the data for all ``m`` columns."""
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
    """The first ``k`` of descending ``vals`` (all when fewer) as a list."""
    return vals[: min(k, vals.numel())].tolist()


def data_gradient(layer: LayerData, loss: DataLoss) -> tuple[Tensor, Tensor]:
    """``grad_{w~} D = vec(1/N sum_n delta_n h~_n^T)`` ``(p,)`` (exact chain rule) and the
    per-sample ``delta_n = J_n^T dl/dz_n = dl_n/du_n`` ``(N, d_out)``."""
    r, _ = loss.derivatives(layer.z, layer.y)
    delta = torch.einsum("nkd,nk->nd", layer.down.J, r)  # dl/du per sample
    return (delta.T @ layer.h_tilde / layer.N).reshape(-1), delta


def certificate_summary(result: TopK) -> dict:
    """What a record says about a certified top-k (``deepufm.matrices.spectra.Certificate``):
    ``certified``, ``method``, ``products`` (operator columns applied), ``k``, ``max_residual``
    (``max ||M v - theta v||``), ``relative_residual`` (over ``max|theta|``), ``orthogonality``,
    ``deflated_max``, ``tol`` and ``reason`` (why not, when not certified)."""
    cert = result.certificate
    top = float(cert.residuals.max()) if cert.residuals.numel() else 0.0
    return {
        "certified": bool(cert.certified),
        "method": cert.method,
        "products": int(cert.products),
        "k": int(result.values.numel()),
        "max_residual": top,
        "relative_residual": top / cert.scale if cert.scale > 0 else 0.0,
        "orthogonality": float(cert.orthogonality),
        "deflated_max": float(cert.deflated_max),
        "tol": float(cert.tol),
        "reason": cert.reason,
    }


# Hutchinson probes for ||E||_F / ||H||_F on the matrix-free route
RESIDUAL_PROBES = 32


def check_residual_probes(probes: object) -> int:
    """A valid number of Hutchinson probes for ``residual_relative_norm``: an integer >= 2."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
        raise ConfigError("residual_probes", probes, "an integer >= 2 (Hutchinson probes)")
    return probes


def _dense_topk(M: DenseSymmetric, k: int, method: str, products: int, strict: bool):
    """All eigenvalues ``(p,)`` descending and the certified top-``k`` of a dense matrix."""
    vals, vecs = dense_eigh(M.M)
    nxt = float(vals[k]) if k < M.size else -math.inf
    result = certify(
        M, vals[:k], vecs[:, :k], deflated_max=nxt, method=method, products=products, strict=strict
    )
    return vals, result


def _residual_topk(E: SymmetricMatrix, k: int, p: int, strict: bool) -> TopK:
    """Top-``k`` of ``E`` (or ``-E``) with the dense crossover as the product budget when the
    layer can be formed (``p <= MAX_DENSE``): the engine decomposes ``E`` exactly itself up to
    its ``DENSE_LIMIT``; above it a spent budget raises :class:`ConvergenceError` so that the
    caller forms ``H`` densely. Larger layers get the engine's default budget and are flagged
    (``strict``: raised) when it is spent."""
    result = spectra_topk(E, k, max_products=p if p <= MAX_DENSE else None)
    cert = result.certificate
    if cert.budget_spent and not cert.certified and p <= MAX_DENSE:
        raise ConvergenceError("block Lanczos", k, cert.products, "Its budget was spent.")
    if strict and not cert.certified:
        raise UncertifiedError(cert.method, k, cert.reason)
    return result


def _failed_certificate(exc: ConvergenceError, k: int) -> dict:
    """:func:`certificate_summary`'s fields for a top-``k`` whose solver did not converge."""
    return {
        "certified": False,
        "method": exc.solver,
        "products": int(exc.products),
        "k": k,
        "max_residual": None,
        "relative_residual": None,
        "orthogonality": None,
        "deflated_max": None,
        "tol": 0.0,
        "reason": f"did not converge after {exc.products} products",
    }


def _relative_residual(
    E: SymmetricMatrix,
    H: SymmetricMatrix,
    deflate_E: tuple[Tensor, Tensor],
    deflate_H: tuple[Tensor, Tensor],
    probes: int,
    seed: int,
) -> tuple[float, float]:
    """``||E||_F / ||H||_F`` and its standard error from two deflated Hutchinson estimates
    (``deepufm.matrices.lanczos.frobenius_estimate``; the certified extreme eigenpairs counted
    exactly); the relative errors are combined in quadrature (delta method)."""
    fro_E, se_E = frobenius_estimate(E, probes, seed, deflate_E)
    fro_H, se_H = frobenius_estimate(H, probes, seed + 1, deflate_H)
    if fro_H == 0:
        return 0.0, 0.0
    ratio = fro_E / fro_H
    rel = math.hypot(se_E / fro_E if fro_E > 0 else 0.0, se_H / fro_H)
    return ratio, ratio * rel


def layer_record(
    model: nn.Module,
    layer: LayerData,
    loss: DataLoss,
    batches: Batches,
    route: str = "auto",
    full: bool = False,
    rank_rtol: float | None = None,
    chunk_size: int | None = None,
    *,
    strict: bool = False,
    residual_probes: int = RESIDUAL_PROBES,
    seed: int = 0,
) -> dict:
    """The per-layer record of :func:`deepufm.analyze` (keys as ``deepufm analyze --json``).

    Args:
        model: the model (eval mode, the analysis dtype).
        layer: the layer at the analysed point (:class:`LayerData`).
        loss: the data loss.
        batches: the data, for Hessian-vector products on the matrix-free route.
        route: ``"auto"``, ``"structured"`` (refused where the downstream is curved) or
            ``"matrix-free"``.
        full: every Hessian eigenvalue (the matrix-free route then forms ``H`` densely, at most
            :data:`MAX_DENSE` parameters), not only the top ``K^2 + K``.
        rank_rtol: the rank rule's relative threshold (default ``p * eps``).
        chunk_size: Hessian-vector products per ``vmap`` call.
        strict: raise :class:`~deepufm.errors.UncertifiedError` when a top-k cannot be
            certified, instead of flagging it in ``uncertified`` and the certificates.
        residual_probes: Hutchinson probes for ``residual_relative_norm`` on the matrix-free
            route (its standard error is in ``residual_relative_norm_stderr``).
        seed: seed of the Hutchinson probes.

    On the matrix-free route ``H`` is a Hessian-vector-product operator; its top ``K^2 + K``
    come from the certified engine (``deepufm.matrices.spectra.topk``: exact from ``p``
    products where its switch ``use_exact`` says that is cheaper, else block Lanczos), and so do
    the top and bottom of ``E = H - G``. Without the full spectrum, ``hessian_rank``,
    ``outlier_count`` and ``effective_rank_hessian`` are those of the top ``k`` (stated in
    ``hessian_spectrum``; ``hessian_rank_saturated`` when all ``k`` are above the rank rule,
    i.e. the rank is at least ``k``).
    """
    if route not in ROUTES:
        raise ConfigError("route", route, f"one of {', '.join(ROUTES)}")
    check_residual_probes(residual_probes)
    K = layer.K
    d_out, d_in = layer.module.weight.shape
    dec = papyan(layer, loss)
    G = dec.gauss_newton
    p = G.size
    keep = min(K * K + K, p)
    k2 = min(K * K, p)
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
    certificates: dict[str, dict] = {}
    residual: dict = {
        "residual_eigenvalues": None,
        "residual_eigenvalues_bottom": None,
        "residual_relative_norm": 0.0,
        "residual_relative_norm_stderr": 0.0,
        "residual_relative_norm_method": "exact (E = 0)",
    }
    vals: Tensor | None  # every eigenvalue of H, when the route gives them
    if structured:
        H: SymmetricMatrix = G
        vals = G.eigvalsh()
        top = G.topk(keep, strict=strict)
        how = f"structured: H = G, {kind}; E = 0 (downstream (piecewise) linear by the probe)"
    else:
        why = "curved by the probe" if not linear else "forced by route='matrix-free'"
        op = matrix_free_hessian(model, layer, loss, batches, chunk_size)
        if full and p > MAX_DENSE:
            raise ConfigError(
                "full",
                full,
                f"False for layers with more than {MAX_DENSE} parameters where the downstream "
                "computation is curved",
                f"'{layer.name}' has {p}; every eigenvalue needs its dense matrix ({p} "
                "Hessian-vector products). Without full, the top K^2 + K are certified "
                "matrix-free.",
            )
        fallback = ""
        dense_route = full or use_exact(p, keep, matrix_free=True)
        if not dense_route:
            top = None
            try:
                H = op
                vals = None
                top = op.topk(keep, strict=strict)
                E = op - G  # a sum of operators: products of H and of the structured G
                e_top = _residual_topk(E, keep, p, strict)
                e_low = _residual_topk(-1.0 * E, keep, p, strict)
                certificates["residual_top"] = certificate_summary(e_top)
                certificates["residual_bottom"] = certificate_summary(e_low)
                # the extreme pairs of E together: orthonormal (distinct eigenvalues, 2k < p)
                ext_vals = torch.cat([e_top.values, -e_low.values])
                ext_vecs = torch.linalg.qr(torch.cat([e_top.vectors, e_low.vectors], dim=1))[0]
                ratio, stderr = _relative_residual(
                    E, op, (ext_vals, ext_vecs), (top.values, top.vectors), residual_probes, seed
                )
                residual.update(
                    residual_eigenvalues=e_top.values.tolist(),
                    residual_eigenvalues_bottom=(-e_low.values).tolist(),
                    residual_relative_norm=ratio,
                    residual_relative_norm_stderr=stderr,
                    residual_relative_norm_method=(
                        f"Hutchinson, {residual_probes} Rademacher probes on the complement of "
                        "the certified extreme eigenvectors (counted exactly), for ||E||_F and "
                        "||H||_F; standard error by the delta method"
                    ),
                )
                how = (
                    f"matrix-free: H from Hessian-vector products on (weight, bias) ({why}), "
                    f"certified top {keep} by {top.certificate.method}; G structured, {kind}; "
                    "E = H - G as an operator"
                )
            except ConvergenceError as exc:
                # Block Lanczos is slow on E's top end when E's spectrum is dominated by large
                # negative values: past p products (its budget, _residual_topk) a layer this
                # small is cheaper formed densely, H once for H, E and every eigenvalue of both.
                if p <= MAX_DENSE:
                    dense_route = True
                    fallback = (
                        f" (block Lanczos did not converge after {exc.products} products, so H "
                        "was formed densely)"
                    )
                    certificates.clear()
                elif top is None or strict:
                    raise  # H itself, or strict: no record without its certified top k
                else:  # H is certified; E's extremes are flagged, never silently missing
                    certificates["residual_top"] = _failed_certificate(exc, keep)
                    residual.update(
                        residual_relative_norm=None,
                        residual_relative_norm_stderr=None,
                        residual_relative_norm_method=f"not computed: {exc}",
                    )
                    how = (
                        f"matrix-free: H from Hessian-vector products on (weight, bias) ({why}), "
                        f"certified top {keep} by {top.certificate.method}; G structured, "
                        f"{kind}; E = H - G as an operator, its extreme eigenvalues NOT found "
                        f"(block Lanczos did not converge after {exc.products} products)"
                    )
        if dense_route:
            # the engine's switch: p products and a dense eigh are cheaper than Lanczos here
            Hd = DenseSymmetric(op.dense())
            H = Hd
            vals, top = _dense_topk(Hd, keep, "dense (p Hessian-vector products)", p, strict)
            E = DenseSymmetric(Hd.M - G.dense())
            e_vals, e_top = _dense_topk(E, keep, "dense", 0, strict)
            e_bottom = e_vals.flip(0)
            certificates["residual_top"] = certificate_summary(e_top)
            residual.update(
                residual_eigenvalues=e_vals.tolist() if full else _top(e_vals, keep),
                residual_eigenvalues_bottom=_top(e_bottom, keep),
                residual_relative_norm=float(
                    torch.linalg.norm(E.M) / (torch.linalg.norm(Hd.M) or 1.0)
                ),
                residual_relative_norm_method="exact (dense H and G)",
            )
            how = (
                f"matrix-free: H from Hessian-vector products on (weight, bias) ({why}), formed "
                f"densely ({p} products, every eigenvalue){fallback}; G structured, {kind}; "
                "E = H - G"
            )
    certificates = {"hessian": certificate_summary(top), **certificates}
    spectrum = vals if vals is not None else top.values
    top_abs = float(spectrum.abs().max()) or 1.0
    rank = numerical_rank(spectrum, p, rank_rtol, scale=top_abs)
    if vals is not None:
        spectrum_note = f"all {p} eigenvalues"
    else:
        spectrum_note = (
            f"the certified top {keep} only (matrix-free): hessian_rank counts those above the "
            "rank rule (a lower bound), outlier_count and effective_rank_hessian are over them"
        )
    vecs = top.vectors[:, :k2]
    if structured:
        g_vals = vals
    elif full:
        g_vals = G.eigvalsh()
    else:
        g_res = G.topk(keep, strict=strict)
        certificates["gauss_newton"] = certificate_summary(g_res)
        g_vals = g_res.values
    g_top = float(g_vals.abs().max()) or 1.0
    ranks = {
        n: numerical_rank(M.eigvalsh(), p, rank_rtol, scale=g_top)
        for n, M in dec.components().items()
    }
    knockouts = {}
    for n, M in dec.knockouts().items():
        res = M.topk(k2, strict=strict)
        knockouts[n] = res.values.tolist()
        if not res.certified:
            certificates[f"knockout_{n}"] = certificate_summary(res)
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
    uncertified = [n for n, c in certificates.items() if not c["certified"]]
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
        "hessian_eigenvalues": vals.tolist() if full else _top(spectrum, keep),
        "hessian_spectrum": spectrum_note,
        "hessian_rank": rank,
        "hessian_rank_saturated": vals is None and rank >= keep,
        "hessian_certificate": certificates["hessian"],
        "certificates": certificates,
        "uncertified": uncertified,
        "outlier_count": outlier_count(spectrum, floor=rank_rtol, size=p),
        "outlier_mean_std": list(outlier_stats(spectrum, k2)),
        "gauss_newton_eigenvalues": g_vals.tolist() if full else _top(g_vals, keep),
        **residual,
        "papyan_form": dec.form,
        "papyan_ranks": ranks,
        "knockout_eigenvalues": knockouts,
        "gradient_coefficients": gradient_coefficients(g, M_out, M_in_t).tolist(),
        "eigvec_alignment": eigvec_alignment_matrix(H, M_out, M_in_t).tolist(),
        "projection_proportion": projection_proportion(g, vecs),
        "data_gradient_norm": float(torch.linalg.norm(g)),
        "weight_singular_values": sv.tolist(),
        "singular_vector_alignment": {"left": sv_left.tolist(), "right": sv_right.tolist()},
        "weight_bias_singular_values": torch.linalg.svdvals(layer.weight_tilde).tolist(),
        "grad_cov_eigenvalues": grad_cov.topk(min(K, p), strict=strict).values.tolist(),
        "backprop_eigenvalues": _backprop(layer) if loss.name == "mse" else None,
        "feature_gram_eigenvalues": _top(torch.linalg.eigvalsh(layer.h.T @ layer.h).flip(0), K),
        "nc1": labelled_nc1(layer.h.T, layer.y, K),
        "orthogonal_frame_distance": orthogonal_frame_distance(M_in),
        "effective_rank_hessian": effective_rank(spectrum),
        "effective_rank_weight": effective_rank(sv),
        "negative_fraction": float((layer.u < 0).to(torch.float64).mean()),
    }
    return out


def _backprop(layer: LayerData) -> list[float]:
    """Top-``K`` eigenvalues of ``Sigma_delta = 1/N sum_n sum_c' J_n^T (z_n - e_c')(z_n - e_c')^T
    J_n`` (docs: Concepts › The curvature matrices; MSE), using ``sum_c' (z - e_c')(z - e_c')^T = K z z^T - z 1^T - 1 z^T + I``."""
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

"""Every closed-form prediction of the paper, as data (Concepts: *Predictions at the optimum*).

A :class:`Prediction` names the matrix it is about, the layer, the predicted non-zero eigenvalues
with multiplicities, the rank, and the predicted eigenvectors / singular vectors as the columns of
a tensor. The vectors are built from the class means of a *given* state, so the same records can
be checked against the exact optimum or against a trained model. Vectors in parameter space are
``vec``-ed row-major (``deepufm.vec``): ``mu'_c ⊗ mu_c'`` has the output-side factor first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepufm.metrics.collapse import class_means
from deepufm.models.ufm import DeepUFM
from deepufm.theory.ce import ce_constants
from deepufm.theory.constants import dnc_constants

# The paper's numbering of every statement the project checks, ``(v1, v2)`` ("—": not in that
# version). v1 numbers theorems "4.1".."4.4" and appendix results "E.1".."E.3"; a v2 entry that
# starts with a digit is a theorem ("1" is v2 Theorem 1), anything else is quoted as it stands
# ("Def. 2", "eq. 9", "App. B"). The only place these numbers are written: every record below and
# every experiment's theorem column take them from here (:func:`theorem_label`).
THEOREMS: dict[str, tuple[str, str]] = {
    "layer_hessian": ("4.1", "1"),
    "gauss_newton_class": ("4.2(c)", "2(c)"),
    "gauss_newton_cross": ("4.2(b)", "2(b)"),
    "gauss_newton_within": ("4.2(a)", "2(a)"),
    "knockout": ("4.2", "2"),
    "data_gradient": ("4.3", "3"),
    "weight": ("4.4", "4"),
    "gradient_covariance": ("E.1", "10"),
    "backprop_error": ("E.2", "11"),
    "feature_gram": ("E.3", "—"),
    "block_gauss_newton": ("—", "5"),
    "full_hessian": ("—", "6"),
    "relu_carry_over": ("—", "7"),
    "relu_loss": ("—", "8"),
    "relu_nonnegative": ("—", "Def. 2"),
    "ce_layer_hessian": ("—", "9"),
    "ce_dnc": ("—", "Def. 3"),
    "ce_logit_scale": ("—", "eq. 9"),
    "ce_global": ("—", "App. B"),
    "dnc1": ("§5 DNC1", "Def. 1"),
    "effective_rank": ("—", "eq. 25"),
    "threshold": ("eq. 2", "eq. 17"),
    "output_scale": ("—", "1"),
}


def theorem_label(record: Prediction | ScalarPrediction | str) -> str:
    """The theorem column of a report: ``"v1 4.1 / v2 Thm 1"``, ``"v2 Def. 2"``, ``"v1 E.3"``.

    ``record`` is a :class:`Prediction`, a :class:`ScalarPrediction` or a key of
    :data:`THEOREMS`.
    """
    if isinstance(record, str):
        if record not in THEOREMS:
            raise ValueError(f"record={record!r} is not a key of THEOREMS ({', '.join(THEOREMS)})")
        v1, v2 = THEOREMS[record]
    else:
        v1, v2 = record.theorem_v1, record.theorem_v2
    parts = [] if v1 == "—" else [f"v1 {v1}"]
    if v2 != "—":
        parts.append(f"v2 Thm {v2}" if v2[:1].isdigit() else f"v2 {v2}")
    return " / ".join(parts)


@dataclass(frozen=True)
class ScalarPrediction:
    """A statement about one number rather than a matrix's spectrum (the companion of
    :class:`Prediction`): an alignment that is 1, a coefficient that is ``1/K``, a fraction or a
    count that is 0, a loss.

    ``key`` names the quantity (``"eigvec_alignment"``, ``"nc1"``, ...), ``layer`` its layer
    (``None``: the whole model), ``value`` the predicted number; ``theorem_v1`` / ``theorem_v2``
    as in :class:`Prediction`, ``description`` the statement in words.
    """

    key: str
    layer: int | None
    value: float
    theorem_v1: str
    theorem_v2: str
    description: str

    @property
    def label(self) -> str:
        """:func:`theorem_label` of this record."""
        return theorem_label(self)


def _scalar(key: str, layer: int | None, value: float, theorem: str, text: str) -> ScalarPrediction:
    return ScalarPrediction(key, layer, float(value), *THEOREMS[theorem], text)


def scalar_predictions(K: int, layer: int) -> list[ScalarPrediction]:
    """The one-number consequences of the predictions at the optimum (docs: Concepts ›
    Predictions at the optimum (linear MSE)) at ``W_layer`` of a DNC point with ``K`` classes.

    They need no constants (they hold at any DNC point, also the structural ones of a real
    network's head): the K^2 predicted vectors are eigenvectors (alignment ``f_cc' = 1``), the
    gradient coefficients are ``1/K`` on the diagonal and 0 off it, the data gradient lies in the
    top-K^2 eigenspace (projection proportion 1), the input features are collapsed (NC1 = 0), the
    effective ranks are exact (``K^2`` and ``K``), and the singular vectors of ``W_l`` are the
    class means (alignment 1).
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"K={K!r} must be an integer >= 2")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"layer={layer!r} must be an integer >= 1")
    l = layer
    return [
        _scalar(
            "eigvec_alignment", l, 1.0, "layer_hessian", "mu'_c ⊗ mu_c' are eigenvectors: f = 1"
        ),
        _scalar("gamma_diagonal", l, 1 / K, "data_gradient", "gamma_cc = 1/K"),
        _scalar("gamma_off_diagonal", l, 0.0, "data_gradient", "gamma_cc' = 0 for c != c'"),
        _scalar(
            "projection_proportion",
            l,
            1.0,
            "data_gradient",
            "the data gradient lies in the top-K^2 eigenspace of H_l",
        ),
        _scalar("nc1", l, 0.0, "dnc1", "the input features H_l are collapsed: NC1 = 0"),
        _scalar(
            "effective_rank_hessian",
            l,
            K * K,
            "effective_rank",
            "K^2 equal non-zero eigenvalues: effective rank K^2",
        ),
        _scalar(
            "effective_rank_weight",
            l,
            K,
            "effective_rank",
            "K equal singular values: effective rank K",
        ),
        _scalar(
            "singular_vector_alignment",
            l,
            1.0,
            "weight",
            "the singular vectors of W_l are the normalised class means",
        ),
        _scalar("hessian_outliers", l, K * K, "layer_hessian", "K^2 outliers"),
        _scalar("knockout_cross_outliers", l, K, "knockout", "H - G_cross keeps K outliers"),
        _scalar("knockout_class_outliers", l, K * (K - 1), "knockout", "H - G_class keeps K(K-1)"),
        _scalar("knockout_within_outliers", l, K * K, "knockout", "H - G_within keeps all K^2"),
        _scalar("weight_outliers", l, K, "weight", "W_l^T W_l has K outliers"),
    ]


def scalar_prediction(K: int, layer: int, key: str) -> ScalarPrediction:
    """The record ``key`` of :func:`scalar_predictions` (``K``, ``layer``)."""
    found = {s.key: s for s in scalar_predictions(K, layer)}
    if key not in found:
        raise ValueError(f"key={key!r} is not a scalar prediction ({', '.join(found)})")
    return found[key]


def relu_predictions(model: DeepUFM) -> list[ScalarPrediction]:
    """The deep ReLU UFM (v2 §4) at the whole-model level: the loss of a Definition-2 point is
    the linear optimum's (v2 Theorem 8), and every pre-activation ``u^(m)``, ``m = 2..L``, is
    non-negative (Definition 2, recorded at layer ``m``: ``u^(m)`` is the input of the ReLU that
    makes ``H_m``)."""
    cfg = model.config
    out = [_scalar("loss", None, dnc_constants(cfg).loss, "relu_loss", "loss = linear optimum")]
    out += [
        _scalar(f"negative_fraction_u{m}", m, 0.0, "relu_nonnegative", f"u^({m}) >= 0")
        for m in range(2, cfg.L + 1)
    ]
    return out


def full_hessian_prediction(K: int) -> ScalarPrediction:
    """v2 Theorem 6 (v2 §3.4, qualitative): in the deep-head limit (``L -> infinity`` with
    ``L_F/L -> 0``, all layer-pair blocks of the same Frobenius order) the whole-network Hessian
    divided by its Frobenius norm has ``K^2`` equal spikes at ``1/K`` (those of the head block)."""
    return _scalar(
        "full_hessian_spike",
        None,
        1 / K,
        "full_hessian",
        "H_full / ||H_full||_F: K^2 spikes at 1/K in the deep-head limit",
    )


def ce_model_predictions(model: DeepUFM) -> list[ScalarPrediction]:
    """The CE deep UFM (v2 App. B) at the whole-model level: the loss at the CE DNC point
    (Definition 3), its logit scale ``alpha`` (v2 eq. 9), and ``global_minimum_gap``: the DNC
    loss minus the lowest loss gradient descent reaches from random initialisations, predicted 0
    (v2 App. B: DNC is a critical point with a PSD Hessian that training selects for some
    settings; Garrod & Keating 2024 find lower minima at ``K >= 4, L >= 3`` and ``K >= 6,
    L = 2``: docs: Concepts › Where the code departs from or goes beyond the paper)."""
    k = ce_constants(model.config)
    return [
        _scalar("loss", None, k.loss, "ce_dnc", "loss at the CE DNC point"),
        _scalar("alpha", None, k.alpha, "ce_logit_scale", "logit scale alpha (larger root)"),
        _scalar(
            "global_minimum_gap",
            None,
            0.0,
            "ce_global",
            "no lower loss than DNC is reached from random initialisations",
        ),
    ]


@dataclass(frozen=True)
class Prediction:
    """One theorem's statement about one matrix at one layer (``layer=None``: all layers).

    ``vectors`` (columns) span the predicted eigenspace of ``eigenvalues[0]`` when ``spanning``
    is False they are also mutually orthogonal eigenvectors; ``None`` where the theorem makes no
    vector statement. ``theorem_v1`` / ``theorem_v2`` give the paper's numbering in each version.
    """

    matrix: str
    layer: int | None
    eigenvalues: tuple[float, ...]
    multiplicities: tuple[int, ...]
    rank: int
    vectors: Tensor | None
    theorem_v1: str
    theorem_v2: str
    description: str
    spanning: bool = False


def _kron_columns(left: Tensor, right: Tensor) -> Tensor:
    """Columns ``left[:, a] ⊗ right[:, b]`` for all ``(a, b)`` (a-major): ``(p*q, A*B)``."""
    return torch.einsum("ia,jb->ijab", left, right).reshape(left.shape[0] * right.shape[0], -1)


def _means(model: DeepUFM, layer: int) -> tuple[Tensor, Tensor]:
    """``(M_l, M_{l+1})``: class means of the input and of the output features of ``W_l``."""
    Hs = model.features()
    K = model.config.K
    return class_means(Hs[layer - 1], K), class_means(Hs[layer], K)


def predictions(model: DeepUFM, layer: int) -> list[Prediction]:
    """The linear-MSE predictions for ``W_layer`` (v1 Theorems 4.1–4.4, E.1–E.3; v2 Theorems 1–4,
    10, 11), vectors from ``model``'s means.

    Eigenvalues come from the configuration (``dnc_constants``); for the ReLU model they apply at
    Definition-2 points (Theorem 7).
    """
    cfg = model.config
    K, l = cfg.K, layer
    k = dnc_constants(cfg)
    M, Mp = _means(model, l)
    Lam = k.hessian_eigenvalue[l - 1]
    mu_G = Mp.mean(dim=1, keepdim=True)
    eye_pairs = _kron_columns(Mp, M)  # (c, c') -> mu'_c ⊗ mu_c'
    diag = eye_pairs[:, [c * K + c for c in range(K)]]
    large, small = k.backprop_eigenvalues(l)
    cov_vecs = diag - diag.mean(dim=1, keepdim=True)
    return [
        Prediction(
            "layer_hessian",
            l,
            (Lam,),
            (K * K,),
            K * K,
            eye_pairs,
            *THEOREMS["layer_hessian"],
            "rank K^2, every non-zero eigenvalue Lambda_l, eigenvectors mu'_c ⊗ mu_c'",
        ),
        Prediction(
            "gauss_newton_class",
            l,
            (Lam,),
            (K,),
            K,
            _kron_columns(mu_G, M),
            *THEOREMS["gauss_newton_class"],
            "G_class: rank K, eigenvalue Lambda_l, eigenvectors mu'_G ⊗ mu_c",
        ),
        Prediction(
            "gauss_newton_cross",
            l,
            (Lam,),
            (K * (K - 1),),
            K * (K - 1),
            _kron_columns(Mp - mu_G, M),
            *THEOREMS["gauss_newton_cross"],
            "G_cross: rank K(K-1), eigenvalue Lambda_l, spanned by (mu'_c' - mu'_G) ⊗ mu_c",
            spanning=True,
        ),
        Prediction(
            "gauss_newton_within",
            l,
            (),
            (),
            0,
            None,
            *THEOREMS["gauss_newton_within"],
            "G_within = 0",
        ),
        Prediction(
            "knockout_class",
            l,
            (Lam,),
            (K * (K - 1),),
            K * (K - 1),
            None,
            *THEOREMS["knockout"],
            "H - G_class: the K(K-1) cross outliers remain",
        ),
        Prediction(
            "knockout_cross",
            l,
            (Lam,),
            (K,),
            K,
            None,
            *THEOREMS["knockout"],
            "H - G_cross: the K class outliers remain",
        ),
        Prediction(
            "data_gradient",
            l,
            (),
            (),
            1,
            diag.sum(dim=1, keepdim=True),
            *THEOREMS["data_gradient"],
            "data gradient = -lam_l vec W_l, parallel to sum_c mu'_c ⊗ mu_c: gamma_cc = 1/K, "
            "gamma_cc' = 0, inside the top-K^2 Hessian eigenspace",
        ),
        Prediction(
            "weight",
            l,
            (k.omega2[l - 1],),
            (K,),
            K,
            torch.cat([Mp, M], dim=0),
            *THEOREMS["weight"],
            "W_l = omega_l sum_c mu'^_c mu^_c^T: K singular values omega_l; columns stack "
            "left (mu'_c) over right (mu_c) singular vectors; eigenvalue of W^T W is omega^2",
        ),
        Prediction(
            "gradient_covariance",
            l,
            (k.grad_cov_eigenvalue(l),),
            (K - 1,),
            K - 1,
            cov_vecs,
            *THEOREMS["gradient_covariance"],
            "rank K-1, eigenvalue (1-c)^2 Lambda_l = c(1-c) lam_l, spanned by "
            "mu'_c ⊗ mu_c minus their mean (a simplex ETF)",
            spanning=True,
        ),
        Prediction(
            "backprop_error",
            l,
            (large, small),
            (K - 1, 1),
            K,
            torch.cat([Mp - mu_G, mu_G], 1),
            *THEOREMS["backprop_error"],
            "rank K: (1+c^2) c^2/||mu'||^2 on mu'_c - mu'_G (K-1), (1-c)^2 c^2/||mu'||^2 on mu'_G",
            spanning=True,
        ),
        Prediction(
            "feature_gram",
            l,
            (k.feature_gram_eigenvalue(l),),
            (K,),
            K,
            M,
            *THEOREMS["feature_gram"],
            "H_l H_l^T: K eigenvalues n ||mu^(l)||^2, eigenvectors mu_c",
        ),
    ]


def block_prediction(model: DeepUFM) -> Prediction:
    """v2 Theorem 5: the block Gauss–Newton matrix over ``W_1..W_L`` has rank ``K^2``, all non-zero
    eigenvalues ``sum_l Lambda_l``, eigenvectors stacking ``beta_{m+1} mu^(m+1)_a ⊗ mu^(m)_b``."""
    cfg = model.config
    K = cfg.K
    k = dnc_constants(cfg)
    Hs = model.features()
    blocks = []
    for m in range(1, cfg.L + 1):
        M, Mp = class_means(Hs[m - 1], K), class_means(Hs[m], K)
        blocks.append(k.beta[m] * _kron_columns(Mp, M))
    return Prediction(
        "block_gauss_newton",
        None,
        (k.block_gn_eigenvalue,),
        (K * K,),
        K * K,
        torch.cat(blocks, dim=0),
        *THEOREMS["block_gauss_newton"],
        "G_blk over all layers: rank K^2, eigenvalue sum_l Lambda_l",
    )


def ce_predictions(model: DeepUFM, layer: int) -> list[Prediction]:
    """v2 Theorem 9: the CE layer Hessian at the CE DNC point."""
    k = ce_constants(model.config)
    values, mults = k.hessian_spectrum(layer)
    M, Mp = _means(model, layer)
    K = model.config.K
    diag = _kron_columns(Mp, M)[:, [c * K + c for c in range(K)]]
    return [
        Prediction(
            "layer_hessian",
            layer,
            values,
            mults,
            (K - 1) ** 2,
            diag.sum(dim=1, keepdim=True),
            *THEOREMS["ce_layer_hessian"],
            "K spikes (one dominant, eigenvector sum_c mu'_c ⊗ mu_c) over a "
            "mini-bulk of K^2-3K+1, rank (K-1)^2",
        ),
    ]

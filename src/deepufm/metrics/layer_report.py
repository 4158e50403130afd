"""Every per-layer quantity of ``deepufm analyze``, recomputed from the parameters alone.

One measurement schema: :class:`LayerMeasurement` computes each quantity under its
:class:`LayerReport` field name, lazily and once, so a caller that needs only some of them
(the experiments' spectral probe, run many times per training run) asks for those through
:meth:`LayerMeasurement.record` and pays for nothing else, while :func:`layer_report` asks for
all of them. Both read the same code, so the probe rows of ``metrics.jsonl``, ``results.json``
and ``deepufm analyze`` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from deepufm.matrices import (
    backprop_error_matrix,
    data_gradient,
    feature_gram,
    gradient_covariance,
    layer_hessian,
    papyan_decomposition,
    weight_singular_values,
)
from deepufm.matrices.operator import SymmetricMatrix
from deepufm.matrices.papyan import PapyanDecomposition
from deepufm.matrices.spectra import check_rank_rtol, numerical_rank
from deepufm.metrics.collapse import class_means, nc1, orthogonal_frame_distance
from deepufm.metrics.spectral import (
    effective_rank,
    eigvec_alignment_matrix,
    gradient_coefficients,
    negative_fraction,
    projection_proportion,
)
from deepufm.models.ufm import DeepUFM


@dataclass(frozen=True)
class LayerReport:
    """Measurements for the weight ``W_l`` (features: its input ``H_l``). Lists are descending.

    ``hessian_eigenvalues`` and each ``knockout_eigenvalues[X]`` (``X`` in ``class``, ``cross``,
    ``within``: the spectrum of ``H_l - G_X``) hold the top ``K^2 + K`` (all ``p`` with
    ``full``); ``grad_cov``, ``backprop`` and ``feature_gram`` the top ``K``.
    """

    layer: int
    hessian_eigenvalues: list[float]
    hessian_rank: int
    papyan_ranks: dict[str, int]
    knockout_eigenvalues: dict[str, list[float]]
    gradient_coefficients: list[list[float]]
    eigvec_alignment: list[list[float]]
    projection_proportion: float
    weight_singular_values: list[float]
    grad_cov_eigenvalues: list[float]
    backprop_eigenvalues: list[float]
    feature_gram_eigenvalues: list[float]
    nc1: float
    orthogonal_frame_distance: float
    effective_rank_hessian: float
    effective_rank_weight: float
    negative_fraction: float | None

    def to_dict(self) -> dict:
        """Every field as a plain ``dict`` (``dataclasses.asdict``: nested lists and dicts
        copied), ready for JSON."""
        return asdict(self)


KEYS: tuple[str, ...] = tuple(f.name for f in fields(LayerReport))
"""Every measurement key, in :class:`LayerReport` field order (the one schema)."""


class LayerMeasurement:
    """The quantities of :class:`LayerReport` for one layer, each computed on first use.

    Intermediates (features, the layer Hessian ``H_l`` and its full spectrum, the Papyan
    decomposition, the data gradient, the singular values of ``W_l``) are cached, so asking for
    several keys costs each shared piece once. ``rank_rtol`` and ``relu_tol`` as in
    :func:`layer_report`.
    """

    def __init__(
        self,
        model: DeepUFM,
        layer: int,
        rank_rtol: float | None = None,
        relu_tol: float = 0.0,
    ) -> None:
        if rank_rtol is not None:
            rank_rtol = check_rank_rtol(rank_rtol)
        self.model, self.layer = model, layer
        self.rank_rtol, self.relu_tol = rank_rtol, relu_tol
        self.K = model.config.K
        # layer validation happens here (clear error naming ``layer``), before any lazy work
        self.hessian: SymmetricMatrix = layer_hessian(model, layer, relu_tol)

    # -- shared intermediates ------------------------------------------------------------------

    @cached_property
    def features(self) -> list[Tensor]:
        """``[H_1, ..., H_{L+1}]`` of the model (``H_{L+1}`` the logits)."""
        return self.model.features()

    @cached_property
    def means_in(self) -> Tensor:
        """Class means of the layer's input ``H_l``: ``(d_in, K)``."""
        return class_means(self.features[self.layer - 1], self.K)

    @cached_property
    def means_out(self) -> Tensor:
        """Class means of the layer's output ``H_{l+1}``: ``(d_out, K)``."""
        return class_means(self.features[self.layer], self.K)

    @cached_property
    def hessian_spectrum(self) -> Tensor:
        """All ``p`` eigenvalues of ``H_l``, descending."""
        return self.hessian.eigvalsh()

    @cached_property
    def decomposition(self) -> PapyanDecomposition:
        """Papyan's class / cross / within terms of ``G_l`` (v1 Thm 4.2 / v2 Thm 2; docs:
        Concepts › The curvature matrices)."""
        return papyan_decomposition(self.model, self.layer, self.relu_tol)

    @cached_property
    def gradient(self) -> Tensor:
        """The data-loss gradient of ``W_l``: ``(d_out, d_in)``."""
        return data_gradient(self.model, self.layer, self.relu_tol)

    @cached_property
    def singular_values(self) -> Tensor:
        """All ``min(d_out, d_in)`` singular values of ``W_l``, descending."""
        return weight_singular_values(self.model, self.layer)

    @cached_property
    def weight_gram_spectrum(self) -> Tensor:
        """All ``d_in`` eigenvalues of ``W_l^T W_l``: the squared singular values, then exact
        zeros for the ``d_in - min(d_out, d_in)`` structural null directions."""
        sv = self.singular_values
        d_in = self.model.W[self.layer - 1].shape[1]
        return torch.cat([sv * sv, sv.new_zeros(d_in - sv.numel())])

    @cached_property
    def grad_cov_spectrum(self) -> Tensor:
        """All eigenvalues of the gradient covariance ``Sigma_g`` (v1 E.1), descending."""
        return gradient_covariance(self.model, self.layer, self.relu_tol).eigvalsh()

    @cached_property
    def backprop_spectrum(self) -> Tensor:
        """All eigenvalues of the back-propagated error matrix ``Sigma_delta`` (v1 E.2)."""
        return backprop_error_matrix(self.model, self.layer, self.relu_tol).eigvalsh()

    @cached_property
    def feature_gram_spectrum(self) -> Tensor:
        """All eigenvalues of ``H_l H_l^T`` (v1 E.3), descending."""
        return feature_gram(self.model, self.layer).eigvalsh()

    def _rank(self, values: Tensor) -> int:
        top = max(float(self.hessian_spectrum[0]), 0.0)
        return numerical_rank(values, self.hessian.size, self.rank_rtol, scale=top)

    # -- the schema ------------------------------------------------------------------------------

    def value(self, key: str, full: bool = False) -> Any:
        """The JSON-ready value of one :data:`KEYS` entry (``full``: whole Hessian / knockout
        spectra instead of the top ``K^2 + K``)."""
        K, model, l = self.K, self.model, self.layer
        top = None if full else K * K + K
        if key == "layer":
            return l
        if key == "hessian_eigenvalues":
            return self.hessian_spectrum[:top].tolist()
        if key == "hessian_rank":
            return self._rank(self.hessian_spectrum)
        if key == "papyan_ranks":
            parts = self.decomposition.components().items()
            return {name: self._rank(part.eigvalsh()) for name, part in parts}
        if key == "knockout_eigenvalues":
            # the exact route (dec.knockouts(): low-rank forms, no cancellation), never G - G_X
            ko = self.decomposition.knockouts().items()
            return {name: M.eigvalsh()[:top].tolist() for name, M in ko}
        if key == "gradient_coefficients":
            return gradient_coefficients(self.gradient, self.means_out, self.means_in).tolist()
        if key == "eigvec_alignment":
            return eigvec_alignment_matrix(self.hessian, self.means_out, self.means_in).tolist()
        if key == "projection_proportion":
            _, vecs = self.hessian.topk(min(K * K, self.hessian.size), strict=True)
            return projection_proportion(self.gradient, vecs)
        if key == "weight_singular_values":
            return self.singular_values.tolist()
        if key == "grad_cov_eigenvalues":
            return self.grad_cov_spectrum[:K].tolist()
        if key == "backprop_eigenvalues":
            return self.backprop_spectrum[:K].tolist()
        if key == "feature_gram_eigenvalues":
            return self.feature_gram_spectrum[:K].tolist()
        if key == "nc1":
            return nc1(self.features[l - 1], K)
        if key == "orthogonal_frame_distance":
            return orthogonal_frame_distance(self.means_in)
        if key == "effective_rank_hessian":
            return effective_rank(self.hessian_spectrum)
        if key == "effective_rank_weight":
            return effective_rank(self.singular_values)
        if key == "negative_fraction":
            if model.config.activation != "relu" or l >= model.config.L:
                return None  # no ReLU follows W_l
            U = model.W[l - 1] @ self.features[l - 1]
            return negative_fraction(U, self.relu_tol)
        raise ValueError(f"key={key!r} is not a layer measurement; valid keys: {', '.join(KEYS)}")

    def record(self, keys: Iterable[str] = KEYS, full: bool = False) -> dict[str, Any]:
        """``{key: value(key)}`` for ``keys`` (default: all of :data:`KEYS`)."""
        return {key: self.value(key, full) for key in keys}


def layer_report(
    model: DeepUFM,
    layer: int,
    full: bool = False,
    rank_rtol: float | None = None,
    relu_tol: float = 0.0,
) -> LayerReport:
    """All quantities of one layer (Concepts: *The curvature matrices*, *The metrics*); Papyan terms
    are the MSE form, the loss-Hessian-weighted form for CE.

    Ranks count eigenvalues above ``rank_rtol * lambda_max(H_l)``; by default ``rank_rtol`` is
    the rank rule of ``deepufm.matrices.spectra`` (``p * eps`` of the model's dtype), so a float32
    and a float64 model at the same point report the same ranks. The top-``K^2`` eigenvectors
    (projection proportion) come from the certified ``topk``: an uncertified result raises
    :class:`~deepufm.errors.UncertifiedError` rather than a wrong number. ``relu_tol``:
    pre-activations ``>= -relu_tol * max|u|`` count as non-negative (also in
    ``negative_fraction``). A subset of the quantities: :class:`LayerMeasurement`.
    """
    return LayerReport(**LayerMeasurement(model, layer, rank_rtol, relu_tol).record(KEYS, full))

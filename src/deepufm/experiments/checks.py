"""The THEORY §6 predictions checked layer by layer: shared by the linear and ReLU experiments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from deepufm.experiments.results import Result, compare, plain
from deepufm.metrics.layer_report import layer_report
from deepufm.models.ufm import DeepUFM
from deepufm.theory.constants import DNCConstants

# Ranks of *trained* states count eigenvalues above this times the largest: gradient descent
# leaves the null directions at ~1e-10 relative after the presets' epochs, above the dtype rule
# (p eps ~ 1e-12) that exact points use; 1e-8 is stated in every report beside the ranks.
TRAINED_RANK_RTOL = 1e-8


def dnc_constants_record(k: DNCConstants) -> dict:
    """The constants of ``k`` as plain numbers, with the per-layer eigenvalues the checks use
    (lists indexed by ``l - 1``): the ``constants`` of ``results.json``."""
    layers = range(1, k.L + 1)
    return plain(k) | {
        "grad_cov_eigenvalue": [k.grad_cov_eigenvalue(l) for l in layers],
        "backprop_eigenvalues": [list(k.backprop_eigenvalues(l)) for l in layers],
        "feature_gram_eigenvalue": [k.feature_gram_eigenvalue(l) for l in layers],
        "block_gn_eigenvalue": k.block_gn_eigenvalue,
    }


def layer_predictions(
    model: DeepUFM,
    k: DNCConstants,
    tol: float,
    layers: Sequence[int] | None = None,
    relu_tol: float = 0.0,
    notes: Mapping[int, str] | None = None,
    scopes: Mapping[int, str] | None = None,
) -> list[Result]:
    """Every THEORY §6 prediction at each of ``layers`` (default all) beside its measurement.

    ``relu_tol`` is passed to the matrices (ReLU, THEORY §7); ``notes[l]`` is attached to every
    record of layer ``l``, and ``scopes[l]`` (``"out: <the hypothesis that fails>"``) marks them
    as outside the theorems' hypotheses (e.g. a ReLU layer off the Definition-2 point).
    """
    K, out = model.config.K, []
    notes, scopes = notes or {}, scopes or {}
    for l in layers or range(1, model.config.L + 1):
        r = layer_report(model, l, rank_rtol=TRAINED_RANK_RTOL, relu_tol=relu_tol)
        layer_out: list[Result] = []
        Lam = k.hessian_eigenvalue[l - 1]
        top = np.asarray(r.hessian_eigenvalues[: K * K])
        gamma = np.asarray(r.gradient_coefficients)
        sv2 = np.asarray(r.weight_singular_values[:K]) ** 2
        big, small = k.backprop_eigenvalues(l)
        layer_out += [
            compare(
                "Hessian outlier eigenvalue (min of top K^2)",
                "v1 4.1 / v2 Thm 1",
                l,
                Lam,
                top.min(),
                tol,
            ),
            compare(
                "Hessian outlier eigenvalue (max of top K^2)",
                "v1 4.1 / v2 Thm 1",
                l,
                Lam,
                top.max(),
                tol,
            ),
            compare("Hessian rank", "v1 4.1 / v2 Thm 1", l, K * K, r.hessian_rank, 0),
            compare(
                "min eigenvector alignment f_cc'",
                "v1 4.1 / v2 Thm 1",
                l,
                1.0,
                np.min(r.eigvec_alignment),
                tol,
            ),
            compare("rank G_class", "v1 4.2 / v2 Thm 2", l, K, r.papyan_ranks["class"], 0),
            compare(
                "rank G_cross", "v1 4.2 / v2 Thm 2", l, K * (K - 1), r.papyan_ranks["cross"], 0
            ),
            compare("rank G_within", "v1 4.2 / v2 Thm 2", l, 0, r.papyan_ranks["within"], 0),
            compare(
                "gradient coefficient gamma_cc (mean)",
                "v1 4.3 / v2 Thm 3",
                l,
                1 / K,
                np.diag(gamma).mean(),
                tol,
            ),
            compare(
                "gradient coefficient gamma_cc' (max off-diagonal)",
                "v1 4.3 / v2 Thm 3",
                l,
                0.0,
                (gamma - np.diag(np.diag(gamma))).max(),
                tol,
            ),
            compare(
                "projection proportion of the data gradient",
                "v1 4.3 / v2 Thm 3",
                l,
                1.0,
                r.projection_proportion,
                tol,
            ),
            compare(
                "squared singular value of W_l (mean of top K)",
                "v1 4.4 / v2 Thm 4",
                l,
                k.omega2[l - 1],
                sv2.mean(),
                tol,
            ),
            compare(
                "rank of W_l",
                "v1 4.4 / v2 Thm 4",
                l,
                K,
                int(
                    (
                        np.asarray(r.weight_singular_values) > 1e-6 * r.weight_singular_values[0]
                    ).sum()
                ),
                0,
            ),
            compare(
                "gradient-covariance eigenvalue (mean of top K-1)",
                "v1 E.1 / v2 Thm 10",
                l,
                k.grad_cov_eigenvalue(l),
                np.mean(r.grad_cov_eigenvalues[: K - 1]),
                tol,
            ),
            compare(
                "back-propagated error, large eigenvalue",
                "v1 E.2 / v2 Thm 11",
                l,
                big,
                np.mean(r.backprop_eigenvalues[: K - 1]),
                tol,
            ),
            compare(
                "back-propagated error, small eigenvalue",
                "v1 E.2 / v2 Thm 11",
                l,
                small,
                r.backprop_eigenvalues[K - 1],
                tol,
            ),
            compare(
                "feature-Gram eigenvalue (mean of top K)",
                "v1 E.3",
                l,
                k.feature_gram_eigenvalue(l),
                np.mean(r.feature_gram_eigenvalues),
                tol,
            ),
            compare("NC1 of the input features", "DNC1 (§4.1)", l, 0.0, r.nc1, tol),
        ]
        note, scope = notes.get(l, ""), scopes.get(l, "in")
        out += [replace(res, note=note, scope=scope) for res in layer_out]
    return out

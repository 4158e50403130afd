"""The theory checked against measurements: final-epoch rows from a :class:`LayerReport`,
over-training rows from the probe records of ``metrics.jsonl``.

Every row's prediction and theorem label come from the records of
:mod:`deepufm.theory.predictions` (:class:`~deepufm.theory.predictions.Prediction` for spectra,
:class:`~deepufm.theory.predictions.ScalarPrediction` for single numbers): nothing here restates a
theorem. Final-epoch rows are computed from :func:`~deepufm.metrics.layer_report.layer_report`
of the final model, never from probe rows; the over-training rows read the probe rows under
``layer_report``'s keys (``eigvec_alignment``, ``gradient_coefficients``,
``hessian_eigenvalues``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from deepufm.experiments.results import Result, compare, plain
from deepufm.metrics.layer_report import layer_report
from deepufm.models.ufm import DeepUFM
from deepufm.theory.constants import DNCConstants
from deepufm.theory.predictions import (
    Prediction,
    ScalarPrediction,
    predictions,
    scalar_predictions,
    theorem_label,
)

# Ranks of *trained* states count eigenvalues above this times the largest: gradient descent
# leaves the null directions at ~1e-10 relative after the presets' epochs, above the dtype rule
# (p eps ~ 1e-12) that exact points use; 1e-8 is stated in every report beside the ranks.
TRAINED_RANK_RTOL = 1e-8

# The over-training rows check what the figures show, at the resolution a figure shows (1 %):
# "f_cc' >= 0.99 from epoch X on"; the final-epoch rows check the same quantities to the preset's
# tolerance.
OVER_TRAINING_TOL = 1e-2


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


def check(
    quantity: str,
    record: Prediction | ScalarPrediction,
    layer: int | None,
    predicted: float,
    measured: float,
    tolerance: float,
    note: str = "",
) -> Result:
    """:func:`~deepufm.experiments.results.compare` with the theorem label of ``record``."""
    return compare(quantity, theorem_label(record), layer, predicted, measured, tolerance, note)


def layer_predictions(
    model: DeepUFM,
    k: DNCConstants | None,
    tol: float,
    layers: Sequence[int] | None = None,
    relu_tol: float = 0.0,
    notes: Mapping[int, str] | None = None,
    scopes: Mapping[int, str] | None = None,
) -> list[Result]:
    """Every prediction at the optimum at each of ``layers`` (default all) beside its measurement
    (docs: Concepts › Predictions at the optimum (linear MSE)).

    The predictions are the records of :func:`~deepufm.theory.predictions.predictions` and
    :func:`~deepufm.theory.predictions.scalar_predictions` (``k`` is not read: the records carry
    their own constants; it stays in the signature for the callers that pass it). ``relu_tol``
    is passed to the matrices (ReLU, v2 Theorem 7); ``notes[l]`` is attached to every record of
    layer ``l``, and ``scopes[l]`` (``"out: <the hypothesis that fails>"``) marks them as outside
    the theorems' hypotheses (e.g. a ReLU layer off the Definition-2 point).
    """
    K, out = model.config.K, []
    notes, scopes = notes or {}, scopes or {}
    for l in layers or range(1, model.config.L + 1):
        r = layer_report(model, l, rank_rtol=TRAINED_RANK_RTOL, relu_tol=relu_tol)
        P = {p.matrix: p for p in predictions(model, l)}
        S = {s.key: s for s in scalar_predictions(K, l)}
        H, W = P["layer_hessian"], P["weight"]
        top = np.asarray(r.hessian_eigenvalues[: H.rank])
        gamma = np.asarray(r.gradient_coefficients)
        sv = np.asarray(r.weight_singular_values)
        cov, bp, gram = P["gradient_covariance"], P["backprop_error"], P["feature_gram"]
        n_big = bp.multiplicities[0]
        rows = [
            check(
                "Hessian outlier eigenvalue (min of top K^2)",
                H,
                l,
                H.eigenvalues[0],
                top.min(),
                tol,
            ),
            check(
                "Hessian outlier eigenvalue (max of top K^2)",
                H,
                l,
                H.eigenvalues[0],
                top.max(),
                tol,
            ),
            check("Hessian rank", H, l, H.rank, r.hessian_rank, 0),
            check(
                "min eigenvector alignment f_cc'",
                S["eigvec_alignment"],
                l,
                S["eigvec_alignment"].value,
                np.min(r.eigvec_alignment),
                tol,
            ),
            *(
                check(
                    f"rank G_{part}",
                    P[f"gauss_newton_{part}"],
                    l,
                    P[f"gauss_newton_{part}"].rank,
                    r.papyan_ranks[part],
                    0,
                )
                for part in ("class", "cross", "within")
            ),
            check(
                "gradient coefficient gamma_cc (mean)",
                S["gamma_diagonal"],
                l,
                S["gamma_diagonal"].value,
                np.diag(gamma).mean(),
                tol,
            ),
            check(
                "gradient coefficient gamma_cc' (max off-diagonal)",
                S["gamma_off_diagonal"],
                l,
                S["gamma_off_diagonal"].value,
                (gamma - np.diag(np.diag(gamma))).max(),
                tol,
            ),
            check(
                "projection proportion of the data gradient",
                S["projection_proportion"],
                l,
                S["projection_proportion"].value,
                r.projection_proportion,
                tol,
            ),
            check(
                "squared singular value of W_l (mean of top K)",
                W,
                l,
                W.eigenvalues[0],
                (sv[: W.rank] ** 2).mean(),
                tol,
            ),
            check("rank of W_l", W, l, W.rank, int((sv > 1e-6 * sv[0]).sum()), 0),
            check(
                "gradient-covariance eigenvalue (mean of top K-1)",
                cov,
                l,
                cov.eigenvalues[0],
                np.mean(r.grad_cov_eigenvalues[: cov.rank]),
                tol,
            ),
            check(
                "back-propagated error, large eigenvalue",
                bp,
                l,
                bp.eigenvalues[0],
                np.mean(r.backprop_eigenvalues[:n_big]),
                tol,
            ),
            check(
                "back-propagated error, small eigenvalue",
                bp,
                l,
                bp.eigenvalues[1],
                r.backprop_eigenvalues[n_big],
                tol,
            ),
            check(
                "feature-Gram eigenvalue (mean of top K)",
                gram,
                l,
                gram.eigenvalues[0],
                np.mean(r.feature_gram_eigenvalues[: gram.rank]),
                tol,
            ),
            check("NC1 of the input features", S["nc1"], l, S["nc1"].value, r.nc1, tol),
        ]
        note, scope = notes.get(l, ""), scopes.get(l, "in")
        out += [replace(res, note=note, scope=scope) for res in rows]
    return out


# -- over training ---------------------------------------------------------------------------------


def settling_epoch(epochs: Sequence[int], ok: Sequence[bool]) -> int | None:
    """The first epoch from which ``ok`` holds at every later probe, ``None`` if it fails at the
    last one. ``epochs`` ascending, one ``ok`` per epoch."""
    if len(epochs) != len(ok):
        raise ValueError(f"epochs ({len(epochs)}) and ok ({len(ok)}) must have the same length")
    start = None
    for e, good in zip(epochs, ok):
        if not good:
            start = None
        elif start is None:
            start = e
    return start


def non_increasing_from(
    epochs: Sequence[int], values: Sequence[float], slack: float = 1e-12
) -> int:
    """The first epoch from which ``values`` never increase again (an increase smaller than
    ``slack`` times the value, round-off, does not count); the last epoch if they rose at the end."""
    v = np.asarray(values, dtype=float)
    start = 0
    for i in range(1, len(v)):
        if v[i] > v[i - 1] * (1 + slack):
            start = i
    return int(epochs[start])


def _sustained(
    quantity: str,
    record: ScalarPrediction,
    layer: int,
    epochs: list[int],
    predicted: float,
    measured_of: np.ndarray,
    tol: float,
    what: str,
) -> Result:
    """A claim ``measured_of ~ predicted`` (as :func:`compare` judges one row: relative error,
    absolute for a zero prediction, within ``tol``) that must hold from a settling epoch to the
    end of training.

    The row holds when there is such an epoch before the last probe (at least two probes in a
    row, the last included); ``measured`` is the worst value from that epoch on (the last value
    when it never settles); the note names the epoch.
    """
    deviation = np.abs(measured_of - predicted) / (abs(predicted) if predicted else 1.0)
    ok = deviation <= tol
    start = settling_epoch(epochs, ok.tolist())
    last = epochs[-1]
    if start is None or start == last:
        worst = float(measured_of[-1])
        res = check(quantity, record, layer, predicted, worst, tol)
        note = (
            f"{what} fails at the last probe (epoch {last})"
            if start is None
            else f"{what} holds only at the last probe (epoch {last})"
        )
        return replace(res, holds=False, note=note)
    tail = np.asarray(epochs) >= start
    dev = deviation[tail]
    worst = float(measured_of[tail][int(np.argmax(dev))])
    res = check(quantity, record, layer, predicted, worst, tol)
    count = int(tail.sum())
    return replace(
        res,
        holds=True,
        note=f"{what} from epoch {start} to {last} ({count} of {len(epochs)} probes)",
    )


def over_training_results(
    records: Sequence[Mapping[str, Any]],
    K: int,
    layer: int,
    tol: float,
    *,
    gamma_tol: float | None = None,
    scope: str = "in",
) -> list[Result]:
    """The over-training claims of the figures, checked on the probe rows of ``metrics.jsonl``.

    Rows carrying ``eigvec_alignment`` (``K x K``), ``gradient_coefficients`` (``K x K``) and
    ``hessian_eigenvalues`` (descending, at least ``K^2``) of layer ``layer``:

    * ``min f_cc' >= 1 - tol`` for every ``(c, c')`` from a settling epoch on (v1 Fig 4, v2 Fig 1);
    * ``max_c |gamma_cc - 1/K| <= gamma_tol`` and ``max_{c != c'} |gamma_cc'| <= gamma_tol`` from a
      settling epoch on (v1 Fig 7);
    * the outliers equalise: ``lambda_1 / lambda_{K^2} -> 1``, with the epoch from which the ratio
      never increases again (v1 Fig 3, v2 Fig 2); holds when the last ratio is within ``tol`` of 1.

    ``gamma_tol`` defaults to ``tol``; ``scope`` is given to every row.
    """
    gamma_tol = tol if gamma_tol is None else gamma_tol
    S = {s.key: s for s in scalar_predictions(K, layer)}
    out: list[Result] = []
    rows = [r for r in records if "eigvec_alignment" in r]
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        fmin = np.asarray([np.min(r["eigvec_alignment"]) for r in rows], dtype=float)
        out.append(
            _sustained(
                f"min f_cc' over training (>= {1 - tol:g} from the settling epoch on)",
                S["eigvec_alignment"],
                layer,
                ep,
                S["eigvec_alignment"].value,
                fmin,
                tol,
                f"every f_cc' >= {1 - tol:g}",
            )
        )
    rows = [r for r in records if "gradient_coefficients" in r]
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        G = [np.asarray(r["gradient_coefficients"], dtype=float) for r in rows]
        # deviations from the records' values (1/K on the diagonal, 0 off it): predicted 0
        diag = np.asarray([np.abs(np.diag(g) - S["gamma_diagonal"].value).max() for g in G])
        off = np.asarray([np.abs(g - np.diag(np.diag(g))).max() for g in G])
        for quantity, rec, dev, what in (
            ("max |gamma_cc - 1/K| over training", S["gamma_diagonal"], diag, "|gamma_cc - 1/K|"),
            (
                "max |gamma_cc'| (c != c') over training",
                S["gamma_off_diagonal"],
                off,
                "|gamma_cc'|",
            ),
        ):
            out.append(
                _sustained(
                    quantity, rec, layer, ep, 0.0, dev, gamma_tol, f"every {what} <= {gamma_tol:g}"
                )
            )
    rows = [r for r in records if len(r.get("hessian_eigenvalues") or ()) >= K * K]
    rows = [r for r in rows if float(r["hessian_eigenvalues"][K * K - 1]) > 0]
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        ratio = np.asarray(
            [r["hessian_eigenvalues"][0] / r["hessian_eigenvalues"][K * K - 1] for r in rows],
            dtype=float,
        )
        # one eigenvalue of multiplicity K^2 (Theorem 1's record): the ratio is 1
        res = check(
            "outlier ratio lambda_1 / lambda_{K^2} of H_l at the end of training",
            S["hessian_outliers"],
            layer,
            1.0,
            ratio[-1],
            tol,
        )
        start = non_increasing_from(ep, ratio)
        note = (
            f"the ratio never increases from epoch {start} on ({ratio[ep.index(start)]:.4g} there)"
        )
        out.append(replace(res, note=note))
    return [replace(r, scope=scope) for r in out]


__all__ = [
    "OVER_TRAINING_TOL",
    "TRAINED_RANK_RTOL",
    "check",
    "dnc_constants_record",
    "layer_predictions",
    "non_increasing_from",
    "over_training_results",
    "settling_epoch",
]

"""``mnist-resnet``, ``fashion-resnet``, ``cifar-resnet``: ResNet-20 + a deep linear head (v2 §5,
App. G.2) — v2 Figs 6, 12–18 and the full-network Hessian of Theorem 6.

The network is trained with UFM-style regularisation (``deepufm.training.network``); at log-spaced
epochs the head is read off as a deep UFM whose ``H1`` are the backbone's features of every image
(BatchNorm in eval mode, a project choice: docs: Concepts › Provisional settings), so every
layer-wise matrix of the head is the exact structured one of ``deepufm.matrices`` (Kronecker
forms for the linear MSE head). The theory has
no closed-form optimum here (the features are not free), so the report compares the *structure*
with the predictions — K^2 outliers, knockout counts, alignments, gradient coefficients, effective
ranks — within :data:`HEAD_TOLERANCES`, beside the training residue that bounds how exactly they can
hold (:func:`training_residue`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from deepufm.errors import ConfigError
from deepufm.experiments import plotting as P
from deepufm.experiments.checks import TRAINED_RANK_RTOL, check, over_training_results
from deepufm.experiments.departures import departures_caption, departures_table
from deepufm.experiments.probes import SpectralProbe
from deepufm.experiments.report import Report, write_report, write_table
from deepufm.experiments.results import Result, experiment_config, write_results
from deepufm.experiments.runs import finish_spectra, track_spectra
from deepufm.matrices import block_hessian, module_hessian, weight_gram
from deepufm.matrices.lanczos import frobenius_estimate, lanczos_topk
from deepufm.metrics import class_means, outlier_count
from deepufm.metrics.layer_report import LayerReport, layer_report
from deepufm.metrics.spectral import singular_vector_alignment
from deepufm.models.config import resolve_device
from deepufm.models.resnet import batch_data_loss, curvature_mode
from deepufm.models.ufm import DeepUFM
from deepufm.theory.predictions import full_hessian_prediction, scalar_predictions
from deepufm.training import network as net
from deepufm.training import rundir as rd

DATASETS = {
    "mnist-resnet": "mnist-embedded",
    "fashion-resnet": "fashion-mnist",
    "cifar-resnet": "cifar10",
}


@dataclass(frozen=True)
class Preset:
    """``training`` is the network run; ``layer`` the studied head layer (2, not stated in the
    paper: docs: Concepts › Provisional settings); ``snapshots`` the epochs whose full spectra
    are kept; ``full_hessian_k`` eigenvalues of the whole network's Hessian (Theorem 6; 0 means
    K^2), ``hutchinson`` probe vectors for its Frobenius norm, ``full_hessian_per_class`` images
    per class it is measured on (``None``: all; float64 convolutions on a CPU make each product
    costly)."""

    training: net.NetworkTrainConfig
    layer: int
    snapshots: tuple[int, ...]
    full_hessian_k: int
    hutchinson: int
    full_hessian_per_class: int | None = None


def preset(name: str, dataset: str) -> Preset:
    """The ``name`` preset of the real-network experiment on ``dataset``: the network training
    of :func:`deepufm.training.network.preset`, head layer 2, snapshots at 0, 1 %, 10 % and 100 %
    of the epochs, 32 Hutchinson probes; the quick preset measures the whole Hessian on 2 images
    per class."""
    training = net.preset(name, dataset)
    e = training.epochs
    snaps = tuple(sorted({0, e // 100, e // 10, e}))
    per_class = 2 if name == "quick" else None
    return Preset(training, 2, snaps, 0, 32, per_class)


# -- probes ----------------------------------------------------------------------------------------


def head_probe(spectral: SpectralProbe) -> net.NetworkProbe:
    """The spectral probe of the UFM experiments on the head (float64; its keys, among them
    ``effective_rank_hessian`` and ``effective_rank_weight``, are ``layer_report``'s), plus the
    real-network figures' singular-vector alignment ``sv_align_left`` / ``sv_align_right``."""

    def probe(snap: net.NetworkSnapshot) -> dict[str, Any]:
        head = snap.head().to(dtype=torch.float64)
        out = spectral(head, snap.epoch)
        l, K = spectral.layer, head.config.K
        Hs = head.features()
        W = head.W[l - 1]
        left, right = singular_vector_alignment(W, class_means(Hs[l], K), class_means(Hs[l - 1], K))
        out.update(sv_align_left=left.tolist(), sv_align_right=right.tolist())
        return out

    return probe


# -- the full-network Hessian (Theorem 6) ----------------------------------------------------------


@dataclass(frozen=True)
class FullHessianComparison:
    """Top eigenvalues of the data-loss Hessian of the whole network and of its head block
    ``H_WW``, each divided by its Frobenius norm (v2 §3.4, Theorem 6), and the relative Frobenius
    size of everything outside the head block, ``sqrt(||H||_F^2 - ||H_WW||_F^2) / ||H_WW||_F``."""

    full: np.ndarray
    head: np.ndarray
    full_fro: float
    full_fro_stderr: float
    head_fro: float
    parameters: int
    head_parameters: int

    @property
    def off_head_ratio(self) -> float:
        """``||H_full - diag(0, H_WW)||_F / ||H_WW||_F``: the feature-map blocks against the head block."""
        return math.sqrt(max(self.full_fro**2 - self.head_fro**2, 0.0)) / self.head_fro


def full_hessian_comparison(
    model, data, config: net.NetworkTrainConfig, k: int, probes: int, seed: int = 0
) -> FullHessianComparison:
    """Lanczos top-``k`` of the whole network's data-loss Hessian on ``data`` (matrix-free,
    float64, eval-mode BN) and the exact head block on the same data from the structured
    ``block_hessian`` of the head; ``||H||_F^2`` by Hutchinson's estimate ``mean ||H v||^2`` over
    ``probes`` Rademacher vectors (one data pass). ``model`` is converted to float64 in place."""
    X = data.X.to(config.device, torch.float64)
    y = data.y.to(config.device)
    model64 = model.to(dtype=torch.float64)
    head = net.NetworkSnapshot(model64, data, config.replace(dtype="float64"), 0).head()
    with curvature_mode(model64, "eval") as m:
        H = module_hessian(
            m, lambda out, t: batch_data_loss(out, t, config.loss), [(X, y)], reduction="mean"
        )
        full, _ = lanczos_topk(H, k, tol=1e-8, seed=seed)
        full_fro, stderr = frobenius_estimate(H, probes, seed)
    block = block_hessian(head)  # H_WW: exactly the head block of the whole Hessian
    B = block.hessian.dense()
    head_vals = torch.linalg.eigvalsh(B).flip(0)[:k]
    head_fro = float(torch.linalg.norm(B))
    return FullHessianComparison(
        full.cpu().numpy() / full_fro,
        head_vals.cpu().numpy() / head_fro,
        full_fro,
        stderr,
        head_fro,
        H.size,
        B.shape[0],
    )


# -- the experiment --------------------------------------------------------------------------------


def run(
    preset_name: str,
    out: Path,
    progress: bool = True,
    experiment: str = "mnist-resnet",
    data_dir: str | None = None,
    per_class: int | None = None,
    device: str | None = None,
    resume: bool = False,
) -> Report:
    """Train (or, with ``resume``, continue) the preset's network into ``out``, then measure."""
    pre = preset(preset_name, DATASETS[experiment])
    if per_class is not None:
        # images per class to train on (the paper: 5,000), validated by the training config
        pre = replace(pre, training=pre.training.replace(per_class=per_class))
    if device is not None:
        pre = replace(pre, training=pre.training.replace(device=device))
    cfg, l = pre.training, pre.layer
    try:  # before anything is loaded or written: the paper preset's default device is CUDA
        resolve_device(cfg.device, "--device")
    except ConfigError as exc:
        raise ConfigError(
            "--device",
            cfg.device,
            exc.valid,
            f"The run would train on {cfg.device} (preset {preset_name!r}), which this machine "
            "lacks; pass --device cpu to run it on the CPU.",
        ) from exc
    data = net.load_network_data(cfg, data_dir)
    out = Path(out)
    spectral = SpectralProbe(l, pre.snapshots)
    # snapshots past the checkpoint are recomputed (identically) and replaced
    track_spectra(out, spectral, cfg.epochs + 1 if resume else None)
    state = net.train(
        cfg,
        data,
        out,
        (*net.DEFAULT_NETWORK_PROBES, head_probe(spectral)),
        progress=progress,
        resume=resume,
    )
    finish_spectra(out, spectral)
    records = rd.read_metrics(out)
    head = net.NetworkSnapshot(state.model, data, cfg, state.epoch).head().to(dtype=torch.float64)
    K = head.config.K
    k = pre.full_hessian_k or K * K
    subset = (
        data
        if pre.full_hessian_per_class is None
        else data.first_per_class(min(pre.full_hessian_per_class, data.n))
    )
    comparison = full_hessian_comparison(state.model, subset, cfg, k, pre.hutchinson)
    results, final = _compare(head, l)
    verdict, thm6_notes = theorem6_verdict(comparison, K)
    T = HEAD_TOLERANCES
    over = over_training_results(records, K, l, T["eigvec_alignment"], gamma_tol=T["gamma"])
    # Equal outliers are a statement about an exact DNC point; the head's inputs are a
    # network's features, not free, and v2 §5 itself reports the counts preserved but the values
    # "not exactly equal": reported, not counted.
    unequal = (
        "out: equal outliers need an exact DNC point; the head's features are not free "
        "(v2 §5: counts preserved, values not exactly equal)"
    )
    over = [replace(r, scope=unequal) if "outlier ratio" in r.quantity else r for r in over]
    results += [*over, verdict]
    residue = training_residue(final, K)
    config = experiment_config(
        experiment,
        preset_name,
        training=cfg.to_dict(),
        layer=l,
        snapshots=pre.snapshots,
        full_hessian_k=k,
        hutchinson=pre.hutchinson,
        full_hessian_per_class=subset.n,
        images_per_class=data.n,
        tolerances=HEAD_TOLERANCES,
        rank_rtol=TRAINED_RANK_RTOL,
    )
    # No closed-form optimum here (the features are not free): the structural predictions'
    # numbers are the constants.
    S = {r.key: r.value for r in scalar_predictions(K, l)}
    constants = {
        "K": K,
        "outliers": S["hessian_outliers"],
        "gamma_cc": S["gamma_diagonal"],
        "deep_head_spike": full_hessian_prediction(K).value,
        "training_residue": residue,
    }
    write_results(out / "results.json", results, config=config, constants=constants)
    figures = _figures(
        out / "figures",
        experiment,
        records,
        spectral.snapshots,
        K,
        l,
        comparison,
        setting=f"K={K}, {cfg.dtype} training (head measured in float64), {state.epoch} epochs",
    )
    rel_se = comparison.full_fro_stderr / comparison.full_fro
    tables = [
        (departures_caption(experiment), departures_table(experiment, config)),
        (
            "Theorem 6: the full-network Hessian beside its head block (Frobenius-normalised)",
            write_table(
                out,
                "v2-thm6",
                ["quantity", "value"],
                [
                    ["images per class", subset.n],
                    ["parameters (whole network)", comparison.parameters],
                    ["parameters (head)", comparison.head_parameters],
                    ["||H||_F (Hutchinson)", comparison.full_fro],
                    ["  its standard error", comparison.full_fro_stderr],
                    ["  relative standard error", rel_se],
                    ["||H_WW||_F", comparison.head_fro],
                    ["off-head blocks / ||H_WW||_F", comparison.off_head_ratio],
                    [f"top {k}: H / ||H||_F, max", float(comparison.full[0])],
                    ["  its standard error", float(comparison.full[0]) * rel_se],
                    [f"top {k}: H_WW / ||H_WW||_F, max", float(comparison.head[0])],
                    ["predicted spike in the deep-head limit (1/K)", 1 / K],
                ],
            ),
        ),
    ]
    last = records[-1]
    report = Report(
        title=f"{experiment}: ResNet-20 + deep linear head, theory vs measurement",
        summary=(
            f"{cfg.dataset}, {data.n} images per class, K={K}; ResNet-20 (width x{cfg.width}) + "
            f"{cfg.L} bias-free linear layers of width {cfg.d}; MSE, lambda={cfg.lam} on the head, "
            f"lambda_H={cfg.lam_H} on the features; {cfg.epochs} epochs, lr {cfg.lr} halved at "
            f"{list(cfg.lr_halve_at)}, momentum {cfg.momentum}, batch "
            f"{cfg.batch_size or 'full'}, {cfg.dtype} (preset '{preset_name}'). Curvature in "
            f"float64 with BatchNorm in eval mode (running statistics). Head layer {l}. Final "
            f"accuracy {last['accuracy']:.4f}, loss {last['loss']:.6g}."
        ),
        figures=figures,
        tables=tables,
        notes=[
            "The head is not at a closed-form optimum (its input features are a network's "
            "output, not free), so the predictions compared are structural: counts, alignments "
            "and coefficients.",
            "Tolerances: " + ", ".join(f"{key} {v:g}" for key, v in T.items()) + " (counts "
            "exact). The training residue measured here says how far the head is from an "
            "exact DNC point: the top K^2 Hessian eigenvalues of head layer "
            f"{l} spread by std/mean = {residue['outlier_spread']:.3g} (0 at DNC) and the head "
            f"input has NC1 = {residue['nc1']:.3g}; the equalities of the theory can only hold "
            "approximately, and the tolerances are of the order of that residue. They are a "
            "choice, set above what the quick MNIST preset measured when it was tuned (min "
            "f_cc' 0.945, max |gamma_cc - 1/K| 0.012, effective ranks 98.8 of 100 and 10.4 of "
            "10), not derived from the theory.",
            "The setting departs from the paper's (table 'Departures from the paper'): the "
            "quick preset trains a few images per class, a narrower network and fewer epochs "
            "with momentum, in float32, to fit two CPU cores; its numbers say whether the "
            "structure appears at that scale, not what the paper's run measured.",
            *thm6_notes,
        ],
        results=results,
    )
    write_report(out, report)
    return report


# Tolerances of the structural rows. The head is not at an exact DNC point, so an equality of the
# theory holds only up to the training residue (:func:`training_residue`: the relative spread of
# the K^2 outliers, NC1 of the head input), which each report prints beside them. They are a
# choice, set above what the quick MNIST preset measured (training.network's preset note: min
# f_cc' 0.945, max |gamma_cc - 1/K| 0.012, effective ranks 98.8 of 100 and 10.4 of 10), not
# derived; the counts are exact.
HEAD_TOLERANCES: dict[str, float] = {
    "eigvec_alignment": 0.1,
    "gamma": 0.05,
    "nc1": 1e-2,
    "effective_rank": 0.2,
    "singular_vector_alignment": 0.1,
}


def training_residue(report: LayerReport, K: int) -> dict[str, float]:
    """How far the final head is from an exact DNC point, in the quantities the tolerances bound:
    ``outlier_spread`` (std / mean of the top ``K^2`` Hessian eigenvalues; 0 at DNC) and ``nc1``
    of the head input (0 at DNC)."""
    top = np.asarray(report.hessian_eigenvalues[: K * K], dtype=float)
    return {"outlier_spread": float(top.std() / top.mean()), "nc1": float(report.nc1)}


def _compare(head: DeepUFM, l: int) -> tuple[list[Result], LayerReport]:
    """The structural rows at the final state, from :func:`layer_report` of the head (never from
    probe rows) and the records of :func:`~deepufm.theory.predictions.scalar_predictions`."""
    K = head.config.K
    r = layer_report(head, l, full=True, rank_rtol=TRAINED_RANK_RTOL)
    S = {s.key: s for s in scalar_predictions(K, l)}
    T = HEAD_TOLERANCES
    gamma = np.asarray(r.gradient_coefficients)
    vals = torch.tensor(r.hessian_eigenvalues)
    knock = {key: torch.tensor(v) for key, v in r.knockout_eigenvalues.items()}
    w_vals = weight_gram(head, l).eigvalsh()
    Hs = head.features()
    left, right = singular_vector_alignment(
        head.W[l - 1], class_means(Hs[l], K), class_means(Hs[l - 1], K)
    )

    def count(values: torch.Tensor) -> int:
        return outlier_count(values, floor=TRAINED_RANK_RTOL)

    def row(quantity, key, measured, tol):
        return check(quantity, S[key], l, S[key].value, measured, tol)

    rows = [
        row(
            "min eigenvector alignment f_cc'",
            "eigvec_alignment",
            np.min(r.eigvec_alignment),
            T["eigvec_alignment"],
        ),
        # deviation from the record's 1/K: predicted 0, absolute tolerance
        check(
            "max |gamma_cc - 1/K|",
            S["gamma_diagonal"],
            l,
            0.0,
            np.abs(np.diag(gamma) - S["gamma_diagonal"].value).max(),
            T["gamma"],
        ),
        row(
            "max off-diagonal gamma_cc'",
            "gamma_off_diagonal",
            (gamma - np.diag(np.diag(gamma))).max(),
            T["gamma"],
        ),
        row("NC1 of the head input H_l", "nc1", r.nc1, T["nc1"]),
        row("Hessian outliers (log-gap rule)", "hessian_outliers", count(vals), 0),
        row(
            "outliers left by the G_cross knockout",
            "knockout_cross_outliers",
            count(knock["cross"]),
            0,
        ),
        row(
            "outliers left by the G_class knockout",
            "knockout_class_outliers",
            count(knock["class"]),
            0,
        ),
        row("weight outliers (log-gap rule)", "weight_outliers", count(w_vals), 0),
        row(
            "effective rank of H_l",
            "effective_rank_hessian",
            r.effective_rank_hessian,
            T["effective_rank"],
        ),
        row(
            "effective rank of W_l",
            "effective_rank_weight",
            r.effective_rank_weight,
            T["effective_rank"],
        ),
        row(
            "min singular-vector alignment (left)",
            "singular_vector_alignment",
            float(left.min()),
            T["singular_vector_alignment"],
        ),
        row(
            "min singular-vector alignment (right)",
            "singular_vector_alignment",
            float(right.min()),
            T["singular_vector_alignment"],
        ),
    ]
    return rows, r


# -- the Theorem 6 verdict -------------------------------------------------------------------------

# Theorem 6 is a limit statement (v2 §3.4; docs: Concepts › Where the code departs from or goes
# beyond the paper); a finite network is judged against it to 10 %, widened by two standard
# errors of the Hutchinson estimate of ||H||_F.
THEOREM6_TOL = 0.1


def theorem6_verdict(cmp: FullHessianComparison, K: int) -> tuple[Result, list[str]]:
    """The Theorem 6 row and its explanation, from the measured comparison.

    The row compares the top eigenvalue of ``H_full / ||H_full||_F`` with the deep-head limit
    ``1/K`` (the record :func:`~deepufm.theory.predictions.full_hessian_prediction`); its error
    bar is the Hutchinson standard error of ``||H_full||_F`` carried to the ratio (the same
    relative size). The hypothesis (the feature-map blocks a small perturbation of the head block,
    v2 §3.4) is judged by the measured ``||off-head||_F / ||H_WW||_F``: at 1 or more the row
    is out of scope. By Weyl's inequality every eigenvalue of ``H_full`` is within
    ``||off-head||_F`` of one of ``diag(0, H_WW)``, so the K^2 plateau of the head can show in the
    whole Hessian only when that is small against the head's spikes.
    """
    rec = full_hessian_prediction(K)
    rel_se = cmp.full_fro_stderr / cmp.full_fro
    top = float(cmp.full[0])
    ratio = cmp.off_head_ratio
    # d ratio / d ||H||_F = ||H||_F / (||H_WW||_F^2 ratio): the ratio's standard error
    ratio_se = cmp.full_fro * cmp.full_fro_stderr / (cmp.head_fro**2 * ratio) if ratio else 0.0
    tol = THEOREM6_TOL + 2 * rel_se
    res = check(
        "top eigenvalue of H_full / ||H_full||_F (K^2 plateau at 1/K)",
        rec,
        None,
        rec.value,
        top,
        tol,
        note=(
            f"± {top * rel_se:.2g} (Hutchinson standard error of ||H_full||_F, "
            f"{100 * rel_se:.1f} %); tolerance {THEOREM6_TOL:g} + 2 standard errors"
        ),
    )
    scope = "in"
    if ratio >= 1:
        scope = (
            f"out: {rec.label} needs the feature-map blocks small beside the head block "
            f"(measured ||off-head||_F / ||H_WW||_F = {ratio:.3g} ± {ratio_se:.2g})"
        )
    share = cmp.head_fro / cmp.full_fro
    head_top = float(cmp.head[0]) * share  # the head's top spike in units of ||H_full||_F
    notes = [
        f"Theorem 6 verdict: {'holds' if res.holds else 'does not hold'} "
        f"{'inside' if scope == 'in' else 'outside'} its hypothesis. The head block H_WW is a "
        f"fraction ||H_WW||_F / ||H_full||_F = {share:.2g} of the whole Hessian's norm (the "
        f"feature-map blocks {ratio:.3g} ± {ratio_se:.2g} times the head block). By Weyl's "
        "inequality the eigenvalues of H_full lie within ||off-head||_F of those of "
        "diag(0, H_WW), whose K^2 spikes are at most "
        f"{head_top:.2g} of ||H_full||_F: "
        + (
            "the off-head blocks swamp them, so H_full / ||H_full||_F shows no K^2 plateau at 1/K "
            "here; the deep-head limit (L -> infinity, L_F / L -> 0) is far from this network."
            if ratio >= 1
            else "the head's K^2 spikes dominate, as in the deep-head limit."
        ),
        f"The Frobenius norm of H_full is a Hutchinson estimate with a {100 * rel_se:.1f} % "
        "standard error, shown on the verdict row as its error bar.",
    ]
    return replace(res, scope=scope), notes


# -- figures ---------------------------------------------------------------------------------------

FIGURE_IDS = {
    "mnist-resnet": {"hessian": "v2-fig12", "weights": "v2-fig13"},
    "cifar-resnet": {"hessian": "v2-fig14", "weights": "v2-fig15"},
    "fashion-resnet": {"hessian": "v2-fig12", "weights": "v2-fig13"},
}


def _figures(
    fig_dir: Path,
    experiment: str,
    records,
    snaps,
    K: int,
    l: int,
    cmp: FullHessianComparison,
    setting: str = "",
) -> list[tuple[str, str, Path]]:
    """Every figure of the network experiment from the head-probe rows, the snapshots and the
    Theorem 6 comparison; captions state the claim, the layer and ``setting`` (the run's)."""
    figs, ids = [], FIGURE_IDS[experiment]
    last = records[-1]
    where = f"Head layer {l}; {experiment}" + (f", {setting}." if setting else ".")

    def add(fid, caption, fig):
        figs.append((fid, f"{caption} {where}", P.save(fig, fig_dir, fid)))

    ep, f = P.matrix_series(records, "eigvec_alignment")
    ep_g, g = P.matrix_series(records, "gradient_coefficients")
    fig, axes = P.new_figure(ncols=2, width=4.4)
    P.matrix_curves_panel(axes[0, 0], ep, f, f"f_cc' (head layer {l})", "f", 1.0, 1.0)
    P.matrix_curves_panel(axes[0, 1], ep_g, g, f"gamma_cc' (head layer {l})", "gamma", 1 / K, 0.0)
    gl = g[-1]
    add(
        "v2-fig6",
        f"v2 Fig. 6: eigenvector alignment f_cc' of the K^2 = {K * K} predicted vectors (-> 1; "
        f"min {f[-1].min():.4g} at epoch {ep[-1]}) and gradient coefficients gamma_cc' (diagonal "
        f"-> 1/K = {1 / K:.4g}, max |gamma_cc - 1/K| = {np.abs(np.diag(gl) - 1 / K).max():.3g}; "
        "off-diagonal -> 0).",
        fig,
    )
    ref = float(np.mean(last["hessian_eigenvalues"][: K * K]))
    add(
        ids["hessian"],
        f"Head-layer Hessian outliers and the G_cross / G_class knockouts at epoch "
        f"{last['epoch']}: K^2 = {K * K}, K = {K} and K(K-1) = {K * (K - 1)} outliers (counts "
        "preserved, values not exactly equal); dashed: mean of the top K^2.",
        P.top_eigenvalues_figure(
            last,
            [
                ("H_l", "hessian_eigenvalues", K * K),
                ("H_l - G_cross", "knockout_eigenvalues.cross", K),
                ("H_l - G_class", "knockout_eigenvalues.class", K * (K - 1)),
            ],
            ref,
            l,
            reference_label="mean of the top K^2",
        ),
    )
    add(
        ids["weights"],
        f"Spectrum of W_l^T W_l over training: K = {K} outliers (red rug) leave the bulk; "
        f"numerical zeros (|λ| ≤ {P.ZERO_RTOL:.0e}·λ_max) counted in each title.",
        P.spectra_over_epochs(snaps, "weight_gram", K, "W_l^T W_l", l, None, equalise=False),
    )
    rows = [r for r in records if "sv_align_left" in r]
    epochs = [r["epoch"] for r in rows]
    fig, axes = P.new_figure(ncols=2, width=4.4)
    mins = {}
    for ax, key, side in zip(axes[0], ("sv_align_left", "sv_align_right"), ("left", "right")):
        vals = np.asarray([r[key] for r in rows])
        mins[side] = vals[-1].min()
        P.curves_panel(
            ax,
            epochs,
            {"min over classes": vals.min(axis=1), "mean over classes": vals.mean(axis=1)},
            f"{side} singular vectors of W_l (layer {l}) vs class means",
            "f",
            reference=1.0,
        )
    add(
        "v2-fig16",
        "v2 Fig. 16: singular-vector alignment of W_l with the class means (-> 1; min "
        f"{mins['left']:.4g} left, {mins['right']:.4g} right at epoch {epochs[-1]}).",
        fig,
    )
    fig, axes = P.new_figure(ncols=2, width=4.4)
    eh = [r["effective_rank_hessian"] for r in rows]
    ew = [r["effective_rank_weight"] for r in rows]
    P.curves_panel(
        axes[0, 0],
        epochs,
        {"H_l": eh},
        f"effective rank of H_l (layer {l})",
        "effective rank",
        reference=K * K,
    )
    P.curves_panel(
        axes[0, 1],
        epochs,
        {"W_l": ew},
        f"effective rank of W_l (layer {l})",
        "effective rank",
        reference=K,
    )
    add(
        "v2-fig17",
        f"v2 Fig. 17: effective ranks of H_l (-> K^2 = {K * K}; {eh[-1]:.4g} at the end) and "
        f"W_l (-> K = {K}; {ew[-1]:.4g}).",
        fig,
    )
    fig, axes = P.new_figure(ncols=2, nrows=2, width=4.4, height=2.8, sharex=True)
    final_cv = {}
    for j, (key, count, name) in enumerate(
        (
            ("hessian_eigenvalues", K * K, f"top K^2 of H_l (layer {l})"),
            ("weight_singular_values", K, f"top K of W_l^T W_l (layer {l})"),
        )
    ):
        tops = np.asarray([r[key][:count] for r in rows])
        if key == "weight_singular_values":
            tops = tops**2  # eigenvalues of W^T W
        mean, std = tops.mean(axis=1), tops.std(axis=1)
        ax = axes[0, j]
        ax.plot(epochs, mean, color="C0", label="mean")
        # a linear axis: the band is drawn whole, never clipped
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.3, color="C0", label="± std")
        P.epoch_axis(ax)
        ax.set_xlabel("")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"outliers: {name}")
        cv = std / mean
        final_cv[name] = cv[-1]
        ax = axes[1, j]
        ax.plot(epochs, cv, color="C3", label="std / mean")
        P.epoch_axis(ax)
        ax.set_yscale("log")
        P.plain_log(ax.yaxis)
        ax.set_ylabel("std / mean")
        ax.set_title(f"relative spread, {cv[-1]:.3g} at epoch {epochs[-1]}")
    P.merged_legend(fig, axes[1], ncol=3)
    cvs = "; ".join(f"{v:.3g} for the {n}" for n, v in final_cv.items())
    add(
        "v2-fig18",
        "v2 Fig. 18: mean ± std of the outlier eigenvalues (linear axis, band unclipped) and "
        f"their relative spread std/mean on its own log axis; at epoch {epochs[-1]}: {cvs}.",
        fig,
    )
    fig, axes = P.new_figure(width=5.0)
    ax = axes[0, 0]
    idx = np.arange(1, len(cmp.full) + 1)
    ax.plot(idx, cmp.full, "o", ms=3, label="whole network, H / ||H||_F")
    ax.plot(idx, cmp.head, "x", ms=3, label="head block, H_WW / ||H_WW||_F")
    ax.axhline(1 / K, color="k", ls="--", lw=0.9, label=f"deep-head limit 1/K = {1 / K:.3g}")
    ax.set_yscale("log")
    P.plain_log(ax.yaxis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index")
    ax.set_ylabel("normalised eigenvalue")
    ax.set_title(f"Theorem 6: off-head blocks {cmp.off_head_ratio:.2f} x ||H_WW||_F")
    P.legend_below(ax)
    add(
        "v2-thm6",
        "Theorem 6: top eigenvalues of the whole-network Hessian and of the head block, each "
        f"divided by its Frobenius norm; the off-head blocks are {cmp.off_head_ratio:.3g} times "
        "the head block in Frobenius norm"
        + (
            ": far from the deep-head regime the theorem assumes, so no K^2 plateau is expected."
            if cmp.off_head_ratio > 1
            else "."
        ),
        fig,
    )
    return figs


__all__ = [
    "DATASETS",
    "HEAD_TOLERANCES",
    "THEOREM6_TOL",
    "FullHessianComparison",
    "Preset",
    "frobenius_estimate",
    "full_hessian_comparison",
    "head_probe",
    "preset",
    "run",
    "theorem6_verdict",
    "training_residue",
]

"""``linear-ufm``: the deep linear UFM with MSE loss — v1 Figs 3–8, 12–14; v2 Figs 1, 2, 7, 9.

Trains the v1 configuration (K=3, n=40, d=60, L=5, lambda=0.01, layer 3; n, d, L and lambda are
provisional stand-ins for v1 numbers lost in extraction, lr and initialisation the project's [U]
defaults: docs: Concepts › Provisional settings) with a spectral probe at layer ``l``, draws every
figure of the family, and compares the final state with every prediction at the optimum (docs:
Concepts › Predictions at the optimum (linear MSE)) at every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deepufm.experiments import plotting as P
from deepufm.experiments.checks import (
    OVER_TRAINING_TOL,
    TRAINED_RANK_RTOL,
    dnc_constants_record,
    layer_predictions,
    over_training_results,
)
from deepufm.experiments.departures import departures_caption, departures_table
from deepufm.experiments.probes import SpectralProbe
from deepufm.experiments.report import Report, markdown_table, write_report
from deepufm.experiments.results import experiment_config, write_results
from deepufm.experiments.runs import train_ufm
from deepufm.models.config import UFMConfig
from deepufm.theory import check_admissible, dnc_constants
from deepufm.theory.predictions import theorem_label
from deepufm.training.config import TrainConfig
from deepufm.training.probes import DEFAULT_PROBES


@dataclass(frozen=True)
class Preset:
    """The model, its training, the studied layer, the epochs whose full spectra are kept and
    the tolerance of the final-epoch checks."""

    model: UFMConfig
    training: TrainConfig
    layer: int
    snapshots: tuple[int, ...]
    tolerance: float


EARLY = (2, 3, 5, 7, 15, 20, 30, 50, 70, 150, 200, 300, 500, 700)


def preset(name: str) -> Preset:
    """``quick`` (6,000 epochs) or ``paper`` (100,000 epochs) of the v1 setting (provisional
    where v1's numbers were lost; docs: Concepts › Provisional settings)."""
    model = UFMConfig(K=3, n=40, d=60, L=5, lam=0.01, seed=0)
    if name == "paper":
        train_cfg = TrainConfig(lr=0.5, epochs=100_000, probes_per_decade=20, probe_at=EARLY)
        return Preset(model, train_cfg, 3, (0, 10, 100, 1000, 100_000), 1e-6)
    train_cfg = TrainConfig(lr=0.5, epochs=6000, probes_per_decade=12, probe_at=EARLY)
    return Preset(model, train_cfg, 3, (0, 10, 100, 1000, 6000), 1e-6)


def run(
    preset_name: str,
    out: Path,
    progress: bool = True,
    device: str | None = None,
    resume: bool = False,
) -> Report:
    """Train (or, with ``resume``, continue) the preset's model into ``out``, then measure."""
    pre = preset(preset_name)
    if device is not None:  # every model of the run (and its matrices) lives there
        pre = replace(pre, model=replace(pre.model, device=device))
    cfg, tcfg, l = pre.model, pre.training, pre.layer
    check_admissible(cfg)
    probe = SpectralProbe(layer=l, snapshot_epochs=pre.snapshots)
    result, records = train_ufm(out, cfg, tcfg, (*DEFAULT_PROBES, probe), progress, resume, probe)
    k = dnc_constants(cfg)
    figures = _figures(out / "figures", records, probe.snapshots, cfg, l, k)
    results = [
        *layer_predictions(result.model, k, pre.tolerance),
        *over_training_results(records, cfg.K, l, OVER_TRAINING_TOL),
    ]
    final_loss = float(result.model.total_loss())  # the final state, not a probe row
    config = experiment_config(
        "linear-ufm",
        preset_name,
        model=cfg.to_dict(),
        training=tcfg.to_dict(),
        layer=l,
        snapshots=pre.snapshots,
        tolerance=pre.tolerance,
        rank_rtol=TRAINED_RANK_RTOL,
    )
    write_results(out / "results.json", results, config=config, constants=dnc_constants_record(k))
    report = Report(
        title="Deep linear UFM (MSE): theory vs measurement",
        summary=(
            f"K={cfg.K}, n={cfg.n}, d={cfg.d}, L={cfg.L}, lambda={cfg.lam}, lr={tcfg.lr}, "
            f"{tcfg.epochs} epochs of full-batch gradient descent from N(0, 1/d) (preset "
            f"'{preset_name}'; v1's values, provisional where lost in extraction, lr and "
            "initialisation the project's choice: docs: Concepts › Provisional settings). "
            "Figures "
            f"show layer {l}; the table checks every layer at the final epoch and, at layer {l}, "
            f"the over-training claims of the figures (from the probe rows, to "
            f"{OVER_TRAINING_TOL:g}). Final loss {final_loss:.10g} (optimum {k.loss:.10g}). "
            "Departures from the paper's setting are in their table."
        ),
        figures=figures,
        tables=[
            (departures_caption("linear-ufm"), departures_table("linear-ufm", config)),
            (
                f"Constants ({theorem_label('threshold')}, {theorem_label('output_scale')}; "
                "docs: Concepts › Deep neural collapse)",
                markdown_table(
                    ["b", "b_crit", "c", "Lambda_l", "omega_l^2", "optimum loss"],
                    [[k.b, k.b_crit, k.c, k.hessian_eigenvalue[l - 1], k.omega2[l - 1], k.loss]],
                ),
            ),
        ],
        results=results,
    )
    write_report(out, report)
    return report


# -- figures ---------------------------------------------------------------------------------------


def _figures(
    fig_dir: Path, records, snaps, cfg: UFMConfig, l: int, k
) -> list[tuple[str, str, Path]]:
    """Every figure of the family from the probe rows and snapshots; captions state the claim,
    the layer and the run's setting (from ``cfg`` and the records), not literal numbers."""
    K, Lam, figs = cfg.K, k.hessian_eigenvalue[l - 1], []
    final_snap = max(snaps)
    last = records[-1]
    where = f"Layer {l}; {P.setting(cfg, last['epoch'])}."
    zeros = f"numerical zeros (|λ| ≤ {P.ZERO_RTOL:.0e}·λ_max) counted in each title, not drawn"

    def add(fid, caption, fig):
        figs.append((fid, f"{caption} {where}", P.save(fig, fig_dir, fid)))

    def ratio(key, count, epoch):
        top = np.sort(snaps[epoch][key])[::-1][:count]
        return top[0] / top[-1]

    ratios = ", ".join(f"{ratio('hessian', K * K, e):.4g} (epoch {e})" for e in sorted(snaps))
    add(
        "v1-fig3",
        f"Layer-Hessian spectrum over training: the bulk (histogram) vanishes and the top K^2 = "
        f"{K * K} outliers (red rug, multiplicity ×m) equalise at the predicted Lambda_l = "
        f"{Lam:.4g} (dashed); bottom row: the top K^2 over their mean, λ1/λ{K * K} = {ratios}; "
        f"{zeros}.",
        P.spectra_over_epochs(snaps, "hessian", K * K, "H_l", l, Lam),
    )
    ep, f = P.matrix_series(records, "eigvec_alignment")
    early = [i for i, e in enumerate(ep) if e <= 1000]
    fig, axes = P.new_figure(width=4.6)
    P.matrix_curves_panel(
        axes[0, 0],
        [ep[i] for i in early],
        f[early],
        f"f_cc' of mu'_c ⊗ mu_c' with H_l (layer {l})",
        "f",
        1.0,
        1.0,
    )
    add(
        "v1-fig4",
        f"Alignment f_cc' of the K^2 = {K * K} predicted eigenvectors with the layer Hessian over "
        f"the first {ep[early[-1]]} epochs (prediction 1; last drawn min "
        f"{f[early[-1]].min():.4g}).",
        fig,
    )
    ko = last["knockout_eigenvalues"]
    add(
        "v1-fig5",
        f"Top eigenvalues of the layer Hessian and of the G_within knockout at epoch "
        f"{last['epoch']}: removing G_within removes no outlier (both keep K^2 = {K * K} at "
        f"Lambda_l).",
        P.top_eigenvalues_figure(
            last,
            [
                ("H_l", "hessian_eigenvalues", K * K),
                ("H_l - G_within", "knockout_eigenvalues.within", K * K),
            ],
            Lam,
            l,
        ),
    )
    pairs = [
        ("H_l - G_cross", "knockout_eigenvalues.cross", K),
        ("H_l - G_class", "knockout_eigenvalues.class", K * (K - 1)),
    ]
    add(
        "v1-fig6",
        f"Knockouts at epoch {last['epoch']}: removing G_cross leaves K = {K} outliers, removing "
        f"G_class leaves K(K-1) = {K * (K - 1)}, all at Lambda_l = {Lam:.4g}; the largest "
        f"removed-direction eigenvalue left: {ko['cross'][K]:.2e} and "
        f"{ko['class'][K * (K - 1)]:.2e}.",
        P.top_eigenvalues_figure(last, pairs, Lam, l),
    )
    ep_g, g = P.matrix_series(records, "gradient_coefficients")
    fig, axes = P.new_figure(width=4.6)
    P.matrix_curves_panel(
        axes[0, 0], ep_g, g, f"gradient coefficients gamma_cc' (layer {l})", "gamma", 1 / K, 0.0
    )
    gl = g[-1]
    add(
        "v1-fig7",
        f"Gradient coefficients gamma_cc' in the natural basis: diagonal (blue) -> 1/K = "
        f"{1 / K:.4g}, off-diagonal (grey) -> 0; at epoch {ep_g[-1]} max |gamma_cc - 1/K| = "
        f"{np.abs(np.diag(gl) - 1 / K).max():.2e}, max off-diagonal "
        f"{(gl - np.diag(np.diag(gl))).max():.2e}.",
        fig,
    )
    w_ratio = ratio("weight_gram", K, final_snap)
    add(
        "v1-fig8",
        f"Spectrum of W_l^T W_l over training: K = {K} outliers at omega_l^2 = "
        f"{k.omega2[l - 1]:.4g} (dashed), λ1/λ{K} = {w_ratio:.4g} at epoch {final_snap}; "
        f"{zeros}.",
        P.spectra_over_epochs(snaps, "weight_gram", K, "W_l^T W_l", l, k.omega2[l - 1]),
    )
    gc = k.grad_cov_eigenvalue(l)
    add(
        "v1-fig12",
        f"Gradient covariance Sigma_g at epoch {final_snap}: K-1 = {K - 1} equal outliers at "
        f"(1-c)^2 Lambda_l = {gc:.4g}, then zeros.",
        P.scree_figure(
            snaps[final_snap]["grad_cov"],
            [(K - 1, f"K−1 = {K - 1} equal outliers", gc)],
            f"Sigma_g (layer {l}), epoch {final_snap}",
        ),
    )
    big, small = k.backprop_eigenvalues(l)
    add(
        "v1-fig13",
        f"Back-propagated errors Sigma_delta at epoch {final_snap}: K-1 = {K - 1} equal outliers "
        f"at {big:.4g} plus one small eigenvalue at {small:.4g}, then zeros.",
        P.scree_figure(
            snaps[final_snap]["backprop"],
            [(K - 1, f"K−1 = {K - 1} equal outliers", big), (1, "1 small eigenvalue", small)],
            f"Sigma_delta (layer {l}), epoch {final_snap}",
        ),
    )
    fg = k.feature_gram_eigenvalue(l)
    add(
        "v1-fig14",
        f"Feature Gram H_l H_l^T at epoch {final_snap}: K = {K} equal outliers at "
        f"n ||mu_l||^2 = {fg:.4g}, then zeros.",
        P.scree_figure(
            snaps[final_snap]["feature_gram"],
            [(K, f"K = {K} equal outliers", fg)],
            f"H_l H_l^T (layer {l}), epoch {final_snap}",
        ),
    )
    fig, axes = P.new_figure(ncols=2, width=4.4)
    P.matrix_curves_panel(axes[0, 0], ep, f, f"f_cc' (layer {l})", "f", 1.0, 1.0)
    P.matrix_curves_panel(axes[0, 1], ep_g, g, f"gamma_cc' (layer {l})", "gamma", 1 / K, 0.0)
    add(
        "v2-fig1",
        f"v2 Fig. 1: eigenvector alignment f_cc' (-> 1; min {f[-1].min():.6g} at epoch {ep[-1]}) "
        f"and gradient coefficients gamma_cc' (diagonal -> 1/K, off-diagonal -> 0) during "
        "training.",
        fig,
    )
    top = np.asarray(last["hessian_eigenvalues"][: K * K])
    add(
        "v2-fig2",
        f"v2 Fig. 2: the K^2 = {K * K} Hessian outliers converge to one value, Lambda_l = "
        f"{Lam:.4g}; right: their spread λ1/λ{K * K} − 1, {top[0] / top[-1] - 1:.2e} at epoch "
        f"{last['epoch']}.",
        P.outlier_curves_figure(
            records, "hessian_eigenvalues", K * K, f"top K^2 eigenvalues of H_l (layer {l})", Lam
        ),
    )
    add(
        "v2-fig7",
        f"v2 Fig. 7: W_l^T W_l spectra over training: K = {K} outliers converge to omega_l^2 = "
        f"{k.omega2[l - 1]:.4g}, the rest to 0; {zeros}.",
        P.spectra_over_epochs(
            snaps, "weight_gram", K, "W_l^T W_l", l, k.omega2[l - 1], equalise=False
        ),
    )
    add(
        "v2-fig9",
        f"v2 Fig. 9 at epoch {last['epoch']}: the K^2 = {K * K} Hessian outliers (left) and the "
        f"G_cross and G_class knockouts, which keep K = {K} and K(K-1) = {K * (K - 1)} of them.",
        P.top_eigenvalues_figure(last, [("H_l", "hessian_eigenvalues", K * K), *pairs], Lam, l),
    )
    return figs


__all__ = ["Preset", "preset", "run"]

"""``linear-ufm``: the deep linear UFM with MSE loss — v1 Figs 3–8, 12–14; v2 Figs 1, 2, 7, 9.

Trains the v1 configuration (THEORY §10: K=3, n=40, d=60, L=5, lambda=0.01, layer 3; lr and
initialisation are the provisional [U] defaults) with a spectral probe at layer ``l``, draws every
figure of the family, and compares the final state with every prediction of THEORY §6 at every
layer.
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
    """``quick`` (6,000 epochs) or ``paper`` (100,000 epochs) of the THEORY §10 v1 setting."""
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
            f"'{preset_name}'; THEORY §10 v1 values, lr and initialisation provisional). Figures "
            f"show layer {l}; the table checks every layer at the final epoch and, at layer {l}, "
            f"the over-training claims of the figures (from the probe rows, to "
            f"{OVER_TRAINING_TOL:g}). Final loss {final_loss:.10g} (optimum {k.loss:.10g}). "
            "Departures from the paper's setting are in their table."
        ),
        figures=figures,
        tables=[
            (departures_caption("linear-ufm"), departures_table("linear-ufm", config)),
            (
                "Constants (THEORY §4.2)",
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
    K, Lam, figs = cfg.K, k.hessian_eigenvalue[l - 1], []
    final_snap = max(snaps)
    last = records[-1]

    def add(fid, caption, fig):
        figs.append((fid, caption, P.save(fig, fig_dir, fid)))

    add(
        "v1-fig3",
        f"Layer-{l} Hessian spectrum: bulk (histogram) and the top K^2 = {K * K} outliers at several "
        "epochs; dashed: predicted Lambda_l.",
        P.spectra_over_epochs(snaps, "hessian", K * K, "H_l", Lam),
    )
    ep, f = P.matrix_series(records, "eigvec_alignment")
    early = [i for i, e in enumerate(ep) if e <= 1000]
    fig, axes = P.new_figure()
    P.curves_panel(
        axes[0, 0],
        [ep[i] for i in early],
        {k_: v[early] for k_, v in f.items()},
        f"alignment f_cc' of mu'_c ⊗ mu_c' with H_l (layer {l})",
        "f",
        reference=1.0,
    )
    add(
        "v1-fig4",
        "Alignment of the K^2 predicted eigenvectors with the layer Hessian over early training.",
        fig,
    )
    add(
        "v1-fig5",
        "Top eigenvalues of the layer Hessian and of the G_within knockout (no outlier removed).",
        P.top_eigenvalues_figure(
            last,
            [
                ("H_l", "hessian_eigenvalues", None),
                ("H_l - G_within", "knockout_eigenvalues.within", None),
            ],
            Lam,
        ),
    )
    pairs = [
        ("H_l - G_cross", "knockout_eigenvalues.cross", K),
        ("H_l - G_class", "knockout_eigenvalues.class", K * (K - 1)),
    ]
    add(
        "v1-fig6",
        "Knockouts: removing G_cross leaves K outliers, removing G_class leaves K(K-1).",
        P.top_eigenvalues_figure(last, pairs, Lam),
    )
    ep_g, g = P.matrix_series(records, "gradient_coefficients")
    fig, axes = P.new_figure()
    P.curves_panel(
        axes[0, 0],
        ep_g,
        g,
        f"gradient coefficients gamma_cc' (layer {l})",
        "gamma",
        reference=1 / K,
    )
    add(
        "v1-fig7",
        "Gradient coefficients in the natural basis: diagonal -> 1/K, off-diagonal -> 0.",
        fig,
    )
    add(
        "v1-fig8",
        f"Spectrum of W_l^T W_l: K = {K} outliers at omega_l^2.",
        P.spectra_over_epochs(snaps, "weight_gram", K, "W^T W", k.omega2[l - 1]),
    )

    def one(key, n_out, title, predicted):
        fig, axes = P.new_figure()
        vals = np.clip(snaps[final_snap][key], 0, None)
        P.spectrum_panel(axes[0, 0], vals, n_out, title, predicted)
        return fig

    add(
        "v1-fig12",
        "Gradient covariance: K-1 equal outliers at (1-c)^2 Lambda_l (log scale).",
        one("grad_cov", K - 1, f"Sigma_g, epoch {final_snap}", k.grad_cov_eigenvalue(l)),
    )
    big, small = k.backprop_eigenvalues(l)
    fig = one("backprop", K, f"Sigma_delta, epoch {final_snap}", big)
    fig.axes[0].axvline(small, color="k", ls=":", lw=0.9, label=f"predicted small {small:.4g}")
    fig.axes[0].legend()
    add(
        "v1-fig13",
        "Back-propagated errors: K-1 equal outliers plus one small eigenvalue (log scale).",
        fig,
    )
    add(
        "v1-fig14",
        "Feature Gram H_l H_l^T: K equal outliers at n ||mu_l||^2.",
        one("feature_gram", K, f"H_l H_l^T, epoch {final_snap}", k.feature_gram_eigenvalue(l)),
    )
    fig, axes = P.new_figure(ncols=2)
    P.curves_panel(axes[0, 0], ep, f, "f_cc' during training", "f", reference=1.0)
    P.curves_panel(axes[0, 1], ep_g, g, "gamma_cc' during training", "gamma", reference=1 / K)
    add(
        "v2-fig1",
        "v2 Fig. 1: eigenvector alignment f_cc' and gradient coefficients gamma_cc' during training.",
        fig,
    )
    add(
        "v2-fig2",
        "v2 Fig. 2: the K^2 Hessian outliers converge to one value.",
        P.outlier_curves_figure(
            records, "hessian_eigenvalues", K * K, f"top K^2 eigenvalues of H_l (layer {l})", Lam
        ),
    )
    add(
        "v2-fig7",
        "v2 Fig. 7: W_l^T W_l spectra over training.",
        P.spectra_over_epochs(snaps, "weight_gram", K, "W^T W", k.omega2[l - 1]),
    )
    add(
        "v2-fig9",
        "v2 Fig. 9: Hessian outliers with the G_cross and G_class knockouts.",
        P.top_eigenvalues_figure(last, pairs, Lam),
    )
    return figs


__all__ = ["Preset", "preset", "run"]

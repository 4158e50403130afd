"""``ce-ufm``: the deep linear UFM with cross-entropy — the Theorem 9 spectrum (THEORY §8).

Gradient descent reaches the CE DNC critical point for K=3 (THEORY §8: K <= 3, or small lambda),
where the layer Hessian has K spikes — one dominant, ``lambda0[1+(1-K eps)(K-1)]``, and ``K-1`` at
``lambda0[1+(1-K eps)(K-2)]`` — over a mini-bulk of ``K^2-3K+1`` at ``lambda0 = alpha lam_l / K``,
rank ``(K-1)^2``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from deepufm.experiments import plotting as P
from deepufm.experiments.checks import TRAINED_RANK_RTOL
from deepufm.experiments.report import Report, markdown_table, write_report
from deepufm.experiments.results import (
    Result,
    compare,
    experiment_config,
    plain,
    write_results,
)
from deepufm.experiments.runs import train_ufm
from deepufm.matrices import layer_hessian, numerical_rank
from deepufm.models.config import UFMConfig
from deepufm.theory import ce_constants, check_admissible
from deepufm.training.config import TrainConfig
from deepufm.training.probes import DEFAULT_PROBES


def preset(name: str) -> tuple[UFMConfig, TrainConfig, float]:
    model = UFMConfig(K=3, n=10, d=8, L=3, lam=0.01, loss="ce", seed=0)
    epochs = 200_000 if name == "paper" else 20_000
    return model, TrainConfig(lr=1.0, epochs=epochs, probes_per_decade=10), 1e-6


def run(
    preset_name: str,
    out: Path,
    progress: bool = True,
    device: str | None = None,
    resume: bool = False,
) -> Report:
    """Train (or, with ``resume``, continue) the preset's model into ``out``, then measure."""
    cfg, tcfg, tol = preset(preset_name)
    if device is not None:
        cfg = replace(cfg, device=device)
    check_admissible(cfg)
    result, records = train_ufm(out, cfg, tcfg, DEFAULT_PROBES, progress, resume)
    model, k, K = result.model, ce_constants(cfg), cfg.K
    Z = model.output().reshape(K, K, cfg.n).mean(dim=2)  # logit class means, (K outputs, K classes)
    alpha_measured = float(Z.diagonal().mean() - (Z.sum() - Z.diagonal().sum()) / (K * (K - 1)))
    results: list[Result] = [
        compare("total loss", "v2 Def. 3 / §8", None, k.loss, records[-1]["loss"], tol),
        compare("logit scale alpha", "v2 eq. 9", None, k.alpha, alpha_measured, tol),
    ]
    spectra = {}
    for l in range(1, cfg.L + 1):
        vals = layer_hessian(model, l).eigvalsh().cpu().numpy()
        spectra[l] = vals
        pred, mult = k.hessian_spectrum(l)
        start = 0
        for j, (v, m) in enumerate(zip(pred, mult)):
            block = vals[start : start + m]
            label = ("dominant spike", f"{K - 1} spikes", "mini-bulk")[j]
            results.append(
                compare(
                    f"Hessian {label} (mean of {m})", "v2 Thm 9", l, v, float(block.mean()), tol
                )
            )
            start += m
        rank = numerical_rank(torch.from_numpy(vals), rtol=TRAINED_RANK_RTOL)
        results.append(compare("Hessian rank", "v2 Thm 9", l, (K - 1) ** 2, rank, 0))
    config = experiment_config(
        "ce-ufm",
        preset_name,
        model=cfg.to_dict(),
        training=tcfg.to_dict(),
        tolerance=tol,
        rank_rtol=TRAINED_RANK_RTOL,
    )
    spectrum = [k.hessian_spectrum(l) for l in range(1, cfg.L + 1)]
    constants = plain(k) | {
        "hessian_spectrum": [{"eigenvalues": v, "multiplicities": m} for v, m in spectrum]
    }
    write_results(out / "results.json", results, config=config, constants=constants)
    figures = _figures(out / "figures", spectra, cfg, k, records[-1]["epoch"])
    report = Report(
        title="Deep linear UFM (cross-entropy): the Theorem 9 spectrum",
        summary=(
            f"K={K}, n={cfg.n}, d={cfg.d}, L={cfg.L}, lambda={cfg.lam}, lr={tcfg.lr}, {tcfg.epochs} "
            f"epochs (preset '{preset_name}'). Final loss {records[-1]['loss']:.10g}, CE DNC "
            f"loss {k.loss:.10g}."
        ),
        figures=figures,
        tables=[
            (
                "Constants (THEORY §8)",
                markdown_table(
                    ["alpha", "eps", "lambda0 (layer 1)"], [[k.alpha, k.eps, k.lambda0[0]]]
                ),
            )
        ],
        notes=[
            "For K >= 4 with L >= 3 (or K >= 6, L = 2) the CE DNC point is not the global minimum "
            "(Garrod & Keating 2024); gradient descent then finds a lower-loss, lower-rank solution. "
            "Observed here as well for K=4, L=2, n=10, d=8, lambda=0.01."
        ],
        results=results,
    )
    write_report(out, report)
    return report


def _figures(fig_dir: Path, spectra: dict, cfg: UFMConfig, k, epochs: int):
    """``ce-thm9``: each layer's top eigenvalues on a linear axis (the three predicted levels a
    factor ~3 apart stay apart), the predicted levels as lines with their multiplicities, the
    zeros after rank ``(K-1)^2`` drawn at 0."""
    K = cfg.K
    fig, axes = P.new_figure(ncols=cfg.L, width=3.4)
    names = ("dominant spike", f"{K - 1} spikes", f"mini-bulk of {K * K - 3 * K + 1}")
    colours = (P.OUTLIER_COLOUR, P.SECOND_COLOUR, "C0")
    for ax, (l, vals) in zip(axes[0], spectra.items()):
        pred, mult = k.hessian_spectrum(l)
        top = np.asarray(vals[: (K - 1) ** 2 + 3], dtype=np.float64)
        start = 0
        for v, m, name, colour in zip(pred, mult, names, colours):
            idx = np.arange(start, min(start + m, len(top)))
            ax.plot(idx + 1, top[idx], "o", color=colour, label=f"{name} (×{m})")
            ax.axhline(v, color=colour, ls="--", lw=0.8, label=f"predicted {name}")
            start += m
        rest = np.arange(start, len(top))
        ax.plot(rest + 1, top[rest], "v", color=P.ZERO_COLOUR, label="zeros")
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        rank = numerical_rank(torch.from_numpy(np.asarray(vals)), rtol=TRAINED_RANK_RTOL)
        ax.set_title(f"H_l (layer {l}), epoch {epochs}: rank {rank}")
    P.merged_legend(fig, axes[0], ncol=3)
    caption = (
        "Theorem 9: layer-Hessian spectra of the trained CE model on a linear axis: one dominant "
        f"spike, K-1 = {K - 1} spikes and a mini-bulk of K^2-3K+1 = {K * K - 3 * K + 1} (dashed: "
        f"predicted), then zeros (rank (K-1)^2 = {(K - 1) ** 2}). Every layer; "
        f"{P.setting(cfg, epochs)}, cross-entropy."
    )
    return [("ce-thm9", caption, P.save(fig, fig_dir, "ce-thm9"))]

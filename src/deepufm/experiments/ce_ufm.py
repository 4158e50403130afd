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
    fig, axes = P.new_figure(ncols=cfg.L)
    for ax, (l, vals) in zip(axes[0], spectra.items()):
        pred, _ = k.hessian_spectrum(l)
        top = vals[: (K - 1) ** 2 + 3]
        ax.semilogy(range(1, len(top) + 1), np.clip(top, 1e-18, None), "o", label="measured")
        for v, style in zip(pred, ("-", "--", ":")):
            ax.axhline(v, color="k", ls=style, lw=0.8, label=f"predicted {v:.4g}")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"layer {l}: K spikes over a mini-bulk")
        ax.legend(fontsize=7)
    figures = [
        (
            "ce-thm9",
            "Layer-Hessian spectra of the trained CE model: one dominant spike, K-1 spikes "
            "and a mini-bulk of K^2-3K+1, then zeros (rank (K-1)^2).",
            P.save(fig, out / "figures", "ce-thm9"),
        )
    ]
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

"""``Analysis.write``: ``results.json``, the paper's kind of figures for this model, ``report.html``.

Figures (PNG under ``figures/``): one per layer with the layer-Hessian top eigenvalues, the outlier
count and the Papyan knockouts (v2 Figs 9-10, 12), the weight spectrum ``W^T W`` (v2 Fig. 13) and
the ``f_cc'`` and ``gamma_cc'`` matrices (v1 Figs 4, 7 at one point); and over the layers the
effective ranks of ``H_l`` and ``W_l`` against ``K^2`` and ``K`` (v2 Fig. 17); when requested,
the full-network Hessian's spectral density (SLQ) with its certified top eigenvalues as a rug
(v2 §5, Theorem 6's full-network spectrum). Top-k eigenproblems that could not be certified are
listed in the report's notes.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from deepufm.errors import ConfigError
from deepufm.experiments import plotting as P
from deepufm.experiments.report import Report, markdown_table, write_report

MARKER = ".deepufm-analysis"
OUTPUTS = ("figures", "results.json", "report.md", "report.html", MARKER)


def check_out_dir(out: Path, param: str = "out_dir") -> None:
    """Refuse, before anything is computed or written, an ``out`` that :func:`prepare_out_dir`
    would refuse (``param`` names it in the message: ``--out`` on the command line)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(param, str(out), "a folder (this is a file)")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not (out / MARKER).exists():
        raise ConfigError(
            param,
            str(out),
            "a new or empty folder, or one written by an earlier deepufm analysis",
            "It holds other files; nothing was written.",
        )
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if extra:
        raise ConfigError(
            param,
            str(out),
            "a folder holding only deepufm analysis outputs",
            f"It also holds {extra[:5]}; nothing was written.",
        )
    figures = out / "figures"
    if figures.exists():
        # only the figures the marker lists are ours: a user's file there is never deleted
        ours = set((out / MARKER).read_text().splitlines()[1:])
        entries = list(figures.iterdir()) if figures.is_dir() else [figures]
        foreign = sorted(f.name for f in entries if f.is_dir() or f"figures/{f.name}" not in ours)
        if foreign or not figures.is_dir():
            raise ConfigError(
                param,
                str(out),
                "a folder holding only deepufm analysis outputs",
                f"Its figures/ also holds {foreign[:5]}, which this analysis did not write; "
                "nothing was written.",
            )


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, accept an existing empty folder or one an earlier analysis wrote (its
    outputs are replaced); refuse anything else rather than mix files or delete a user's."""
    check_out_dir(out)
    figures = out / "figures"
    if figures.is_dir():
        for f in figures.iterdir():
            f.unlink()
        figures.rmdir()
    if out.is_dir():
        for name in OUTPUTS[1:]:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # a header line, then (save_png) every figure written, the files a later write may replace
    (out / MARKER).write_text("written by deepufm.analyze (Analysis.write)\n")


def write_analysis(analysis, out: Path) -> Path:
    """Everything into ``out`` (module docstring); returns the path of ``report.html``."""
    prepare_out_dir(out)
    (out / "results.json").write_text(analysis.to_json() + "\n")
    cfg, layers = analysis.config, analysis.layers
    figures = _figures(out / "figures", cfg["K"], layers)
    network = analysis.network
    if network is not None:
        figures.append(_network_figure(out / "figures", network))
    rows = [
        [
            r["name"],
            f"{r['d_in']}->{r['d_out']}" + (" +b" if r["bias"] else ""),
            r["hessian_route"].split(":")[0],
            r["outlier_count"],
            r["hessian_rank"],
            f"{r['papyan_ranks']['class']}/{r['papyan_ranks']['cross']}/{r['papyan_ranks']['within']}",
            float(np.min(r["eigvec_alignment"])),
            float(np.max(np.abs(np.diag(r["gradient_coefficients"]) - 1 / cfg["K"]))),
            r["nc1"] if r["nc1"] is not None else float("nan"),
            r["effective_rank_hessian"],
            r["effective_rank_weight"],
        ]
        for r in analysis.to_dict()["layers"]
    ]
    table = markdown_table(
        [
            "layer",
            "shape",
            "route",
            "outliers",
            "rank",
            "Papyan class/cross/within",
            "min f",
            "max |γ_cc - 1/K|",
            "NC1",
            "erank H",
            "erank W",
        ],
        rows,
    )
    report = Report(
        title=f"deepufm analysis of {cfg['model']}",
        summary=(
            f"{cfg['N']} samples, K={cfg['K']} classes (sizes {cfg['class_counts']}), loss "
            f"{cfg['loss_definition']} = {cfg['data_loss']:.6g}, accuracy {cfg['accuracy']:.4f}; "
            f"{cfg['dtype']} on {cfg['device']}, eval mode. Layers in forward order: "
            f"{', '.join(cfg['layers'])}. The paper predicts, at deep neural collapse, K^2 = "
            f"{cfg['K'] ** 2} Hessian outliers, knockouts leaving K(K-1) (class) and K (cross), "
            f"f = 1, gamma_cc = 1/K, W of rank K, NC1 -> 0."
        ),
        figures=figures,
        tables=[("Per layer", table)],
        notes=[f"{k}: {v}" for k, v in cfg["conventions"].items()]
        + [f"{r['name']}: {r['hessian_route']}" for r in layers]
        + _uncertified_notes(layers, network),
    )
    _, html = write_report(out, report)
    return html


def _uncertified_notes(layers, network: dict | None) -> list[str]:
    """One warning per top-k eigenproblem whose certificate failed (never used silently)."""
    notes = []
    for r in layers:
        for key in r.get("uncertified", []):
            c = r["certificates"][key]
            notes.append(
                f"WARNING {r['name']}: the top {c['k']} of {key} by {c['method']} are NOT "
                f"certified ({c['reason']}); treat those numbers as estimates."
            )
    top = (network or {}).get("topk")
    if top is not None and not top["certificate"]["certified"]:
        c = top["certificate"]
        notes.append(
            f"WARNING network Hessian: the top {c['k']} by {c['method']} are NOT certified "
            f"({c['reason']})."
        )
    return notes


def _network_figure(fig_dir: Path, network: dict) -> tuple[str, str, Path]:
    """The full-network Hessian: SLQ density (log scale) with the top-k as a rug, or the top-k
    by index when no density was requested."""
    fig, axes = P.new_figure(ncols=1)
    ax = axes[0, 0]
    top = network.get("topk")
    dens = network.get("density")
    if dens is not None:
        grid, phi = np.asarray(dens["grid"]), np.asarray(dens["density"], dtype=np.float64)
        floor = 1e-12 * float(phi.max()) if phi.size and phi.max() > 0 else 1e-300
        ax.semilogy(grid, np.clip(phi, floor, None), color="C0", lw=1.0, label="SLQ density")
        if top is not None:
            vals = np.asarray(top["eigenvalues"], dtype=np.float64)
            state = "certified" if top["certificate"]["certified"] else "NOT certified"
            label = f"top {len(vals)} ({state})"
            ax.plot(vals, np.full_like(vals, floor * 10), "|", color="C3", ms=12, label=label)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        caption = (
            f"Full-network Hessian ({network['parameters']} parameters): eigenvalue density by "
            f"stochastic Lanczos quadrature ({dens['probes']} probes, {dens['lanczos_steps']} "
            f"steps, sigma = {dens['sigma']:.3g})"
            + ("; the top eigenvalues as a rug." if top is not None else ".")
        )
    else:
        vals = np.asarray(top["eigenvalues"], dtype=np.float64)
        ax.plot(np.arange(1, len(vals) + 1), vals, "o", ms=3.5, mfc="none")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        caption = (
            f"Full-network Hessian ({network['parameters']} parameters): its top {len(vals)} "
            "eigenvalues."
        )
    ax.set_title("full-network Hessian")
    if dens is not None:
        ax.legend()
    return ("network-hessian", caption, save_png(fig, fig_dir, "network-hessian"))


def save_png(fig, fig_dir: Path, name: str) -> Path:
    """``name.png`` only (PDFs double the time, and a user's analysis may have many layers)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    marker = fig_dir.parent / MARKER
    if marker.exists():  # listed before it exists: a later write may replace it, even after a crash
        with marker.open("a") as f:
            f.write(f"{fig_dir.name}/{name}.png\n")
    with plt.rc_context(P.STYLE):
        fig.tight_layout()
        fig.savefig(fig_dir / f"{name}.png")
    plt.close(fig)
    return fig_dir / f"{name}.png"


def _figures(fig_dir: Path, K: int, layers) -> list[tuple[str, str, Path]]:
    """The per-layer figures and the effective ranks over the layers (module docstring)."""
    figs = []

    def add(fid, caption, fig):
        """Save ``fig`` as ``fid.png`` and list it with its caption."""
        figs.append((fid, caption, save_png(fig, fig_dir, fid)))

    for r in layers:
        name = r["name"]
        fig, axes = P.new_figure(ncols=2, nrows=2, width=4.4, height=3.4)
        ax = axes[0, 0]
        series = [("H", r["hessian_eigenvalues"], "o")]
        series += [
            (f"G - G_{k}", v, m) for (k, v), m in zip(r["knockout_eigenvalues"].items(), "sx^")
        ]
        top = max(abs(x) for _, v, _ in series for x in v) or 1.0
        for label, vals, marker in series:
            # a log axis down to round-off only: exact zeros would stretch it over 300 decades
            v = np.clip(np.asarray(vals, dtype=np.float64), 1e-16 * top, None)
            ax.semilogy(np.arange(1, len(v) + 1), v, marker, ms=3.5, mfc="none", label=label)
        shown = max(len(v) for _, v, _ in series)
        if r["outlier_count"] < shown:
            ax.axvline(r["outlier_count"] + 0.5, color="C3", ls=":", lw=0.9, label="outliers")
        else:  # a line far right of the plotted top k would squeeze them against the axis
            ax.plot([], [], " ", label=f"outliers: {r['outlier_count']} (> {shown} shown)")
        ax.axvline(K * K + 0.5, color="k", ls="--", lw=0.8, label=f"K^2 = {K * K}")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"{name}: layer Hessian and knockouts")
        # below the axes: wherever it sits inside, some spectrum runs under it
        ax.legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small")
        sv2 = np.asarray(r["weight_singular_values"]) ** 2
        P.spectrum_panel(axes[0, 1], sv2, K, f"{name}: eigenvalues of W^T W")
        for ax, key, title in (
            (axes[1, 0], "eigvec_alignment", "f_cc' (eigenvector alignment)"),
            (axes[1, 1], "gradient_coefficients", "γ_cc' (gradient coefficients)"),
        ):
            mat = np.asarray(r[key], dtype=np.float64)
            im = ax.imshow(mat, vmin=0, vmax=1 if key == "eigvec_alignment" else None)
            ax.figure.colorbar(im, ax=ax)
            ax.set_xlabel("c' (input class mean)")
            ax.set_ylabel("c (output class mean)")
            ax.set_title(title)
            ax.grid(False)
        add(
            f"layer-{name}",
            f"{name}: top eigenvalues of the layer Hessian (outliers by the log-gap rule) and of "
            "the Gauss–Newton knockouts G - G_X; the spectrum of W^T W (top K marked); f_cc' "
            "(-> 1 at collapse) and γ_cc' (-> I/K) in the basis mu'_c ⊗ [mu_c'; 1].",
            fig,
        )
    fig, axes = P.new_figure(ncols=2)
    x = np.arange(len(layers))
    names = [r["name"] for r in layers]
    for ax, key, ref, title in (
        (axes[0, 0], "effective_rank_hessian", K * K, "effective rank of H_l"),
        (axes[0, 1], "effective_rank_weight", K, "effective rank of W_l"),
    ):
        ax.bar(x, [r[key] for r in layers], color="C0")
        ax.axhline(ref, color="k", ls="--", lw=0.9, label=f"collapse limit {ref}")
        ax.set_xticks(x, names, rotation=30)
        ax.set_title(title)
        ax.legend()
    add("effective-ranks", "Effective ranks per layer against K^2 (Hessian) and K (weights).", fig)
    return figs


def read_results(out: Path) -> dict:
    """``results.json`` of an analysis folder."""
    return json.loads((Path(out) / "results.json").read_text())

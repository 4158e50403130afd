"""Figure helpers shared by the experiments: one style, PNG + PDF, log scales where they matter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never needs a display
import matplotlib.pyplot as plt
import numpy as np

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False
        )
    return fig, axes


def save(fig, out_dir: Path, name: str) -> Path:
    """Write ``name.png`` and ``name.pdf`` into ``out_dir``, each atomically; returns the PNG
    path."""
    from deepufm.training.rundir import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with plt.rc_context(STYLE):
            fig.tight_layout()
            for fmt in ("png", "pdf"):
                atomic_write(
                    out_dir / f"{name}.{fmt}", lambda f, fmt=fmt: fig.savefig(f, format=fmt)
                )
    finally:
        plt.close(fig)
    return out_dir / f"{name}.png"


def spectrum_panel(
    ax,
    eigenvalues: np.ndarray,
    n_outliers: int,
    title: str,
    predicted: float | None = None,
    log: bool = True,
) -> None:
    """A spectrum as the paper draws it: the bulk as a histogram, the top outliers as spikes.

    Eigenvalues below ``1e-14 * max`` are counted as the bulk at zero and reported in the legend.
    """
    vals = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    top = vals[:n_outliers]
    rest = vals[n_outliers:]
    floor = 1e-14 * max(abs(vals[0]), 1e-300)
    zeros = int(np.sum(np.abs(rest) <= floor))
    bulk = rest[np.abs(rest) > floor]
    if log:
        pos = bulk[bulk > 0]
        if pos.size:
            bins = np.logspace(
                np.log10(pos.min()),
                np.log10(max(pos.max(), top.min() if top.size else pos.max())),
                40,
            )
            ax.hist(pos, bins=bins, color="0.6", label=f"bulk ({pos.size})")
        ax.set_xscale("log")
        ax.set_yscale("log")
    elif bulk.size:
        ax.hist(bulk, bins=40, color="0.6", label=f"bulk ({bulk.size})")
    ax.vlines(
        top, 0.8, 1.0 * max(1, len(top)), colors="C3", lw=1.2, label=f"top {len(top)} outliers"
    )
    if predicted is not None:
        ax.axvline(predicted, color="k", ls="--", lw=0.9, label=f"predicted {predicted:.4g}")
    if log and top.size and top.min() > 0:
        # keep at least a decade either side of the outliers, so equal spikes stay readable
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, top.min() / 10), max(hi, top.max() * 10))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    ax.set_title(title + (f"  [+{zeros} at 0]" if zeros else ""))
    ax.legend(loc="best")


def curves_panel(
    ax,
    epochs: Sequence[int],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    reference: float | None = None,
    ylog: bool = False,
) -> None:
    """Curves over log-scaled epochs (epoch 0 drawn at 1/2), with an optional predicted line."""
    x = np.maximum(np.asarray(epochs, dtype=np.float64), 0.5)
    for label, y in series.items():
        ax.plot(x, y, lw=1.1, label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.9, label=f"predicted {reference:.4g}")
    ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) <= 12:
        ax.legend(loc="best", ncol=2 if len(series) > 4 else 1)


# -- figures shared by the UFM experiments ----------------------------------------------------------


def matrix_series(records: Sequence[dict], key: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """Epochs and one curve per entry ``(a,b)`` of the K x K matrix ``key`` in the records
    (probe rows of ``metrics.jsonl``) that hold it; labels are 1-based like the paper's."""
    rows = [r for r in records if key in r]
    mats = np.asarray([r[key] for r in rows])
    K = mats.shape[1]
    curves = {f"({a + 1},{b + 1})": mats[:, a, b] for a in range(K) for b in range(K)}
    return [r["epoch"] for r in rows], curves


def spectra_over_epochs(
    snapshots: dict[int, dict[str, np.ndarray]],
    key: str,
    n_outliers: int,
    title: str,
    predicted: float | None,
):
    """One spectrum panel per snapshot epoch for the spectrum ``key``."""
    epochs = sorted(snapshots)
    fig, axes = new_figure(ncols=len(epochs), width=3.4)
    for ax, e in zip(axes[0], epochs):
        vals = np.clip(snapshots[e][key], 0, None)
        spectrum_panel(ax, vals, n_outliers, f"{title}, epoch {e}", predicted)
    return fig


def lookup(record: dict, key: str):
    """``record[key]``, where ``key`` may name a nested entry as ``"outer.inner"`` (e.g.
    ``"knockout_eigenvalues.cross"``)."""
    value = record
    for part in key.split("."):
        value = value[part]
    return value


def top_eigenvalues_figure(
    record: dict,
    panels: Sequence[tuple[str, str, int | None]],
    predicted: float,
    reference_label: str = "predicted",
):
    """Indexed top eigenvalues (log scale) of several spectra held in one probe ``record``.

    ``panels``: ``(title, record key, predicted outlier count or None)``; the count is drawn as a
    vertical line between the predicted outliers and the rest.
    """
    fig, axes = new_figure(ncols=len(panels))
    for ax, (name, key, expect) in zip(axes[0], panels):
        vals = np.clip(lookup(record, key), 1e-18, None)
        ax.semilogy(range(1, len(vals) + 1), vals, "o")
        ax.axhline(
            predicted, color="k", ls="--", lw=0.9, label=f"{reference_label} {predicted:.4g}"
        )
        if expect is not None:
            ax.axvline(
                expect + 0.5, color="C3", ls=":", lw=0.9, label=f"{expect} outliers predicted"
            )
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"{name}, epoch {record['epoch']}")
        ax.legend()
    return fig


def outlier_curves_figure(
    records: Sequence[dict], key: str, count: int, title: str, predicted: float
):
    """The top ``count`` values of the list ``key`` over training (log-log), against a
    predicted common value."""
    rows = [r for r in records if key in r]
    tops = np.asarray([r[key][:count] for r in rows])
    fig, axes = new_figure()
    curves_panel(
        axes[0, 0],
        [r["epoch"] for r in rows],
        {f"lambda_{i + 1}": tops[:, i] for i in range(count)},
        title,
        "eigenvalue",
        reference=predicted,
        ylog=True,
    )
    return fig

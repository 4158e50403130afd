"""Figure helpers shared by the experiments: one style, PNG + PDF, figures that show the claim.

Conventions every figure follows (issue 13):

* spectra: numerical zeros (``|lambda| <= zero_rtol * lambda_max``, the rank rule of the reports)
  are counted and stated in the panel's title, never drawn; the predicted outliers are a rug
  with their multiplicities (``×9``); panels over epochs share their x and y ranges;
* counts: scree plots (index vs eigenvalue) with the predicted groups coloured and named;
* curves over training: a symlog epoch axis (linear below 1), so epoch 0 is a tick of its own;
  diagonal and off-diagonal entries of a ``K x K`` matrix styled apart, one legend entry each;
* legends sit outside the data area (below the axes), titles carry the layer.

Every builder returns the :class:`matplotlib.figure.Figure`, so tests can read what was drawn;
:func:`save` writes and closes it. Text artists a test reads carry a ``gid``: ``"zero-count"``
(the number of zeros), ``"multiplicity"`` (a rug cluster's size), ``"ratio"`` (``λ1/λk``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import (
    FuncFormatter,
    LogFormatter,
    LogLocator,
    MaxNLocator,
    NullLocator,
)

from deepufm.experiments.checks import TRAINED_RANK_RTOL

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
}
"""Matplotlib rc settings of every experiment figure."""

ZERO_RTOL = TRAINED_RANK_RTOL
"""Default relative zero rule of the spectrum figures: the reports' rank rule for trained states
(``experiments.checks.TRAINED_RANK_RTOL``), so a figure's zero count is the report's."""

GROUP_RTOL = 1e-3
"""Outliers within this relative distance of their neighbour form one rug cluster (``×m``)."""

OUTLIER_COLOUR = "C3"
"""Colour of the predicted outliers (rugs, scree points)."""
SECOND_COLOUR = "C1"
"""Colour of a second predicted group (the small eigenvalue of v1 Fig. 13, the K-1 CE spikes)."""
ZERO_COLOUR = "0.55"
"""Colour of the numerical zeros where they are drawn (at the threshold, as triangles)."""
BULK_COLOUR = "0.6"
"""Colour of the bulk histogram."""


def new_figure(
    ncols: int = 1,
    nrows: int = 1,
    width: float = 4.2,
    height: float = 3.2,
    sharex: bool = False,
    sharey: bool | str = False,
):
    """``(fig, axes)`` in the shared style; ``axes`` is always 2-D ``(nrows, ncols)``."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(width * ncols, height * nrows),
            squeeze=False,
            sharex=sharex,
            sharey=sharey,
        )
    return fig, axes


def save(fig, out_dir: Path, name: str) -> Path:
    """Write ``name.png`` and ``name.pdf`` into ``out_dir``, each atomically, and close ``fig``;
    returns the PNG path. :func:`finalise` makes room for the legends below the axes."""
    from deepufm.training.rundir import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with plt.rc_context(STYLE):
            finalise(fig)
            for fmt in ("png", "pdf"):
                atomic_write(
                    out_dir / f"{name}.{fmt}", lambda f, fmt=fmt: fig.savefig(f, format=fmt)
                )
    finally:
        plt.close(fig)
    return out_dir / f"{name}.png"


def legend_below(ax, ncol: int = 1, handles=None, labels=None) -> None:
    """The axes' legend (or the given ``handles``/``labels``) under the figure, centred below
    ``ax``: outside every data area and every axis label. :func:`finalise` places it once the
    layout is known; it takes no part in the layout (no-op without labels)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        leg = ax.legend(
            handles, labels, loc="upper center", ncol=min(ncol, len(handles)), frameon=False
        )
        leg.set_in_layout(False)
        leg.below = True  # read by finalise


def finalise(fig) -> None:
    """Lay ``fig`` out: a band at the bottom as tall as the tallest :func:`legend_below`
    legend is added to the figure, ``tight_layout`` fills the rest, and each such legend hangs
    in the band centred under its axes. :func:`save` calls it; tests call it before reading
    legend positions. (No ``bbox_inches="tight"``: it would lay every text out again.)"""
    renderer = fig.canvas.get_renderer()
    below = [
        (ax, leg)
        for ax in fig.axes
        if (leg := ax.get_legend()) is not None and getattr(leg, "below", False)
    ]
    if below and not hasattr(fig, "legend_band"):  # finalise may run twice: add the band once
        tallest = max(leg.get_window_extent(renderer).height for _, leg in below)
        fig.legend_band = tallest / fig.dpi + 0.15  # inches, with a margin
        fig.set_figheight(fig.get_figheight() + fig.legend_band)
    band = getattr(fig, "legend_band", 0.0)
    height = fig.get_figheight()
    with plt.rc_context(STYLE):
        fig.tight_layout(rect=(0, band / height, 1, 1))
    fig_width = fig.bbox.width
    for ax, leg in below:
        pos = ax.get_position()
        # centred under its axes, but shifted (and, if need be, the figure widened) so that a
        # legend wider than its column stays whole inside the figure
        half = leg.get_window_extent(renderer).width / fig_width / 2
        if half > 0.5:
            fig.set_figwidth(fig.get_figwidth() * 2 * half * 1.02)
            half = 0.5 / 1.02
        x = min(max(pos.x0 + pos.width / 2, half), 1 - half)
        y = (band - 0.05) / height
        leg.set_bbox_to_anchor((x, y), transform=fig.transFigure)


def setting(cfg, epochs: int | None = None) -> str:
    """The run's setting for a caption, from its config: ``"K=3, n=40, d=60, L=5,
    lambda=0.01, float64, 6000 epochs"`` (``cfg``: a :class:`~deepufm.models.config.UFMConfig`)."""
    parts = [f"K={cfg.K}", f"n={cfg.n}", f"d={cfg.d}", f"L={cfg.L}", f"lambda={cfg.lam:g}"]
    if getattr(cfg, "activation", "linear") != "linear":
        parts.append(cfg.activation)
    parts.append(cfg.dtype)
    if epochs is not None:
        parts.append(f"{epochs} epochs")
    return ", ".join(parts)


def lookup(record: dict, key: str):
    """``record[key]``, where ``key`` may name a nested entry as ``"outer.inner"`` (e.g.
    ``"knockout_eigenvalues.cross"``)."""
    value = record
    for part in key.split("."):
        value = value[part]
    return value


# -- spectra -----------------------------------------------------------------------------------


def split_spectrum(
    eigenvalues: np.ndarray, n_outliers: int, zero_rtol: float = ZERO_RTOL
) -> dict[str, np.ndarray | int | float]:
    """Descending eigenvalues split as the figures draw them: ``outliers`` (the top
    ``n_outliers`` above the zero threshold), ``bulk`` (the other positive ones above it),
    ``zeros`` (how many have ``|lambda| <= threshold``), ``negative`` (below ``-threshold``) and
    ``threshold = zero_rtol * max(lambda_max, 0)``."""
    vals = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    top = max(float(vals[0]), 0.0) if vals.size else 0.0
    thr = zero_rtol * top
    pos = vals[vals > thr]
    return {
        "outliers": pos[:n_outliers],
        "bulk": pos[n_outliers:],
        "zeros": int(np.sum(np.abs(vals) <= thr)),
        "negative": int(np.sum(vals < -thr)),
        "threshold": thr,
    }


def clusters(values: np.ndarray, rtol: float = GROUP_RTOL) -> list[tuple[float, int]]:
    """``(centre, multiplicity)`` of the runs of sorted ``values`` whose neighbours differ by at
    most ``rtol`` relative (geometric-mean centre), largest first."""
    vals = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    out: list[list[float]] = []
    for v in vals:
        if out and abs(out[-1][-1] - v) <= rtol * abs(out[-1][-1]):
            out[-1].append(v)
        else:
            out.append([v])
    return [(float(np.exp(np.mean(np.log(np.abs(c))))), len(c)) for c in out]


def zero_text(zeros: int, zero_rtol: float, negative: int = 0) -> str:
    """``"3420 eigenvalues at 0 (|λ| ≤ 1e-08·λ_max)"`` (and the negative count, when any)."""
    text = f"{zeros} eigenvalues at 0 (|λ| ≤ {zero_rtol:.0e}·λ_max)"
    return text + (f", {negative} negative" if negative else "")


ZERO_PATTERN = re.compile(r"(\d+) eigenvalues at 0")
"""Reads the zero count back from a panel's ``"zero-count"`` text (tests)."""


def _power_label(v: float, _=None) -> str:
    """``1e-8``-style labels for decades (plain text: no mathtext to lay out, so fast)."""
    if v <= 0:
        return "0"
    e = np.log10(v)
    if abs(e - round(e)) > 1e-9:
        return ""
    e = round(e)
    return f"{10.0**e:g}" if -2 <= e <= 3 else f"1e{e}"


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, each label as ``%.3g`` plain text."""

    def __call__(self, x, pos=None):
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def plain_log(axis) -> None:
    """Plain-text labels (``1e-08``, ``0.01``, ``100``) on a log ``axis`` (``ax.xaxis`` /
    ``ax.yaxis``), minor ticks labelled when few decades show, as matplotlib's default does, but
    without mathtext, whose layout dominates the drawing time of these figures."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _integer_log_counts(ax) -> None:
    """Count axis on a log scale labelled 1, 10, 100 (no 2×10⁰ minor labels)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v >= 1 else ""))
    ax.yaxis.set_minor_locator(NullLocator())  # minor ticks cost drawing time, say nothing


def title_with_zero_count(ax, title: str, parts: dict, zero_rtol: float) -> None:
    """``title`` with the zero count of ``parts`` (:func:`zero_text`) as a second title line:
    stated in the panel, never over the data."""
    ax.set_title(title, y=1.08)
    ax.text(
        0.5,
        1.0,
        zero_text(parts["zeros"], zero_rtol, parts["negative"]),
        transform=ax.transAxes,
        ha="center",
        va="bottom",
        fontsize=7,
        color="0.25",
        gid="zero-count",
    ).set_in_layout(False)  # may be wider than a narrow panel: not a reason to shrink it


def spectrum_panel(
    ax,
    eigenvalues: np.ndarray,
    n_outliers: int,
    title: str,
    predicted: float | None = None,
    zero_rtol: float = ZERO_RTOL,
    bins: np.ndarray | None = None,
) -> dict:
    """One spectrum as the paper draws it, on a log eigenvalue axis: the bulk as a histogram,
    the top ``n_outliers`` as a rug with multiplicities, the zeros counted in the title.

    ``bins``: shared log-spaced bin edges (:func:`spectra_over_epochs` passes one set to every
    panel). Returns :func:`split_spectrum`'s dict plus ``clusters``.
    """
    parts = split_spectrum(eigenvalues, n_outliers, zero_rtol)
    out, bulk = parts["outliers"], parts["bulk"]
    if bins is None:
        lo = min(np.concatenate([bulk, out])) if (bulk.size or out.size) else 1.0
        hi = max(np.concatenate([bulk, out])) if (bulk.size or out.size) else 10.0
        bins = np.logspace(np.log10(lo) - 0.1, np.log10(hi) + 0.1, 41)
    if bulk.size:
        ax.hist(bulk, bins=bins, color=BULK_COLOUR, label="bulk")
    _integer_log_counts(ax)
    ax.set_xscale("log")
    plain_log(ax.xaxis)
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=5))
    ax.xaxis.set_minor_locator(NullLocator())  # 10+ decades: decade ticks say it all
    # the rug: one tick per outlier on the axis, each cluster's multiplicity above it
    ax.vlines(
        out,
        0,
        0.1,
        transform=ax.get_xaxis_transform(),
        colors=OUTLIER_COLOUR,
        lw=1.5,
        label=f"top {n_outliers} outliers (rug)",
    )
    groups = clusters(out)
    for centre, mult in groups:
        if mult == 1:
            continue  # a single tick needs no count
        ax.annotate(
            f"×{mult}",
            (centre, 0.11),
            xycoords=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            color=OUTLIER_COLOUR,
            fontsize=8,
            gid="multiplicity",
        )
    if predicted is not None:
        ax.axvline(predicted, color="k", ls="--", lw=0.9, label=f"predicted {predicted:.4g}")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    title_with_zero_count(ax, title, parts, zero_rtol)
    return {**parts, "clusters": groups}


def ratio_panel(ax, eigenvalues: np.ndarray, count: int, title: str, zero_rtol: float = ZERO_RTOL):
    """The top ``count`` eigenvalues on a linear axis, divided by their mean (1 = equal), with
    ``λ1/λ_count`` in the title: where the claim is that they equalise."""
    top = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1][:count]
    mean = float(top.mean())
    ax.plot(range(1, len(top) + 1), top / mean, "o", ms=3.5, color=OUTLIER_COLOUR)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ratio = float(top[0] / top[-1]) if top[-1] > 0 else float("inf")
    ax.set_title(title)
    ax.text(
        0.5,
        0.95,
        f"λ1/λ{len(top)} = {ratio:.4g}",
        transform=ax.transAxes,
        ha="center",
        va="top",
        fontsize=8,
        gid="ratio",
    )
    ax.set_xlabel("index")
    ax.set_ylabel("λ_i / mean of top " + str(len(top)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ratio


def spectra_over_epochs(
    snapshots: dict[int, dict[str, np.ndarray]],
    key: str,
    n_outliers: int,
    matrix: str,
    layer: int,
    predicted: float | None,
    zero_rtol: float = ZERO_RTOL,
    equalise: bool = True,
):
    """One spectrum panel per snapshot epoch for the spectrum ``key`` (``matrix`` its name in
    the titles, e.g. ``"H_l"``), all on one x range, one set of bins and one count range; with
    ``equalise`` a second row draws the top ``n_outliers`` divided by their mean (linear), so
    that ``λ1/λ_k -> 1`` is seen across epochs."""
    epochs = sorted(snapshots)
    spectra = [np.asarray(snapshots[e][key], dtype=np.float64) for e in epochs]
    split = [split_spectrum(v, n_outliers, zero_rtol) for v in spectra]
    drawn = np.concatenate([np.concatenate([s["outliers"], s["bulk"]]) for s in split])
    lo, hi = (drawn.min(), drawn.max()) if drawn.size else (1.0, 10.0)
    if predicted is not None and predicted > 0:
        lo, hi = min(lo, predicted), max(hi, predicted)
    bins = np.logspace(np.log10(lo) - 0.2, np.log10(hi) + 0.3, 51)
    nrows = 2 if equalise else 1
    fig, axes = new_figure(ncols=len(epochs), nrows=nrows, width=3.2, height=2.9)
    for j, (e, vals) in enumerate(zip(epochs, spectra)):
        ax = axes[0, j]
        spectrum_panel(
            ax, vals, n_outliers, f"{matrix} (layer {layer}), epoch {e}", predicted, zero_rtol, bins
        )
        ax.set_xlim(bins[0], bins[-1])
        if j:
            ax.set_ylabel("")
        if equalise:
            ratio_panel(
                axes[1, j],
                vals,
                n_outliers,
                f"top {n_outliers} of {matrix} (layer {layer})",
                zero_rtol,
            )
            if j:
                axes[1, j].set_ylabel("")
    counts = [np.histogram(s["bulk"], bins=bins)[0].max() if s["bulk"].size else 1 for s in split]
    for ax in axes[0]:
        ax.set_ylim(0.7, 2.5 * max(counts))
    if equalise:
        ys = np.concatenate([np.asarray(ax.get_ylim()) for ax in axes[1]])
        span = max(abs(ys - 1).max(), 1e-3)
        for ax in axes[1]:  # lambda_i / mean >= 0: no room below 0
            ax.set_ylim(max(1 - 1.1 * span, -0.05), 1 + 1.1 * span)
    merged_legend(fig, axes[-1], ncol=min(3, len(epochs)))  # never wider than the figure
    return fig


def scree_figure(
    eigenvalues: np.ndarray,
    groups: Sequence[tuple[int, str, float | None]],
    title: str,
    zero_rtol: float = ZERO_RTOL,
    extra: int = 3,
):
    """Index vs eigenvalue (log) where the claim is a count: ``groups`` are ``(count, label,
    predicted value or None)`` in descending order (e.g. ``(K-1, "K−1 = 2 equal outliers", v)``
    then ``(1, "1 small eigenvalue", s)``), each coloured with its predicted value as a line;
    ``extra`` further eigenvalues follow, the zeros among them drawn at the threshold and
    counted."""
    vals = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    parts = split_spectrum(vals, 0, zero_rtol)
    thr = parts["threshold"]
    n = min(len(vals), sum(c for c, _, _ in groups) + extra)
    fig, axes = new_figure(width=4.6)
    ax = axes[0, 0]
    start = 0
    colours = (OUTLIER_COLOUR, SECOND_COLOUR, "C0", "C2")
    for (count, label, pred), colour in zip(groups, colours):
        idx = np.arange(start, min(start + count, n))
        ax.semilogy(idx + 1, np.maximum(vals[idx], thr), "o", color=colour, label=label)
        if pred is not None:
            ax.axhline(pred, color=colour, ls="--", lw=0.8, label=f"predicted {pred:.4g}")
        start += count
    rest = np.arange(start, n)
    nonzero = rest[np.abs(vals[rest]) > thr]
    zero = rest[np.abs(vals[rest]) <= thr]
    if nonzero.size:
        ax.semilogy(nonzero + 1, vals[nonzero], "o", color="C0", mfc="none", label="rest")
    if zero.size:
        ax.semilogy(
            zero + 1,
            np.full(zero.size, thr),
            "v",
            color=ZERO_COLOUR,
            label=f"zeros (≤ {zero_rtol:.0e}·λ_max, drawn at it)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    plain_log(ax.yaxis)
    title_with_zero_count(ax, title, parts, zero_rtol)
    legend_below(ax)
    return fig


def top_eigenvalues_figure(
    record: dict,
    panels: Sequence[tuple[str, str, int | None]],
    predicted: float,
    layer: int,
    reference_label: str = "predicted",
    zero_rtol: float = ZERO_RTOL,
):
    """Indexed top eigenvalues (log scale) of several spectra held in one probe ``record``.

    ``panels``: ``(title, record key (nested as "a.b"), predicted outlier count or None)``; the
    predicted outliers are coloured and the count drawn as a vertical line between them and the
    rest; values ``<= zero_rtol * lambda_max`` of the panel are drawn at that threshold as zeros.
    """
    fig, axes = new_figure(ncols=len(panels), width=3.6)
    for ax, (name, key, expect) in zip(axes[0], panels):
        vals = np.asarray(lookup(record, key), dtype=np.float64)
        thr = zero_rtol * max(float(vals.max()), 0.0)
        idx = np.arange(1, len(vals) + 1)
        zero = np.abs(vals) <= thr
        cut = expect if expect is not None else 0
        hi = (~zero) & (idx <= cut)
        lo = (~zero) & (idx > cut)
        if hi.any():
            ax.semilogy(idx[hi], vals[hi], "o", color=OUTLIER_COLOUR, label="predicted outliers")
        if lo.any():
            ax.semilogy(idx[lo], vals[lo], "o", color="C0", mfc="none", label="the rest")
        if zero.any():
            ax.semilogy(
                idx[zero],
                np.full(zero.sum(), max(thr, 1e-300)),
                "v",
                color=ZERO_COLOUR,
                label=f"zeros (≤ {zero_rtol:.0e}·λ_max)",
            )
        ax.axhline(
            predicted, color="k", ls="--", lw=0.9, label=f"{reference_label} {predicted:.4g}"
        )
        if expect is not None:
            ax.axvline(expect + 0.5, color=OUTLIER_COLOUR, ls=":", lw=0.9, label="predicted count")
            ax.text(
                expect + 0.5,
                0.5,
                f" {expect} ",
                transform=ax.get_xaxis_transform(),
                ha="right",
                color=OUTLIER_COLOUR,
                fontsize=8,
                gid="count",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        plain_log(ax.yaxis)
        ax.set_title(f"{name} (layer {layer})\nepoch {record['epoch']}")
    _shared_ylim(axes[0])
    merged_legend(fig, axes[0], ncol=min(3, len(panels)))
    return fig


def _shared_ylim(axes) -> None:
    lo = min(ax.get_ylim()[0] for ax in axes)
    hi = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
        ax.set_ylim(lo, hi)


def merged_legend(fig, axes, ncol: int = 3) -> None:
    """One legend for a row of panels (and the rows above), below the middle one, entries
    deduplicated by label."""
    seen: dict[str, object] = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    legend_below(axes[len(axes) // 2], ncol, list(seen.values()), list(seen))


# -- curves over training ---------------------------------------------------------------------


def epoch_axis(ax) -> None:
    """A symlog epoch axis (linear in ``[0, 1]``, log beyond): epoch 0 is the tick ``"0"``, not
    a point at 0.5 on a log axis."""
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(FuncFormatter(_power_label))
    ax.set_xlabel("epoch (0, then log scale)")


def curves_panel(
    ax,
    epochs: Sequence[int],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    reference: float | None = None,
    ylog: bool = False,
    styles: dict[str, dict] | None = None,
) -> None:
    """Curves over epochs on :func:`epoch_axis`, an optional predicted line, the legend below
    the axes. ``styles``: per-label keyword arguments for ``ax.plot``."""
    x = np.asarray(epochs, dtype=np.float64)
    styles = styles or {}
    for label, y in series.items():
        ax.plot(x, y, **({"lw": 1.1} | styles.get(label, {})), label=label)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.9, label=f"predicted {reference:.4g}")
    epoch_axis(ax)
    if ylog:
        ax.set_yscale("log")
        plain_log(ax.yaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend_below(ax)


def matrix_curves_panel(
    ax,
    epochs: Sequence[int],
    mats: np.ndarray,
    title: str,
    ylabel: str,
    diagonal_reference: float | None,
    off_reference: float | None,
    ylog: bool = False,
) -> None:
    """The ``K^2`` entries of a ``(T, K, K)`` series over epochs: the ``K`` diagonal entries
    solid in one colour, the ``K(K-1)`` off-diagonal ones thin grey, two legend entries (and one
    per predicted value)."""
    x = np.asarray(epochs, dtype=np.float64)
    mats = np.asarray(mats, dtype=np.float64)
    K = mats.shape[1]
    for a in range(K):
        for b in range(K):
            diag = a == b
            ax.plot(
                x,
                mats[:, a, b],
                color="C0" if diag else "0.55",
                lw=1.4 if diag else 0.7,
                zorder=3 if diag else 2,
                label=(
                    (f"diagonal c = c' ({K})" if diag else f"off-diagonal c ≠ c' ({K * (K - 1)})")
                    if (a, b) in ((0, 0), (0, 1))
                    else None
                ),
            )
    if diagonal_reference is not None:
        ax.axhline(  # relabelled below when the off-diagonal prediction is the same
            diagonal_reference,
            color="C0",
            ls="--",
            lw=0.9,
            label=f"predicted diagonal {diagonal_reference:.4g}",
        )
    if off_reference is not None and off_reference == diagonal_reference:
        ax.lines[-1].set_label(f"predicted (all entries) {off_reference:.4g}")
    elif off_reference is not None:
        ax.axhline(
            off_reference,
            color="0.3",
            ls=":",
            lw=0.9,
            label=f"predicted off-diagonal {off_reference:.4g}",
        )
    epoch_axis(ax)
    if ylog:
        ax.set_yscale("log")
        plain_log(ax.yaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend_below(ax)


def matrix_series(records: Sequence[dict], key: str) -> tuple[list[int], np.ndarray]:
    """Epochs and the ``(T, K, K)`` stack of the matrix ``key`` over the records (probe rows of
    ``metrics.jsonl``) that hold it."""
    rows = [r for r in records if key in r]
    return [r["epoch"] for r in rows], np.asarray([r[key] for r in rows], dtype=np.float64)


def outlier_curves_figure(
    records: Sequence[dict],
    key: str,
    count: int,
    title: str,
    predicted: float | None,
    transform=None,
):
    """The top ``count`` values of the list ``key`` over training (log y) against a predicted
    common value, and beside them their spread ``λ1/λ_count − 1`` (log y), which must fall to
    round-off where the claim is that they become equal. ``transform`` maps each row's list
    (e.g. singular values to their squares)."""
    rows = [r for r in records if key in r]
    tops = np.asarray(
        [(transform(np.asarray(r[key])) if transform else np.asarray(r[key]))[:count] for r in rows]
    )
    epochs = [r["epoch"] for r in rows]
    fig, axes = new_figure(ncols=2, width=4.0)
    ax = axes[0, 0]
    for i in range(count):
        ax.plot(
            epochs,
            tops[:, i],
            color=OUTLIER_COLOUR,
            lw=0.9,
            label=f"λ1 .. λ{count}" if i == 0 else None,
        )
    if predicted is not None:
        ax.axhline(predicted, color="k", ls="--", lw=0.9, label=f"predicted {predicted:.4g}")
    epoch_axis(ax)
    ax.set_yscale("log")
    plain_log(ax.yaxis)
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    legend_below(ax)
    spread = tops[:, 0] / tops[:, -1] - 1
    ax = axes[0, 1]
    ax.plot(epochs, np.maximum(spread, 1e-17), color="C0", lw=1.1, label=f"λ1/λ{count} − 1")
    epoch_axis(ax)
    ax.set_yscale("log")
    plain_log(ax.yaxis)
    ax.set_ylabel("spread")
    ax.set_title(f"spread λ1/λ{count} − 1 of the\n{title}")
    legend_below(ax)
    return fig

"""Figures assert on what they draw (issue 13): shared axes across epochs, the zero count stated
equal to an independent count, rug multiplicities equal to the cluster sizes, legends outside
the data area, epoch 0 on the axis, diagonal and off-diagonal styled apart. Small synthetic
spectra and records (no training), plus the figures of a tiny linear run."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from deepufm.experiments import linear_ufm
from deepufm.experiments import plotting as P
from deepufm.models.config import UFMConfig
from deepufm.training.config import TrainConfig

K = 3


def synthetic_snapshots(seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Three epochs of a 300-eigenvalue 'Hessian': a bulk shrinking by 1e-3 per epoch step,
    K^2 outliers converging to 0.25 (exactly equal at the last epoch), exact structural zeros
    and round-off at 1e-16 (below the 1e-8 rule: zeros, not a bulk)."""
    rng = np.random.default_rng(seed)
    out = {}
    for step, epoch in enumerate((0, 100, 5000)):
        spread = (0.5, 0.05, 0.0)[step]
        outliers = 0.25 * (1 + spread * np.linspace(1, -1, K * K))
        bulk = 10.0 ** rng.uniform(-6, -2, 60) * 1e-3**step if step < 2 else np.array([])
        zeros = np.zeros(300 - K * K - bulk.size - 20)
        roundoff = 1e-16 * rng.standard_normal(20)
        vals = np.sort(np.concatenate([outliers, bulk, zeros, roundoff]))[::-1]
        out[epoch] = {"hessian": vals}
    return out


def texts(ax, gid: str) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == gid]


def test_spectra_over_epochs_shares_axes_and_states_the_zeros():
    snaps = synthetic_snapshots()
    fig = P.spectra_over_epochs(snaps, "hessian", K * K, "H_l", 3, 0.25)
    hist_axes = fig.axes[: len(snaps)]
    ratio_axes = fig.axes[len(snaps) :]
    assert len({ax.get_xlim() for ax in hist_axes}) == 1  # one x range for every epoch
    assert len({ax.get_ylim() for ax in hist_axes}) == 1
    assert len({ax.get_ylim() for ax in ratio_axes}) == 1
    for ax, (epoch, snap) in zip(hist_axes, sorted(snaps.items())):
        vals = snap["hessian"]
        expected = int(np.sum(np.abs(vals) <= 1e-8 * vals.max()))  # numpy, independently
        (text,) = texts(ax, "zero-count")
        assert int(re.match(r"(\d+) eigenvalues at 0", text).group(1)) == expected
        assert "1e-08" in text
        assert "layer 3" in ax.get_title() and f"epoch {epoch}" in ax.get_title()
        # round-off is not drawn as a bulk: the histogram holds exactly the values above the rule
        # that are not among the top K^2
        drawn = sum(p.get_height() for p in ax.patches)
        assert drawn == np.sum(vals > 1e-8 * vals.max()) - K * K
        # count axis labelled 1, 10, 100 (no "2x10^0")
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"\d+", s) for s in labels), labels
    # the exactly equal outliers of the last epoch are one cluster, annotated ×9
    assert texts(hist_axes[-1], "multiplicity") == [f"×{K * K}"]
    assert texts(hist_axes[0], "multiplicity") == []  # distinct outliers: single ticks
    # the linear equalisation row: λ1/λ9 of each epoch, computed independently
    for ax, (_, snap) in zip(ratio_axes, sorted(snaps.items())):
        (text,) = texts(ax, "ratio")
        top = snap["hessian"][: K * K]
        assert float(text.split("=")[1]) == pytest.approx(top[0] / top[-1], rel=1e-3)
    plt.close(fig)


def test_clusters_group_equal_values_and_count_them():
    vals = np.array([2.0, 2.0 * (1 + 1e-6), 2.0, 1.0, 1.0 + 5e-4, 0.3])
    assert [m for _, m in P.clusters(vals)] == [3, 2, 1]
    c, m = P.clusters(vals)[0]
    assert c == pytest.approx(2.0, rel=1e-6) and m == 3


def legend_outside(fig, ax) -> None:
    """The axes' legend box does not overlap its data area (display coordinates)."""
    P.finalise(fig)
    fig.canvas.draw()
    leg = ax.get_legend()
    assert leg is not None
    lb, ab = leg.get_window_extent(), ax.get_window_extent()
    overlap_x = min(lb.x1, ab.x1) - max(lb.x0, ab.x0)
    overlap_y = min(lb.y1, ab.y1) - max(lb.y0, ab.y0)
    assert overlap_x <= 0 or overlap_y <= 0, (lb, ab)
    fb = fig.bbox  # and whole inside the figure: nothing clipped on save
    assert fb.x0 - 1 <= lb.x0 and lb.x1 <= fb.x1 + 1 and fb.y0 - 1 <= lb.y0, (lb, fb)


def test_curves_mark_epoch_zero_style_the_diagonal_apart_and_keep_legends_outside():
    epochs = [0, 1, 2, 5, 10, 100, 1000]
    T = len(epochs)
    mats = np.stack([np.eye(K) / K + 0.1 * np.exp(-t) for t in range(T)])
    fig, axes = P.new_figure(ncols=2)
    P.matrix_curves_panel(axes[0, 0], epochs, mats, "gamma (layer 2)", "gamma", 1 / K, 0.0)
    P.curves_panel(axes[0, 1], epochs, {"a": np.arange(T), "b": np.ones(T)}, "t", "y", 1.0)
    for ax in axes[0]:
        assert ax.get_xscale() == "symlog"
        # epoch 0 is drawn at x = 0, a tick of its own
        assert ax.lines[0].get_xdata()[0] == 0 and ax.get_xlim()[0] == 0
        fig.canvas.draw()
        assert "0" in [t.get_text() for t in ax.get_xticklabels()]
        legend_outside(fig, ax)
    ax = axes[0, 0]
    curves = ax.lines[: K * K]
    diag = [ln for i, ln in enumerate(curves) if i // K == i % K]
    off = [ln for i, ln in enumerate(curves) if i // K != i % K]
    assert len({ln.get_color() for ln in diag}) == 1 and len({ln.get_color() for ln in off}) == 1
    assert diag[0].get_color() != off[0].get_color()
    assert diag[0].get_linewidth() > off[0].get_linewidth()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == [f"diagonal c = c' ({K})", f"off-diagonal c ≠ c' ({K * (K - 1)})"]
    plt.close(fig)


def test_scree_figure_marks_groups_and_zeros():
    vals = np.array([6.2, 6.2, 0.011, 1e-12, -1e-13, 0.0, 0.0])
    fig = P.scree_figure(
        vals, [(2, "K−1 = 2 equal outliers", 6.2), (1, "1 small eigenvalue", 0.011)], "S (layer 1)"
    )
    ax = fig.axes[0]
    (text,) = texts(ax, "zero-count")
    assert int(P.ZERO_PATTERN.match(text).group(1)) == 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "K−1 = 2 equal outliers" in labels and "1 small eigenvalue" in labels
    assert any(s.startswith("zeros") for s in labels)
    first = ax.lines[0]
    assert list(first.get_xdata()) == [1, 2] and list(first.get_ydata()) == [6.2, 6.2]
    legend_outside(fig, ax)
    plt.close(fig)


def test_top_eigenvalues_figure_shares_the_value_axis_and_shows_counts():
    record = {
        "epoch": 7,
        "hessian_eigenvalues": [0.2] * 9 + [0.0] * 3,
        "knockout_eigenvalues": {"cross": [0.2] * 3 + [1e-17] * 9},
    }
    fig = P.top_eigenvalues_figure(
        record,
        [("H_l", "hessian_eigenvalues", 9), ("H_l - G_cross", "knockout_eigenvalues.cross", 3)],
        0.2,
        layer=2,
    )
    a, b = fig.axes
    assert a.get_ylim() == b.get_ylim()
    assert texts(a, "count") == [" 9 "] and texts(b, "count") == [" 3 "]
    assert "layer 2" in a.get_title() and "epoch 7" in b.get_title()
    legend_outside(fig, b)
    # a two-panel figure: the merged legend fits although it is wider than its column
    fig2 = P.spectra_over_epochs(
        {0: {"h": np.array([3.0, 2.0, 1.0, 0.1])}, 9: {"h": np.array([1.0, 1.0, 1.0, 0.0])}},
        "h",
        3,
        "H_l",
        1,
        1.0,
    )
    legend_outside(fig2, fig2.axes[-1])
    plt.close(fig2)
    plt.close(fig)


def test_linear_run_figures_draw_what_they_say(tmp_path, monkeypatch):
    """The figures of a tiny real run: every title names the layer, the histogram panels share
    their x range, every zero count matches the snapshot, v2-fig9 has the H_l panel that v1-fig6
    lacks, and every caption carries the run's setting."""
    kept = {}

    def keep(fig, out_dir, name):
        P.finalise(fig)
        kept[name] = fig
        return tmp_path / f"{name}.png"

    monkeypatch.setattr(P, "save", keep)
    monkeypatch.setattr(
        linear_ufm,
        "preset",
        lambda name: linear_ufm.Preset(
            UFMConfig(K=3, n=4, d=5, L=3, lam=0.01, device="cpu"),
            TrainConfig(lr=0.5, epochs=2000, probes_per_decade=3),
            2,
            (0, 2000),
            1e-6,
        ),
    )
    from deepufm.experiments.probes import SpectralProbe
    from deepufm.experiments.runs import train_ufm
    from deepufm.theory import dnc_constants
    from deepufm.training.probes import DEFAULT_PROBES

    pre = linear_ufm.preset("quick")
    (tmp_path / "run").mkdir()
    probe = SpectralProbe(layer=2, snapshot_epochs=pre.snapshots)
    _, records = train_ufm(
        tmp_path / "run", pre.model, pre.training, (*DEFAULT_PROBES, probe), False, False, probe
    )
    figs = linear_ufm._figures(
        tmp_path, records, probe.snapshots, pre.model, 2, dnc_constants(pre.model)
    )
    assert [f for f, _, _ in figs] == list(kept)
    for fid, caption, _ in figs:
        assert "Layer 2" in caption and "K=3" in caption and "float64" in caption, fid
        assert "2000 epochs" in caption, fid
        for ax in kept[fid].axes:
            title = ax.get_title()
            assert "layer 2" in title, (fid, title)
    v1_fig3 = kept["v1-fig3"]
    hist = v1_fig3.axes[:2]
    assert hist[0].get_xlim() == hist[1].get_xlim()
    for ax, e in zip(hist, (0, 2000)):
        vals = probe.snapshots[e]["hessian"]
        (text,) = texts(ax, "zero-count")
        assert int(P.ZERO_PATTERN.match(text).group(1)) == np.sum(np.abs(vals) <= 1e-8 * vals.max())
    assert len(kept["v2-fig9"].axes) == len(kept["v1-fig6"].axes) + 1
    assert kept["v2-fig9"].axes[0].get_title().startswith("H_l ")
    for fig in kept.values():
        plt.close(fig)

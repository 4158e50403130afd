"""Over training: the paper's per-layer analysis in *your own* training loop (v2 Figs 6, 16–18).

``TrainingProbe(data, loss, out_dir=...)`` is called once per step or epoch,
``probe(model, epoch)``; each call measures ``model`` with :func:`deepufm.analyze` (the same code,
so the same numbers and key names) and appends one line to ``out_dir/metrics.jsonl``::

    {"epoch": 12, "data_loss": ..., "accuracy": ..., "K": 10, "N": 5000, <extra>,
     "layers": [{"name": "head.0", "layer": 1, "eigvec_alignment": K x K, ...}, ...]}

with per layer the keys of :data:`RECORD_KEYS` (all of the analysis record with ``keys="all"``).
:func:`overtraining_figures` draws the paper's over-training figures from that file.

**The probe convention** is that of the trainers (:mod:`deepufm.training.probes`): a call
``probe(model, epoch)`` at the epochs the probe is scheduled for (``every``, ``at``), a record per
call with an integer ``"epoch"`` in ``metrics.jsonl``, and a run directory with a
``manifest.json`` (kind ``"probe"``: only files the probe wrote are ever replaced), whose status
is ``"running"`` until :meth:`TrainingProbe.close` (or the end of a ``with TrainingProbe(...) as
probe:`` block) marks it ``"complete"``. One log is one trajectory: a probe resumed on other data
(a hash of ``X`` and ``y``, ``data_fingerprint`` in every row) or with a model whose classes or
analysed layers changed is refused.

**Restart-safe.** The log always describes one trajectory, in increasing epochs: a call at an
epoch at or before the last logged one (a user loop resumed from an earlier checkpoint) first
drops the logged rows from that epoch on, then appends — as the trainers' resume does
(:func:`deepufm.training.rundir.repair_metrics`). A torn last line (a kill mid-write) is dropped
with a warning.

**Leaves the model alone.** The measurement runs in eval mode on a float64 copy (``dtype``) and
restores every module's ``training`` flag, the parameters' ``requires_grad`` and ``.grad``, the
global RNG state and the autograd mode, so a loop with the probe follows the same trajectory as
without it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepufm.analysis.api import analyze
from deepufm.analysis.inputs import LossFn, as_batches
from deepufm.errors import ConfigError
from deepufm.training import lock
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd

KIND = "probe"

# Per-layer keys logged by default: everything the over-training figures and the usual
# over-training questions need, without the bulky spectra of the knockouts and of G and E.
RECORD_KEYS = (
    "name",
    "layer",
    "d_in",
    "d_out",
    "bias",
    "hessian_route",
    "hessian_eigenvalues",
    "hessian_rank",
    "outlier_count",
    "outlier_mean_std",
    "eigvec_alignment",
    "gradient_coefficients",
    "projection_proportion",
    "data_gradient_norm",
    "weight_singular_values",
    "singular_vector_alignment",
    "papyan_ranks",
    "nc1",
    "orthogonal_frame_distance",
    "effective_rank_hessian",
    "effective_rank_weight",
)
FORMATS = ("png", "pdf")
RESERVED = ("epoch", "data_loss", "accuracy", "K", "N", "data_fingerprint", "layers")


class TrainingProbe:
    """Log the per-layer analysis of a model to ``out_dir/metrics.jsonl`` during training.

    Args:
        data: the data measured at every probe: ``(X, y)`` tensors or a re-iterable of batches, as
            for :func:`deepufm.analyze` (read once here and kept; a training set too large to
            keep in memory twice wants a fixed subset).
        loss: ``"mse"`` (the paper's data loss), ``"ce"`` or a callable, as for ``analyze``.
        layers: names of the ``nn.Linear`` modules to follow (default every one).
        out_dir: the run directory (created; an existing one must be empty or hold this probe's
            earlier run, unless ``overwrite``); ``None`` keeps the records in memory only.
        every: measure when ``epoch % every == 0`` (``None``: only at the ``at`` epochs).
        at: further epochs to measure at, e.g. ``deepufm.training.probe_epochs(epochs)`` (the
            trainers' log-spaced schedule) with ``every=None``.
        keys: the per-layer record keys to log (default :data:`RECORD_KEYS`; ``"all"``: the
            whole analysis record).
        overwrite: start afresh in an ``out_dir`` holding another run (files deepufm did not
            write stay).
        **analyze_options: passed to :func:`deepufm.analyze` (``batch_size``, ``dtype``,
            ``route`` ...).
    """

    def __init__(
        self,
        data: tuple | Iterable,
        loss: str | LossFn = "mse",
        layers: Sequence[str] | None = None,
        out_dir: str | Path | None = None,
        *,
        every: int | None = 1,
        at: Iterable[int] = (),
        keys: Sequence[str] | str | None = None,
        overwrite: bool = False,
        **analyze_options: Any,
    ) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
            raise ConfigError("every", every, "a positive integer or None (only the `at` epochs)")
        if every is not None and every < 1:
            raise ConfigError("every", every, "a positive integer or None (only the `at` epochs)")
        self.at = frozenset(_epoch("at", e) for e in at)
        if every is None and not self.at:
            raise ConfigError(
                "at", list(at), "some epochs when every=None (else nothing is probed)"
            )
        if keys is None:
            keys = RECORD_KEYS
        elif keys != "all":
            if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
                raise ConfigError("keys", keys, f"'all' or a sequence of record keys {RECORD_KEYS}")
            keys = tuple(dict.fromkeys(("name", "layer", *keys)))
        self.keys = keys
        self.every, self.loss, self.layers = every, loss, layers
        self.options = analyze_options
        # The data are read once: a DataLoader is then not re-iterated at every probe.
        self.data = list(as_batches(data, analyze_options.pop("batch_size", None)))
        self.fingerprint = _fingerprint(self.data)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.overwrite = overwrite
        self.records: list[dict[str, Any]] = []
        self._opened = False
        if self.out_dir is not None:
            mf.check_directory(self.out_dir, "out_dir")

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is a scheduled probe epoch (``every``, ``at``)."""
        return epoch in self.at or (self.every is not None and epoch % self.every == 0)

    def __call__(self, model: nn.Module, epoch: int, **extra: Any) -> dict[str, Any] | None:
        """Same as :meth:`probe`."""
        return self.probe(model, epoch, **extra)

    def probe(self, model: nn.Module, epoch: int, **extra: Any) -> dict[str, Any] | None:
        """Measure ``model`` at ``epoch`` when it is due, log and return the record (else ``None``).

        ``extra``: JSON-serialisable values stored with the record (the training loss, the step
        size ...; not the reserved keys ``epoch``, ``data_loss``, ``accuracy``, ``K``, ``N``,
        ``layers``). The model's modes, gradients and the global RNG are left as they were.
        """
        epoch = _epoch("epoch", epoch)
        for key in extra:
            if key in RESERVED:
                raise ConfigError(key, extra[key], f"a key other than {', '.join(RESERVED)}")
        if not self.due(epoch):
            return None
        if self.out_dir is not None and not self._opened:
            self._check_same_run(rd.scan_metrics(self.out_dir)[0] if self._resumable() else [])
        analysis = _measure(model, self.data, self.loss, self.layers, self.options)
        layers = [
            dict(r) if self.keys == "all" else {k: r[k] for k in self.keys if k in r}
            for r in analysis.to_dict()["layers"]
        ]
        record: dict[str, Any] = {
            "epoch": epoch,
            "data_loss": analysis.config["data_loss"],
            "accuracy": analysis.config["accuracy"],
            "K": analysis.config["K"],
            "N": analysis.config["N"],
            "data_fingerprint": self.fingerprint,
            **extra,
            "layers": layers,
        }
        kept = [r for r in self.records if r["epoch"] < epoch]
        if self.out_dir is not None and self._resumable():
            kept = [r for r in rd.scan_metrics(self.out_dir)[0] if r["epoch"] < epoch]
        self._check_same_run(kept, record)
        self.records = [r for r in self.records if r["epoch"] < epoch]
        self.records.append(record)
        if self.out_dir is not None:
            self._write(record)
        return record

    def _resumable(self) -> bool:
        """Whether the next write continues the log in ``out_dir`` (this probe's own run)."""
        if self._opened:
            return True
        manifest = mf.read_manifest(self.out_dir) if self.out_dir.is_dir() else None
        return not self.overwrite and manifest is not None and manifest.kind == KIND

    def _check_same_run(self, rows: list[dict[str, Any]], record: dict | None = None) -> None:
        """Refuse a record that cannot continue ``rows`` (one trajectory): other data (a
        resumed loop given another data set), another number of classes or other layers."""
        if not rows:
            return
        first = rows[0]
        where = f"the log in {self.out_dir}" if self.out_dir is not None else "the logged records"
        old = first.get("data_fingerprint")
        if old is not None and old != self.fingerprint:
            raise ConfigError(
                "data",
                f"{self.fingerprint[:12]}... (N={sum(len(b[1]) for b in self.data)})",
                f"the data of {where} (fingerprint {old[:12]}..., N={first['N']})",
                "A probe continues one trajectory measured on one data set; give the same "
                "(X, y) as before, or start a new out_dir (or overwrite=True).",
            )
        if record is None:
            return
        names = [r["name"] for r in record["layers"]]
        old_names = [r["name"] for r in first["layers"]]
        if record["K"] != first["K"] or names != old_names:
            raise ConfigError(
                "model",
                f"K={record['K']} classes, layers {names}",
                f"K={first['K']} and layers {old_names}, as in {where}",
                "The model's output or its analysed layers changed; one log holds one "
                "model's trajectory: start a new out_dir (or overwrite=True).",
            )

    def close(self) -> None:
        """Mark the run finished: ``manifest.json`` gets status ``"complete"`` (and what an
        overwritten earlier run wrote and this one did not is deleted). :meth:`figures` still
        works afterwards; a later call of the probe continues the log (status ``"running"``
        again). Without ``out_dir`` nothing to do."""
        if self.out_dir is None or not self._resumable():
            return
        with lock.locked(self.out_dir):
            mf.finish(self.out_dir)

    def __enter__(self) -> TrainingProbe:
        """``with TrainingProbe(...) as probe:`` closes the run when the block ends normally."""
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close on a normal exit; after an exception the run stays ``"running"`` (resumable)."""
        if exc_type is None:
            self.close()

    def _write(self, record: dict[str, Any]) -> None:
        resume = self._opened or not self.overwrite
        with rd.open_run(
            self.out_dir, KIND, resume=resume, overwrite=not resume, param="out_dir"
        ) as resuming:
            if not resuming:  # a new run (or one replacing another): an empty log first
                rd.rewrite_metrics(self.out_dir, [])
            self._opened = True
            manifest = mf.read_manifest(self.out_dir)
            if manifest is not None and manifest.complete:  # a closed run continued
                mf.write_manifest(self.out_dir, replace(manifest, status="running"))
            rows, dropped = rd.scan_metrics(self.out_dir)
            if dropped or any(r["epoch"] >= record["epoch"] for r in rows):
                # A resumed loop re-runs these epochs: the log keeps one trajectory.
                rd.repair_metrics(self.out_dir, record["epoch"])
            rd.append_metrics(self.out_dir, record)

    def read(self) -> list[dict[str, Any]]:
        """The logged records (``metrics.jsonl``; in memory without ``out_dir``)."""
        return self.records if self.out_dir is None else rd.read_metrics(self.out_dir)

    def figures(
        self,
        out_dir: str | Path | None = None,
        layers: Sequence[str] | None = None,
        formats: Sequence[str] = ("png", "pdf"),
    ) -> list[Path]:
        """The over-training figures of the logged records (:func:`overtraining_figures`),
        into ``out_dir`` (default ``<out_dir>/figures``); returns the paths written."""
        if self.out_dir is None:
            if out_dir is None:
                raise ConfigError("out_dir", None, "a folder for the figures (the probe has none)")
            return save_figures(draw_overtraining(self.records, layers), Path(out_dir), formats)
        return overtraining_figures(self.out_dir, out_dir, layers, formats)


def _fingerprint(batches: list) -> str:
    """A hash of the data's values, dtypes and shapes (one trajectory is one data set)."""
    h = hashlib.blake2b(digest_size=16)
    for X, y in batches:
        for t in (X, y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _epoch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ConfigError(name, value, "an integer >= 0 (the step or epoch)")
    return int(value)


def _measure(model: nn.Module, data: list, loss, layers, options: dict) -> Any:
    """``analyze`` leaving everything about the model and the process as it was."""
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
    flags = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"} - {None})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            return analyze(model, data, loss, layers, **options)
    finally:
        for m, flag in flags:
            m.training = flag
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad


# -- the figures -------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "layer"


def _epoch_axis(ax) -> None:
    """Epochs on a symmetric-log axis: linear in [0, 1], so epoch 0 is drawn at 0 (and ticked),
    logarithmic beyond."""
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    ax.set_xlim(left=0)
    ax.set_xlabel("epoch (0, then log scale)")


def _legend(ax) -> None:
    """The legend right of the axes, outside the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _layer_rows(records: Sequence[dict]) -> dict[str, list[tuple[int, dict]]]:
    """``layer name -> [(epoch, layer record), ...]`` in increasing epoch."""
    out: dict[str, list[tuple[int, dict]]] = {}
    for r in sorted(records, key=lambda r: r["epoch"]):
        for rec in r.get("layers", ()):
            out.setdefault(rec["name"], []).append((r["epoch"], rec))
    return out


def _array(rows, key) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the stacked values of ``key`` of the rows that hold it (``None`` -> ``nan``)."""
    kept = [(e, rec[key]) for e, rec in rows if rec.get(key) is not None]
    if not kept:
        return np.zeros(0), np.zeros(0)
    vals = np.asarray([_nan(v) for _, v in kept], dtype=np.float64)
    return np.asarray([e for e, _ in kept], dtype=np.float64), vals


def _nan(v):
    if isinstance(v, list):
        return [_nan(x) for x in v]
    return math.nan if v is None else v


def _positive(v: np.ndarray) -> np.ndarray:
    """``v`` with entries <= 0 as ``nan`` (a log axis cannot show them)."""
    return np.where(v > 0, v, np.nan)


def draw_overtraining(
    records: Sequence[dict], layers: Sequence[str] | None = None
) -> list[tuple[str, str, Any]]:
    """The over-training figures of probe records (:class:`TrainingProbe` rows), per layer:
    ``[(file stem, caption, matplotlib figure), ...]``.

    Per layer ``name``: ``v2-fig6-<name>`` (f_cc' and gamma_cc', diagonal c = c' solid and
    coloured, off-diagonal dashed grey), ``v2-fig16-<name>`` (singular-vector alignment of W,
    left and right), ``v2-fig17-<name>`` (effective ranks of H and W), ``v2-fig18-<name>`` (mean
    ± std of the top K^2 Hessian and top K ``W^T W`` eigenvalues; std/mean on its own axis) and
    ``outliers-<name>`` (the top K^2 + 1 Hessian eigenvalues, log). Epochs are on a symmetric-log
    axis that draws epoch 0 at 0; every line carries a ``gid`` naming its role.
    """
    from deepufm.experiments.plotting import new_figure as _new

    def new_figure(**kw):
        # constrained layout makes room for the legends outside the axes
        fig, axes = _new(**kw)
        fig.set_layout_engine("constrained")
        return fig, axes

    by_layer = _layer_rows(records)
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        for name in layers:
            if name not in by_layer:
                raise ConfigError("layers", name, f"a logged layer: {list(by_layer)}")
        by_layer = {k: v for k, v in by_layer.items() if k in layers}
    figs = []
    for name, rows in by_layer.items():
        pos = rows[0][1].get("layer", "?")
        # the module's name first: "layer N" is its position among the probed layers only
        where = f"'{name}', probed layer {pos}"
        ep, f = _array(rows, "eigvec_alignment")
        _, g = _array(rows, "gradient_coefficients")
        if f.size and g.size:
            K = f.shape[1]
            fig, axes = new_figure(ncols=2, width=5.2)
            for ax, vals, sym, ref_diag, ref_off in (
                (axes[0, 0], f, "f_cc'", 1.0, None),
                (axes[0, 1], g, "gamma_cc'", 1.0 / K, 0.0),
            ):
                off = [(a, b) for a in range(K) for b in range(K) if a != b]
                # off-diagonal first, so that the coloured diagonal curves are drawn on top
                for i, (a, b) in enumerate(off + [(c, c) for c in range(K)]):
                    diag = a == b
                    first = i == 0 or (diag and b == 0)
                    ax.plot(
                        ep,
                        vals[:, a, b],
                        color=f"C{a % 10}" if diag else "0.55",
                        ls="-" if diag else "--",
                        lw=1.2 if diag else 0.6,
                        alpha=1.0 if diag else 0.6,
                        gid="diagonal" if diag else "off-diagonal",
                        label=(
                            ("diagonal c = c'" if diag else "off-diagonal c ≠ c'")
                            if first
                            else "_nolegend_"
                        ),
                    )
                ax.axhline(ref_diag, color="k", lw=0.9, ls=":", gid="reference",
                           label=f"DNC: diagonal {ref_diag:.3g}")  # fmt: skip
                if ref_off is not None:
                    ax.axhline(ref_off, color="k", lw=0.9, ls="-.", gid="reference",
                               label=f"DNC: off-diagonal {ref_off:.3g}")  # fmt: skip
                _epoch_axis(ax)
                ax.set_ylabel(sym)
                ax.set_title(f"{sym} over training\n({where})")
                _legend(ax)
            figs.append(
                (
                    f"v2-fig6-{_slug(name)}",
                    f"v2 Fig. 6 ({where}): eigenvector alignment f_cc' (-> 1) and gradient "
                    f"coefficients gamma_cc' (-> 1/K on the diagonal, 0 off it).",
                    fig,
                )
            )
        ep_s = [e for e, rec in rows if rec.get("singular_vector_alignment")]
        if ep_s:
            fig, axes = new_figure(ncols=2, width=5.0)
            for ax, side in zip(axes[0], ("left", "right")):
                vals = np.asarray(
                    [_nan(rec["singular_vector_alignment"][side]) for _, rec in rows
                     if rec.get("singular_vector_alignment")],
                    dtype=np.float64,
                )  # fmt: skip
                for c in range(vals.shape[1]):
                    ax.plot(ep_s, vals[:, c], lw=1.0, color=f"C{c % 10}", gid="class",
                            label=f"class {c + 1}" if c < 10 else "_nolegend_")  # fmt: skip
                ax.axhline(1.0, color="k", ls=":", lw=0.9, gid="reference", label="DNC: 1")
                _epoch_axis(ax)
                ax.set_ylabel("f")
                what = "mu'_c; W W^T" if side == "left" else "mu_c; W^T W"
                ax.set_title(f"{side} singular vectors, f({what})\n({where})")
                _legend(ax)
            figs.append(
                (
                    f"v2-fig16-{_slug(name)}",
                    f"v2 Fig. 16 ({where}): alignment of the left and right singular vectors "
                    "of W with the output and input class means (-> 1).",
                    fig,
                )
            )
        ep_h, er_h = _array(rows, "effective_rank_hessian")
        ep_w, er_w = _array(rows, "effective_rank_weight")
        K = len(rows[-1][1].get("eigvec_alignment") or ()) or None
        if er_h.size or er_w.size:
            fig, axes = new_figure(ncols=2, width=4.8)
            for ax, e, v, sym, ref in (
                (axes[0, 0], ep_h, er_h, "H", K * K if K else None),
                (axes[0, 1], ep_w, er_w, "W", K or None),
            ):
                ax.plot(e, v, lw=1.2, gid="effective-rank", label=f"erank({sym})")
                if ref:
                    ax.axhline(ref, color="k", ls=":", lw=0.9, gid="reference", label=f"DNC: {ref}")
                _epoch_axis(ax)
                ax.set_ylabel("effective rank")
                ax.set_title(f"effective rank of {sym}\n({where})")
                _legend(ax)
            figs.append(
                (
                    f"v2-fig17-{_slug(name)}",
                    f"v2 Fig. 17 ({where}): effective ranks of the layer Hessian H (-> K^2) "
                    "and of the weight W (-> K).",
                    fig,
                )
            )
        if K:
            ep_e, eig = _top_matrix(rows, "hessian_eigenvalues", K * K + 1)
            ep_v, sv = _top_matrix(rows, "weight_singular_values", K)
            fig, axes = new_figure(ncols=3, width=4.3)
            ratio_ax = axes[0, 2]
            for ax, e, v, label in (
                (axes[0, 0], ep_e, eig[:, : K * K], f"top K^2 = {K * K} of H"),
                (axes[0, 1], ep_v, sv**2, f"top K = {K} of W^T W"),
            ):
                if not v.size:
                    continue
                mean, std = np.nanmean(v, axis=1), np.nanstd(v, axis=1)
                ax.plot(e, _positive(mean), lw=1.2, gid="mean", label="mean")
                # the band's lower edge floored at mean/20: a wide early spread would push the
                # log axis down by many decades
                ax.fill_between(e, _positive(np.maximum(mean - std, mean / 20)),
                                _positive(mean + std), alpha=0.3, gid="std", label="± std")  # fmt: skip
                ax.set_yscale("log")
                _epoch_axis(ax)
                ax.set_ylabel("eigenvalue")
                ax.set_title(f"outliers: {label}\n({where})")
                _legend(ax)
                with np.errstate(invalid="ignore", divide="ignore"):
                    rel = std / np.abs(mean)
                ratio_ax.plot(e, _positive(rel), lw=1.2, gid="std/mean", label=label)
            ratio_ax.set_yscale("log")
            _epoch_axis(ratio_ax)
            ratio_ax.set_ylabel("std / mean")
            ratio_ax.set_title(f"relative spread of the outliers (-> 0)\n({where})")
            _legend(ratio_ax)
            figs.append(
                (
                    f"v2-fig18-{_slug(name)}",
                    f"v2 Fig. 18 ({where}): mean ± std of the outlier eigenvalues of H (top "
                    "K^2) and W^T W (top K), and std/mean (-> 0 at DNC).",
                    fig,
                )
            )
            if eig.size:
                fig, axes = new_figure(width=5.2)
                ax = axes[0, 0]
                for i in range(min(K * K, eig.shape[1])):
                    ax.plot(ep_e, _positive(eig[:, i]), lw=0.8, color="C0", alpha=0.7,
                            gid="outlier", label="top K^2" if i == 0 else "_nolegend_")  # fmt: skip
                if eig.shape[1] > K * K:
                    ax.plot(ep_e, _positive(eig[:, K * K]), lw=1.0, color="C3", ls="--",
                            gid="next", label="eigenvalue K^2 + 1")  # fmt: skip
                ax.set_yscale("log")
                _epoch_axis(ax)
                ax.set_ylabel("eigenvalue")
                ax.set_title(f"top Hessian eigenvalues over training\n({where})")
                _legend(ax)
                figs.append(
                    (
                        f"outliers-{_slug(name)}",
                        f"The top K^2 = {K * K} eigenvalues of the layer Hessian ({where}) and "
                        "the next one: the K^2 outliers separate from the bulk and become equal.",
                        fig,
                    )
                )
    return figs


def _top_matrix(rows, key: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the first ``k`` entries of ``key`` per row (``nan``-padded): ``(n, k)``."""
    kept = [(e, _nan(rec[key])) for e, rec in rows if rec.get(key)]
    if not kept:
        return np.zeros(0), np.zeros((0, k))
    out = np.full((len(kept), k), np.nan)
    for i, (_, v) in enumerate(kept):
        v = v[:k]
        out[i, : len(v)] = v
    return np.asarray([e for e, _ in kept], dtype=np.float64), out


def save_figures(
    figs: Sequence[tuple[str, str, Any]], out_dir: Path, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write each figure as ``<stem>.<format>`` (default PNG and PDF; atomically, legends
    included in the bounding box); returns the paths of the first format."""
    formats = _formats(formats)
    import matplotlib.pyplot as plt

    from deepufm.experiments.plotting import STYLE

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, _, fig in figs:
        try:
            with plt.rc_context(STYLE):
                for fmt in formats:
                    rd.atomic_write(
                        out_dir / f"{stem}.{fmt}",
                        lambda f, fmt=fmt, fig=fig: fig.savefig(f, format=fmt, bbox_inches="tight"),
                    )
        finally:
            plt.close(fig)
        paths.append(out_dir / f"{stem}.{formats[0]}")
    return paths


def overtraining_figures(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    layers: Sequence[str] | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Draw the over-training figures (:func:`draw_overtraining`) of the probe records in
    ``run_dir/metrics.jsonl`` into ``out_dir`` (default ``run_dir/figures``, recorded in the run's
    manifest), for the layers named in ``layers`` (default all); returns the paths of the first
    of ``formats`` (``"png"``, ``"pdf"``, ``"svg"``)."""
    formats = _formats(formats)
    run_dir = Path(run_dir)
    records = rd.read_metrics(run_dir)
    if not any(r.get("layers") for r in records):
        raise ConfigError(
            "run_dir",
            str(run_dir),
            "a directory whose metrics.jsonl holds TrainingProbe records (with 'layers')",
        )
    figs = draw_overtraining(records, layers)
    if out_dir is not None:
        return save_figures(figs, Path(out_dir), formats)
    manifest = mf.read_manifest(run_dir)
    if manifest is None or manifest.kind != KIND:
        return save_figures(figs, run_dir / "figures", formats)
    with rd.open_run(run_dir, KIND, resume=True, param="run_dir"):
        return save_figures(figs, run_dir / "figures", formats)


def _formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    if not formats or any(f not in ("png", "pdf", "svg") for f in formats):
        raise ConfigError("formats", list(formats), "one or more of 'png', 'pdf', 'svg'")
    return formats

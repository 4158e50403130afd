"""`deepufm.TrainingProbe` in a user's own training loop, and the over-training figures.

References: `deepufm.analyze` on the same model (the probe must log exactly its records), NC1
computed here in numpy from forward hooks, the model's own state before the call, a loop run
without the probe (the trajectory must not change), and the logged numbers themselves for the
data drawn in the figures."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepufm
from deepufm.analysis.training import RECORD_KEYS, draw_overtraining
from deepufm.errors import ConfigError
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd

K, D = 3, 5
NEEDED = {
    "name",
    "layer",
    "eigvec_alignment",
    "gradient_coefficients",
    "outlier_count",
    "outlier_mean_std",
    "effective_rank_hessian",
    "effective_rank_weight",
    "nc1",
    "hessian_eigenvalues",
    "weight_singular_values",
    "projection_proportion",
    "singular_vector_alignment",
}


def clusters(n=20, seed=0, dtype=torch.float64):
    """``K`` Gaussian clusters in ``D`` dimensions, classes interleaved (any order is allowed)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    y = torch.arange(K).repeat(n)
    X = centres[y] + torch.randn(K * n, D, generator=g, dtype=torch.float64)
    return X.to(dtype), y


class MLP(nn.Module):
    """Biased layers, ReLU, a dropout (so that train/eval mode matters), a biased head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, K))

    def forward(self, x):
        return self.head(self.body(x))


def make(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MLP().to(dtype)


def mse(z, y):
    return 0.5 * (z - F.one_hot(y, K).to(z.dtype)).pow(2).sum(1).mean()


def user_loop(model, X, y, epochs, probe=None, start=0, opt_state=None, batch=20):
    """An ordinary minibatch loop (global-RNG batch order, dropout), ``probe(model, epoch)`` at
    the start of every epoch and after the last; returns the optimizer's state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for epoch in range(start, epochs):
        with torch.no_grad():
            loss = float(mse(model(X), y))  # with or without the probe: the same RNG draws
        if probe is not None:
            probe(model, epoch, train_loss=loss)
        model.train()
        for idx in torch.randperm(len(y)).split(batch):
            opt.zero_grad()
            mse(model(X[idx]), y[idx]).backward()
            opt.step()
    if probe is not None:
        probe(model, epochs)
    return opt.state_dict()


def close(a, b, tol=1e-12, where="record"):
    """Recursive equality of two records, numbers to ``tol * max(1, |b|)``."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), where
        for k in b:
            close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            close(u, v, tol, f"{where}[{i}]")
    elif isinstance(b, float) and not isinstance(b, bool):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """40 epochs of the user loop, probed every 5 epochs, into a run directory."""
    out = tmp_path_factory.mktemp("probe") / "run"
    X, y = clusters()
    model = make()
    probe = deepufm.TrainingProbe((X, y), "mse", out_dir=out, every=5)
    user_loop(model, X, y, 40, probe)
    return out, model, X, y, probe


def test_rows_hold_the_analysis_records_and_match_analyze(trained):
    out, model, X, y, probe = trained
    rows = rd.read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(0, 41, 5))
    assert mf.read_manifest(out).kind == "probe"
    for r in rows:
        assert (r["K"], r["N"]) == (K, 60)
        assert [rec["name"] for rec in r["layers"]] == ["body.0", "head.0", "head.2"]
        for rec in r["layers"]:
            assert NEEDED <= set(rec) <= set(RECORD_KEYS)
            assert len(rec["hessian_eigenvalues"]) == K * K + K
    assert "train_loss" in rows[0] and "train_loss" not in rows[-1]  # extras as given
    # the last row is deepufm.analyze of the final model, key for key
    a = deepufm.analyze(model, (X, y), "mse")
    for logged, rec in zip(rows[-1]["layers"], a.to_dict()["layers"]):
        close(logged, {k: rec[k] for k in RECORD_KEYS})
    assert rows[-1]["data_loss"] == pytest.approx(a.config["data_loss"], abs=1e-12)
    assert probe.read() == rows
    # NC1 of each layer's input, directly in numpy (class means, Sigma_W, Sigma_B^+)
    feats = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: feats.__setitem__(n, i[0].detach().numpy())
        )
        for n in ("body.0", "head.0", "head.2")
    ]
    model.eval()
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    yy = y.numpy()
    for rec in rows[-1]["layers"]:
        H = feats[rec["name"]]
        mu = np.stack([H[yy == c].mean(0) for c in range(K)], 1)
        within = H - mu[:, yy].T
        sw = within.T @ within / len(yy)
        cen = mu - mu.mean(1, keepdims=True)
        nc1 = np.trace(sw @ np.linalg.pinv(cen @ cen.T / K)) / K
        assert rec["nc1"] == pytest.approx(nc1, rel=1e-9)


def test_model_state_and_trajectory_are_left_alone():
    X, y = clusters()
    for dtype in (torch.float32, torch.float64):
        ref = make(dtype)
        user_loop(ref, X.to(dtype), y, 6)
        model = make(dtype)
        probe = deepufm.TrainingProbe((X, y), "mse", every=2)  # in memory
        user_loop(model, X.to(dtype), y, 6, probe)
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k  # same RNG draws, same dropout masks, same steps
        assert next(model.parameters()).dtype == dtype  # measured on a float64 copy
        assert [r["epoch"] for r in probe.records] == [0, 2, 4, 6]
    # modes, requires_grad, .grad and the autograd mode as the caller left them
    model = make()
    model.train()
    model.head[1].eval()
    model.body[0].bias.requires_grad_(False)
    mse(model(X), y).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        rec = deepufm.TrainingProbe((X, y), "mse", layers=["head.2"])(model, 0)
    assert [r["name"] for r in rec["layers"]] == ["head.2"]
    assert [m.training for m in model.modules()] == flags
    assert not model.body[0].bias.requires_grad and model.body[0].weight.requires_grad
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (
            p.grad is None or torch.equal(p.grad, grads[n])
        ), n
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_resumed_loop_does_not_duplicate_rows(tmp_path):
    X, y = clusters()
    out = tmp_path / "run"
    model = make()
    probe = deepufm.TrainingProbe((X, y), "mse", layers=["head.2"], out_dir=out, every=4)
    opt = user_loop(model, X, y, 8, probe)
    saved = copy.deepcopy((model.state_dict(), opt, torch.get_rng_state()))  # "checkpoint"
    user_loop(model, X, y, 12, probe, start=8, opt_state=opt)  # rows 8, 12 ... then a crash
    full = [r["epoch"] for r in rd.read_metrics(out)]
    assert full == [0, 4, 8, 12]
    # a new process: the same probe again, the loop resumed from the epoch-8 checkpoint
    resumed = make()
    resumed.load_state_dict(saved[0])
    torch.set_rng_state(saved[2])
    again = deepufm.TrainingProbe((X, y), "mse", layers=["head.2"], out_dir=out, every=4)
    user_loop(resumed, X, y, 16, again, start=8, opt_state=saved[1])
    rows = rd.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 4, 8, 12, 16]  # 8 and 12 replaced, not repeated
    ref = deepufm.analyze(resumed, (X, y), "mse", layers=["head.2"]).layers[0]
    close(rows[-1]["layers"][0], {k: ref[k] for k in RECORD_KEYS})
    # a line torn by a kill is dropped with a warning; the log stays one trajectory
    with open(out / rd.METRICS, "a") as f:
        f.write('{"epoch": 20, "layers": [{"na')
    with pytest.warns(UserWarning, match="dropped 1 unreadable"):
        again(resumed, 20)
    assert [r["epoch"] for r in rd.read_metrics(out)] == [0, 4, 8, 12, 16, 20]
    # a DataLoader (no shuffling) gives the same records as the tensors
    loader = DataLoader(TensorDataset(X, y), batch_size=25)
    rec = deepufm.TrainingProbe(loader, "mse", layers=["head.2"])(resumed, 20)
    close(rec["layers"][0], rd.read_metrics(out)[-1]["layers"][0], tol=1e-10)


def test_directory_rules_and_refusals(tmp_path):
    X, y = clusters()
    model = make()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(ConfigError, match="out_dir"):
        deepufm.TrainingProbe((X, y), out_dir=out)(model, 0)
    deepufm.TrainingProbe((X, y), out_dir=out, overwrite=True, layers=["head.2"])(model, 0)
    assert (out / "notes.txt").read_text() == "the user's"  # never touched
    assert [r["epoch"] for r in rd.read_metrics(out)] == [0]
    for kwargs, name in (
        ({"every": 0}, "every"),
        ({"every": None}, "at"),
        ({"keys": "nc1"}, "keys"),
    ):
        with pytest.raises(ConfigError, match=name):
            deepufm.TrainingProbe((X, y), **kwargs)
    probe = deepufm.TrainingProbe((X, y), every=None, at=[3], layers=["head.2"])
    assert probe(model, 2) is None and probe(model, 3)["epoch"] == 3
    with pytest.raises(ConfigError, match="epoch"):
        probe(model, -1)
    with pytest.raises(ConfigError, match="layers"):
        probe(model, 3, layers=[])
    with pytest.raises(ConfigError, match="layers"):
        deepufm.TrainingProbe((X, y), layers=["body.1"])(model, 0)  # a ReLU, not nn.Linear
    rec = deepufm.TrainingProbe((X, y), keys=["nc1"], layers=["head.2"])(model, 0)
    assert set(rec["layers"][0]) == {"name", "layer", "nc1"}
    rec = deepufm.TrainingProbe((X, y), keys="all", layers=["head.2"])(model, 0)
    assert "knockout_eigenvalues" in rec["layers"][0]
    json.dumps(rec, allow_nan=False)  # strict JSON


def test_figures_draw_the_logged_numbers(trained):
    out, _, _, _, _ = trained
    rows = rd.read_metrics(out)
    figs = {stem: fig for stem, _, fig in draw_overtraining(rows)}
    assert len(figs) == 3 * 5
    epochs = [r["epoch"] for r in rows]
    for pos, name in enumerate(("body.0", "head.0", "head.2"), start=1):
        recs = [next(x for x in r["layers"] if x["name"] == name) for r in rows]
        slug = name.replace(".", "-")
        fig = figs[f"v2-fig6-{slug}"]
        fig.canvas.draw()
        for ax, key in zip(fig.axes, ("eigvec_alignment", "gradient_coefficients")):
            assert name in ax.get_title() and f"layer {pos}" in ax.get_title()
            assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] == 0
            diag = [ln for ln in ax.get_lines() if ln.get_gid() == "diagonal"]
            off = [ln for ln in ax.get_lines() if ln.get_gid() == "off-diagonal"]
            assert (len(diag), len(off)) == (K, K * (K - 1))
            assert diag[0].get_linestyle() != off[0].get_linestyle()
            for ln in diag + off:
                assert list(ln.get_xdata()) == epochs and ln.get_xdata()[0] == 0  # epoch 0 at 0
            c = 1
            assert list(diag[c].get_ydata()) == [r[key][c][c] for r in recs]
            # the legend lies right of the data
            legend = ax.get_legend().get_window_extent()
            assert legend.x0 >= ax.get_window_extent().x1
        fig = figs[f"v2-fig17-{slug}"]
        h, w = (
            [ln for ln in ax.get_lines() if ln.get_gid() == "effective-rank"] for ax in fig.axes
        )
        assert list(h[0].get_ydata()) == [r["effective_rank_hessian"] for r in recs]
        assert list(w[0].get_ydata()) == [r["effective_rank_weight"] for r in recs]
        fig = figs[f"v2-fig18-{slug}"]
        (mean,) = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "mean"]
        top = np.asarray([r["hessian_eigenvalues"][: K * K] for r in recs])
        np.testing.assert_allclose(mean.get_ydata(), top.mean(1), rtol=1e-14)
        # std/mean on its own axis, equal to the logged outlier_mean_std of H
        ratio = [ln for ln in fig.axes[2].get_lines() if ln.get_gid() == "std/mean"]
        m, s = np.asarray([r["outlier_mean_std"] for r in recs]).T
        np.testing.assert_allclose(ratio[0].get_ydata(), s / m, rtol=1e-10)
        assert fig.axes[2].get_yscale() == "log"
        fig = figs[f"v2-fig16-{slug}"]
        left = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "class"]
        assert len(left) == K
        assert list(left[0].get_ydata()) == [
            r["singular_vector_alignment"]["left"][0] for r in recs
        ]
        fig = figs[f"outliers-{slug}"]
        assert len([ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "outlier"]) == K * K
    import matplotlib.pyplot as plt

    plt.close("all")
    paths = deepufm.overtraining_figures(out, layers=["head.2"], formats=("png",))
    assert sorted(p.name for p in paths) == sorted(
        f"{s}-head-2.png" for s in ("v2-fig6", "v2-fig16", "v2-fig17", "v2-fig18", "outliers")
    )
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "figures/v2-fig6-head-2.png" in mf.read_manifest(out).files
    with pytest.raises(ConfigError, match="layers"):
        draw_overtraining(rows, ["nope"])
    empty = out.parent / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="run_dir"):
        deepufm.overtraining_figures(empty)


def test_no_nan_in_the_log_and_epoch_zero_probe(tmp_path):
    """At initialisation a dead-ReLU layer can have undefined metrics: strict JSON ``null``."""
    X, y = clusters()
    model = make()
    with torch.no_grad():
        model.head[0].weight.zero_()
        model.head[0].bias.fill_(-1.0)  # every unit dead: head.2 sees zero features
    probe = deepufm.TrainingProbe((X, y), out_dir=tmp_path / "r", layers=["head.2"])
    rec = probe(model, 0)
    line = (tmp_path / "r" / rd.METRICS).read_text().strip()
    assert "NaN" not in line and json.loads(line)["epoch"] == 0
    assert rec["layers"][0]["nc1"] is None or not math.isnan(rec["layers"][0]["nc1"])


def test_close_context_manager_and_one_trajectory(tmp_path):
    """``close()`` / ``with`` mark the run complete; a later call continues it (running again);
    other data or another model on resume are refused before anything is written."""
    X, y = clusters(n=4)
    model = make()
    out = tmp_path / "run"
    with deepufm.TrainingProbe((X, y), "mse", out_dir=out) as probe:
        probe(model, 0)
        assert mf.read_manifest(out).status == "running"
    assert mf.read_manifest(out).status == "complete"
    assert probe.figures(formats=["png"])  # drawing after close still works
    assert mf.read_manifest(out).status == "complete"
    probe(model, 1)  # continued: running again until closed
    assert mf.read_manifest(out).status == "running"
    probe.close()
    probe.close()  # idempotent
    assert mf.read_manifest(out).status == "complete"
    # an exception inside the block leaves the run resumable ("running")
    with pytest.raises(RuntimeError), deepufm.TrainingProbe((X, y), "mse", out_dir=out) as p:
        p(model, 2)
        raise RuntimeError("the user's loop failed")
    assert mf.read_manifest(out).status == "running"
    rows = rd.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # resumed with another data set: refused, naming the data, nothing logged
    other = deepufm.TrainingProbe((X + 1.0, y), "mse", out_dir=out)
    with pytest.raises(ConfigError, match=r"data.*fingerprint"):
        other(model, 3)
    # resumed with a model whose analysed layers changed
    other = deepufm.TrainingProbe((X, y), "mse", layers=["head.2"], out_dir=out)
    with pytest.raises(ConfigError, match=r"model.*'head.2'.*one log holds one"):
        other(model, 3)
    # a model with another number of classes
    wider = nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, K + 1)).double()
    with pytest.raises(ConfigError, match="class"):
        deepufm.TrainingProbe((X, y), "mse", out_dir=out)(wider, 3)
    assert rd.read_metrics(out) == rows
    # overwrite=True starts a new trajectory on the other data
    fresh = deepufm.TrainingProbe((X + 1.0, y), "mse", out_dir=out, overwrite=True)
    fresh(model, 0)
    fresh.close()
    assert [r["epoch"] for r in rd.read_metrics(out)] == [0]
    assert mf.read_manifest(out).status == "complete"

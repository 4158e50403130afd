"""The trainer: hand-derived steps against autograd, schedules, the run directory, resume."""

import json

import numpy as np
import pytest
import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.training import (
    FusedStep,
    TrainConfig,
    TrainState,
    loss_gradients,
    probe_epochs,
    read_metrics,
    resume_run,
    start_run,
    train,
)
from deepufm.training import rundir as rd

CASES = [
    dict(activation=a, loss=lo, **reg)
    for a in ("linear", "relu")
    for lo in ("mse", "ce")
    for reg in ({"lam": 0.01}, {"lam_W": [0.1, 0.02, 0.05], "lam_H": 0.3})
]


def _autograd_grads(model):
    params = [p.clone().requires_grad_(True) for p in model.params]
    loss = model.loss_fn()(params[0], params[1:])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("case", CASES)
def test_hand_gradients_equal_autograd(case):
    model = DeepUFM.init(UFMConfig(K=3, n=4, d=6, L=3, device="cpu", seed=1, **case))
    for g, ref in zip(loss_gradients(model.H1, model.W, model.config), _autograd_grads(model)):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_steps_equal_autograd_gradient_descent(case, momentum):
    cfg = UFMConfig(K=3, n=4, d=6, L=3, device="cpu", seed=2, **case)
    model = DeepUFM.init(cfg)
    ref = [p.clone() for p in model.params]
    velocity = [torch.zeros_like(p) for p in ref]
    step = FusedStep(cfg, model.params, momentum)
    for lr in (0.3, 0.3, 0.15):
        step(lr)
        grads = _autograd_grads(DeepUFM(cfg, ref[0], ref[1:]))
        velocity = [momentum * v + g for v, g in zip(velocity, grads)]
        ref = [p - lr * v for p, v in zip(ref, velocity)]
    for p, r in zip(model.params, ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


def test_probe_epochs_are_log_spaced_and_include_ends_and_extras():
    assert probe_epochs(100, per_decade=1) == [0, 1, 10, 100]
    assert probe_epochs(50, per_decade=2, extra=(7, 999)) == [0, 1, 3, 7, 10, 32, 50]
    assert probe_epochs(0) == [0]


def test_lr_halving_schedule():
    cfg = TrainConfig(lr=0.04, lr_halve_at=[2000, 3000])
    assert [cfg.lr_at(e) for e in (0, 1999, 2000, 2999, 3000)] == [0.04, 0.04, 0.02, 0.02, 0.01]


def test_train_matches_step_by_step_and_records_schedule(tmp_path):
    cfg = UFMConfig(K=2, n=3, d=4, L=2, device="cpu", lam=0.01)
    tcfg = TrainConfig(lr=0.2, epochs=250, lr_halve_at=[120], probes_per_decade=1)
    state = TrainState(DeepUFM.init(cfg))
    result = train(state, tcfg)
    ref = DeepUFM.init(cfg)
    step = FusedStep(cfg, ref.params)
    with torch.no_grad():
        for e in range(250):
            step(tcfg.lr_at(e))
    for p, r in zip(result.model.params, ref.params):
        assert torch.equal(p, r)
    assert [r["epoch"] for r in result.records] == [0, 1, 10, 100, 250]
    assert result.records[-1]["lr"] == pytest.approx(0.1)
    last = result.records[-1]
    assert last["loss"] == pytest.approx(float(ref.total_loss()), rel=1e-14)
    assert len(last["nc1"]) == cfg.L and len(last["orthogonal_frame_distance"]) == cfg.L


def test_run_directory_contract(tmp_path):
    cfg = UFMConfig(K=2, n=3, d=4, L=3, device="cpu", lam_W=[0.01, 0.02, 0.03], lam_H=0.005)
    out = tmp_path / "run"
    result = start_run(cfg, TrainConfig(lr=0.3, epochs=50), out)
    config = json.loads((out / "config.json").read_text())
    assert config["deepufm_version"] and config["model"]["lam_W"] == [0.01, 0.02, 0.03]
    assert config["training"]["epochs"] == 50
    with np.load(out / "params.npz") as arrays:
        assert sorted(arrays.files) == ["H1", "W1", "W2", "W3"]
        assert np.array_equal(arrays["W3"], result.model.W[2].numpy())
    records = read_metrics(out)
    assert records[0]["epoch"] == 0 and records[-1]["epoch"] == 50
    assert {"loss", "data_loss", "regulariser", "grad_norm", "nc1", "elapsed"} <= set(records[-1])
    assert rd.load_checkpoint(out)["epoch"] == 50


def test_resume_from_config_only_and_torn_metrics(tmp_path):
    cfg = UFMConfig(K=2, n=3, d=4, L=2, device="cpu")
    tcfg = TrainConfig(lr=0.3, epochs=300, momentum=0.5, checkpoint_every=1e-9)
    ref = start_run(cfg, tcfg, tmp_path / "ref").model
    # A run directory that holds a config but no checkpoint resumes from the start.
    out = tmp_path / "run"
    out.mkdir()
    rd.write_config(out, cfg, tcfg)
    (out / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "lo')
    resumed = resume_run(out).model
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, ref.params))
    assert [r["epoch"] for r in read_metrics(out)] == [
        r["epoch"] for r in read_metrics(tmp_path / "ref")
    ]


def test_resume_mid_run_with_momentum_is_bitwise_exact(tmp_path):
    cfg = UFMConfig(K=3, n=4, d=5, L=3, device="cpu", activation="relu")
    tcfg = TrainConfig(lr=0.2, epochs=700, momentum=0.9, lr_halve_at=[350], checkpoint_every=1e-9)
    ref = start_run(cfg, tcfg, tmp_path / "ref").model
    # Stop after 400 epochs by training a truncated copy, then continue under the full config.
    part = tmp_path / "part"
    start_run(cfg, TrainConfig(**{**tcfg.to_dict(), "epochs": 400}), part)
    rd.write_config(part, cfg, tcfg)
    (part / "params.npz").unlink()
    resumed = resume_run(part).model
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, ref.params))


def test_an_undefined_nc1_is_stored_as_null_with_a_note_and_is_not_divergence(tmp_path):
    """At the trivial zero solution (``H_1 = 0``, every ``W_l = 0``: a stationary point with a
    finite loss) NC1 is undefined: the run goes on, ``metrics.jsonl`` is strict JSON with
    ``null`` and an ``nc1_note``, and reading it back gives ``None``."""
    cfg = UFMConfig(K=3, n=2, d=4, L=2, lam=0.01, device="cpu")
    zero = DeepUFM.init(cfg)
    for p in zero.params:
        p.zero_()
    result = train(TrainState(zero), TrainConfig(lr=0.1, epochs=3, probes_per_decade=1), tmp_path)
    assert result.epoch == 3
    assert all(np.isnan(v) for v in result.records[-1]["nc1"])
    text = (tmp_path / rd.METRICS).read_text()
    assert "NaN" not in text
    lines = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert len(lines) == len(result.records) >= 2
    for rec in read_metrics(tmp_path):
        assert rec["nc1"] == [None, None]
        assert rec["orthogonal_frame_distance"] == [None, None]
        assert all("trivial zero solution" in note for note in rec["nc1_note"])
        assert rec["loss"] == pytest.approx(0.5)  # ||Y||_F^2 / (2N) with ||Y||_F^2 = N: finite


def test_json_record_nulls_only_non_finite_floats():
    rec = {"a": float("nan"), "b": [1.0, float("inf"), None, 2], "c": {"d": -float("inf")}}
    assert rd.json_record(rec) == {"a": None, "b": [1.0, None, None, 2], "c": {"d": None}}
    assert rd.json_record({"x": 0.5, "s": "nan"}) == {"x": 0.5, "s": "nan"}

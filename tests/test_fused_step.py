"""FusedStep at depths the trainer tests do not cover (L = 1, 2, 4), against autograd.

L = 1 is the regression case: there ``A^{(1)T}`` is a view of ``W_L`` itself, so updating ``W_L``
before ``H1`` used the new ``W_L`` (an O(lr) error the L = 3 tests could not see).
"""

import dataclasses
import signal

import pytest
import torch

from deepufm import DeepUFM, UFMConfig
from deepufm.training import FusedStep


def _autograd_step(model, lr, velocity, momentum):
    params = [p.clone().requires_grad_(True) for p in model.params]
    grads = torch.autograd.grad(model.loss_fn()(params[0], params[1:]), params)
    velocity = [momentum * v + g for v, g in zip(velocity, grads, strict=True)]
    new = [p.detach() - lr * v for p, v in zip(params, velocity, strict=True)]
    return DeepUFM(model.config, new[0], new[1:]), velocity


@pytest.mark.parametrize("L", [1, 2, 4])
@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_fused_steps_equal_autograd_at_every_depth(L, activation, loss, momentum, engine):
    lam_W = [0.02 * (l + 1) for l in range(L)]
    cfg = UFMConfig(
        K=3, n=4, d=5, L=L, activation=activation, loss=loss, lam_W=lam_W, lam_H=0.03,
        device="cpu", seed=4,
    )  # fmt: skip
    model = DeepUFM.init(cfg)
    ref = DeepUFM(cfg, model.H1.clone(), [W.clone() for W in model.W])
    velocity = [torch.zeros_like(p) for p in ref.params]
    step = FusedStep(cfg, model.params, momentum, engine=engine)
    step.run(0.4, 2)  # two steps in one call: the workspace is reused across steps
    step(0.2)
    for lr in (0.4, 0.4, 0.2):
        ref, velocity = _autograd_step(ref, lr, velocity, momentum)
    moved = max(float((p - q).abs().max()) for p, q in zip(model.params, DeepUFM.init(cfg).params))
    assert moved > 1e-3  # the steps did something
    for p, r in zip(model.params, ref.params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_relu_step_uses_derivative_one_at_zero(engine):
    # Rows of W_1 orthogonal to H1's columns make pre-activations exactly 0: the paper's
    # convention (sigma'(0) = 1) lets the error through there, torch.relu's would not.
    cfg = UFMConfig(K=2, n=2, d=3, L=2, activation="relu", lam=0.01, device="cpu", seed=0)
    model = DeepUFM.init(cfg)
    model.H1[2].zero_()
    model.W[0][0] = torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64)
    ref, _ = _autograd_step(model, 0.3, [torch.zeros_like(p) for p in model.params], 0.0)
    assert (model.W[0] @ model.H1)[0].eq(0).all()
    FusedStep(cfg, model.params, engine=engine)(0.3)
    for p, r in zip(model.params, ref.params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_numpy_relu_loop_in_float32_matches_float64_autograd(loss):
    # float32 parameters stay float32 through NumPy (no silent upcast) and agree with a float64
    # autograd reference to float32 round-off over 20 steps.
    cfg = UFMConfig(
        K=3, n=5, d=7, L=3, activation="relu", loss=loss, lam=0.02, dtype="float32",
        device="cpu", seed=1,
    )  # fmt: skip
    model = DeepUFM.init(cfg)
    ref = DeepUFM(
        dataclasses.replace(cfg, dtype="float64"), model.H1.double(), [W.double() for W in model.W]
    )
    velocity = [torch.zeros_like(p) for p in ref.params]
    FusedStep(cfg, model.params, engine="numpy").run(0.3, 20)
    for _ in range(20):
        ref, velocity = _autograd_step(ref, 0.3, velocity, 0.0)
    for p, r in zip(model.params, ref.params, strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.double(), r, rtol=2e-5, atol=2e-6)


def test_engine_choice_and_validation():
    from deepufm.errors import ConfigError
    from deepufm.training.gradients import step_engine

    paper = UFMConfig(K=3, n=40, d=65, L=4, activation="relu", lam=5e-3, device="cpu")
    cpu = torch.device("cpu")
    assert step_engine(paper, cpu) == "numpy"
    assert step_engine(paper, cpu, momentum=0.9) == "torch"
    assert step_engine(dataclasses.replace(paper, activation="linear"), cpu) == "torch"
    assert (
        step_engine(dataclasses.replace(paper, d=512, n=400), cpu) == "torch"
    )  # multi-threaded torch
    assert step_engine(paper, torch.device("meta")) == "torch"
    model = DeepUFM.init(paper)
    with pytest.raises(ConfigError, match="engine"):
        FusedStep(paper, model.params, engine="jax")
    meta = [p.to("meta") for p in model.params]
    with pytest.raises(ConfigError, match="engine"):
        FusedStep(paper, meta, engine="numpy")


def test_numpy_step_bumps_autograd_versions():
    # A graph that saved a parameter before the step must refuse to run on the updated values.
    cfg = UFMConfig(K=2, n=3, d=4, L=2, activation="relu", lam=0.01, device="cpu", seed=0)
    model = DeepUFM.init(cfg)
    W = model.W[0].requires_grad_(True)
    y = (W * W).sum()
    with torch.no_grad():
        FusedStep(cfg, model.params, engine="numpy")(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _sigint_at(epoch):
    from deepufm.training.probes import loss_probe

    def probe(model, e):
        if e == epoch:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C in the middle of training
        return loss_probe(model, e)

    return probe


def test_numpy_engine_run_interrupted_and_resumed_is_bitwise_equal(tmp_path):
    # The plain ReLU loop of the trainer takes the NumPy route; a resumed run must take it again
    # and end on exactly the uninterrupted run's parameters.
    from deepufm.errors import Interrupted
    from deepufm.training import TrainConfig, resume_run, start_run
    from deepufm.training import rundir as rd
    from deepufm.training.gradients import step_engine

    cfg = UFMConfig(K=3, n=4, d=9, L=3, activation="relu", lam=0.01, device="cpu", seed=2)
    assert step_engine(cfg, torch.device("cpu")) == "numpy"
    tcfg = TrainConfig(lr=0.3, epochs=3000, probes_per_decade=4)
    ref = start_run(cfg, tcfg, tmp_path / "ref")
    with pytest.raises(Interrupted):
        start_run(cfg, tcfg, tmp_path / "cut", probes=(_sigint_at(100),))
    assert 100 <= rd.load_checkpoint(tmp_path / "cut")["epoch"] < 3000
    back = resume_run(tmp_path / "cut")
    assert back.epoch == ref.epoch == 3000
    for p, q in zip(ref.model.params, back.model.params, strict=True):
        assert torch.equal(p, q)
    assert float((ref.model.params[1] - DeepUFM.init(cfg).params[1]).abs().max()) > 1e-2

"""FusedStep at depths the trainer tests do not cover (L = 1, 2, 4), against autograd.

L = 1 is the regression case: there ``A^{(1)T}`` is a view of ``W_L`` itself, so updating ``W_L``
before ``H1`` used the new ``W_L`` (an O(lr) error the L = 3 tests could not see).
"""

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
def test_fused_steps_equal_autograd_at_every_depth(L, activation, loss, momentum):
    lam_W = [0.02 * (l + 1) for l in range(L)]
    cfg = UFMConfig(
        K=3, n=4, d=5, L=L, activation=activation, loss=loss, lam_W=lam_W, lam_H=0.03,
        device="cpu", seed=4,
    )  # fmt: skip
    model = DeepUFM.init(cfg)
    ref = DeepUFM(cfg, model.H1.clone(), [W.clone() for W in model.W])
    velocity = [torch.zeros_like(p) for p in ref.params]
    step = FusedStep(cfg, model.params, momentum)
    step.run(0.4, 2)  # two steps in one call: the workspace is reused across steps
    step(0.2)
    for lr in (0.4, 0.4, 0.2):
        ref, velocity = _autograd_step(ref, lr, velocity, momentum)
    moved = max(float((p - q).abs().max()) for p, q in zip(model.params, DeepUFM.init(cfg).params))
    assert moved > 1e-3  # the steps did something
    for p, r in zip(model.params, ref.params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)


def test_relu_step_uses_derivative_one_at_zero():
    # Rows of W_1 orthogonal to H1's columns make pre-activations exactly 0: the paper's
    # convention (sigma'(0) = 1) lets the error through there, torch.relu's would not.
    cfg = UFMConfig(K=2, n=2, d=3, L=2, activation="relu", lam=0.01, device="cpu", seed=0)
    model = DeepUFM.init(cfg)
    model.H1[2].zero_()
    model.W[0][0] = torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64)
    ref, _ = _autograd_step(model, 0.3, [torch.zeros_like(p) for p in model.params], 0.0)
    assert (model.W[0] @ model.H1)[0].eq(0).all()
    FusedStep(cfg, model.params)(0.3)
    for p, r in zip(model.params, ref.params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-14)

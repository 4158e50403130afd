import math

import numpy as np
import pytest
import torch

from deepufm import ConfigError, DeepUFM, UFMConfig
from deepufm.metrics import class_means, nc1, orthogonal_frame_distance
from deepufm.models import functional as Fn


def test_labels_are_class_major_one_hot():
    Y = Fn.labels(3, 2)
    assert Y.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]


def test_config_resolves_single_lambda_and_default_init():
    c = UFMConfig(K=3, n=2, d=5, L=4, lam=0.02)
    assert c.lam_W == (0.02,) * 4 and c.lam_H == 0.02 and c.N == 6
    assert c.init_std == pytest.approx(1 / math.sqrt(5))
    assert c.layer_shapes() == [(5, 5)] * 3 + [(3, 5)]


def test_config_per_layer_lambdas_round_trip():
    c = UFMConfig(K=2, n=1, d=2, L=2, lam_W=[0.1, 0.2], lam_H=0.3)
    assert c.lam is None and c.lam_W == (0.1, 0.2) and c.lam_H == 0.3
    assert UFMConfig.from_dict(c.to_dict()) == c
    assert UFMConfig.from_dict(UFMConfig(lam=0.05).to_dict()) == UFMConfig(lam=0.05)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"K": 1}, "K"),
        ({"n": 0}, "n"),
        ({"K": 4, "d": 3}, "d"),
        ({"L": 0}, "L"),
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam_W": [0.1, 0.1], "lam_H": 0.1, "L": 3}, "lam_W"),
        ({"lam_W": 0.1}, "lam_H"),
        ({"activation": "tanh"}, "activation"),
        ({"loss": "hinge"}, "loss"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_config_rejects_bad_values_naming_the_parameter(kwargs, param):
    with pytest.raises(ConfigError) as info:
        UFMConfig(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_from_dict_names_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="'widht'"):
        UFMConfig.from_dict({"widht": 3})
    with pytest.raises(ConfigError, match=r"'K'.*integer"):
        UFMConfig.from_dict({"K": "3"})


def test_forward_and_losses_match_hand_computation():
    torch.manual_seed(0)
    c = UFMConfig(K=2, n=2, d=3, L=2, lam_W=[0.1, 0.2], lam_H=0.3, device="cpu")
    m = DeepUFM.init(c)
    H1, (W1, W2) = m.H1, m.W
    Z = W2 @ H1.new_tensor(np.asarray(W1 @ H1))
    Y = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    expected_data = ((Z - Y) ** 2).sum() / (2 * 4)
    expected_reg = 0.05 * (W1**2).sum() + 0.1 * (W2**2).sum() + 0.15 * (H1**2).sum()
    torch.testing.assert_close(m.data_loss(), expected_data, rtol=1e-14, atol=0)
    torch.testing.assert_close(m.total_loss(), expected_data + expected_reg, rtol=1e-14, atol=0)


def test_cross_entropy_loss_matches_log_softmax():
    c = UFMConfig(K=3, n=2, d=4, L=1, loss="ce", device="cpu")
    m = DeepUFM.init(c)
    Z = m.output()
    ref = -torch.log_softmax(Z, dim=0)[torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(6)].mean()
    torch.testing.assert_close(m.data_loss(), ref, rtol=1e-14, atol=0)


def test_relu_derivative_at_zero_is_one():
    u = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    Fn.relu(u).sum().backward()
    assert u.grad.tolist() == [0.0, 1.0, 1.0]


def test_init_is_seeded_and_normal():
    c = UFMConfig(K=3, n=50, d=40, L=2, seed=7, device="cpu")
    a, b = DeepUFM.init(c), DeepUFM.init(c)
    assert torch.equal(a.H1, b.H1) and all(torch.equal(x, y) for x, y in zip(a.W, b.W))
    assert float(a.H1.std()) == pytest.approx(1 / math.sqrt(40), rel=0.05)


def test_nc1_and_frame_distance_on_hand_cases():
    # Perfect collapse onto an orthogonal frame: both metrics vanish.
    M = torch.eye(4)[:, :3] * 2.0
    H = M.repeat_interleave(5, dim=1)
    assert nc1(H, 3) == pytest.approx(0.0, abs=1e-14)
    assert orthogonal_frame_distance(class_means(H, 3)) == pytest.approx(0.0, abs=1e-14)
    # K=2, 1-D features: class means -1, +1, within-class spread +-s.
    s = 0.5
    H = torch.tensor([[-1 - s, -1 + s, 1 - s, 1 + s]])
    # Sigma_W = s^2, Sigma_B = 1, NC1 = s^2 / K
    assert nc1(H, 2) == pytest.approx(s**2 / 2, rel=1e-14)
    # Two parallel unit means: Gram = ones(2,2) -> normalised ones/2; distance to I/sqrt(2).
    ones = torch.ones(2, 2) / 2
    assert orthogonal_frame_distance(torch.ones(3, 2)) == pytest.approx(
        float(torch.linalg.norm(ones - torch.eye(2) / math.sqrt(2))), rel=1e-14
    )

"""ResNet-20 feature map + deep linear head (THEORY §10): shapes, regulariser, BatchNorm mode of
curvature measurements, and the head as a deep UFM (`head_state`, `UFMConfig.d_in`)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from deepufm import ConfigError, DeepUFM, UFMConfig
from deepufm.matrices import layer_hessian
from deepufm.models import ResNetUFM, curvature_mode, head_state
from deepufm.models.resnet import batch_data_loss, batch_objective, regulariser

DT = torch.float64


def tiny(K=3, **kw):
    """A ResNet-8 of width 1/4 (feature_dim 16) with a 3-layer head of width 12."""
    args = {"in_channels": 1, "d": 12, "L": 3, "width": 0.25, "blocks": 1, "seed": 1} | kw
    return ResNetUFM(K, **args)


def class_major_batch(K=3, n=4, C=1, side=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(K * n, C, side, side, generator=gen, dtype=DT)
    return X, torch.arange(K).repeat_interleave(n)


def train_running_stats(model, X, steps=3):
    """Move the BatchNorm running statistics away from their (0, 1) initial values."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(2 * X + 1)
    model.eval()


@pytest.mark.parametrize(("C", "side"), [(1, 28), (3, 32)])
def test_resnet20_shapes(C, side):
    model = ResNetUFM(10, in_channels=C)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    # ResNet-20: a stem and 3 stages x 3 blocks x 2 convolutions (19 = 20 minus the classifier),
    # plus the two option-B 1x1 projection shortcuts at the stride-2 stage starts
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19
    assert [
        (c.in_channels, c.out_channels, c.stride) for c in convs if c.kernel_size == (1, 1)
    ] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert convs[0].in_channels == C and model.feature_dim == 64
    assert [tuple(W.shape) for W in model.head_weights()] == [(64, 64)] * 3 + [(10, 64)]
    assert all(layer.bias is None for layer in model.head)
    x = torch.randn(2, C, side, side, dtype=DT)
    assert model.features(x).shape == (2, 64) and model(x).shape == (2, 10)
    assert ResNetUFM(10, in_channels=C, width=0.5).feature_dim == 32


def test_head_is_linear_and_init_is_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = tiny(seed=4), tiny(seed=4), tiny(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head[0].weight, c.head[0].weight)
    h = torch.randn(5, a.feature_dim, dtype=DT)
    W1, W2, W3 = a.head_weights()
    torch.testing.assert_close(a.head_forward(h), h @ W1.T @ W2.T @ W3.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"d": 2}, "d"),
        ({"L": 0}, "L"),
        ({"in_channels": 2}, "in_channels"),
        ({"width": 0}, "width"),
    ],
)
def test_bad_model_arguments(kwargs, param):
    with pytest.raises(ConfigError, match=param):
        tiny(**kwargs)


def test_regulariser_and_objective_by_hand():
    model = tiny()
    X, y = class_major_batch()
    H = model.features(X)
    Ws = model.head_weights()
    lam, lam_H, wd = [0.1, 0.2, 0.3], 1e-3, 0.05
    backbone = sum((p.detach() ** 2).sum() for p in model.backbone.parameters())
    by_hand = (
        sum(0.5 * l * (W.detach() ** 2).sum() for l, W in zip(lam, Ws))
        + 0.5 * lam_H * (H.detach() ** 2).sum()
        + 0.5 * wd * backbone
    )
    torch.testing.assert_close(regulariser(model, H, lam, lam_H, wd).detach(), by_hand)
    assert regulariser(model, H, 0.2, 0.0).item() == pytest.approx(
        sum(0.1 * (W.detach() ** 2).sum().item() for W in Ws)
    )
    Z = model.head_forward(H).detach()
    onehot = torch.eye(3, dtype=DT)[y]
    mse = 0.5 * ((Z - onehot) ** 2).sum() / 12
    assert batch_data_loss(Z, y).item() == pytest.approx(mse.item(), rel=1e-14)
    ce = -torch.log_softmax(Z, dim=1)[torch.arange(12), y].mean()
    assert batch_data_loss(Z, y, "ce").item() == pytest.approx(ce.item(), rel=1e-14)
    total = batch_objective(model, X, y, lam, lam_H, "mse", wd)
    assert total.item() == pytest.approx((mse + by_hand).item(), rel=1e-12)
    with pytest.raises(ConfigError, match="lam"):
        regulariser(model, H, [0.1, 0.2], lam_H)


def test_curvature_mode_eval_is_batch_independent_and_train_is_not():
    model = tiny()
    X, _ = class_major_batch()
    train_running_stats(model, X)
    model.train()  # the mode a caller may be in, e.g. mid-training
    running = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        with curvature_mode(model) as m:
            assert not any(mod.training for mod in m.modules())
            alone, in_batch = m(X[:1]), m(X)[:1]
        torch.testing.assert_close(alone, in_batch, rtol=1e-12, atol=1e-12)
        with curvature_mode(model, "train") as m:
            assert all(mod.training for mod in m.modules())
            full, half = m(X)[:2], m(X[:6])[:2]
        assert (full - half).abs().max() > 1e-3  # batch statistics differ
    # modes and running statistics restored (the train-mode passes updated them inside)
    assert all(mod.training for mod in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers()))
    with pytest.raises(ConfigError, match="bn_mode"):
        with curvature_mode(model, "frozen"):
            pass


def test_head_state_is_the_network_head_as_a_deep_ufm():
    model = tiny()
    X, y = class_major_batch()
    train_running_stats(model, X)
    lam, lam_H = [1e-2, 2e-2, 3e-2], 1e-3
    ufm = head_state(model, X, y, lam=lam, lam_H=lam_H)
    cfg = ufm.config
    assert (cfg.K, cfg.n, cfg.d, cfg.L, cfg.d_in, cfg.input_dim) == (3, 4, 12, 3, 16, 16)
    assert cfg.lam_W == tuple(lam) and cfg.lam_H == lam_H and cfg.activation == "linear"
    assert ufm.H1.shape == (16, 12) and [tuple(W.shape) for W in ufm.W] == [
        (12, 16),
        (12, 12),
        (3, 12),
    ]
    # eval mode: column i is the feature of image i on its own (running statistics)
    with torch.no_grad():
        model.eval()
        one_by_one = torch.cat([model.features(X[i : i + 1]) for i in range(12)]).T
    torch.testing.assert_close(ufm.H1, one_by_one, rtol=1e-12, atol=1e-12)
    assert ufm.W[0] is not model.head[0].weight  # copies
    # the UFM objective is the network's full-batch objective (eval mode, no backbone decay)
    with torch.no_grad():
        net = batch_objective(model, X, y, lam, lam_H)
    assert ufm.total_loss().item() == pytest.approx(net.item(), rel=1e-13)
    # train mode: features with the batch's statistics, different from eval mode
    ufm_train = head_state(model, X, y, lam=lam, lam_H=lam_H, bn_mode="train")
    with torch.no_grad():
        model.train()
        batch_features = model.features(X).T
        model.eval()
    torch.testing.assert_close(ufm_train.H1, batch_features, rtol=1e-12, atol=1e-12)
    assert (ufm_train.H1 - ufm.H1).abs().max() > 1e-3


@pytest.mark.parametrize("l", [1, 2])
def test_head_layer_hessian_equals_network_hessian(l):
    """The layer Hessian of head weight W_l from the DeepUFM — dense autograd of its objective and
    the structured `layer_hessian` — equals the dense autograd Hessian of the whole network's
    objective w.r.t. that weight (eval-mode BatchNorm). l = 1 is the non-square (d x d_in) layer."""
    model = tiny()
    X, y = class_major_batch()
    train_running_stats(model, X)
    ufm = head_state(model, X, y, lam=0.01, lam_H=1e-3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    name, p = f"head.{l - 1}.weight", ufm.W[l - 1].numel()

    def net_loss(W):
        logits = functional_call(model, params | {name: W} | buffers, (X,))
        return batch_data_loss(logits, y)

    def ufm_loss(W):
        Ws = list(ufm.W)
        Ws[l - 1] = W
        return ufm.loss_fn()(ufm.H1, Ws)

    H_net = jacrev(jacrev(net_loss))(params[name]).reshape(p, p)
    H_ufm = jacrev(jacrev(ufm_loss))(ufm.W[l - 1]).reshape(p, p)
    # the UFM objective includes the regulariser's lam * I
    I = torch.eye(p, dtype=DT)
    torch.testing.assert_close(H_ufm - 0.01 * I, H_net, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer_hessian(ufm, l).dense(), H_net, rtol=1e-10, atol=1e-12)
    assert H_net.abs().max() > 1e-4


def test_head_state_rejects_non_class_major_labels():
    model = tiny()
    X, y = class_major_batch()
    with pytest.raises(ConfigError, match="class-major"):
        head_state(model, X, y.flip(0))


def test_config_d_in_is_additive():
    c = UFMConfig(K=3, n=2, d=5, L=3, d_in=7)
    assert c.input_dim == 7 and c.layer_shapes() == [(5, 7), (5, 5), (3, 5)]
    assert UFMConfig.from_dict(c.to_dict()) == c and c.to_dict()["d_in"] == 7
    assert UFMConfig(K=3, n=2, d=5, L=1, d_in=7).layer_shapes() == [(3, 7)]
    square = UFMConfig(K=3, n=2, d=5, L=3, d_in=5)
    assert square == UFMConfig(K=3, n=2, d=5, L=3) and square.d_in is None
    assert "d_in" not in square.to_dict()  # square models serialise as before
    m = DeepUFM.init(c, device="cpu")
    assert m.H1.shape == (7, 6) and m.output().shape == (3, 6)
    with pytest.raises(ConfigError, match="d_in"):
        UFMConfig(K=3, n=2, d=5, d_in=2)
    with pytest.raises(ValueError, match=r"expected \(7, 6\)"):
        DeepUFM(c, torch.zeros(5, 6, dtype=DT), m.W)

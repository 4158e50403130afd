"""Large-batch training of ResNetUFM (deepufm.training.network): the step is gradient descent on
the batch objective, shards average to the batch, probes measure what they claim, exact resume."""

import copy
import json

import pytest
import torch

from deepufm import ConfigError
from deepufm.data import ClassificationData
from deepufm.errors import DivergenceError
from deepufm.metrics.collapse import class_means, nc1, orthogonal_frame_distance
from deepufm.models import curvature_mode
from deepufm.models.resnet import batch_objective
from deepufm.training import network as nw
from deepufm.training.rundir import read_metrics

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: intra-op threads only add synchronisation (and contend with
    # other processes on a shared machine).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_data(K=3, n=3, side=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(K * n, 1, side, side, generator=gen, dtype=DT)
    X += torch.arange(K, dtype=DT).repeat_interleave(n).view(-1, 1, 1, 1)  # separable classes
    y = torch.arange(K).repeat_interleave(n)
    return ClassificationData(X, y, K, "toy", tuple(str(c) for c in range(K)))


def tiny_config(**kw):
    base = {"epochs": 3, "lr": 0.05, "lr_halve_at": (2,), "d": 4, "L": 3, "width": 0.25}
    base |= {"blocks": 1, "lam": 1e-2, "lam_H": 1e-3, "checkpoint_every_epochs": 1}
    return nw.NetworkTrainConfig(**(base | kw))


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("momentum", 1.0),
        ("batch_size", 0),
        ("dtype", "float16"),
        ("bn_train", "sync"),
        ("epochs", -1),
        ("checkpoint_every", 0),
        ("checkpoint_every", float("inf")),
        ("checkpoint_every_epochs", 0),
        ("checkpoint_every_epochs", 1.5),
        ("lr_halve_at", (-3,)),
        ("dataset", "imagenet"),
        ("lam_H", float("nan")),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field) as err:
        nw.NetworkTrainConfig(**{field: value})
    assert err.value.param == field and "expected" in str(err.value)


def test_presets_hold_the_paper_settings_and_the_schedule_halves():
    mnist = nw.preset("paper", "mnist")
    assert (mnist.epochs, mnist.lr, mnist.lr_halve_at, mnist.batch_size) == (
        4000,
        0.04,
        (2000,),
        10000,
    )
    assert (mnist.d, mnist.L, mnist.lam, mnist.lam_H, mnist.per_class) == (64, 4, 5e-3, 1e-6, 5000)
    cifar = nw.preset("paper", "cifar10")
    assert (cifar.epochs, cifar.lr, cifar.lr_halve_at) == (5000, 0.05, (2500,))
    assert [cifar.lr_at(e) for e in (0, 2499, 2500, 4999)] == [0.05, 0.05, 0.025, 0.025]
    quick = nw.preset("quick", "mnist-embedded", epochs=7)
    assert quick.epochs == 7 and quick.device == "cpu" and quick.blocks == 3  # still a ResNet-20
    with pytest.raises(ConfigError, match="preset"):
        nw.preset("huge")
    assert nw.NetworkTrainConfig.from_dict(quick.to_dict()) == quick


def test_full_batch_epoch_is_one_gradient_step_on_the_batch_objective():
    data, cfg = tiny_data(), tiny_config(epochs=1, momentum=0.0)
    state = nw.new_state(cfg, data)
    twin = copy.deepcopy(state.model).train()
    g = torch.autograd.grad(
        batch_objective(twin, data.X, data.y, cfg.lam, cfg.lam_H), list(twin.parameters())
    )
    nw.train(cfg, data, state=state)
    for p, q, gq in zip(state.model.parameters(), twin.parameters(), g, strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - cfg.lr * gq, rtol=1e-12, atol=1e-14)
    assert state.epoch == 1
    # the BatchNorm running statistics saw the same batch
    for a, b in zip(state.model.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shard_objectives_average_to_the_batch_objective():
    """Two ranks' shard objectives, averaged, have the gradient of the whole batch's objective
    (data-parallel training averages gradients) — BatchNorm frozen so shards cannot differ."""
    data, cfg = tiny_data(n=4), tiny_config(lam_H=0.3)
    model = nw.build_model(cfg, data)
    net = nw.FeatureLogits(model)
    nw.set_bn_train_mode(net, "frozen")

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    H, Z = net(data.X)
    full = grads(nw.shard_objective(model, H, Z, data.y, cfg, data.N))
    # unequal shards: 5 and 7 of 12 images
    parts = [slice(0, 5), slice(5, 12)]
    loss = 0
    for s in parts:
        H, Z = net(data.X[s])
        loss = loss + nw.shard_objective(model, H, Z, data.y[s], cfg, data.N, world=2) / 2
    for a, b in zip(grads(loss), full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_probes_measure_the_full_data_in_eval_mode():
    data, cfg = tiny_data(), tiny_config(epochs=2, probe_at=(1,))
    state = nw.train(cfg, data)
    assert [r["epoch"] for r in state.records] == [0, 1, 2]
    last = state.records[-1]
    model = state.model
    with curvature_mode(model, "eval"), torch.no_grad():
        H = model.features(data.X)
        Z = model.head_forward(H)
        expected = batch_objective(model, data.X, data.y, cfg.lam, cfg.lam_H)
    assert last["loss"] == pytest.approx(float(expected), rel=1e-12)
    assert last["accuracy"] == float((Z.argmax(1) == data.y).double().mean())
    Hs = [H.T]
    for W in model.head_weights()[:-1]:
        Hs.append(W.detach() @ Hs[-1])
    assert last["nc1"] == pytest.approx([nc1(h, 3) for h in Hs], rel=1e-10)
    ofd = [orthogonal_frame_distance(class_means(h, 3)) for h in Hs]
    assert last["orthogonal_frame_distance"] == pytest.approx(ofd, rel=1e-10)
    assert state.records[0]["train_loss"] is None and last["train_loss"] > 0


def test_bn_train_frozen_keeps_running_statistics_and_batch_mode_updates_them():
    data = tiny_data()
    for mode, changes in (("frozen", False), ("batch", True)):
        state = nw.new_state(tiny_config(bn_train=mode), data)
        before = params_of(state.model)
        nw.train(state.config, data, state=state)
        after = params_of(state.model)
        moved = any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)
        assert moved is changes


class Interrupt(Exception):
    pass


def interrupt_at(epoch):
    def probe(snap):
        if snap.epoch == epoch:
            raise Interrupt
        return {}

    return probe


@pytest.mark.parametrize("batch_size", [None, 4])
def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path, batch_size):
    data = tiny_data()
    cfg = tiny_config(epochs=5, momentum=0.9, batch_size=batch_size, checkpoint_every_epochs=2)
    cfg = cfg.replace(probe_at=(3,), probes_per_decade=1)
    whole = nw.train(cfg, data, tmp_path / "whole")
    with pytest.raises(Interrupt):
        nw.train(cfg, data, tmp_path / "cut", probes=[*nw.DEFAULT_NETWORK_PROBES, interrupt_at(3)])
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = nw.train(cfg, data, tmp_path / "cut", resume=True)
    assert resumed.epoch == whole.epoch == 5
    a, b = params_of(whole.model), params_of(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "whole"))
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [0, 1, 3, 5]
    loaded = nw.load_network(tmp_path / "cut", data)
    assert loaded.epoch == 5 and all(torch.equal(params_of(loaded.model)[k], a[k]) for k in a)


def test_run_directory_contract_and_resume_refuses_other_settings(tmp_path):
    data, cfg = tiny_data(), tiny_config(epochs=1)
    nw.train(cfg, data, tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["kind"] == "network" and payload["data"]["N"] == data.N
    assert nw.read_network_config(tmp_path)[0] == cfg
    with pytest.raises(ConfigError, match="--out"):
        nw.train(cfg, data, tmp_path)  # a new run into a used directory
    with pytest.raises(ConfigError, match="config"):
        nw.train(cfg.replace(lr=0.1), data, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="data"):
        nw.train(cfg, tiny_data(seed=1), tmp_path, resume=True)


def test_checkpoint_every_counts_seconds_and_the_epoch_cadence_is_its_own_field(tmp_path):
    """``checkpoint_every`` is seconds, as in TrainConfig and ``deepufm train``: a long interval
    still writes the final checkpoint (and only it); ``checkpoint_every_epochs`` counts epochs."""
    data = tiny_data()
    assert nw.NetworkTrainConfig().checkpoint_every == 60.0
    assert nw.NetworkTrainConfig().checkpoint_every_epochs is None
    runs = {
        "long": {"checkpoint_every": 1e6, "checkpoint_every_epochs": None},
        "always": {"checkpoint_every": 1e-9, "checkpoint_every_epochs": None},
        "epochs": {"checkpoint_every": None, "checkpoint_every_epochs": 2},
    }
    for name, kw in runs.items():
        out = tmp_path / name
        nw.train(tiny_config(epochs=3, **kw), data, out)
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3, name
        prev = out / "checkpoint.prev.pt"
        assert prev.exists() == (name != "long"), name
        if prev.exists():  # every epoch by time; epoch 2 by the epoch cadence
            assert torch.load(prev, weights_only=True)["epoch"] == 2, name
    # the cadence does not change the trajectory, so a resume may use another
    ref = nw.train(tiny_config(epochs=3), data)
    resumed = nw.train(tiny_config(epochs=3, checkpoint_every=5.0), data, tmp_path / "epochs",
                       resume=True)  # fmt: skip
    a, b = params_of(ref.model), params_of(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stored_when_checkpoint_every_counted_epochs_resumes(tmp_path):
    """An older ``config.json`` holds an int ``checkpoint_every`` in epochs and no
    ``checkpoint_every_epochs``: it reads as that epoch cadence, and the run resumes exactly."""
    data = tiny_data()
    cfg = tiny_config(epochs=5, momentum=0.9, checkpoint_every=None, checkpoint_every_epochs=2)
    whole = nw.train(cfg, data, tmp_path / "whole")
    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        nw.train(cfg, data, cut, probes=[*nw.DEFAULT_NETWORK_PROBES, interrupt_at(3)])
    payload = json.loads((cut / "config.json").read_text())
    training = payload["training"]
    training.pop("checkpoint_every_epochs")
    training["checkpoint_every"] = 2  # the old meaning: epochs
    (cut / "config.json").write_text(json.dumps(payload))
    saved, _ = nw.read_network_config(cut)
    assert (saved.checkpoint_every, saved.checkpoint_every_epochs) == (None, 2)
    with pytest.raises(ConfigError, match="data"):
        nw.resume_run(cut)  # toy data: not the built-in set the config names
    resumed = nw.resume_run(cut, data)  # the spelling of deepufm.training.resume_run
    assert resumed.epoch == 5
    a, b = params_of(whole.model), params_of(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(read_metrics(cut)) == strip(read_metrics(tmp_path / "whole"))


def test_divergence_is_reported():
    with pytest.raises(DivergenceError, match="epoch"):
        nw.train(tiny_config(lr=1e6, epochs=3), tiny_data())


def test_head_input_narrower_than_k_is_refused():
    with pytest.raises(ConfigError, match="width"):
        nw.build_model(tiny_config(width=0.03), tiny_data(K=3))

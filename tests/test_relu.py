"""The ReLU deep UFM off and on Definition 2 (THEORY §7): the flat family at the first ReLU and
the experiment's per-layer applicability of the linear predictions, at exact points."""

import pytest
import torch

from deepufm.errors import ConfigError
from deepufm.experiments import relu_ufm
from deepufm.experiments.checks import layer_predictions
from deepufm.matrices import layer_hessian
from deepufm.models.config import UFMConfig
from deepufm.theory import dnc_constants, dnc_optimum, flat_family_point
from deepufm.training.probes import loss_probe

CFG = UFMConfig(K=3, n=2, d=7, L=4, lam=0.01, activation="relu", device="cpu")


def test_flat_family_point_is_a_critical_point_with_the_definition_2_loss():
    k = dnc_constants(CFG)
    for a in (0.1, 0.2, 1 / 3):
        point = flat_family_point(CFG, a)
        probe = loss_probe(point, 0)
        assert probe["loss"] == pytest.approx(k.loss, rel=1e-12)
        assert probe["grad_norm"] < 1e-12
        U2 = point.preactivations()[0]
        # K-1 negative entries in every column, the rest as at Definition 2
        assert int((U2 < -1e-12).sum()) == (CFG.K - 1) * CFG.N
        H2 = point.features()[1]
        ref = dnc_optimum(CFG, nonnegative=True).features()[1]
        torch.testing.assert_close(H2, ref, rtol=0, atol=1e-12)


def test_flat_family_point_rejects_bad_input():
    with pytest.raises(ConfigError, match="a number in"):
        flat_family_point(CFG, 0.5)
    lin = UFMConfig(K=3, n=2, d=7, L=4, lam=0.01, device="cpu")
    with pytest.raises(ConfigError, match="relu"):
        flat_family_point(lin, 0.1)


def test_every_prediction_holds_at_a_definition_2_point():
    point = dnc_optimum(CFG, nonnegative=True)
    negative = relu_ufm._negative_fractions(point, 0.0)
    assert negative == {2: 0.0, 3: 0.0, 4: 0.0}
    assert relu_ufm._applicability(negative, CFG.L) == ({}, {})  # every layer in scope
    results = layer_predictions(point, dnc_constants(CFG), 1e-9)
    assert results and all(r.holds for r in results), [r for r in results if not r.holds]


def test_flat_family_breaks_only_the_first_layer():
    point = flat_family_point(CFG, 0.2)
    negative = relu_ufm._negative_fractions(point, 1e-9)
    assert negative[2] == pytest.approx((CFG.K - 1) / CFG.d)
    assert negative[3] == negative[4] == 0.0
    scopes, notes = relu_ufm._applicability(negative, CFG.L)
    assert list(notes) == [1] and "flat family" in notes[1] and "[D]" in notes[1]
    assert scopes == {
        1: f"out: v2 Thm 7 needs u^(2)..u^(4) >= 0 (u^(2) {100 * negative[2]:.1f}% negative)"
    }
    results = layer_predictions(point, dnc_constants(CFG), 1e-9, notes=notes, scopes=scopes)
    assert all(r.holds for r in results if r.layer != 1), [
        r for r in results if r.layer != 1 and not r.holds
    ]
    # W_1's Jacobian carries the masks of u^(2): K-1 of every K class directions are cut
    vals = layer_hessian(point, 1).eigvalsh()
    rank = int((vals > 1e-8 * vals[0]).sum())
    assert rank < CFG.K**2
    assert all(r.note and r.scope == scopes[1] for r in results if r.layer == 1)
    assert all(r.scope == "in" for r in results if r.layer != 1)


def test_zeroed_copies_and_leaves_the_model_alone():
    point = flat_family_point(CFG, 0.2)
    W1 = point.W[0].clone()
    small = point.zeroed(1e-3)
    assert torch.equal(point.W[0], W1)
    for p, q in zip(small.params, point.params):
        assert torch.equal(p, torch.where(q.abs() < 1e-3, torch.zeros_like(q), q))
    with pytest.raises(ValueError, match="below"):
        point.zeroed(-1.0)

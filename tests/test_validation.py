"""Nothing silently accepted: every numeric flag and field through one set of checks
(deepufm.validate), the library trainer's threshold rule and zero-solution warning, and bad
files for `deepufm analyze` as messages."""

import json

import numpy as np
import pytest

from deepufm import DeepUFM, UFMConfig, validate
from deepufm.cli import main
from deepufm.errors import ConfigError
from deepufm.training import TrainConfig, TrainState, start_run, train
from deepufm.training import network as nw

SMALL = ["--K", "2", "--n", "3", "--d", "4", "--L", "2", "--quiet", "--device", "cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, " ".join(err.split())


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda: TrainConfig(allow_trivial="no"), ["allow_trivial='no'", "boolean"]),
        (lambda: TrainConfig(lr=float("nan")), ["lr=nan", "> 0"]),
        (lambda: TrainConfig(checkpoint_every=float("inf")), ["checkpoint_every=inf"]),
        (lambda: TrainConfig(epochs=10**20), ["epochs=100000000000000000000", str(2**53)]),
        (lambda: TrainConfig(probe_at=[1, float("nan")]), ["probe_at"]),
        (lambda: UFMConfig(K=3, seed=2**64), [f"seed={2**64}", str(2**64 - 1)]),
        (lambda: UFMConfig(K=3, lam=float("inf")), ["lam=inf"]),
        (lambda: UFMConfig(K=True), ["K=True", "integer"]),
        (lambda: TrainState(DeepUFM.init(UFMConfig(K=2, n=2, d=2, L=1)), epoch=-5), ["epoch=-5"]),
        (lambda: nw.NetworkTrainConfig(seed=2**70), ["seed="]),
        (lambda: nw.NetworkTrainConfig(lam=float("nan")), ["lam=nan"]),
    ],
)
def test_out_of_range_values_name_parameter_value_and_range(make, needles):
    with pytest.raises(ConfigError) as info:
        make()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    cfg = UFMConfig(
        K=np.int64(3), n=np.int32(4), d=np.int64(5), L=np.int64(2), lam=np.float64(0.01)
    )
    assert cfg.K == 3 and type(cfg.K) is int and type(cfg.lam) is float
    tcfg = TrainConfig(lr=np.float32(0.5), epochs=np.int64(10), allow_trivial=np.bool_(False))
    assert type(tcfg.epochs) is int and tcfg.allow_trivial is False
    assert json.dumps(cfg.to_dict()) and json.dumps(tcfg.to_dict())
    assert validate.integer("x", np.uint8(7), 0, 10) == 7
    with pytest.raises(ConfigError):
        validate.number("x", np.float64("nan"))


def test_state_past_the_end_is_refused():
    model = DeepUFM.init(UFMConfig(K=2, n=2, d=2, L=1, device="cpu"))
    with pytest.raises(ConfigError, match=r"epoch=11.*epochs=10"):
        train(TrainState(model, epoch=11), TrainConfig(epochs=10))


def test_library_train_applies_the_threshold_rule():
    model = DeepUFM.init(UFMConfig(K=3, n=4, d=5, L=3, lam=1.0, device="cpu"))
    with pytest.raises(ConfigError, match="threshold"):
        train(TrainState(model), TrainConfig(epochs=10))


def test_ending_at_the_zero_solution_warns_with_threshold_and_lr():
    # The case: the v1 configuration, below the threshold (b = 0.0555 < b_crit = 0.1724),
    # with a step size so large that gradient descent falls to the zero solution (loss 0.5,
    # optimum 0.1648).
    cfg = UFMConfig(K=3, n=40, d=60, L=5, lam=0.01, device="cpu")
    with pytest.warns(UserWarning, match=r"zero solution.*lr=5\.0.*b = 0\.05547.*b_crit\(L=5\)"):
        result = train(TrainState(DeepUFM.init(cfg)), TrainConfig(lr=5.0, epochs=1000))
    assert result.records[-1]["loss"] == pytest.approx(0.5, abs=1e-12)


def test_a_run_at_the_optimum_does_not_warn(recwarn):
    cfg = UFMConfig(K=2, n=3, d=4, L=2, lam=0.01, device="cpu")
    train(TrainState(DeepUFM.init(cfg)), TrainConfig(lr=0.5, epochs=300))
    assert not [w for w in recwarn if "zero solution" in str(w.message)]


def test_cli_numeric_flags_and_toml_booleans(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('allow_trivial = "no"\nepochs = 3\n')
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", *SMALL, "--config", toml, "--out", out)
    assert code == 2 and "allow_trivial='no'" in err and "boolean" in err
    assert not out.exists()
    code, _, err = run_cli(
        capsys, "train", *SMALL, "--epochs", "99999999999999999999", "--out", out
    )
    assert code == 2 and "epochs=99999999999999999999" in err
    code, _, err = run_cli(capsys, "train", *SMALL, "--seed", str(2**64), "--out", out)
    assert code == 2 and f"seed={2**64}" in err
    assert not out.exists()


def test_too_large_an_allocation_is_refused_before_allocating(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", "--K", "3", "--d", "1000000", "--quiet", "--out", tmp_path / "big"
    )
    assert code == 1 and "GiB" in err and "smaller d" in err
    assert not (tmp_path / "big").exists()


@pytest.fixture
def trained(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *SMALL, "--epochs", "20", "--out", out)[0] == 0
    return out


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--rank-rtol", "nan", "--rank-rtol=nan"),
        ("--rank-rtol", "-1", "--rank-rtol=-1.0"),
        ("--relu-tol", "nan", "--relu-tol=nan"),
        ("--zero-below", "inf", "--zero-below=inf"),
        ("--layer", "9", "--layer=9"),
    ],
)
def test_analyze_rejects_bad_options(trained, capsys, flag, value, needle):
    code, _, err = run_cli(capsys, "analyze", trained, flag, value)
    assert code == 2 and needle in err and "expected" in err


@pytest.mark.parametrize("damage", ["shapes", "nan", "text", "object"])
def test_analyze_on_a_bad_params_file_is_a_message(trained, capsys, damage):
    path = trained / "params.npz"
    with np.load(path) as a:
        arrays = dict(a)
    if damage == "shapes":
        arrays["W1"] = np.zeros((7, 7))
    elif damage == "nan":
        arrays["W2"] = np.full_like(arrays["W2"], np.nan)
    elif damage == "object":
        arrays["H1"] = np.array([{"a": 1}], dtype=object)
    if damage == "text":
        path.write_text("not an npz\n")
    else:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    code, _, err = run_cli(capsys, "analyze", trained)
    assert code == 2 and "params.npz" in err
    want = {
        "shapes": "does not match",
        "nan": "non-finite",
        "text": "not a readable",
        "object": "not a readable",
    }
    assert want[damage] in err, err


def test_start_run_validates_everything_before_writing(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ConfigError):
        start_run(UFMConfig(K=2, n=3, d=4, L=2, lam=1.0, device="cpu"), TrainConfig(), out)
    assert not out.exists()

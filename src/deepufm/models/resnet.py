"""A real network with a deep linear head: ResNet-20 feature map + ``L`` bias-free linear layers.

v2 App. G.2: the feature map is the CIFAR ResNet-20 of He et al. (2016, §4.2) — a
3 x 3 convolution to 16 channels, three stages of three basic blocks with 16, 32, 64 channels
(stride 2 at the start of stages 2 and 3), global average pooling — giving ``h^{(1)}`` of
dimension 64 (``feature_dim``). Shortcuts that change shape use **option B** (a strided 1 x 1
convolution followed by BatchNorm); the others are identities. A ``width`` multiplier scales all
channel counts (``round(16 w), round(32 w), round(64 w)``) and ``blocks`` sets the blocks per stage
(3 gives ResNet-20; 1 a tiny ResNet-8 for tests). The head is ``L`` bias-free ``nn.Linear`` layers
without activations (a deep *linear* head): ``W_1`` is ``(d, feature_dim)``, ``W_2..W_{L-1}``
``(d, d)``, ``W_L`` ``(K, d)``; ``z = W_L ... W_1 h^{(1)}``. All weights use PyTorch's default
initialisation, drawn from ``seed`` without touching the global random state.

Objective (the deep UFM's, per batch): for a batch of ``B`` samples with features ``H`` (``B`` rows)

    L_B = D_B + sum_l lam_l/2 ||W_l||_F^2 + lam_H/2 ||H||_F^2 + wd/2 sum_{backbone p} ||p||^2,

``D_B`` the MSE ``||Z - Y||_F^2 / (2B)`` or the mean cross-entropy. The feature penalty is the
**sum over the batch** (not a mean): with the whole data set as the batch, ``L_B`` (``wd = 0``) is
exactly the deep-UFM objective with ``H_1`` = the network's features (so ``lam_H`` must be small,
"to offset the number of samples"); with mini-batches of ``B`` of ``N`` samples, its expectation is
the deep-UFM objective with ``lam_H`` scaled by ``B / N``.

**BatchNorm and curvature.** Curvature is measured in **eval mode** by default: BatchNorm uses its
running statistics, so the network is a fixed function of its parameters and the Hessian does not
depend on how the data are batched. ``bn_mode="train"`` instead uses each batch's statistics, as
during training. :func:`curvature_mode` applies the choice and restores the module's modes and
BatchNorm buffers afterwards (train-mode passes would otherwise update the running statistics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepufm.errors import ConfigError
from deepufm.models.config import DTYPES, UFMConfig
from deepufm.models.ufm import DeepUFM

STAGE_CHANNELS = (16, 32, 64)
BN_MODES = ("eval", "train")


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; 3 x 3 convolutions, option-B shortcut.

    Maps ``(B, c_in, H, W)`` to ``(B, c_out, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(c_out, dtype=dtype)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, dtype=dtype)
        self.bn2 = nn.BatchNorm2d(c_out, dtype=dtype)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False, dtype=dtype),
                nn.BatchNorm2d(c_out, dtype=dtype),
            )

    def forward(self, x: Tensor) -> Tensor:
        """The block on a batch:
        ``(B, c_in, H, W) -> (B, c_out, ceil(H/stride), ceil(W/stride))``; the residual is added
        before the final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """The CIFAR ResNet feature map: ``(B, in_channels, H, W)`` -> ``(B, feature_dim)``."""

    def __init__(
        self, in_channels: int, width: float, blocks: int, dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        channels = [max(1, round(c * width)) for c in STAGE_CHANNELS]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False, dtype=dtype),
            nn.BatchNorm2d(channels[0], dtype=dtype),
            nn.ReLU(),
        )
        layers, c_in = [], channels[0]
        for stage, c_out in enumerate(channels):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride, dtype))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.feature_dim = channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Stem, the residual stages, then a global average over the spatial axes:
        ``(B, in_channels, H, W) -> (B, feature_dim)``."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class ResNetUFM(nn.Module):
    """ResNet feature map followed by a deep linear head (module docstring; v2 App. G.2).

    Args:
        K: classes (>= 2).
        in_channels: 1 (MNIST, Fashion-MNIST) or 3 (CIFAR-10).
        d: head width (>= K); [U] provisional default 64.
        L: head layers (>= 1); the paper's four.
        width: channel multiplier of the feature map (> 0); ``feature_dim = round(64 * width)``.
        blocks: basic blocks per stage (3 = ResNet-20).
        dtype: parameter dtype (float64 by default).
        seed: seed of the initialisation (the global random state is left untouched).
    """

    def __init__(
        self,
        K: int,
        in_channels: int = 1,
        d: int = 64,
        L: int = 4,
        width: float = 1.0,
        blocks: int = 3,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("K", K, 2)
        _check_int("d", d, K, f"an integer >= K={K}")
        _check_int("L", L, 1)
        _check_int("blocks", blocks, 1)
        _check_int("seed", seed, 0)
        if in_channels not in (1, 3) or isinstance(in_channels, bool):
            raise ConfigError("in_channels", in_channels, "1 or 3")
        if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
            raise ConfigError("width", width, "a number > 0")
        self.K, self.d, self.L = K, d, L
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.backbone = ResNetFeatures(in_channels, width, blocks, dtype)
            self.feature_dim = self.backbone.feature_dim
            dims = [self.feature_dim] + [d] * (L - 1) + [K]
            self.head = nn.ModuleList(
                nn.Linear(a, b, bias=False, dtype=dtype) for a, b in pairwise(dims)
            )

    def features(self, x: Tensor) -> Tensor:
        """``H_1`` as rows: ``(B, feature_dim)`` backbone output for ``x`` ``(B, C, H, W)``."""
        return self.backbone(x)

    def head_forward(self, h: Tensor) -> Tensor:
        """Logits ``(B, K)`` of features ``h`` ``(B, feature_dim)``: ``h W_1^T ... W_L^T``."""
        for layer in self.head:
            h = layer(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)``."""
        return self.head_forward(self.features(x))

    def head_weights(self) -> list[Tensor]:
        """``[W_1, ..., W_L]`` (the parameters themselves, not copies)."""
        return [layer.weight for layer in self.head]


def _check_int(name: str, value: object, minimum: int, valid: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, valid or f"an integer >= {minimum}")


def _layer_lams(lam: float | Sequence[float], L: int) -> list[float]:
    lams = list(lam) if isinstance(lam, Sequence) else [lam] * L
    if len(lams) != L:
        raise ConfigError("lam", lam, f"a number or a list of L={L} numbers")
    return [float(v) for v in lams]


def regulariser(
    model: ResNetUFM,
    features: Tensor,
    lam: float | Sequence[float],
    lam_H: float,
    weight_decay: float = 0.0,
) -> Tensor:
    """``sum_l lam_l/2 ||W_l||_F^2 + lam_H/2 ||features||_F^2 + wd/2 sum_backbone ||p||^2``.

    ``features`` ``(B, feature_dim)`` are the batch's ``H_1`` rows (sum over the batch, module
    docstring); ``lam`` is one number or ``L`` numbers; the backbone weight decay covers every
    backbone parameter (convolutions and BatchNorm affine parameters).
    """
    lams = _layer_lams(lam, model.L)
    reg = 0.5 * lam_H * features.pow(2).sum()
    for lam_l, W in zip(lams, model.head_weights(), strict=True):
        reg = reg + 0.5 * lam_l * W.pow(2).sum()
    if weight_decay:
        reg = reg + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.backbone.parameters())
    return reg


def batch_data_loss(logits: Tensor, y: Tensor, loss: str = "mse") -> Tensor:
    """Data loss of a batch: ``||Z - Y||_F^2 / (2B)`` (MSE, one-hot ``Y``) or the mean
    cross-entropy; ``logits`` ``(B, K)``, ``y`` ``(B,)`` long."""
    if loss == "mse":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return 0.5 * (logits - target).pow(2).sum() / logits.shape[0]
    if loss == "ce":
        return F.cross_entropy(logits, y)
    raise ConfigError("loss", loss, "mse or ce")


def batch_objective(
    model: ResNetUFM,
    x: Tensor,
    y: Tensor,
    lam: float | Sequence[float],
    lam_H: float,
    loss: str = "mse",
    weight_decay: float = 0.0,
) -> Tensor:
    """``L_B`` of the module docstring for images ``x`` ``(B, C, H, W)`` and labels ``y`` ``(B,)``."""
    H = model.features(x)
    return batch_data_loss(model.head_forward(H), y, loss) + regulariser(
        model, H, lam, lam_H, weight_decay
    )


@contextmanager
def curvature_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[nn.Module]:
    """Put ``model`` in the mode in which curvature is measured, restoring it afterwards.

    ``"eval"`` (default): BatchNorm uses its running statistics — the network is one fixed function
    of its parameters, independent of batch composition. ``"train"``: each forward pass uses its
    batch's statistics. On exit every submodule's ``training`` flag and every buffer (the running
    statistics a train-mode pass updates) are restored.
    """
    if bn_mode not in BN_MODES:
        raise ConfigError("bn_mode", bn_mode, f"one of {', '.join(BN_MODES)}")
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    model.train(bn_mode == "train")
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)
        for m, flag in flags:
            m.training = flag


def head_state(
    model: ResNetUFM,
    X: Tensor,
    y: Tensor,
    lam: float | Sequence[float] = 5e-3,
    lam_H: float = 1e-6,
    loss: str = "mse",
    bn_mode: str = "eval",
    batch_size: int | None = None,
) -> DeepUFM:
    """The head of ``model`` on data ``(X, y)`` as a deep UFM (v2 §3.4, App. G.2).

    ``H1`` ``(feature_dim, N)`` are the features of ``X`` ``(N, C, H, W)`` (columns, class-major as
    ``y`` must be: ``[0]*n + [1]*n + ...``) computed under :func:`curvature_mode` ``bn_mode`` in
    chunks of ``batch_size`` (all at once by default; in train mode the chunks' statistics are
    used); ``W`` copies of the head weights. The config has ``d_in = feature_dim``,
    ``lam_W = lam``, ``lam_H``, linear activation. Its objective equals the network's full-batch
    objective (``weight_decay = 0``) with the backbone held fixed, so every head-layer Hessian
    ``H_l`` of the DeepUFM is that of the network.
    """
    K = model.K
    if y.ndim != 1 or y.shape[0] != X.shape[0] or y.shape[0] % K:
        raise ConfigError("y", tuple(y.shape), f"(N,) labels for the N={X.shape[0]} images")
    n = y.shape[0] // K
    if not torch.equal(y, torch.arange(K, device=y.device).repeat_interleave(n)):
        raise ConfigError("y", "not class-major", "balanced class-major labels [0]*n + [1]*n + ...")
    dtype_names = {dt: name for name, dt in DTYPES.items()}
    if X.dtype not in dtype_names:
        raise ConfigError("X.dtype", X.dtype, f"one of {', '.join(DTYPES)}")
    with curvature_mode(model, bn_mode), torch.no_grad():
        chunks = [X] if batch_size is None else X.split(batch_size)
        H = torch.cat([model.features(c) for c in chunks])
    config = UFMConfig(
        K=K,
        n=n,
        d=model.d,
        L=model.L,
        d_in=model.feature_dim,
        activation="linear",
        loss=loss,
        lam_W=_layer_lams(lam, model.L),
        lam_H=lam_H,
        dtype=dtype_names[X.dtype],
        device=str(X.device),
    )
    return DeepUFM(config, H.T.contiguous(), [W.detach().clone() for W in model.head_weights()])

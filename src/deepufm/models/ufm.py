"""`DeepUFM`: the state of a deep unconstrained feature model (Concepts: *Deep unconstrained
feature models*)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deepufm.models import functional as Fn
from deepufm.models.config import UFMConfig


@dataclass
class DeepUFM:
    """Parameters of a deep UFM together with their configuration.

    Attributes:
        config: the hyperparameters.
        H1: unconstrained features, ``(d, N)``, class-major columns (``(d_in, N)`` when the config
            has ``d_in``, e.g. the head of a real network, v2 App. G.2).
        W: ``[W_1, ..., W_L]``; ``W_l`` is ``(d, d)`` for ``l < L`` and ``W_L`` is ``(K, d)``.

    Layer ``l`` is the weight ``W_l``; its input features are ``H_l`` (``features()[l-1]``).
    """

    config: UFMConfig
    H1: Tensor
    W: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.config
        if tuple(self.H1.shape) != (cfg.input_dim, cfg.N):
            raise ValueError(
                f"H1 has shape {tuple(self.H1.shape)}, expected {(cfg.input_dim, cfg.N)}"
            )
        shapes = [tuple(W.shape) for W in self.W]
        if shapes != cfg.layer_shapes():
            raise ValueError(f"W has shapes {shapes}, expected {cfg.layer_shapes()}")

    @classmethod
    def init(cls, config: UFMConfig, device: torch.device | str | None = None) -> DeepUFM:
        """I.i.d. ``N(0, init_std^2)`` parameters drawn on the CPU from ``config.seed``.

        Drawing on the CPU makes the initial point independent of the device it then moves to.
        """
        gen = torch.Generator().manual_seed(config.seed)
        dtype = config.torch_dtype
        device = config.torch_device if device is None else torch.device(device)

        def draw(shape: tuple[int, int]) -> Tensor:
            return (torch.randn(shape, generator=gen, dtype=dtype) * config.init_std).to(device)

        H1 = draw((config.input_dim, config.N))
        return cls(config, H1, [draw(s) for s in config.layer_shapes()])

    # -- views ---------------------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """``[H1, W_1, ..., W_L]``."""
        return [self.H1, *self.W]

    def labels(self) -> Tensor:
        """``Y``: ``(K, N)``."""
        cfg = self.config
        return Fn.labels(cfg.K, cfg.n, self.H1.dtype, self.H1.device)

    def features(self) -> list[Tensor]:
        """``[H_1, ..., H_L, Z]``."""
        return Fn.forward(self.H1, self.W, self.config.activation)

    def preactivations(self) -> list[Tensor]:
        """``[U_2, ..., U_{L+1}]``, ``U_{l+1} = W_l H_l``."""
        return Fn.preactivations(self.H1, self.W, self.config.activation)

    def output(self) -> Tensor:
        """Logits ``Z``: ``(K, N)``."""
        return self.features()[-1]

    # -- objective -----------------------------------------------------------------------------
    def data_loss(self) -> Tensor:
        """The data loss ``D`` at the current parameters (mean over the ``N`` samples, no
        regulariser; MSE or CE as ``config.loss`` says): a 0-dim tensor, differentiable in ``H1``
        and ``W``."""
        cfg = self.config
        return Fn.data_loss(self.output(), cfg.loss, cfg.K, cfg.n)

    def regulariser(self) -> Tensor:
        """``sum_l lam_l/2 ||W_l||_F^2 + lam_H/2 ||H_1||_F^2`` with the configuration's weights:
        a 0-dim tensor."""
        return Fn.regulariser(self.H1, self.W, self.config.lam_W, self.config.lam_H)

    def total_loss(self) -> Tensor:
        """The objective ``data_loss() + regulariser()`` that training minimises: a 0-dim tensor."""
        return self.data_loss() + self.regulariser()

    def loss_fn(self):
        """The objective as a pure function ``(H1, Ws) -> scalar`` for ``torch.func``."""
        cfg = self.config

        def fn(H1: Tensor, Ws: list[Tensor]) -> Tensor:
            return Fn.total_loss(
                H1,
                Ws,
                K=cfg.K,
                n=cfg.n,
                activation=cfg.activation,
                loss=cfg.loss,
                lam_W=cfg.lam_W,
                lam_H=cfg.lam_H,
            )

        return fn

    # -- conversion ----------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> DeepUFM:
        """A new model with ``H1`` and every ``W_l`` moved by
        ``Tensor.to(device=..., dtype=...)`` (``None`` keeps each); the configuration object is
        reused unchanged, and tensors already there are not copied."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return DeepUFM(self.config, move(self.H1), [move(W) for W in self.W])

    def clone(self) -> DeepUFM:
        """A copy with cloned parameters (same device, dtype and configuration): changing it in
        place leaves this model as it is."""
        return DeepUFM(self.config, self.H1.clone(), [W.clone() for W in self.W])

    def zeroed(self, below: float) -> DeepUFM:
        """A copy with every parameter entry of magnitude ``< below`` set to 0.

        The paper's ReLU practice (v2 Figs 4–5): after long training, entries that
        should be exactly 0 at a Definition-2 point are tiny instead, and only exact zeros get
        sigma'(0) = 1. ``below = 0`` returns an unchanged copy.
        """
        if not below >= 0:
            raise ValueError(f"below={below} must be >= 0")
        out = self.clone()
        for p in out.params:
            p.masked_fill_(p.abs() < below, 0.0)
        return out

    def state_arrays(self) -> dict[str, Tensor]:
        """``{"H1": H1, "W1": W_1, ..., "WL": W_L}`` (the names of ``params.npz``)."""
        out = {"H1": self.H1}
        out.update({f"W{l}": W for l, W in enumerate(self.W, start=1)})
        return out

    @classmethod
    def from_arrays(cls, config: UFMConfig, arrays, device=None) -> DeepUFM:
        """Inverse of :meth:`state_arrays`; accepts tensors or NumPy arrays (e.g. ``params.npz``)."""
        dtype = config.torch_dtype
        device = config.torch_device if device is None else torch.device(device)
        get = lambda k: torch.as_tensor(arrays[k]).to(device=device, dtype=dtype)  # noqa: E731
        return cls(config, get("H1"), [get(f"W{l}") for l in range(1, config.L + 1)])

"""Analyse your own classifier: a small CNN with a biased 3-layer MLP head on the embedded MNIST.

Trains the network (a few minutes on a laptop CPU with the defaults), then runs the paper's
per-layer analysis on every ``nn.Linear`` of the head with ``deepufm.analyze`` and writes
``results.json``, the figures and ``report.html``::

    pip install ".[mnist]"
    python examples/own_classifier.py --out runs/own-classifier

During training a ``deepufm.TrainingProbe`` follows the middle head layer every ``--probe-every``
epochs into ``<out>-training/metrics.jsonl`` and draws the paper's over-training figures
(v2 Figs 6, 16-18) into ``<out>-training/figures``.

The model is an ordinary ``nn.Module`` with BatchNorm (measured in eval mode), ReLU and biases;
nothing about it is specific to deepufm. ``--epochs 1 --per-class 4`` runs in seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import deepufm
from deepufm.data import load_dataset


class SmallCNN(nn.Module):
    """Two convolutions (with BatchNorm) to 32 features, then a biased MLP head 32-32-32-10."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, width, 5, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn() -> SmallCNN:
    """Factory for ``deepufm analyze --model own_classifier:small_cnn`` (seeded)."""
    torch.manual_seed(0)
    return SmallCNN()


def paper_mse(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's data loss ``1/(2B) sum ||z - e_y||^2`` (= K/2 * nn.MSELoss())."""
    return 0.5 * (z - F.one_hot(y, z.shape[1]).to(z.dtype)).pow(2).sum(dim=1).mean()


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int = 0,
    probe: Callable[..., object] | None = None,
) -> None:
    """Minibatch AdamW on the paper's MSE; ``probe(model, epoch, train_loss=...)`` (if given)
    before every epoch and after the last."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    model.train()
    last = None
    for epoch in range(epochs):
        if probe is not None:
            probe(model, epoch, train_loss=last)  # measures in eval mode, restores train mode
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for idx in order.split(batch_size):
            opt.zero_grad()
            loss = paper_mse(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        last = total / len(y)
        print(f"epoch {epoch + 1}/{epochs}: training loss {last:.5f}", flush=True)
    if probe is not None:
        probe(model, epochs, train_loss=last)


def main(argv: Sequence[str] | None = None) -> deepufm.Analysis:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/own-classifier", help="where the report goes")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--per-class", type=int, default=None, help="images per class (all: 500)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--probe-every", type=int, default=5, help="epochs between probes (0: none)")
    p.add_argument("--probe-out", default=None, help="the probe's run folder [<out>-training]")
    args = p.parse_args(argv)

    model = small_cnn()
    dtype = next(model.parameters()).dtype  # float32 unless the default dtype was changed
    data = load_dataset("mnist-embedded", per_class=args.per_class, dtype=dtype)
    probe = None
    if args.probe_every > 0:
        # Over training: the same per-layer records for the middle head layer, every few epochs
        probe_out = args.probe_out or str(
            Path(args.out).with_name(Path(args.out).name + "-training")
        )
        probe = deepufm.TrainingProbe(
            (data.X, data.y), "mse", layers=["head.2"], out_dir=probe_out,
            every=args.probe_every, at=[args.epochs], batch_size=1000,  # and the last epoch
        )  # fmt: skip
    start = time.perf_counter()
    train(model, data.X, data.y, args.epochs, args.batch_size, args.lr, args.weight_decay,
          probe=probe)  # fmt: skip
    print(f"trained in {time.perf_counter() - start:.0f} s")
    if probe is not None:
        figures = probe.figures(formats=["png"])
        probe.close()  # the probe's manifest.json: status "complete"
        print(f"over-training figures ({len(probe.read())} probes): {figures[0].parent}")

    # The analysis itself: five lines for any model.
    analysis = deepufm.analyze(model, (data.X, data.y), loss="mse", batch_size=1000)
    report = analysis.write(args.out)
    for r in analysis.layers:
        print(
            f"{r['name']:>7}: {r['outlier_count']} Hessian outliers (K^2 = 100), Papyan ranks "
            f"{r['papyan_ranks']}, NC1 {r['nc1']:.3g}, effective rank of W "
            f"{r['effective_rank_weight']:.3g}"
        )
    print(f"accuracy {analysis.config['accuracy']:.4f}; report: {report}")
    return analysis


if __name__ == "__main__":
    main()

"""Data-parallel training of a ResNetUFM with ``torch.distributed`` (DDP), launched by ``torchrun``.

Launch (two processes on the CPU with gloo; NCCL is chosen on the GPU)::

    torchrun --nproc-per-node 2 -m deepufm.training.distributed --preset quick --out runs/ddp

Every rank holds the data, draws the same batch order and computes on its contiguous share of each
batch; :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients, and the shard
objective (:func:`deepufm.training.network.shard_objective`) is weighted so that the average is the
gradient of the whole batch's objective. The trajectory is therefore that of single-process
training up to floating-point summation order, provided the network is the same function of each
batch on every rank:

* ``bn_train="batch"``: BatchNorm must use the statistics of the *whole* batch. On the GPU the
  layers become :class:`torch.nn.SyncBatchNorm`; PyTorch's SyncBatchNorm refuses CPU tensors, so on
  the CPU they become :class:`AllReduceBatchNorm2d`, which sums the per-channel moments over the
  ranks with differentiable all-reduces (gloo).
* ``bn_train="frozen"``: BatchNorm is an affine map with fixed statistics; nothing to synchronise.

Probes, the progress bar and checkpoints run on rank 0 only (the other ranks wait for it at their
next collective). Probes must not use collectives, so ``bn_mode="train"`` probes are refused.

**SIGINT/SIGTERM** (to one rank, to all, or to ``torchrun``, which passes its signal on to every
rank): each rank only notes the signal; at the end of every epoch the ranks all-reduce it (MAX of
the signal numbers, one 8-byte collective per epoch), so all stop after the same epoch; rank 0
writes the checkpoint, every rank waits until it is on disk, then every rank exits with
``128 + signal`` and rank 0 prints the command that resumes. ``torchrun`` kills ranks that have not
exited ``--shutdown-timeout`` seconds (30 by default) after passing the signal on, so an epoch must
take less than that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from deepufm.data import ClassificationData
from deepufm.errors import ConfigError, DeepUFMError, Interrupted, RunError
from deepufm.training import manifest as mf
from deepufm.training import rundir as rd
from deepufm.training.network import (
    DEFAULT_NETWORK_PROBES,
    KIND,
    FeatureLogits,
    NetworkProbe,
    NetworkState,
    NetworkTrainConfig,
    RankStop,
    _loop,
    _open_run,
    load_network_data,
    new_state,
    preset,
    read_network_config,
    restore_state,
)


class _SumOverRanks(torch.autograd.Function):
    """``sum_r x_r`` on every rank; its adjoint is again the sum over the ranks (every rank's output
    depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(x: Tensor) -> Tensor:
    """The sum of ``x`` over all ranks, differentiable (the gradient is summed over ranks too)."""
    return _SumOverRanks.apply(x)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the union of the ranks' batches, on any device (gloo or NCCL).

    In training mode with more than one rank, the per-channel count, mean and (biased) variance are
    computed from all-reduced sums (two passes: the mean first, then the centred squares, as the
    single-process kernel does), through differentiable all-reduces so that the backward pass sees
    the whole batch too; the running statistics are updated as :class:`nn.BatchNorm2d` does (with
    the unbiased variance). Otherwise it is exactly :class:`nn.BatchNorm2d`.
    """

    def forward(self, x: Tensor) -> Tensor:
        """BatchNorm of ``x`` ``(B, C, H, W)`` with the statistics of the whole batch over every
        rank in training mode; the ordinary BatchNorm otherwise."""
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = differentiable_all_reduce(torch.cat([x.sum(dim=dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = differentiable_all_reduce(centred.pow(2).sum(dim=dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` replaced by a synchronised one, in place where possible.

    CUDA modules get :class:`torch.nn.SyncBatchNorm`, others :class:`AllReduceBatchNorm2d`. The new
    layers reuse the old parameter and buffer tensors, so optimizers built on the parameters and
    references to them stay valid.
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, AllReduceBatchNorm2d):
        device = next(iter(module.buffers())).device
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        out = AllReduceBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=device,
            dtype=module.running_mean.dtype if module.running_mean is not None else None,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module


def _check(config: NetworkTrainConfig) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "torch.distributed",
            "not initialised",
            "a process group (launch with torchrun, or call init_process_group first)",
        )
    world = dist.get_world_size()
    if config.bn_mode == "train" and world > 1:
        raise ConfigError(
            "bn_mode", config.bn_mode, "eval under data-parallel training (probes run on rank 0)"
        )
    return dist.get_rank(), world


def train_distributed(
    config: NetworkTrainConfig,
    data: ClassificationData,
    run_dir: Path | str | None = None,
    probes: Sequence[NetworkProbe] = DEFAULT_NETWORK_PROBES,
    progress: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    resume_command: str | None = None,
) -> NetworkState:
    """:func:`deepufm.training.network.train` on every rank of an initialised process group.

    Call it on every rank with the same arguments (the data in full on each). Returns each rank's
    final state (identical parameters on all ranks; ``records`` only on rank 0). A SIGINT/SIGTERM
    stops every rank after the same epoch with a checkpoint (module docstring); the
    :class:`~deepufm.errors.Interrupted` of rank 0 names ``resume_command`` (default: this call
    with ``resume=True``).
    """
    rank, world = _check(config)
    run_path = None if run_dir is None else Path(run_dir)
    with contextlib.ExitStack() as stack:
        if run_path is None:
            state = new_state(config, data)
        else:
            decided = [False]
            if rank == 0:  # rank 0 holds the directory's lock and applies the overwrite rule
                ctx = rd.open_run(run_path, KIND, overwrite=overwrite, resume=resume)
                decided[0] = stack.enter_context(ctx)
                state = _open_run(config, data, run_path, decided[0])
            dist.broadcast_object_list(decided, src=0)  # whether rank 0 continues the run
            if rank != 0:
                read_network_config(run_path)  # rank 0 has validated it
                payload = rd.load_checkpoint(run_path) if decided[0] else None
                state = (
                    new_state(config, data)
                    if payload is None
                    else restore_state(config, data, payload)
                )
                state.run_dir = run_path
        hint = resume_command or (
            f"deepufm.training.distributed.train_distributed(config, data, {str(run_path)!r}, "
            "resume=True) on every rank"
        )
        state = _train_ranks(state, config, data, probes, progress, world, rank, hint)
        if run_path is not None and rank == 0:
            mf.finish(run_path)
    return state


def rank_stop(device: torch.device, hint: str | None = None) -> RankStop:
    """The collectives by which the ranks stop together (:class:`~deepufm.training.network.RankStop`);
    their tensors live on ``device`` (NCCL needs CUDA tensors)."""

    def agree(signum: int) -> int:
        flag = torch.tensor([signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def confirm(written: bool) -> bool:
        flag = torch.tensor([int(written)], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return RankStop(agree, confirm, hint)


def _train_ranks(state, config, data, probes, progress, world, rank, hint=None) -> NetworkState:
    if config.bn_train == "batch" and world > 1:
        sync_batchnorm(state.model)
    device = torch.device(config.device)
    net = DistributedDataParallel(
        FeatureLogits(state.model), device_ids=[device] if device.type == "cuda" else None
    )
    X = data.X.to(device, config.torch_dtype)
    y = data.y.to(device)
    together = rank_stop(device, hint)
    return _loop(state, net, X, y, data, probes, progress, world, rank, together)


# -- torchrun entry point -------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node P -m deepufm.training.distributed",
        description="Data-parallel training of ResNet-20 + deep linear head (deepufm).",
    )
    parser.add_argument("--preset", default="quick", help="paper or quick (default quick)")
    parser.add_argument("--dataset", default="mnist-embedded")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a NetworkTrainConfig field (JSON value), e.g. --set epochs=100",
    )
    return parser.parse_args(argv)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError("--set", pair, "FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resume_command(argv: Sequence[str]) -> str:
    """The torchrun command that continues the run ``argv`` (this module's arguments) started."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    nodes = max(1, int(os.environ.get("WORLD_SIZE", "1")) // max(local, 1))
    launch = f"torchrun --nproc-per-node {local}"
    if nodes > 1:
        launch = f"torchrun --nnodes {nodes} --nproc-per-node {local} (your rendezvous options)"
    kept = [a for a in argv if a not in ("--resume", "--overwrite")]
    return f"{launch} -m deepufm.training.distributed {shlex.join(kept)} --resume"


def _say(message: str) -> None:
    print(f"deepufm.training.distributed: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point under ``torchrun`` (reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` ...).

    Returns the exit status: 0 done, 2 bad input, 1 a runtime failure, 130 / 143 stopped by
    SIGINT / SIGTERM after the checkpoint was written (rank 0 prints how to resume).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = preset(args.preset, args.dataset, **_overrides(args.set))
        if config.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            config = config.replace(device=f"cuda:{local}")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
        try:
            data = load_network_data(config, args.data_dir)
            train_distributed(
                config,
                data,
                args.out,
                progress=True,
                resume=args.resume,
                overwrite=args.overwrite,
                resume_command=resume_command(argv),
            )
        finally:
            dist.destroy_process_group()
    except Interrupted as exc:
        if rank == 0:
            _say(f"stopped: {exc}")
        return exc.exit_code
    except DeepUFMError as exc:
        _say(f"error (rank {rank}): {exc}")
        return 1 if isinstance(exc, RunError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

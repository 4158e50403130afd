"""A Hessian whose data are sharded over ``torch.distributed`` ranks: one all-reduce per product.

Each rank holds a :class:`~deepufm.matrices.module_hessian.ModuleHessian` of its own shard of the
data (the same model and parameters on every rank). With a batch-mean loss the whole data set's
Hessian is ``sum_r (N_r / N) H_r`` (``N_r`` the shard sizes, ``N`` their sum); with a summed loss
it is ``sum_r H_r``. A product ``H V`` computes the local term for the whole block ``V`` and sums
it over the ranks with a single ``all_reduce``.

Every rank must call :meth:`DistributedHessian.matmat` the same number of times with the same
``V`` (a collective): run the same eigensolver with the same start vector on every rank —
``topk`` (certified block Lanczos with seeded start blocks) does, because the reduced products,
and so every Lanczos iterate, are identical on all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from deepufm.errors import ConfigError
from deepufm.matrices.module_hessian import ModuleHessian
from deepufm.matrices.operator import SymmetricMatrix


class DistributedHessian(SymmetricMatrix):
    """The Hessian over the union of the ranks' shards (module docstring).

    Args:
        local: this rank's :class:`ModuleHessian` (its data = this rank's shard).
        group: the process group (default: the whole world).
    """

    matrix_free = True

    def __init__(self, local: ModuleHessian, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "torch.distributed", "not initialised", "an initialised process group"
            )
        super().__init__(local.size, local.dtype, local.device)
        self.local, self.group = local, group
        # NCCL gathers device tensors only, gloo CPU ones
        where = "cpu" if dist.get_backend(group) == "gloo" else local.device
        sizes = torch.tensor(
            [float(local.num_data), float(local.size)], dtype=torch.float64, device=where
        )
        gathered = [torch.zeros_like(sizes) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, sizes, group=group)
        if any(int(g[1]) != local.size for g in gathered):
            raise ConfigError(
                "local", [int(g[1]) for g in gathered], "the same parameter count on every rank"
            )
        self.num_data = int(sum(int(g[0]) for g in gathered))
        self.weight = local.num_data / self.num_data if local.reduction == "mean" else 1.0

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` ``(p, m)``: the local shard's product, then one ``all_reduce``."""
        out = self.local.matmat(V) * self.weight
        # gloo reduces CPU tensors only; NCCL reduces on the GPU in place
        backend = dist.get_backend(self.group)
        if backend == "gloo" and out.device.type != "cpu":
            host = out.cpu()
            dist.all_reduce(host, group=self.group)
            return host.to(out.device)
        dist.all_reduce(out, group=self.group)
        return out


def shard_bounds(N: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``N`` samples (sizes differ by <= 1,
    as ``torch.tensor_split``)."""
    q, r = divmod(N, world)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)

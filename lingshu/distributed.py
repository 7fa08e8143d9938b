"""``torch.distributed`` plumbing for data-parallel training launched by ``torchrun``.

``torchrun`` (or ``lingshu train --nproc N``, which calls it) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` starts the process group (NCCL on CUDA,
gloo on CPU) and :class:`DistInfo` tells the trainer which share of each global batch is
this process's. Everything here is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "info", "shutdown", "barrier", "launched_by_torchrun"]


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (``0`` and ``1`` without ``torch.distributed``)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (strided, so every rank gets ~n/world)."""
        return slice(self.rank, n, self.world)


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[DistInfo, str]:
    """Start the process group if launched by ``torchrun``.

    Parameters
    ----------
    device
        ``"cpu"`` or ``"cuda"``: picks the backend (gloo / NCCL); on CUDA each process
        takes the GPU of its ``LOCAL_RANK``.

    Returns
    -------
    info, device
        This process's :class:`DistInfo` and the device string it should train on.
    """
    if not launched_by_torchrun():
        return DistInfo(), device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return DistInfo(dist.get_rank(), dist.get_world_size()), device


def info() -> DistInfo:
    """The current process's rank and world size."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

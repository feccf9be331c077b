"""The process group: who am I, how many are we, and which shards of a batch are mine.

Plain :mod:`torch.distributed` (``torchrun``, ``accelerate launch`` and ``torch.multiprocessing``
all set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``): :func:`init_process_group`
joins the group the launcher describes (gloo on CPU, nccl on CUDA). Without a group every
function here answers for one process (rank 0 of 1), so library code calls them unconditionally.

A batch of ``n`` samples is cut into ``shards`` equal parts; shard ``s`` draws its randomness
from a generator of its own, so the union of the shards does not depend on how many processes
draw them. With ``W`` processes, rank ``r`` owns the contiguous shards
``r * shards / W .. (r + 1) * shards / W - 1`` (:func:`shard_range`).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "local_rank",
    "is_main_process",
    "barrier",
    "init_process_group",
    "destroy_process_group",
    "shard_range",
    "default_device",
]


def is_distributed() -> bool:
    """Whether a :mod:`torch.distributed` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if is_distributed() else 0


#: (world size, rank, local rank) variables of the launchers, torchrun's first; MPI launchers
#: (``mpirun``, which ``accelerate launch`` uses for multi-CPU runs) set only their own
_LAUNCHER_VARIABLES = (
    ("WORLD_SIZE", "RANK", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),  # MPICH, Intel MPI
)


def _launcher() -> tuple[int, int, int] | None:
    """``(world size, rank, local rank)`` from the first launcher whose variables are set."""
    for size, rank_, local in _LAUNCHER_VARIABLES:
        if size in os.environ:
            return int(os.environ[size]), int(os.environ.get(rank_, "0")), int(os.environ.get(local, "0"))
    return None


def local_rank() -> int:
    """The rank on this node (``LOCAL_RANK`` or the MPI launcher's; 0 otherwise): the GPU to use."""
    launcher = _launcher()
    return 0 if launcher is None else launcher[2]


def is_main_process() -> bool:
    """Rank 0: the process that writes checkpoints, logs and shows progress bars."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU: one device per process."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher describes (environment ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; or an MPI launcher's rank and size, e.g. ``mpirun`` under
    ``accelerate launch`` on CPUs, with ``MASTER_ADDR`` / ``MASTER_PORT``); returns whether a
    group is up.

    ``backend``: default ``"nccl"`` when CUDA is available, else ``"gloo"``. Without a launcher's
    variables (a plain ``python script.py``) nothing happens and ``False`` is returned, so the
    same script runs in one process. Already initialised: no-op. On CUDA the current device is
    set to ``cuda:LOCAL_RANK``.
    """
    if is_distributed():
        return True
    launcher = _launcher()
    if launcher is None or not dist.is_available():
        return False
    size, rank_, _ = launcher
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"init_process_group: a launcher set the world size {size} but not {missing}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, rank=rank_, world_size=size, timeout=timedelta(seconds=timeout_s))
    return True


def destroy_process_group() -> None:
    """Leave the group (no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def shard_range(shards: int, world: int | None = None, rank_: int | None = None) -> range:
    """The shards ``rank_`` owns among ``shards`` split over ``world`` processes (defaults: this
    process and its group). ``ValueError`` unless ``shards`` is a positive multiple of ``world``."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"rollout_shards: expected a positive integer, got {shards!r}")
    if shards % world:
        raise ValueError(
            f"rollout_shards: expected a multiple of the world size {world} (each process draws whole shards), got {shards}"
        )
    per = shards // world
    return range(rank_ * per, (rank_ + 1) * per)

"""Data-parallel training and sampling on :mod:`torch.distributed` (``docs/distributed.md``).

Launch any script with ``torchrun --nproc_per_node=N`` or ``accelerate launch`` and call
:func:`init_process_group` first; trainers then shard their per-iteration batch over the
processes (``TrainerConfig.rollout_shards``), average gradients, compute global statistics
globally, write checkpoints from rank 0 and show progress on rank 0 only.
"""

from diffusiongym.distributed.collectives import (
    all_mean,
    all_sum,
    any_rank,
    average_gradients,
    broadcast_object,
    gather_cat,
    gather_offset,
    global_mean_loss,
    local_part,
)
from diffusiongym.distributed.group import (
    barrier,
    default_device,
    destroy_process_group,
    init_process_group,
    is_distributed,
    is_main_process,
    local_rank,
    rank,
    shard_range,
    world_size,
)
from diffusiongym.distributed.sampling import cat_trajectories, gather_trajectory, sample_sharded

__all__ = [
    "all_mean",
    "all_sum",
    "any_rank",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "cat_trajectories",
    "default_device",
    "destroy_process_group",
    "gather_cat",
    "gather_offset",
    "gather_trajectory",
    "global_mean_loss",
    "init_process_group",
    "is_distributed",
    "is_main_process",
    "local_part",
    "local_rank",
    "rank",
    "sample_sharded",
    "shard_range",
    "world_size",
]

"""The batched sampler across processes: :func:`sample_sharded`.

``num_samples`` are cut into ``shards`` equal chunks; chunk ``s`` is drawn by
:func:`diffusiongym.sample` with its own generator seeded ``derive_seed(seed, "shard", s)``;
each rank draws the chunks it owns (:func:`~diffusiongym.distributed.group.shard_range`) and,
with ``gather=True``, the chunks of all ranks are concatenated in shard order on every rank.
The result depends on ``seed`` and ``shards``, not on the number of processes: one process
with ``shards=4`` returns exactly what four processes return together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.distributed.group import shard_range, world_size
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.utils.runtime import derive_seed
from diffusiongym.utils.validation import check_positive_int

__all__ = ["sample_sharded", "cat_trajectories", "gather_trajectory", "BATCH_FIELDS"]

#: Trajectory fields and the dimension that indexes the samples
BATCH_FIELDS: dict[str, int] = {
    "x1": 0,
    "valid": 0,
    "reward": 0,
    "running_cost": 1,
    "states": 1,
    "drifts": 1,
    "noises": 1,
    "controls": 1,
}


def cat_trajectories(parts: Sequence[Trajectory]) -> Trajectory:
    """Concatenate trajectories on the same grid along the sample dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    values: dict[str, Any] = {}
    for name, dim in BATCH_FIELDS.items():
        items = [getattr(p, name) for p in parts]
        values[name] = None if items[0] is None else torch.cat(items, dim)
    return dataclasses.replace(first, **values)


def gather_trajectory(traj: Trajectory) -> Trajectory:
    """Every rank's trajectories concatenated in rank order (identity in one process)."""
    if world_size() == 1:
        return traj
    values: dict[str, Tensor | None] = {}
    for name, dim in BATCH_FIELDS.items():
        value = getattr(traj, name)
        values[name] = None if value is None else gather_cat(value, dim)
    return dataclasses.replace(traj, **values)


def sample_sharded(
    env: Any, num_samples: int, seed: int = 0, shards: int | None = None, gather: bool = True, **kwargs: Any
) -> Trajectory:
    """:func:`diffusiongym.sample` of ``num_samples`` trajectories split over the process group.

    Parameters
    ----------
    env : DiffusionEnvironment
    num_samples : int
        In all (a multiple of ``shards``).
    seed : int
        Chunk ``s`` uses ``derive_seed(seed, "shard", s)``.
    shards : int, optional
        Chunks (a multiple of the world size); default: the world size.
    gather : bool
        Return every rank's samples (default) or only this rank's chunks.
    **kwargs
        Passed to :func:`diffusiongym.sample` (``grid``, ``control``, ``reward``, ``store``, ...;
        not ``generator``, ``seed``, ``x``, ``noises`` or ``cond``: those are per sample).

    Returns
    -------
    Trajectory
        ``(num_samples, ...)`` with ``gather=True``, else this rank's ``num_samples * len(mine) / shards``.
    """
    n = check_positive_int("num_samples", num_samples)
    shards = world_size() if shards is None else shards
    mine = shard_range(shards)
    if n % shards:
        raise ValueError(f"num_samples: expected a multiple of shards={shards}, got {n}")
    clash = sorted({"generator", "seed", "x", "noises", "cond"} & set(kwargs))
    if clash:
        raise TypeError(f"sample_sharded: {clash} are drawn per shard; expected none of them")
    parts = []
    for s in mine:
        gen = torch.Generator(device=kwargs.get("device") or "cpu").manual_seed(derive_seed(int(seed), "shard", s))
        parts.append(sample(env, n // shards, generator=gen, **kwargs))
    local = cat_trajectories(parts)
    return gather_trajectory(local) if gather else local

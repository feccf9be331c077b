"""What every trainer's :meth:`~diffusiongym.trainers.base.Trainer.evaluate` reports."""

from __future__ import annotations

import math
from typing import Any

from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.sampling import Trajectory

__all__ = ["EVALUATION_KEYS", "trajectory_metrics"]

EVALUATION_KEYS = ("objective", "kl", "reward", "valid_fraction", "gap_closed")


def trajectory_metrics(traj: Trajectory, task: Any, gather: bool = False) -> dict[str, float]:
    """:data:`EVALUATION_KEYS` of sampled trajectories (means over valid samples).

    ``gather=True``: the trajectories are this rank's share of a batch spread over a process
    group; the means are taken over every rank's samples (identity in one process)."""
    v = gather_cat(traj.valid) if gather else traj.valid
    kl = None if traj.kl is None else (gather_cat(traj.kl) if gather else traj.kl)
    reward = gather_cat(traj.reward) if gather else traj.reward
    nan = float("nan")
    any_valid = bool(v.any())
    objective = float((reward * traj.reward_scale - kl)[v].mean()) if any_valid and kl is not None else nan
    out = {
        "objective": objective,
        "kl": float(kl[v].mean()) if any_valid and kl is not None else nan,
        "reward": float(reward[v].mean()) if any_valid else nan,
        "valid_fraction": float(v.float().mean()),
        "gap_closed": nan,
    }
    oracle = getattr(task, "oracle", None)
    if (
        oracle is not None
        and abs(oracle.optimal_objective - oracle.base_objective) > 1e-12
        and math.isfinite(objective)
    ):
        out["gap_closed"] = float(oracle.gap_closed(objective))
    return out

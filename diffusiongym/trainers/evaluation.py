"""What every trainer's :meth:`~diffusiongym.trainers.base.Trainer.evaluate` reports."""

from __future__ import annotations

import math
from typing import Any

from diffusiongym.sampling import Trajectory

__all__ = ["EVALUATION_KEYS", "trajectory_metrics"]

EVALUATION_KEYS = ("objective", "kl", "reward", "valid_fraction", "gap_closed")


def trajectory_metrics(traj: Trajectory, task: Any) -> dict[str, float]:
    """:data:`EVALUATION_KEYS` of sampled trajectories (means over valid samples)."""
    v = traj.valid
    nan = float("nan")
    any_valid = bool(v.any())
    objective = float(traj.objective[v].mean()) if any_valid and traj.kl is not None else nan
    out = {
        "objective": objective,
        "kl": float(traj.kl[v].mean()) if any_valid and traj.kl is not None else nan,
        "reward": float(traj.reward[v].mean()) if any_valid else nan,
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

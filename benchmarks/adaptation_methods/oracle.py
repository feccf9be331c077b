"""Reference row: the exact optimal control u* (gap_closed should be ~1 up to Euler error)."""

from __future__ import annotations

from adaptation import Result

import diffusiongym as dg
from diffusiongym.tasks import make_task

TASKS = ["GMM1D-v0", "GMM2D-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    task = make_task(task_id)
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, control=task.oracle.control(), reward=task.reward, reward_scale=task.reward_scale, seed=seed)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

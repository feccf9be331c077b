"""Adjoint Matching rows: fine-tune a residual copy of the base model (``diffusiongym.policies.adjoint_matching``).

Training runs on a 50-step grid (half the cost per iteration; the learned control is a
function of ``(x, t)``, so it transfers); the numbers are measured on fresh samples on the
task's own 100-step grid. ``train(task_id, quick, seed)`` is shared with
``benchmarks/adjoint_vs_value.py``.
"""

from __future__ import annotations

from adaptation import Result

import diffusiongym as dg
from diffusiongym.policies.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.tasks import make_task

TASKS = ["GMM1D-v0", "GMM2D-v0"]

ITERATIONS = {("GMM1D-v0", True): 100, ("GMM1D-v0", False): 400, ("GMM2D-v0", True): 100, ("GMM2D-v0", False): 400}
TRAIN_STEPS = 50


def config(task_id: str, quick: bool, seed: int) -> AdjointMatchingConfig:
    return AdjointMatchingConfig(iterations=ITERATIONS[(task_id, quick)], batch_size=256, learning_rate=3e-3, updates_per_iteration=4, seed=seed)


def train(task_id: str, quick: bool, seed: int, parameterization: str = "velocity") -> tuple[object, AdjointMatching]:
    task = make_task(task_id, parameterization=parameterization)
    trainer = AdjointMatching.from_task(task, config=config(task_id, quick, seed), steps=TRAIN_STEPS)
    trainer.train()
    return task, trainer


def run(task_id: str, quick: bool, seed: int) -> Result:
    task, trainer = train(task_id, quick, seed)
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, policy=trainer.model, reward=task.reward, reward_scale=task.reward_scale, seed=seed + 10_000)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

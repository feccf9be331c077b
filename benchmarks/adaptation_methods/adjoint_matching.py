"""Adjoint Matching rows: fine-tune a residual copy of the base model (``diffusiongym.policies.adjoint_matching``).

Regression target: the lambda-return lean adjoint bootstrapped on the model's own
``-u_theta / sigma`` (``bootstrap="horizon"``, ``tau = 0.05``; same fixed point ``u*``). The
paper's plain Monte-Carlo lean adjoint stalls on GMM1D-v0 (0.58-0.75 of the gap): there its
sample mean at early times is a near-delta estimate that grows like ``log n`` (see
``tests/test_adjoint_matching.py``). Training runs on a 50-step grid (GMM1D full: 100 steps, whose
smaller Jacobian steps ``h db/dx`` across the mode boundary help; the learned control is a
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

ITERATIONS = {("GMM1D-v0", True): 80, ("GMM1D-v0", False): 300, ("GMM2D-v0", True): 40, ("GMM2D-v0", False): 80}
TRAIN_STEPS = {("GMM1D-v0", True): 50, ("GMM1D-v0", False): 100, ("GMM2D-v0", True): 50, ("GMM2D-v0", False): 50}
# Measured (seed 0, one core): --quick GMM1D 0.877 (56 s), GMM2D 0.971 (22 s). GMM1D on the
# 100-step grid, gap on 4096 fresh samples every 60 iterations: seed 0 0.70, 0.76, 0.68, 0.94,
# 0.95 (u* MSE 0.08 at the end); seed 1 0.59, 0.81, 0.89, 0.81, 0.81. The bootstrapped iteration
# oscillates on GMM1D; it does not reliably hold >= 0.90 yet. Full row, seed 0: 0.9575 (157 s).


def config(task_id: str, quick: bool, seed: int) -> AdjointMatchingConfig:
    return AdjointMatchingConfig(
        iterations=ITERATIONS[(task_id, quick)], batch_size=1024, loss_times=None, minibatch_size=4096, updates_per_iteration=8,
        bootstrap="horizon", bootstrap_horizon=0.05, learning_rate=3e-3, grad_clip=None, seed=seed,
    )


def train(task_id: str, quick: bool, seed: int, parameterization: str = "velocity") -> tuple[object, AdjointMatching]:
    task = make_task(task_id, parameterization=parameterization)
    trainer = AdjointMatching.from_task(task, config=config(task_id, quick, seed), steps=TRAIN_STEPS[(task_id, quick)])
    trainer.train()
    return task, trainer


def run(task_id: str, quick: bool, seed: int) -> Result:
    task, trainer = train(task_id, quick, seed)
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, policy=trainer.model, reward=task.reward, reward_scale=task.reward_scale, seed=seed + 10_000)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

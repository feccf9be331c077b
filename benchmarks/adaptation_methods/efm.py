"""Energy-weighted flow matching (online, importance-weighted rounds) on the GMM tasks."""

from __future__ import annotations

import torch
from adaptation import Result

import diffusiongym as dg
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.tasks import make_task

TASKS = ["GMM1D-v0", "GMM2D-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    torch.manual_seed(seed)
    task = make_task(task_id)
    d = task.sample_shape[0]
    model = ResidualModel(task.environment.model, TimeMLP(d, d, hidden=64, layers=3, zero_init=True))
    config = EFMConfig(
        mode="online", weighting="importance", rounds=2 if quick else 4, samples_per_round=8192 if quick else 16384,
        iterations_per_round=400 if quick else 1000, batch_size=256, lr=1e-2, lr_schedule="cosine", seed=seed,
    )
    EFMTrainer(task.environment, model, task.reward, task.reward_scale, config, steps=task.steps, t_start=task.t_start).train()
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, policy=model, reward=task.reward, reward_scale=task.reward_scale, seed=seed + 1)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

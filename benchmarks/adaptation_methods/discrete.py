"""Discrete rows: the exact tilt control c* and the reward-weighted cross-entropy fine-tune
(ResidualPosterior on base samples weighted by softmax(lambda r)) on DiscreteGrid-v0 (mask source)."""

from __future__ import annotations

import torch
from adaptation import Result

from diffusiongym.discrete import ResidualPosterior, control_from_model, sample_chain
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.discrete.train import CrossEntropyConfig, reward_weighted_finetune

TASKS = ["DiscreteGrid-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    torch.manual_seed(seed)
    task = grid_task()
    o, base = task.oracle, task.model
    n_data, n_eval, steps = (12000, 6000, 300) if quick else (40000, 20000, 1000)
    data = sample_chain(base, n_data, task.steps, reward=task.reward, seed=seed + 1)
    model = ResidualPosterior(base, hidden=64, layers=2)
    reward_weighted_finetune(model, data.x1, data.reward, task.reward_scale, CrossEntropyConfig(steps=steps, lr=3e-3, seed=seed))
    ev = sample_chain(base, n_eval, task.steps, control=control_from_model(base, model), reward=task.reward, reward_scale=task.reward_scale, seed=seed + 2)
    return Result(float(ev.objective.mean()), float(ev.kl.mean()), float(ev.reward.mean()), o.base_objective, o.optimal_objective)

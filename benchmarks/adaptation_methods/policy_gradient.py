"""GRPO-style PPO (group-normalised terminal-reward advantages, clipped ratio, exact KL penalty)."""

from __future__ import annotations

import torch
from adaptation import Result

import diffusiongym as dg
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.policies.policy_gradient import PGConfig, PolicyGradientAgent
from diffusiongym.tasks import make_task

TASKS = ["GMM1D-v0", "GMM2D-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    torch.manual_seed(seed)
    task = make_task(task_id)
    d = task.sample_shape[0]
    policy = ResidualModel(task.environment.model, TimeMLP(d, d, hidden=64, layers=3, zero_init=True))
    config = PGConfig(iterations=30 if quick else 150, num_groups=8, group_size=32, seed=seed)
    agent = PolicyGradientAgent(task.environment, policy, task.reward, task.reward_scale, config, steps=task.steps, t_start=task.t_start)
    agent.train()
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, policy=policy, reward=task.reward, reward_scale=task.reward_scale, seed=seed + 1)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

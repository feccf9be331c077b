"""GRPO-style PPO acting through the torch vector env (group-normalised terminal-reward
advantages, clipped exact Gaussian ratios, exact KL penalty); evaluated on fresh engine samples."""

from __future__ import annotations

import gymnasium as gym
import torch
from adaptation import Result

import diffusiongym as dg
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.trainers.policy_gradient import PGConfig, PolicyGradientAgent

TASKS = ["GMM1D-v0", "GMM2D-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    torch.manual_seed(seed)
    envs = gym.make_vec(f"diffusiongym/{task_id}", num_envs=256, vectorization_mode="vector_entry_point")
    task = envs.unwrapped.task
    d = task.sample_shape[0]
    policy = ResidualModel(task.environment.model, TimeMLP(d, d, hidden=64, layers=3, zero_init=True))
    agent = PolicyGradientAgent(envs, policy, PGConfig(iterations=30 if quick else 150, group_size=32, seed=seed))
    agent.train()
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, control=agent.as_control(), reward=task.reward, reward_scale=task.reward_scale, seed=seed + 1)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

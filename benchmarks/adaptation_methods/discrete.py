"""Discrete rows: the reward-weighted cross-entropy fine-tune (ResidualPosterior on base samples
weighted by softmax(lambda r), :class:`RewardWeightedTrainer`) on DiscreteGrid-v0 (mask source),
judged against the exact tilt oracle."""

from __future__ import annotations


from diffusiongym.discrete import ResidualPosterior
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer
from diffusiongym.utils.runtime import seeded

TASKS = ["DiscreteGrid-v0"]


def make(task_id: str, quick: bool, seed: int) -> RewardWeightedTrainer:
    task = grid_task()
    with seeded(seed):
        model = ResidualPosterior(task.model, hidden=64, layers=2)
    config = RewardWeightedConfig(
        iterations=300 if quick else 1000, num_samples=12000 if quick else 40000, lr=3e-3, seed=seed
    )
    return RewardWeightedTrainer(task, model=model, config=config)

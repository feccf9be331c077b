"""Discrete rows: the reward-weighted cross-entropy fine-tune (ResidualPosterior on base samples
weighted by softmax(lambda r), :class:`RewardWeightedTrainer`) on DiscreteGrid-v0 (mask source),
judged against the exact tilt oracle."""

from __future__ import annotations

from adaptation import Result

from diffusiongym.discrete import ResidualPosterior
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer
from diffusiongym.utils.runtime import seeded

TASKS = ["DiscreteGrid-v0"]


def run(task_id: str, quick: bool, seed: int) -> Result:
    task = grid_task()
    n_data, n_eval, iterations = (12000, 6000, 300) if quick else (40000, 20000, 1000)
    with seeded(seed):
        model = ResidualPosterior(task.model, hidden=64, layers=2)
    config = RewardWeightedConfig(iterations=iterations, num_samples=n_data, lr=3e-3, seed=seed)
    trainer = RewardWeightedTrainer(task, model=model, config=config)
    trainer.train(progress=False)
    metrics = trainer.evaluate(n_eval, seed=seed + 2)
    return Result(metrics["objective"], metrics["kl"], metrics["reward"], task.oracle.base_objective, task.oracle.optimal_objective)

"""Energy-weighted flow matching (online, importance-weighted rounds) on the GMM tasks."""

from __future__ import annotations


from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.tasks import make_task
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.utils.runtime import seeded

TASKS = ["GMM1D-v0", "GMM2D-v0"]


def make(task_id: str, quick: bool, seed: int) -> EFMTrainer:
    task = make_task(task_id)
    d = task.sample_shape[0]
    rounds, per_round = (2, 400) if quick else (4, 1000)
    config = EFMConfig(
        mode="online",
        weighting="importance",
        rounds=rounds,
        samples_per_round=8192 if quick else 16384,
        iterations=rounds * per_round,
        batch_size=512,
        lr=1e-2,
        lr_schedule="cosine",
        seed=seed,
    )
    # a residual MLP on the exact base (the default would be the mixture's own trainable copy)
    with seeded(seed):
        model = ResidualModel(task.environment.model, TimeMLP(d, d, hidden=64, layers=3, zero_init=True))
    return EFMTrainer(task, model=model, config=config)

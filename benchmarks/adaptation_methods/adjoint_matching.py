"""Adjoint Matching rows: fine-tune a trainable copy of the base model (``diffusiongym.policies.adjoint_matching``).

The fine-tuned model is the base mixture's own ``trainable_copy()`` (weights, means and
covariances are parameters: full fine-tuning of a copy, as the issue asks for small models),
trained with the paper's Monte-Carlo lean adjoint. Within-mode structure (means, covariances)
is learnt from short, low-variance adjoints; how much mass each mode gets is carried only by
paths that cross the low-density region between modes, where the pathwise adjoint is a
rare, huge spike. Restarts (``restarts=4``: 4 x batch extra paths per iteration from mixup
states at one random grid time ``t >= 0.7``) put many states in that region, which makes the
gap robust (without them GMM1D ended anywhere in 0.82-0.99 over seeds), but the weights stay
biased low (see below), so x1 does not pass the two-sample test against p*. The
numbers are measured on fresh samples on the task's own 100-step grid; training uses a
50-step grid (the learnt model is a function of ``(x, t)``, so it transfers).
``train(task_id, quick, seed)`` and ``config`` are shared with ``benchmarks/adjoint_matching_gmm.py``
(full figures: two-sample tests, learnt weights vs p*) and ``benchmarks/adjoint_vs_value.py``.
"""

from __future__ import annotations

from adaptation import Result

import diffusiongym as dg
from diffusiongym.policies.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.tasks import make_task

TASKS = ["GMM1D-v0", "GMM2D-v0"]

# Measured (one core; gap on 16384 fresh samples on the 100-step grid): GMM1D 60 iterations,
# seeds 0-4: 0.954 0.952 0.984 0.963 0.922 (light-mode weight 0.68-0.80 vs p*'s 0.827), ~15 s.
# In float64 the same runs end lower (0.928 0.925 0.948 0.876 0.923, weights 0.62-0.70): the
# weights' estimate hangs on rare spikes, and such details move it. GMM2D 60 iterations: 0.985. Training longer
# does not help: the estimator is biased where the weights are concerned (started *at* p*, the
# light-mode weight drifts down to 0.74-0.76 over 100 iterations at lr 1e-3, on 100- and
# 200-step grids alike; 200 iterations at lr 3e-2 end at 0.92-1.00, 600 at lr 1e-2 at 0.95 with
# weight 0.68). The same budget is therefore used with and without --quick.
ITERATIONS = {"GMM1D-v0": 60, "GMM2D-v0": 60}
LEARNING_RATE = 3e-2
TRAIN_STEPS = 50


def config(task_id: str, quick: bool, seed: int, **overrides: object) -> AdjointMatchingConfig:
    options = dict(
        iterations=ITERATIONS[task_id], batch_size=1024, loss_times=None, minibatch_size=8192, updates_per_iteration=8,
        learning_rate=LEARNING_RATE, lr_schedule="cosine", grad_clip=None, time_weight="inverse", restarts=4.0,
        restart_after=0.7, residual="copy", seed=seed,
    )
    options.update(overrides)
    return AdjointMatchingConfig(**options)


def train(task_id: str, quick: bool, seed: int, parameterization: str = "velocity", **overrides: object) -> tuple[object, AdjointMatching]:
    task = make_task(task_id, parameterization=parameterization)
    trainer = AdjointMatching.from_task(task, config=config(task_id, quick, seed, **overrides), steps=TRAIN_STEPS)
    trainer.train()
    return task, trainer


def run(task_id: str, quick: bool, seed: int) -> Result:
    task, trainer = train(task_id, quick, seed)
    n = 4096 if quick else 16384
    traj = dg.sample(task.environment, n, steps=task.steps, t_start=task.t_start, policy=trainer.model, reward=task.reward, reward_scale=task.reward_scale, seed=seed + 10_000)
    return Result(float(traj.objective.mean()), float(traj.kl.mean()), float(traj.reward.mean()), task.oracle.base_objective, task.oracle.optimal_objective)

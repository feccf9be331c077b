"""Value Matching rows: learn V, steer with u = -sigma grad V (``diffusiongym.trainers.value_matching``).

``make(task_id, quick, seed)`` is shared with ``benchmarks/value_matching.py`` (full figures).
"""

from __future__ import annotations

from adaptation_methods import _digits
from diffusiongym.tasks import make_task
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig

GMM_TASKS = ["GMM1D-v0", "GMM2D-v0"]
TASKS = [*GMM_TASKS, _digits.DIGITS]

# Iterations x (batch trajectories of 100 steps + 32 regression steps on minibatches from a
# 4-iteration replay buffer). The quick budgets stay above 90% gap closed (see the report).
# GMM2D's full budget matches p* in distribution only with twice the batch, twice the
# minibatch and a deeper learning-rate decay (to 2% of lr): with 256 / 2048 / 10% it stalls
# at energy distance ~0.0056 against the 0.0026 threshold; with these it measured 0.0008-0.0020
# from iteration 75 on (benchmarks/value_matching.py prints the figures).
ITERATIONS = {("GMM1D-v0", True): 50, ("GMM1D-v0", False): 100, ("GMM2D-v0", True): 50, ("GMM2D-v0", False): 150}
FULL_GMM2D = {"batch_size": 512, "minibatch_size": 4096, "lr_final_factor": 0.02}


def config(task_id: str, quick: bool, seed: int) -> ValueMatchingConfig:
    options = {"batch_size": 256, "updates_per_iteration": 32, "minibatch_size": 2048, "replay": 3, "lr": 1e-3}
    if task_id == "GMM2D-v0" and not quick:
        options.update(FULL_GMM2D)
    return ValueMatchingConfig(iterations=ITERATIONS[(task_id, quick)], seed=seed, **options)


# Digits (``_digits.py``): the default value network (SignalScaled(TimeCNN), zero head) with
# center_targets (the cost-to-go is ~20 with spread ~8; uncentred, 40 iterations left the control
# at zero). Measured on one core, seed 0, 512 evaluation samples, batch 128, replay 3, lr 1e-3:
# gap 0.47 / 0.66 / 0.66 after 20 / 40 / 60 iterations, class-3 fraction 0.90 / 0.94 / 0.97 but
# KL 10.4 / 7.7 / 8.0 (the optimum's is 2.15): the learnt gradient overshoots; 4.3 CPU seconds per
# iteration. The full budget (on an H200: larger batch and minibatch, lower rate) closes only 0.77 ± 0.02
# over seeds 0-2: class-3 fraction 0.995 (p*: 0.955) at KL 6.4 (p*: 2.1), the same over-steering.
DIGITS_CONFIG = {
    True: {"iterations": 20, "batch_size": 128, "minibatch_size": 1024, "updates_per_iteration": 16, "lr": 1e-3},
    False: {"iterations": 150, "batch_size": 256, "minibatch_size": 4096, "updates_per_iteration": 32, "lr": 5e-4},
}


def make_digits(quick: bool, seed: int) -> ValueMatching:
    config = ValueMatchingConfig(**DIGITS_CONFIG[quick], replay=3, center_targets=True, seed=seed)
    return ValueMatching(_digits.task(), config=config, device=_digits.DEVICE)


def make(task_id: str, quick: bool, seed: int) -> ValueMatching:
    if task_id == _digits.DIGITS:
        return make_digits(quick, seed)
    return ValueMatching(make_task(task_id), config=config(task_id, quick, seed))

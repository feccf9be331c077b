"""Value Matching rows: learn V, steer with u = -sigma grad V (``diffusiongym.trainers.value_matching``).

``make(task_id, quick, seed)`` is shared with ``benchmarks/value_matching.py`` (full figures).
"""

from __future__ import annotations

from adaptation_methods import _digits
from diffusiongym.policies.networks import SignalScaled, TimeCNN
from diffusiongym.tasks import make_task
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig
from diffusiongym.utils.runtime import seeded

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


# Digits (``_digits.py``): the soft target (``target="soft"``: V* from importance-weighted
# targets, no policy iteration) with a flattened value head (SignalScaled(TimeCNN(value_head=
# "flatten"))), centred targets. Measured on one core, seed 0, 2048 evaluation samples, 40 iterations:
#   cost-to-go target, pooled head (the earlier row), batch 128: gap 0.49 (KL 7.8, class-3 fraction
#     0.75); 60 iterations 0.64-0.66 (KL 8.0-8.5, fraction 0.97-0.98: it over-steers); on an H200 at
#     150 iterations 0.77 ± 0.02 over seeds 0-2 (KL 6.4, fraction 0.995).
#   cost-to-go target, flattened head: diverges (gap -1.6, KL 49).
#   soft target, pooled head, batch 128: 0.58 (KL 3.0) at 40, 0.72 (KL 4.8) at 80 iterations.
#   soft target, flattened head: batch 128 0.87 (KL 4.3; 80 iterations: 0.875), replay 10 instead
#     of 3 0.85, batch 256 0.90 (KL 3.9, fraction 0.94; 380 CPU seconds).
# Full budget (80 iterations, 16384 evaluation samples, this CPU): 0.906 / 0.913 / 0.908 on seeds 0 / 1 / 2
# (0.9092 ± 0.0021; KL 3.56, class-3 fraction 0.91).
DIGITS_CONFIG = {
    True: {"iterations": 40, "batch_size": 256, "minibatch_size": 1024, "updates_per_iteration": 16, "lr": 1e-3},
    False: {"iterations": 80, "batch_size": 256, "minibatch_size": 1024, "updates_per_iteration": 16, "lr": 1e-3},
}


def make_digits(quick: bool, seed: int) -> ValueMatching:
    task = _digits.task()
    config = ValueMatchingConfig(**DIGITS_CONFIG[quick], replay=3, target="soft", center_targets=True, seed=seed)
    with seeded(seed):
        net = SignalScaled(TimeCNN(1, value_head="flatten", image_size=(8, 8)), task.environment.scheduler)
    return ValueMatching(task, model=net, config=config, device=_digits.DEVICE)


def make(task_id: str, quick: bool, seed: int) -> ValueMatching:
    if task_id == _digits.DIGITS:
        return make_digits(quick, seed)
    return ValueMatching(make_task(task_id), config=config(task_id, quick, seed))

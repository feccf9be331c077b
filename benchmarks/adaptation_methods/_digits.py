"""The digits row shared by every method that runs on images (``DIGITS`` in a module's ``TASKS``).

Task: the shipped digits model made unconditional (null label), memoryless SDE, 25 Euler steps
from ``t = 0.01``, reward ``r = log p(3 | x)`` of the shipped classifier, ``lambda = 1``
(:func:`diffusiongym.trainers.value_matching_digits.digits_value_task`). Then
``p* ∝ p_base(x) p(3 | x)`` is the base's class-3 conditional as the classifier sees it, and the
optimal objective ``log E_base[p(3 | x)]`` is about ``log 0.1``. There is no closed form: the task's
``oracle`` is :data:`ESTIMATE`, an :class:`~diffusiongym.optimum.OptimumEstimate` of the base and
optimal objectives from base samples of this very chain (``benchmarks/digits_optimum.py``
measured it; the figures and the command are recorded below), so ``trainer.evaluate`` reports
``gap_closed`` against it like against the GMM tasks' exact oracle.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from diffusiongym.optimum import OptimumEstimate
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.tasks import Task
from diffusiongym.trainers.value_matching_digits import digits_value_task

DIGITS = "Digits-v0:class3"
TARGET = 3
STEPS = 25
#: where the digits rows train and sample (``benchmarks/adaptation.py --device`` sets it in the
#: row's process; the GMM rows stay on the CPU)
DEVICE = "cpu"

# python benchmarks/digits_optimum.py --num-samples 1000000 --batch-size 50000 --device cuda (seed 0,
# an H200, 34 s): J_base -20.4780 ± 0.0129, J* -2.2417 ± 0.0028, gap 18.236 ± 0.016, KL(p* || p)
# 2.129, class-3 fraction 0.106 under the base and 0.955 under p* (ESS 113 542).
ESTIMATE = OptimumEstimate(
    num_samples=1_000_000,
    reward_scale=1.0,
    base_objective=-20.47802971738024,
    base_objective_se=0.012879186961820072,
    optimal_objective=-2.2417454207864123,
    optimal_objective_se=0.002794160931608208,
    optimal_reward=-0.11242892894260932,
    optimal_kl=2.129316491843803,
    effective_sample_size=113541.82066067624,
    base_statistics={"class_fraction": 0.106094},
    optimal_statistics={"class_fraction": 0.9546349164384723},
)


def task(estimate: OptimumEstimate | None = ESTIMATE, device: str | torch.device | None = None) -> Task:
    """The digits task on ``device`` (default :data:`DEVICE`), with ``estimate`` as its oracle
    (``None``: none)."""
    device = DEVICE if device is None else device
    return replace(digits_value_task(TARGET, 1.0, STEPS, "log_prob", device=device), oracle=estimate)


@torch.no_grad()
def class_fraction(x1: torch.Tensor, reward: DigitClassifierReward) -> float:
    """Fraction of the samples ``x1`` that ``reward``'s classifier calls a :data:`TARGET`."""
    return float((reward.log_probs(x1).argmax(1) == TARGET).float().mean())


def is_class_reward(reward: DigitClassifierReward) -> DigitClassifierReward:
    return DigitClassifierReward(target=TARGET, mode="is_class", classifier=reward.classifier)

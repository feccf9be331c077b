"""Inference-time reward guidance: sample ``p* ∝ p exp(lambda r)`` (or chase reward) without fine-tuning.

- :func:`smc`: twisted sequential Monte Carlo over the Euler–Maruyama chain, exact for the tilt
  of the discretised base chain, with a log-normaliser estimate (:class:`SMCResult`).
- Twists (:mod:`~diffusiongym.guidance.twists`): :class:`OracleTwist` (exact ``V*``),
  :class:`ValueTwist` (a learned value, e.g. Value Matching's), :class:`PredFinalTwist`
  (the reward of the Tweedie estimate), :class:`ZeroTwist`.
- Baselines (:mod:`~diffusiongym.guidance.baselines`): :func:`best_of_n`,
  :func:`importance_resampling`, :func:`gradient_guidance` (DPS-style, :class:`RewardGradientControl`).
- :class:`ResamplingVectorEnv`: a Gymnasium vector-env wrapper that resamples the batch between steps.

See ``docs/guidance.md``.
"""

from diffusiongym.guidance.baselines import RewardGradientControl, best_of_n, gradient_guidance, importance_resampling
from diffusiongym.guidance.resampling import (
    RESAMPLING_SCHEMES,
    effective_sample_size,
    normalized_log_weights,
    resample_indices,
)
from diffusiongym.guidance.result import CountingModel, GuidanceResult, counting_environment
from diffusiongym.guidance.smc import SMCResult, replicate_log_normalizer, smc
from diffusiongym.guidance.twists import OracleTwist, PredFinalTwist, Twist, ValueTwist, ZeroTwist
from diffusiongym.guidance.wrapper import ResamplingVectorEnv

__all__ = [
    "smc",
    "SMCResult",
    "GuidanceResult",
    "Twist",
    "OracleTwist",
    "ValueTwist",
    "PredFinalTwist",
    "ZeroTwist",
    "best_of_n",
    "importance_resampling",
    "gradient_guidance",
    "RewardGradientControl",
    "ResamplingVectorEnv",
    "RESAMPLING_SCHEMES",
    "resample_indices",
    "effective_sample_size",
    "normalized_log_weights",
    "replicate_log_normalizer",
    "CountingModel",
    "counting_environment",
]

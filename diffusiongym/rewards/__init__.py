"""Rewards on final samples: ``reward(x, **cond) -> (values, valid)``."""

from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import CallableReward, ConstantReward, Reward
from diffusiongym.rewards.images import (
    BrightnessReward,
    ContrastReward,
    DigitClassifierReward,
    ImageReward,
    JPEGCompressibility,
    JPEGIncompressibility,
)

__all__ = [
    "Reward",
    "CallableReward",
    "ConstantReward",
    "LinearReward",
    "QuadraticReward",
    "ImageReward",
    "DigitClassifierReward",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "BrightnessReward",
    "ContrastReward",
]

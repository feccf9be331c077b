"""Rewards on final samples: ``reward(x) -> (values, valid)``."""

from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import CallableReward, ConstantReward, Reward

__all__ = ["Reward", "CallableReward", "ConstantReward", "LinearReward", "QuadraticReward"]

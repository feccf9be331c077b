"""Rewards on final samples: ``reward(x, **cond) -> (values, valid)``."""

from diffusiongym.rewards.aesthetic import AestheticHead, AestheticReward, load_aesthetic_head
from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import CallableReward, ConstantReward, Reward
from diffusiongym.rewards.clip import CLIPScore, PickScore
from diffusiongym.rewards.clip_loading import CLIPBackbone, CLIPImagePreprocess, load_clip
from diffusiongym.rewards.images import (
    BrightnessReward,
    ContrastReward,
    DigitClassifierReward,
    ImageReward,
    JPEGCompressibility,
    JPEGIncompressibility,
)
from diffusiongym.rewards.model_base import ModelImageReward
from diffusiongym.rewards.ocr import OCRReward

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
    "ModelImageReward",
    "CLIPScore",
    "PickScore",
    "AestheticReward",
    "AestheticHead",
    "load_aesthetic_head",
    "OCRReward",
    "CLIPBackbone",
    "CLIPImagePreprocess",
    "load_clip",
]

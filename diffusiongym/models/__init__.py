"""Base models: exact Gaussian mixtures, the shipped digits model, and the diffusers bridge."""

from diffusiongym.models.diffusers_bridge import DiffusersModel, diffusers_environment, scheduler_from_diffusers
from diffusiongym.models.diffusers_loader import load_diffusers_environment
from diffusiongym.models.digit_classifier import DigitClassifier, load_digit_classifier
from diffusiongym.models.digits import DigitsUNet, digits_environment, digits_task, load_digits_model
from diffusiongym.models.gmm import (
    GMM_PRESETS,
    GaussianMixture,
    GaussianMixtureModel,
    Posterior,
    TrainableGaussianMixtureModel,
    gmm_preset,
)
from diffusiongym.models.lora import add_lora, load_lora, lora_state_dict, save_lora

__all__ = [
    "GaussianMixture",
    "GaussianMixtureModel",
    "TrainableGaussianMixtureModel",
    "Posterior",
    "gmm_preset",
    "GMM_PRESETS",
    "DigitsUNet",
    "load_digits_model",
    "digits_environment",
    "digits_task",
    "DigitClassifier",
    "load_digit_classifier",
    "DiffusersModel",
    "diffusers_environment",
    "load_diffusers_environment",
    "scheduler_from_diffusers",
    "add_lora",
    "lora_state_dict",
    "save_lora",
    "load_lora",
]

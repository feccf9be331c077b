"""Base models: exact Gaussian mixtures (and, later, shipped pretrained networks)."""

from diffusiongym.models.gmm import GMM_PRESETS, GaussianMixture, GaussianMixtureModel, Posterior, gmm_preset

__all__ = ["GaussianMixture", "GaussianMixtureModel", "Posterior", "gmm_preset", "GMM_PRESETS"]

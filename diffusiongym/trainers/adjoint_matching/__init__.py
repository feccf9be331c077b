"""Adjoint Matching (Domingo-Enrich et al. 2024), on the :class:`~diffusiongym.trainers.base.Trainer` contract.

- :mod:`.config`: :class:`AdjointMatchingConfig`;
- :mod:`.lean_adjoint`: the paper's lean adjoint, :func:`lean_adjoint`;
- :mod:`.likelihood_ratio`: its likelihood-ratio steps (``likelihood_ratio=theta``);
- :mod:`.restarts`: mixup restarts (``restarts=...``);
- :mod:`.trainer`: :class:`AdjointMatching` (sample, adjoint, regression pairs, loss, update).
"""

from diffusiongym.trainers.adjoint_matching.config import AdjointMatchingConfig, multimodal_recipe
from diffusiongym.trainers.adjoint_matching.lean_adjoint import check_differentiable_reward, lean_adjoint
from diffusiongym.trainers.adjoint_matching.trainer import AdjointMatching, make_finetune_model, time_weights

__all__ = [
    "multimodal_recipe",
    "AdjointMatching",
    "AdjointMatchingConfig",
    "check_differentiable_reward",
    "lean_adjoint",
    "make_finetune_model",
    "time_weights",
]

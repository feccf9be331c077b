"""Registration of the discrete environments under the ``diffusiongym/`` namespace.

``register_discrete_envs()`` registers ``diffusiongym/DiscreteGrid-v0`` and ``diffusiongym/DiscreteDigits-v0``
with both an ``entry_point`` (single :class:`~diffusiongym.discrete.env.DiscreteFlowEnv`) and a
``vector_entry_point`` (:class:`~diffusiongym.discrete.env.DiscreteFlowVectorEnv`); then
``gym.make("diffusiongym/DiscreteGrid-v0")`` and
``gym.make_vec("diffusiongym/DiscreteGrid-v0", num_envs=n, vectorization_mode="vector_entry_point")`` work.
Idempotent.
"""

from __future__ import annotations

from diffusiongym.envs.registry import NAMESPACE, register_ids

__all__ = ["register_discrete_envs", "DISCRETE_ENV_IDS"]

DISCRETE_ENV_IDS = {f"{NAMESPACE}/{name}": name for name in ("DiscreteGrid-v0", "DiscreteDigits-v0")}


def register_discrete_envs() -> list[str]:
    """Register the discrete env ids (skipping those already registered); returns the ids."""
    return register_ids(
        DISCRETE_ENV_IDS, "diffusiongym.discrete.env:DiscreteFlowEnv", "diffusiongym.discrete.env:DiscreteFlowVectorEnv"
    )

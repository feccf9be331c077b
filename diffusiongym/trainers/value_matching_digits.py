"""The digits Value Matching recipe: task, and a bare value network on disk.

:func:`digits_value_task` is the shipped digits model made unconditional (null label) with the
non-differentiable reward ``1[classifier argmax = target]``; :func:`save_value_net` /
:func:`load_value_net` store a bare value network (safetensors + JSON), e.g. the shipped
``weights/value_digits.*`` (:data:`DIGITS_VALUE_WEIGHTS`, written by
``benchmarks/value_matching_digits.py --out``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.policies.value_nets import build_value_net, value_net_spec
from diffusiongym.utils.io import save_module

__all__ = ["DIGITS_VALUE_WEIGHTS", "digits_value_task", "load_value_net", "save_value_net"]

DIGITS_VALUE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "value_digits"


def digits_value_task(
    target: int = 3,
    reward_scale: float = 10.0,
    steps: int = 25,
    mode: str = "is_class",
    device: str | torch.device = "cpu",
) -> Any:
    """The digits Value Matching setting: the shipped model *unconditional*, rewarded for class ``target``.

    The shipped :class:`~diffusiongym.models.digits.DigitsUNet` with the null label
    (:data:`~diffusiongym.models.digits.NULL_LABEL`: every class, about 10% each), the
    memoryless SDE on ``steps`` Euler steps from ``t = 0.01``, reward
    ``DigitClassifierReward(target, mode)`` (default the non-differentiable indicator
    ``argmax == target``) and ``reward_scale = lambda``. With base rate ``p0`` of the
    class, the tilted optimum ``p* ∝ p exp(lambda 1[class = target])`` puts
    ``p0 e^lambda / (1 - p0 + p0 e^lambda)`` on it (for the measured ``p0 = 0.097``: 0.94 at
    ``lambda = 5``, 0.9996 at the default ``lambda = 10``, the shipped value network's) at the
    optimal objective ``log(1 - p0 + p0 e^lambda)`` (``docs/maths.md``, the tilted optimum).

    Returns a :class:`~diffusiongym.tasks.Task` (``name = "Digits-v0"``) whose conditioning
    sampler draws null labels, so :class:`~diffusiongym.trainers.value_matching.ValueMatching`
    and the Gymnasium envs use the unconditional model.
    """
    import gymnasium

    from diffusiongym.models.digits import NULL_LABEL, digits_task
    from diffusiongym.rewards.images import DigitClassifierReward

    def null_labels(n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        return torch.full((int(n),), NULL_LABEL, dtype=torch.long, device=device)

    reward = DigitClassifierReward(target=target, mode=mode, device=device)
    task = digits_task(reward=reward, reward_scale=reward_scale, steps=steps, device=device)
    return replace(task, conditioning={"label": (gymnasium.spaces.Discrete(NULL_LABEL + 1), null_labels)})


def save_value_net(value_net: nn.Module, stem: str | Path, info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write a trained value network alone (no optimiser, no buffer): ``<stem>.safetensors``
    (state dict) and ``<stem>.json`` (``{"value_net": {"class", "config"}, **info}``);
    :func:`load_value_net` reads it back. For shipping small pretrained value networks."""
    if not isinstance(value_net, nn.Module):
        raise TypeError(f"value_net: expected an nn.Module, got {type(value_net).__name__}")
    return save_module(value_net, stem, {"value_net": value_net_spec(value_net), **(info or {})})


def load_value_net(
    stem: str | Path, scheduler: Any, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a :class:`TimeMLP` / :class:`TimeCNN` (optionally in :class:`SignalScaled`
    with ``scheduler``) saved by :func:`save_value_net`; returns ``(value_net, info)`` with
    the network in eval mode on ``device``."""
    from safetensors.torch import load_file

    stem = Path(stem)
    weights, cfg_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.exists() or not cfg_path.exists():
        raise FileNotFoundError(f"stem: expected {weights.name} and {cfg_path.name} in {stem.parent}")
    config = json.loads(cfg_path.read_text())
    net = build_value_net(config.get("value_net"), scheduler, source=f"stem: {cfg_path.name}: value_net")
    net.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    return net.to(device).eval(), config

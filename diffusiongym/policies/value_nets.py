"""Value networks ``V(x, t, **cond) -> (n,)`` for Value Matching, and their on-disk spec.

:func:`default_value_net` is what :class:`~diffusiongym.trainers.value_matching.ValueMatching`
trains when given no network; :func:`value_net_spec` / :func:`build_value_net` are the
``{"class", "config"}`` description a checkpoint or a saved value network stores and the
untrained network rebuilt from it (weights are then loaded into it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diffusiongym.policies.networks import SignalScaled, TimeCNN, TimeMLP

__all__ = ["build_value_net", "default_value_net", "value_net_spec"]


def default_value_net(sample_shape: tuple[int, ...], scheduler: Any, num_classes: int | None = None) -> nn.Module:
    """A value network for ``sample_shape`` with a zero head (the base control ``u = 0`` at
    the start): ``SignalScaled(TimeMLP)`` for vectors ``(d,)``, ``SignalScaled(TimeCNN)``
    for images ``(C, H, W)``; ``scheduler`` is the environment's. Draws its initial
    weights from the global RNG (:class:`ValueMatching` builds it seeded)."""
    if len(sample_shape) == 1:
        return SignalScaled(TimeMLP(sample_shape[0], out_dim=1, hidden=128, layers=3, zero_init=True), scheduler)
    if len(sample_shape) == 3:
        return SignalScaled(
            TimeCNN(sample_shape[0], num_classes=num_classes, output="value", zero_init=True), scheduler
        )
    raise ValueError(f"sample_shape: expected (d,) or (C, H, W), got {tuple(sample_shape)}")


def value_net_spec(value_net: nn.Module) -> dict[str, Any]:
    """``{"class", "config"}`` of a value network: what :func:`build_value_net` rebuilds."""
    return {"class": type(value_net).__name__, "config": getattr(value_net, "config", None)}


def build_value_net(spec: Any, scheduler: Any, source: str = "value_net") -> nn.Module:
    """An untrained :class:`TimeMLP` / :class:`TimeCNN` (optionally in :class:`SignalScaled`
    with ``scheduler``) from :func:`value_net_spec`; ``ValueError`` naming ``source`` for
    any other network (then pass an untrained instance instead)."""
    builders: dict[str, Callable[..., nn.Module]] = {"TimeMLP": TimeMLP, "TimeCNN": TimeCNN}
    cls_name = spec.get("class") if isinstance(spec, dict) else None
    config = (spec.get("config") if isinstance(spec, dict) else None) or {}
    inner_name, inner_cfg = (
        (config.get("net_class"), config.get("net")) if cls_name == "SignalScaled" else (cls_name, config)
    )
    if inner_name not in builders or not isinstance(inner_cfg, dict) or not inner_cfg:
        raise ValueError(
            f"{source}: cannot rebuild a value network of class {cls_name!r} (expected TimeMLP, TimeCNN or SignalScaled of one); pass an untrained instance to load into"
        )
    net = builders[inner_name](**inner_cfg)
    return SignalScaled(net, scheduler) if cls_name == "SignalScaled" else net

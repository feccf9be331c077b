"""Reward interface: ``reward(x, **cond) -> (values, valid)``.

A reward maps a batch of final samples ``x1`` of shape ``(n, *sample_shape)`` to a
pair of tensors of shape ``(n,)``: the reward values and a boolean validity mask.
Invalid samples (NaN/inf entries, or outside the reward's domain, e.g. an image out
of range) are flagged in ``valid``, never crashed on; their value is whatever the
formula gives (possibly NaN) and consumers must mask with ``valid``.

Each reward declares ``differentiable`` (whether ``values`` can be back-propagated to
``x``; methods like adjoint matching need it) and ``range`` (the value range where
known, else ``None``). Nothing else: closed forms that only the Gaussian-mixture oracle
needs (Gaussian tilts) live in :mod:`diffusiongym.oracle`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Reward", "CallableReward", "ConstantReward"]


def _per_sample_rows(x: Tensor) -> Tensor:
    """``x`` as ``(n, -1)`` rows, also for an empty batch or 1-D ``x``."""
    return x.flatten(1) if x.ndim > 1 else x[:, None]


class Reward(ABC):
    """Base class of rewards on final samples."""

    differentiable: bool = False
    range: tuple[float, float] | None = None

    @abstractmethod
    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        """Reward values, shape ``(n,)``."""

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        """Validity of each sample, shape ``(n,)`` bool. Default: all entries finite."""
        return _per_sample_rows(torch.isfinite(x)).all(dim=1)

    def __call__(self, x: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor batch of shape (n, *sample_shape), got {type(x).__name__}")
        if x.ndim < 1:
            raise ValueError(f"x: expected a batch of shape (n, *sample_shape), got shape {tuple(x.shape)}")
        values = self.evaluate(x, **cond)
        if values.shape != (x.shape[0],):
            raise ValueError(
                f"{type(self).__name__}.evaluate: expected shape ({x.shape[0]},), got {tuple(values.shape)}"
            )
        valid = self.is_valid(x, **cond) & torch.isfinite(values)
        return values, valid

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CallableReward(Reward):
    """Make any Python callable ``fn(x, **cond) -> (n,) tensor`` a reward.

    Parameters
    ----------
    fn : callable
        Returns a tensor (or array) of shape ``(n,)``.
    differentiable : bool
        Whether ``fn`` is differentiable in ``x`` with torch autograd.
    range : (float, float), optional
        Known value range.
    validity : callable, optional
        ``validity(x, **cond) -> (n,) bool`` in addition to the finiteness check.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        differentiable: bool = False,
        range: tuple[float, float] | None = None,
        validity: Callable[..., Tensor] | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.differentiable = bool(differentiable)
        self.range = range
        self.validity = validity

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        out = self.fn(x, **cond)
        return torch.as_tensor(out, device=x.device).to(x.dtype if x.is_floating_point() else torch.float32)

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        valid = super().is_valid(x, **cond)
        if self.validity is not None:
            valid = valid & torch.as_tensor(self.validity(x, **cond), dtype=torch.bool, device=x.device)
        return valid

    def __repr__(self) -> str:
        return f"CallableReward({getattr(self.fn, '__name__', repr(self.fn))})"


class ConstantReward(Reward):
    """``r(x) = value`` (adaptation should leave the base model unchanged)."""

    differentiable = True

    def __init__(self, value: float = 0.0):
        self.value = float(value)
        self.range = (self.value, self.value)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        return _per_sample_rows(x).sum(1) * 0 + self.value

    def __repr__(self) -> str:
        return f"ConstantReward({self.value})"

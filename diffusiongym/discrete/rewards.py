"""Rewards on token sequences ``x`` (n, D) long (the :class:`~diffusiongym.rewards.Reward` interface)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusiongym.rewards.base import Reward

__all__ = ["TableReward", "LogisticClassReward", "PixelFeatureReward"]


class TableReward(Reward):
    """``r(x) = table[x_1, ..., x_D]`` for a full table of shape ``(K,) * D``; tokens outside
    ``[0, K)`` (e.g. a leftover mask) are invalid and get ``nan``."""

    def __init__(self, table: Tensor):
        self.table = torch.as_tensor(table, dtype=torch.float64)
        self.vocab_size = self.table.shape[0]
        self.length = self.table.ndim
        self.range = (float(self.table.min()), float(self.table.max()))

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        return ((x >= 0) & (x < self.vocab_size)).all(1)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.length:
            raise ValueError(f"x: expected shape (n, {self.length}), got {tuple(x.shape)}")
        ok = self.is_valid(x)
        xc = x.clamp(0, self.vocab_size - 1).cpu()
        flat = torch.zeros(x.shape[0], dtype=torch.long)
        for i in range(self.length):
            flat = flat * self.vocab_size + xc[:, i]
        out = self.table.flatten()[flat].to(x.device)
        return torch.where(ok, out, torch.full_like(out, float("nan")))

    def __repr__(self) -> str:
        return f"TableReward(shape={tuple(self.table.shape)})"


class LogisticClassReward(Reward):
    """``r(x) = log softmax(W x + b)[label]``: a linear classifier's log-probability of a class.

    ``x`` (n, D) binary tokens (a leftover mask token is invalid); ``W`` (C, D), ``b`` (C,).
    """

    range = (-float("inf"), 0.0)

    def __init__(self, weight: Tensor, bias: Tensor, label: int):
        self.weight = weight.float()
        self.bias = bias.float()
        if not 0 <= int(label) < self.weight.shape[0]:
            raise ValueError(f"label: expected an int in [0, {self.weight.shape[0]}), got {label!r}")
        self.label = int(label)

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        return ((x == 0) | (x == 1)).all(1)

    def class_log_probs(self, x: Tensor) -> Tensor:
        """``(n, C)`` log-probabilities of every class."""
        z = x.float().clamp(0, 1) @ self.weight.T.to(x.device) + self.bias.to(x.device)
        return torch.log_softmax(z, -1)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        return self.class_log_probs(x)[:, self.label]

    def __repr__(self) -> str:
        return f"LogisticClassReward(label={self.label})"


class PixelFeatureReward(Reward):
    """``r(x) = mean of x over the coordinates in mask`` (fraction of "on" pixels in a region)."""

    range = (0.0, 1.0)

    def __init__(self, mask: Tensor):
        self.mask = torch.as_tensor(mask, dtype=torch.float32).flatten()

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        return ((x == 0) | (x == 1)).all(1)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        m = self.mask.to(x.device)
        return (x.float().clamp(0, 1) * m).sum(1) / m.sum()

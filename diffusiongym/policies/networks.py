"""Small time-conditioned networks shared by the adaptation methods.

- :class:`TimeMLP`: ``net(x, t) -> (n, out_dim)`` for vector data; Fourier features of
  ``t`` are concatenated to ``x``. Used as a value network (``out_dim = 1``) or as a
  control/residual network (``out_dim = d``).
- :class:`ResidualModel`: a trainable copy of a base model, ``base(x, t) + net(x, t)``,
  with the residual's last layer zero-initialised so that it starts *equal* to the base.
  This is how an exact (parameter-free) Gaussian-mixture model is fine-tuned; it outputs
  in the base model's own parameterisation, so it plugs in anywhere the base does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FourierTimeEmbedding", "TimeMLP", "ResidualModel"]


class FourierTimeEmbedding(nn.Module):
    """``t -> [t, sin(2 pi f t), cos(2 pi f t)]`` for fixed frequencies ``f = 1..num_frequencies``."""

    def __init__(self, num_frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32), persistent=False)
        self.dim = 2 * num_frequencies + 1

    def forward(self, t: Tensor) -> Tensor:
        t = t.reshape(-1, 1)
        angles = t * self.freqs.to(t)
        return torch.cat([t, torch.sin(angles), torch.cos(angles)], dim=1)


class TimeMLP(nn.Module):
    """MLP on ``[x, embed(t)]``.

    Parameters
    ----------
    dim : int
        Input dimension ``d`` (``x`` has shape ``(n, d)``).
    out_dim : int
        Output dimension (1 for a value network, ``d`` for a vector field).
    hidden : int
        Width of the hidden layers.
    layers : int
        Number of hidden layers.
    zero_init : bool
        Zero the last layer (the network starts as the zero function).
    """

    def __init__(self, dim: int, out_dim: int = 1, hidden: int = 128, layers: int = 3, num_frequencies: int = 8, zero_init: bool = False):
        super().__init__()
        self.config = {"dim": dim, "out_dim": out_dim, "hidden": hidden, "layers": layers, "num_frequencies": num_frequencies}
        self.embed = FourierTimeEmbedding(num_frequencies)
        widths = [dim + self.embed.dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(widths[-1], out_dim)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = torch.cat([x.reshape(x.shape[0], -1), self.embed(t)], dim=1)
        return self.head(self.body(h))


class ResidualModel(nn.Module):
    """Trainable copy ``base(x, t, **cond) + net(x, t, **cond)`` of a base model.

    ``net`` should output the shape of ``x``; with a zero-initialised last layer the
    model starts equal to the base. The base's parameters (if any) are frozen.
    """

    def __init__(self, base: nn.Module, net: nn.Module):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.net = net
        self.sample_shape = getattr(base, "sample_shape", None)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.base(x, t, **cond) + self.net(x, t, **cond).reshape(x.shape)

"""Small time-conditioned networks shared by the adaptation methods.

- :class:`TimeMLP`: ``net(x, t) -> (n, out_dim)`` for vector data; Fourier features of
  ``t`` are concatenated to ``x``. Used as a value network (``out_dim = 1``) or as a
  control/residual network (``out_dim = d``).
- :class:`TimeCNN`: a small time- (and optionally class-) conditioned CNN for images,
  as a value (``output="value"``) or a field (``output="field"``).
- :class:`SignalScaled`: ``net(alpha_t x, t)``, the input scaling value networks need.
- :class:`ControlScaledNet`: a residual whose network outputs the control ``u`` itself.
- :class:`CopyDifference`: a trainable copy of a base model minus the frozen base.
- :class:`TimeWindow`: a residual (or control) switched off from ``t_stop`` on.
- :func:`mlp`: the plain MLP the others (and RQL's flow networks) are built from.
- :class:`ResidualModel`: a trainable copy of a base model, ``base(x, t) + net(x, t)``,
  with the residual's last layer zero-initialised so that it starts *equal* to the base.
  This is how an exact (parameter-free) Gaussian-mixture model is fine-tuned; it outputs
  in the base model's own parameterisation, so it plugs in anywhere the base does.
"""

from __future__ import annotations

import copy

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import DiffusionEnvironment, time_vector
from diffusiongym.schedulers import Scheduler, make_scheduler

__all__ = [
    "mlp",
    "FourierTimeEmbedding",
    "TimeMLP",
    "ResidualModel",
    "TimeCNN",
    "SignalScaled",
    "ControlScaledNet",
    "CopyDifference",
    "TimeWindow",
]


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int, zero_init: bool = False) -> nn.Sequential:
    """``layers`` hidden ``Linear -> SiLU`` blocks of width ``hidden`` and a linear head
    (zeroed with ``zero_init``: the network starts as the zero function)."""
    widths = [in_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), nn.SiLU()]
    head = nn.Linear(widths[-1], out_dim)
    if zero_init:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return nn.Sequential(*mods, head)


class FourierTimeEmbedding(nn.Module):
    """``t -> [t, sin(2 pi f t), cos(2 pi f t)]`` for fixed frequencies ``f = 1..num_frequencies``."""

    def __init__(self, num_frequencies: int = 8):
        super().__init__()
        self.register_buffer(
            "freqs", 2 * math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32), persistent=False
        )
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

    def __init__(
        self,
        dim: int,
        out_dim: int = 1,
        hidden: int = 128,
        layers: int = 3,
        num_frequencies: int = 8,
        zero_init: bool = False,
    ):
        super().__init__()
        self.config = {
            "dim": dim,
            "out_dim": out_dim,
            "hidden": hidden,
            "layers": layers,
            "num_frequencies": num_frequencies,
        }
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
        t = time_vector(t, x)
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


class _Block(nn.Module):
    """GroupNorm -> SiLU -> conv, with a per-channel shift from the (time, class) embedding."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.shift = nn.Linear(emb_dim, channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.conv(torch.nn.functional.silu(self.norm(h) + self.shift(emb)[:, :, None, None]))


class TimeCNN(nn.Module):
    """Small time-conditioned (optionally class-conditional) CNN for images.

    ``net(x, t, **cond)`` with ``x`` of shape ``(n, C, H, W)`` and ``t`` of shape ``(n,)``.

    Parameters
    ----------
    in_channels : int
        ``C``.
    hidden : int
        Channels of the residual conv blocks.
    blocks : int
        Number of residual blocks (3x3 convs, stride 1; the receptive field covers 8x8).
    num_classes : int, optional
        Makes the network class-conditional: ``cond[class_key]`` (integer tensor ``(n,)``)
        is embedded and added to the time embedding.
    class_key : str
        Conditioning keyword holding the labels.
    output : {"value", "field"}
        ``"value"``: a scalar per sample, shape ``(n, 1)``, for :class:`ValuePolicy`.
        ``"field"``: shape ``(n, C, H, W)``, for :class:`ControlPolicy`.
    value_head : {"mean", "flatten"}
        How ``"value"`` reduces the feature map: ``"mean"`` pools it (any image size, but the
        value cannot tell where a feature is), ``"flatten"`` feeds all of it to a two-layer
        MLP of width ``4 * hidden`` (needs ``image_size``). On the digits row the flattened
        head learnt a value whose gradient steers as well as Adjoint Matching's control; the
        pooled one's spent twice the KL for less reward.
    image_size : (int, int), optional
        ``(H, W)``, required by ``value_head="flatten"``.
    zero_init : bool
        Zero the head (the network starts as the zero function: the base model's control).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 32,
        blocks: int = 3,
        num_classes: int | None = None,
        class_key: str = "label",
        output: str = "value",
        num_frequencies: int = 8,
        zero_init: bool = True,
        value_head: str = "mean",
        image_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        if output not in ("value", "field"):
            raise ValueError(f"output: expected 'value' or 'field', got {output!r}")
        if value_head not in ("mean", "flatten"):
            raise ValueError(f"value_head: expected 'mean' or 'flatten', got {value_head!r}")
        if value_head == "flatten":
            if output != "value":
                raise ValueError("value_head: 'flatten' is a head for output='value'")
            if (
                not isinstance(image_size, (tuple, list))
                or len(image_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
            ):
                raise ValueError(
                    f"image_size: expected (H, W), two positive integers, with value_head='flatten', got {image_size!r}"
                )
            image_size = (int(image_size[0]), int(image_size[1]))
        elif image_size is not None:
            raise ValueError("image_size: only used with value_head='flatten'; expected None")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0
        ):
            raise ValueError(f"num_classes: expected a positive integer or None, got {num_classes!r}")
        self.config = {
            "in_channels": in_channels,
            "hidden": hidden,
            "blocks": blocks,
            "num_classes": num_classes,
            "class_key": class_key,
            "output": output,
            "num_frequencies": num_frequencies,
        }
        if value_head == "flatten":  # recorded only when used: older specs rebuild unchanged
            self.config.update(value_head=value_head, image_size=list(image_size))
        self.in_channels, self.output, self.class_key = in_channels, output, class_key
        self.image_size = image_size
        self.embed = FourierTimeEmbedding(num_frequencies)
        emb_dim = 4 * hidden
        self.time_mlp = nn.Sequential(nn.Linear(self.embed.dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        self.stem = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim) for _ in range(blocks))
        self.out_norm = nn.GroupNorm(min(8, hidden), hidden)
        if value_head == "flatten":
            width = 4 * hidden
            self.head: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(hidden * image_size[0] * image_size[1], width), nn.SiLU(), nn.Linear(width, 1)
            )
        elif output == "value":
            self.head = nn.Linear(hidden, 1)
        else:
            self.head = nn.Conv2d(hidden, in_channels, 3, padding=1)
        if zero_init:
            last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (n, {self.in_channels}, H, W), got {tuple(x.shape)}")
        t = time_vector(t, x)
        emb = self.time_mlp(self.embed(t))
        if self.class_embed is not None:
            if self.class_key not in cond:
                raise ValueError(f"cond: expected the class labels under {self.class_key!r}, got keys {sorted(cond)}")
            labels = torch.as_tensor(cond[self.class_key], device=x.device).long().reshape(-1)
            if labels.shape != (x.shape[0],):
                raise ValueError(f"cond[{self.class_key!r}]: expected shape ({x.shape[0]},), got {tuple(labels.shape)}")
            emb = emb + self.class_embed(labels)
        emb = torch.nn.functional.silu(emb)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        h = torch.nn.functional.silu(self.out_norm(h))
        if self.image_size is not None:
            if tuple(h.shape[2:]) != self.image_size:
                raise ValueError(f"x: expected images of size {self.image_size}, got {tuple(x.shape[2:])}")
            return self.head(h)
        if self.output == "value":
            return self.head(h.mean(dim=(2, 3)))
        return self.head(h)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class SignalScaled(nn.Module):
    """``V(x, t, **cond) = net(alpha_t x, t, **cond)``: a value network that sees ``alpha_t x``.

    Why: the exact cost-to-go depends on ``x`` only through ``alpha_t x`` (for *any* data
    law, the Gaussian likelihood of ``x_t = x`` given ``x1`` is
    ``exp(-|x|^2 / 2 beta^2 + alpha x . x1 / beta^2 - ...)`` and the ``|x|^2`` term cancels
    in the posterior), and ``grad_x V* = O(alpha_t)`` as ``t -> 0``. With this input the
    learned control ``-sigma grad_x V = -sigma alpha_t grad net`` inherits that factor, so a
    network gradient error is not amplified by ``sigma`` near ``t = 0`` (memoryless linear
    schedule: ``sigma alpha = sqrt(2 t (1 - t)) <= 0.71``, while ``sigma(1e-3) = 45``).
    Without it, Value Matching on the GMM tasks diverges (the KL explodes).

    Parameters
    ----------
    net : nn.Module
        ``net(y, t, **cond)`` with ``y = alpha_t x`` of the shape of ``x``.
    scheduler : str or Scheduler
        Supplies ``alpha_t`` (use the environment's).
    """

    def __init__(self, net: nn.Module, scheduler: str | Scheduler):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module, got {type(net).__name__}")
        self.net = net
        self.scheduler = make_scheduler(scheduler)
        self.config = {"net_class": type(net).__name__, "net": getattr(net, "config", None)}

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = time_vector(t, x)
        alpha = self.scheduler.alpha(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.net(alpha * x, t, **cond)


class ControlScaledNet(nn.Module):
    """Residual in base-model units from a network that outputs the control ``u``.

    ``forward(x, t) = (sigma(t) / coef_out(t)) * net(x, t)``, where
    ``b = coef_x x + coef_out * output`` is the base environment's drift conversion under
    the memoryless schedule. Inside ``ResidualModel(base, ControlScaledNet(net, env))``
    the control is then exactly ``u = net(x, t)``, whatever the parameterisation, which
    keeps the regression equally well conditioned for velocity, epsilon, endpoint and
    score models (their ``coef_out / sigma`` ranges over orders of magnitude in ``t``).
    """

    def __init__(self, net: nn.Module, env: DiffusionEnvironment):
        super().__init__()
        self.net = net
        self._env = env.as_memoryless()

    def scale(self, t: Tensor) -> Tensor:
        """``sigma(t) / coef_out(t)``, shape of ``t`` (float64 maths, cast to ``t``'s dtype)."""
        t64 = t.detach().to(torch.float64)
        _, coef_out = self._env.coefficients(t64, "drift")
        return (self._env.sigma(t64) / coef_out).to(t.dtype)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = time_vector(t, x)
        out = self.net(x, t, **cond).reshape(x.shape)
        return self.scale(t).reshape(-1, *([1] * (x.ndim - 1))) * out


class CopyDifference(nn.Module):
    """``copy(x, t) - base(x, t)``: a trainable copy of ``base`` minus the frozen base.

    Zero at the start and as expressive as the base architecture. Inside
    ``ResidualModel(base, ControlScaledNet(CopyDifference(base), env))`` the control is
    ``u = copy - base`` (in the base's output units), so the fine-tuned model cannot leave the
    base where ``sigma -> 0`` (``t -> 1``) unless the control itself grows there: a full copy
    fine-tuned directly on few weighted samples (EFM on the digits row) moved its drift near
    ``t = 1``, where the KL weighs a drift error by ``1 / sigma^2``, and paid a KL of 57 nats,
    44 of them on the last of 25 steps.

    Parameters
    ----------
    base : nn.Module
        Deep-copied (the copy is trainable); the original is kept frozen and not registered
        as a submodule (checkpoints hold the copy only).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base: expected an nn.Module, got {type(base).__name__}")
        self.copy = copy.deepcopy(base).requires_grad_(True)
        for p in base.parameters():
            p.requires_grad_(False)
        self._base = (base,)  # a tuple: not a registered submodule

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.copy(x, t, **cond) - self._base[0](x, t, **cond)


class TimeWindow(nn.Module):
    """``net(x, t, **cond)`` for ``t < t_stop``, zero from ``t_stop`` on.

    Inside ``ResidualModel(base, TimeWindow(net, t_stop))`` the fine-tuned model *is* the
    base from ``t_stop`` on, so its control is exactly zero there and costs no KL. Why: a
    control learnt by regression near the data end is mostly estimation noise that the KL
    charges in full. EFM's flow-matching target in control units, ``coef_out (target - base)
    / sigma``, has a conditional variance that grows like ``1 / (1 - t)`` under the memoryless
    schedule, while the optimal control there is small (``sigma -> 0``). On the digits row,
    a model trained on ``t <= 0.98`` spent 4.4 of its 7.0 nats on the five steps from
    ``t = 0.8`` on. Switching those steps off cost 0.4 in mean reward and cut the KL to 2.6;
    training on ``t <= 0.8`` only, with this window, closed 0.86 of the gap instead of 0.64.

    Parameters
    ----------
    net : nn.Module
        Output of any shape with a leading batch dimension ``n``. It runs on the whole batch
        when any row has ``t < t_stop``, and on one row (for the output's shape) when none has:
        the sampling steps past ``t_stop`` cost the base only.
    t_stop : float
        The first time without output, in ``(0, 1]`` (``1``: on everywhere the grid goes).
    """

    def __init__(self, net: nn.Module, t_stop: float):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module, got {type(net).__name__}")
        if isinstance(t_stop, bool) or not isinstance(t_stop, (int, float)) or not 0.0 < t_stop <= 1.0:
            raise ValueError(f"t_stop: expected a number in (0, 1], got {t_stop!r}")
        self.net = net
        self.t_stop = float(t_stop)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = time_vector(t, x)
        on = t < self.t_stop
        if bool(on.all()):
            return self.net(x, t, **cond)
        n = x.shape[0]
        if not bool(on.any()):
            # a sampling step past t_stop: the net runs on one row only, for its output's shape
            row = {k: v[:1] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in cond.items()}
            zero = self.net(x[:1], t[:1], **row) * 0.0
            return zero.expand(n, *zero.shape[1:]).contiguous()
        out = self.net(x, t, **cond)
        return out * on.to(out.dtype).reshape(-1, *([1] * (out.ndim - 1)))

    def extra_repr(self) -> str:
        return f"t_stop={self.t_stop}"

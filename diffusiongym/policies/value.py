"""Controls from value functions and from control networks.

A *control* is a callable ``u(x, t, **cond)`` with ``x`` of shape ``(n, *sample_shape)``
and ``t`` of shape ``(n,)``; the engine (:func:`diffusiongym.sample`) adds ``sigma u`` to
the base drift. This module gives two agents that implement it:

- :class:`ValuePolicy`: ``u = -sigma(t) grad_x V(x, t, **cond)`` for a learned cost-to-go
  ``V`` (the optimal control when ``V = V*``, ``shared/DESIGN.md`` s. 1);
- :class:`ControlPolicy`: a network that outputs ``u`` directly.

Both also act on Gymnasium observations ``{"x": (n, *shape), "t": (n, 1), **cond}``
through :meth:`act`, returning the normalised action ``a = u / action_scale`` (an
unbatched numpy observation gives an unbatched numpy action).

Value networks: :class:`~diffusiongym.policies.networks.TimeMLP` (``out_dim = 1``) for
vectors, :class:`TimeCNN` here for images (optionally class-conditional), each best
wrapped in :class:`SignalScaled` (input ``alpha_t x``), which keeps ``sigma grad V``
bounded near ``t = 0`` where ``sigma`` blows up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.agent import control_action
from diffusiongym.policies.networks import FourierTimeEmbedding
from diffusiongym.schedulers import Scheduler, make_scheduler

__all__ = ["ValuePolicy", "ControlPolicy", "TimeCNN", "SignalScaled"]


def _time_vector(t: Tensor | float, x: Tensor) -> Tensor:
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.ndim == 0:
        return tt.expand(x.shape[0])
    tt = tt.reshape(-1) if tt.ndim == 2 and tt.shape[1] == 1 else tt
    if tt.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar, shape ({x.shape[0]},) or ({x.shape[0]}, 1), got {tuple(tt.shape)}")
    return tt


class _Agent(nn.Module):
    """Shared Gymnasium-side behaviour: observation in, normalised action out."""

    def __init__(self, env: DiffusionEnvironment | None, action_scale: float):
        super().__init__()
        if env is not None and not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if not (isinstance(action_scale, (int, float)) and not isinstance(action_scale, bool) and action_scale > 0):
            raise ValueError(f"action_scale: expected a positive number, got {action_scale!r}")
        self.env = env
        self.action_scale = float(action_scale)

    def _reference(self) -> Tensor | None:
        return next(iter(self.parameters()), None)

    @torch.no_grad()
    def act(self, observation: dict[str, Any]) -> Tensor | np.ndarray:
        """Normalised Gymnasium action ``a = u(x, t) / action_scale``.

        The conversion is :func:`diffusiongym.policies.agent.control_action` (the one
        :class:`~diffusiongym.policies.agent.ControlAgent` uses), with numpy observations
        moved to this network's device and dtype.

        Parameters
        ----------
        observation : dict
            ``"x"``: ``(n, *shape)`` (or ``shape`` for one unbatched numpy observation),
            ``"t"``: ``(n, 1)``, ``(n,)`` or a scalar; every other key is passed to the
            control as conditioning.

        Returns
        -------
        Tensor ``(n, *shape)`` on ``x``'s device, or a numpy array when ``x`` was numpy.
        """
        ref = self._reference()
        numpy_in = isinstance(observation, dict) and isinstance(observation.get("x"), np.ndarray)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        shape = self.env.sample_shape if self.env is not None else None
        return control_action(
            self,
            observation,
            self.action_scale,
            device=device if numpy_in else None,
            dtype=dtype if numpy_in else None,
            sample_ndim=len(shape) if shape is not None else None,
        )


class ValuePolicy(_Agent):
    """Control ``u(x, t) = -sigma(t) grad_x V(x, t, **cond)`` from a value network.

    Parameters
    ----------
    value_net : nn.Module
        ``value_net(x, t, **cond)`` returning ``(n,)`` or ``(n, 1)``: the cost-to-go
        ``V(x, t) ~ E[sum of 1/2 |u|^2 dt - reward_scale * r(X1) | X_t = x]``.
    env : DiffusionEnvironment
        Supplies ``sigma(t)`` (the diffusion coefficient used for sampling).
    action_scale : float
        Gymnasium action ``a = u / action_scale`` (see :meth:`act`).

    Notes
    -----
    The gradient is taken on a detached copy of ``x`` under ``torch.enable_grad()``, so
    it works inside the engine's ``no_grad`` sampling, never modifies or attaches a graph
    to the caller's tensors, and returns a tensor without a graph (the value network's
    parameters get no ``.grad``).
    """

    def __init__(self, value_net: nn.Module, env: DiffusionEnvironment, action_scale: float = 1.0):
        if not isinstance(value_net, nn.Module):
            raise TypeError(f"value_net: expected an nn.Module value_net(x, t, **cond) -> (n,), got {type(value_net).__name__}")
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment (for sigma(t)), got {type(env).__name__}")
        if env.noise.is_deterministic:
            raise ValueError("env: sigma = 0 (noise='ode') admits no control u = -sigma grad V; use a stochastic noise")
        super().__init__(env, action_scale)
        self.value_net = value_net

    def value(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``V(x, t)``, shape ``(n,)`` (differentiable; used by training)."""
        v = self.value_net(x, _time_vector(t, x), **cond)
        if v.shape not in ((x.shape[0],), (x.shape[0], 1)):
            raise ValueError(f"value_net output: expected shape ({x.shape[0]},) or ({x.shape[0]}, 1), got {tuple(v.shape)}")
        return v.reshape(x.shape[0])

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``u = -sigma(t) grad_x V(x, t)``, shape of ``x``, no autograd graph."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        t_vec = _time_vector(t, x).detach()
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value(xg, t_vec, **cond).sum(), xg)
        sigma = self.env.sigma(t_vec).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (-sigma * grad).detach()


class ControlPolicy(_Agent):
    """Control given directly by a network: ``u = net(x, t, **cond)`` reshaped to ``x``.

    Parameters
    ----------
    net : nn.Module
        ``net(x, t, **cond)`` with ``x.numel() / n`` outputs per sample (e.g.
        ``TimeMLP(d, out_dim=d)`` or ``TimeCNN(..., output="field")``).
    env : DiffusionEnvironment, optional
        Only used to recognise unbatched numpy observations in :meth:`act`.
    action_scale : float
        Gymnasium action ``a = u / action_scale``.
    """

    def __init__(self, net: nn.Module, env: DiffusionEnvironment | None = None, action_scale: float = 1.0):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module net(x, t, **cond) -> u, got {type(net).__name__}")
        super().__init__(env, action_scale)
        self.net = net

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``u(x, t)``, shape of ``x``."""
        u = self.net(x, _time_vector(t, x), **cond)
        if u.numel() != x.numel():
            raise ValueError(f"net output: expected {x.numel()} values (shape {tuple(x.shape)}), got shape {tuple(u.shape)}")
        return u.reshape(x.shape)


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
        ``"value"``: a scalar per sample, shape ``(n, 1)`` (mean-pooled head), for
        :class:`ValuePolicy`. ``"field"``: shape ``(n, C, H, W)``, for :class:`ControlPolicy`.
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
    ):
        super().__init__()
        if output not in ("value", "field"):
            raise ValueError(f"output: expected 'value' or 'field', got {output!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0):
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
        self.in_channels, self.output, self.class_key = in_channels, output, class_key
        self.embed = FourierTimeEmbedding(num_frequencies)
        emb_dim = 4 * hidden
        self.time_mlp = nn.Sequential(nn.Linear(self.embed.dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        self.stem = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim) for _ in range(blocks))
        self.out_norm = nn.GroupNorm(min(8, hidden), hidden)
        if output == "value":
            self.head: nn.Module = nn.Linear(hidden, 1)
        else:
            self.head = nn.Conv2d(hidden, in_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (n, {self.in_channels}, H, W), got {tuple(x.shape)}")
        t = _time_vector(t, x)
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
        t = _time_vector(t, x)
        alpha = self.scheduler.alpha(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.net(alpha * x, t, **cond)

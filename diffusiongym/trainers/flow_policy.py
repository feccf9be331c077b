"""Flow policies for Reversal Q-Learning: the flow, its reversal, its value and its density.

A flow policy ``v(s, x, t)`` acts by ``F`` Euler steps ``x^{f+1} = x^f + h_f v(s, x^f, t_f)``
on a grid ``t_0 < ... < t_F`` (``h_f = t_{f+1} - t_f``) from ``x^0 ~ N(0, x0_std^2 I)``;
``x^F`` is the action (``docs/maths.md``, "Reversal Q-Learning"). In the diffusion gym
``s`` is empty, ``x^F = x1`` and the grid is the task's ``[t_start, 1]``
(:func:`~diffusiongym.trainers.flow_diffusion.diffusion_policy`); for a general MDP the grid
is ``[0, 1]``.

- :class:`FlowPolicy`: the flow, its forward pass, its reversal and its exact log-density.
- :class:`FlowValue`: the value ``V(s, x^f, f)`` over complete and partial actions.
- :func:`flow_matching_bc` (behaviour cloning), :func:`reversal_error`.

The diffusion gym's side (the base model as a flow, the drift agent, the exact terminal KL)
is :mod:`diffusiongym.trainers.flow_diffusion`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import time_vector
from diffusiongym.policies.networks import FourierTimeEmbedding, mlp
from diffusiongym.utils.runtime import flush_denormals
from diffusiongym.utils.validation import check_positive_int

__all__ = ["FlowPolicy", "FlowValue", "flow_matching_bc", "reversal_error"]

BaseVelocity = Callable[[Tensor, Tensor], Tensor]


class FlowPolicy(nn.Module):
    """Flow policy ``v(s, x, t) = base(x, t) + net([s, x, embed(t)])`` with ``F`` Euler steps.

    Parameters
    ----------
    action_dim : int
        ``d``: actions ``x`` have shape ``(n, d)``.
    state_dim : int
        ``ds``: states ``s`` have shape ``(n, ds)`` (0: unconditional).
    flow_steps : int
        ``F``.
    t_start, t_end : float
        Flow-time grid ``t_f = t_start + f (t_end - t_start) / F``.
    x0_std : float
        ``x^0 ~ N(0, x0_std^2 I)``.
    base : callable, optional
        Frozen base velocity ``base(x, t) -> (n, d)`` (``t`` of shape ``(n,)``); the
        residual network is then zero-initialised so the policy starts *equal* to it.
    hidden, layers : int
        Residual MLP size.
    """

    def __init__(
        self,
        action_dim: int,
        state_dim: int = 0,
        flow_steps: int = 10,
        t_start: float = 0.0,
        t_end: float = 1.0,
        x0_std: float = 1.0,
        base: BaseVelocity | None = None,
        hidden: int = 128,
        layers: int = 3,
    ):
        super().__init__()
        check_positive_int("action_dim", action_dim)
        check_positive_int("flow_steps", flow_steps)
        if isinstance(state_dim, bool) or not isinstance(state_dim, int) or state_dim < 0:
            raise ValueError(f"state_dim: expected a non-negative integer, got {state_dim!r}")
        if not 0.0 <= t_start < t_end <= 1.0:
            raise ValueError(f"t_start, t_end: expected 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
        if not (isinstance(x0_std, (int, float)) and x0_std > 0):
            raise ValueError(f"x0_std: expected a positive number, got {x0_std!r}")
        if base is not None and not callable(base):
            raise TypeError(f"base: expected a callable base(x, t) -> velocity, got {type(base).__name__}")
        self.spec = {
            "action_dim": action_dim,
            "state_dim": state_dim,
            "flow_steps": flow_steps,
            "t_start": float(t_start),
            "t_end": float(t_end),
            "x0_std": float(x0_std),
            "hidden": hidden,
            "layers": layers,
        }
        self.action_dim, self.state_dim, self.flow_steps = action_dim, state_dim, flow_steps
        self.x0_std = float(x0_std)
        self.base = base
        self.register_buffer(
            "times", torch.linspace(t_start, t_end, flow_steps + 1, dtype=torch.float64).float(), persistent=False
        )
        self.embed = FourierTimeEmbedding(8)
        self.net = mlp(state_dim + action_dim + self.embed.dim, action_dim, hidden, layers, zero_init=base is not None)

    def frozen_copy(self) -> FlowPolicy:
        """A copy with the same weights and base velocity (shared, not copied), all frozen."""
        ref = self.times
        copy = FlowPolicy(**self.spec, base=self.base).to(device=ref.device, dtype=ref.dtype)
        copy.load_state_dict(self.state_dict())
        return copy.requires_grad_(False)

    def _check(self, s: Tensor | None, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.action_dim:
            raise ValueError(f"x: expected shape (n, {self.action_dim}), got {tuple(x.shape)}")
        if s is None:
            s = x.new_zeros(x.shape[0], 0)
        if s.shape != (x.shape[0], self.state_dim):
            raise ValueError(f"s: expected shape ({x.shape[0]}, {self.state_dim}), got {tuple(s.shape)}")
        return s

    def forward(self, s: Tensor | None, x: Tensor, t: Tensor | float) -> Tensor:
        """Velocity ``v(s, x, t)``, shape ``(n, d)``; ``t`` a scalar or shape ``(n,)``."""
        s = self._check(s, x)
        tt = time_vector(t, x)
        out = self.net(torch.cat([s, x, self.embed(tt)], dim=1))
        if self.base is not None:
            out = out + self.base(x, tt)
        return out

    def step_sizes(self) -> Tensor:
        """``h_f``, shape ``(F,)``."""
        return self.times[1:] - self.times[:-1]

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``x^0 ~ N(0, x0_std^2 I)``, shape ``(n, d)``."""
        return self.x0_std * torch.randn(
            n, self.action_dim, generator=generator, device=self.times.device, dtype=self.times.dtype
        )

    def sample(
        self,
        s: Tensor | None = None,
        x0: Tensor | None = None,
        n: int | None = None,
        generator: torch.Generator | None = None,
        return_path: bool = False,
    ) -> Tensor:
        """Forward Euler from ``x^0`` (given, or drawn for ``n`` = batch of ``s``).

        Returns ``x^F`` of shape ``(n, d)``, or the path ``(F + 1, n, d)`` when ``return_path``.
        Runs under the caller's grad mode.
        """
        if x0 is None:
            if n is None:
                if s is None:
                    raise ValueError("n: give the batch size, s or x0")
                n = s.shape[0]
            x0 = self.noise(n, generator)
        x = x0
        path = [x]
        for f, h in enumerate(self.step_sizes().tolist()):
            x = x + h * self(s, x, self.times[f])
            path.append(x)
        return torch.stack(path) if return_path else x

    def reverse(self, s: Tensor | None, a: Tensor, iters: int = 0) -> Tensor:
        """Flow reversal of actions ``a = x^F``: the virtual trajectory ``(F + 1, n, d)``.

        ``iters = 0``: explicit Euler backwards in time, ``x^f = x^{f+1} - h_f v(s, x^{f+1}, t_{f+1})``;
        ``iters > 0``: that many fixed-point iterations ``x^f <- x^{f+1} - h_f v(s, x^f, t_f)``
        of the implicit inverse of the forward Euler step (exact when they converge,
        ``h_f Lip(v) < 1``).
        """
        x = a
        path = [a]
        hs = self.step_sizes().tolist()
        for f in reversed(range(self.flow_steps)):
            nxt = x
            x = nxt - hs[f] * self(s, nxt, self.times[f + 1])
            for _ in range(iters):
                x = nxt - hs[f] * self(s, x, self.times[f])
            path.append(x)
        return torch.stack(path[::-1])

    def sample_with_log_prob(
        self, n: int, s: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x^F`` and its exact log-density under the discrete Euler map (change of variables).

        ``log q(x^F) = log N(x^0; 0, x0_std^2 I) - sum_f log |det(I + h_f dv/dx(x^f))|``,
        exact when the Euler map is injective. Jacobians by ``d`` backward passes: meant
        for low-dimensional actions. The same ``generator`` state gives the same ``x^F`` as
        :meth:`sample`. Returns ``((n, d), (n,) float64)``, detached.
        """
        x = self.noise(n, generator)
        d = self.action_dim
        logq = (
            -0.5 * (x / self.x0_std).pow(2).sum(1) - d * math.log(self.x0_std) - 0.5 * d * math.log(2 * math.pi)
        ).double()
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        for f, h in enumerate(self.step_sizes().tolist()):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                v = self(s, xg, self.times[f])
                rows = [torch.autograd.grad(v[:, i].sum(), xg, retain_graph=i < d - 1)[0] for i in range(d)]
            jac = torch.stack(rows, 1).double()  # (n, d, d): d v_i / d x_j
            logq = logq - torch.linalg.slogdet(eye + h * jac)[1]
            x = (x + h * v).detach()
        return x, logq


class FlowValue(nn.Module):
    """``V(s, x^f, f)``: MLP on ``[s, x^f, embed(f / F)]``, output shape ``(n,)``.

    Parameters
    ----------
    action_dim, state_dim, flow_steps : int
        As the policy's.
    hidden, layers : int
        MLP size.
    """

    def __init__(self, action_dim: int, state_dim: int, flow_steps: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.action_dim, self.state_dim, self.flow_steps = action_dim, state_dim, flow_steps
        self.embed = FourierTimeEmbedding(8)
        self.net = mlp(state_dim + action_dim + self.embed.dim, 1, hidden, layers)

    def forward(self, s: Tensor, x: Tensor, f: Tensor | int) -> Tensor:
        """``V`` at states ``s`` ``(n, ds)``, partial actions ``x`` ``(n, d)`` and flow indices ``f`` (scalar or ``(n,)``)."""
        ff = time_vector(f, x)
        return self.net(torch.cat([s, x, self.embed(ff / self.flow_steps)], dim=1)).squeeze(1)


def reversal_error(policy: FlowPolicy, n: int = 1024, s: Tensor | None = None, iters: int = 0, seed: int = 0) -> float:
    """Max ``|reverse(forward(x^0))^0 - x^0|`` over ``n`` draws (the integrator's round-trip error)."""
    gen = torch.Generator(device=policy.times.device).manual_seed(seed)
    with torch.no_grad():
        x0 = policy.noise(n, gen)
        a = policy.sample(s, x0=x0)
        back = policy.reverse(s, a, iters=iters)[0]
    return float((back - x0).abs().max())


def flow_matching_bc(
    policy: FlowPolicy,
    dataset: Any,
    updates: int,
    lr: float = 3e-4,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Behaviour cloning of ``dataset``'s actions by conditional flow matching (in place).

    Path ``x_t = (1 - tau) x^0 + tau a`` with ``tau = (t - t_start) / (t_end - t_start)``,
    target velocity ``(a - x^0) / (t_end - t_start)``. All randomness from a generator
    seeded with ``seed``. Returns ``{"loss": [...]}``.

    Parameters
    ----------
    policy : FlowPolicy
    dataset : OfflineDataset
        Its ``states`` and ``actions`` (on the policy's device).
    updates, batch_size : int
    lr : float
        Adam learning rate.
    """
    check_positive_int("updates", updates)
    check_positive_int("batch_size", batch_size)
    dev = policy.times.device
    dataset = dataset.to(dev, policy.times.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    t0, t1 = float(policy.times[0]), float(policy.times[-1])
    history: dict[str, list[float]] = {"loss": []}
    with flush_denormals():
        for _ in tqdm(range(updates), disable=not progress, desc="flow BC", leave=False):
            b = dataset.batch(batch_size, gen)
            x0 = policy.noise(batch_size, gen)
            tau = torch.rand(batch_size, 1, generator=gen, device=dev, dtype=x0.dtype)
            xt = (1 - tau) * x0 + tau * b["a"]
            loss = (policy(b["s"], xt, t0 + (t1 - t0) * tau[:, 0]) - (b["a"] - x0) / (t1 - t0)).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["loss"].append(float(loss.detach()))
    return history

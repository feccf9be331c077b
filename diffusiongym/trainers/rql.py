"""Reversal Q-Learning (RQL): each flow (denoising) step of a flow policy is an RL action.

Oberai, Park, Levine (2026), "Reversal Q-Learning". The pieces, in the order the
training loop uses them:

Flow policy ``v(s, x^f, t_f)``
    ``F`` Euler steps ``x^{f+1} = x^f + v(s, x^f, t_f) h_f`` on a grid ``t_0 < ... < t_F``
    (``h_f = t_{f+1} - t_f``) from ``x^0 ~ N(0, x0_std^2 I)``; ``x^F`` is the action.
    In the diffusion gym ``s`` is the conditioning (empty for unconditional models),
    ``x^F = x1`` and the grid is ``[t_start, 1]``: flow step ``f`` runs at diffusion time
    ``t_f = t_start + f (1 - t_start) / F``. For a general MDP the grid is ``[0, 1]``.
Flow reversal
    From a dataset action ``a = x^F``, integrate the current field backwards:
    ``x^f = x^{f+1} - h_f v(s, x^{f+1}, t_{f+1})`` (explicit Euler in reverse time),
    optionally refined by ``reversal_iters`` fixed-point iterations
    ``x^f <- x^{f+1} - h_f v(s, x^f, t_f)`` which invert the forward Euler map exactly
    when they converge (``h_f Lip(v) < 1``). The resulting "virtual trajectory"
    ``x^0, ..., x^F`` is deterministic and on-policy: the policy maps ``x^f`` to ``a``
    (up to the integrator's error, reported by :func:`reversal_error`).
Value ``V(s, x^f, f)``
    One network over complete (``f = F``: ``Q(s, a)``) and partial actions. Because the
    virtual trajectory is deterministic and on-policy, every ``f`` has the *same* target
    ``y = r + gamma (1 - done) V_target(s', x'^0, 0)``, ``x'^0 ~ N(0, x0_std^2 I)`` fresh
    (gamma only on real environment transitions). Huber loss, Polyak target network.
    ``chain_discount=True`` is the ablation that discounts inside the chain (the wrong
    target ``gamma^{F - f} y``, as if each flow step were an environment step).
Policy loss
    Stepwise pathwise gradient, one hop per flow step, no backpropagation through the
    chain: ``-V(s, x^f + v(s, x^f, t_f) h_f, f + 1)`` with ``x^f`` detached, plus
    ``alpha |v(s, x^f, t_f) - (x^{f+1} - x^f) / h_f|^2``, behaviour cloning towards the
    reversal's own step. ``bc_reversal`` picks which field reverses the data for that BC
    target:

    - ``"current"`` (the issue's literal version): the same virtual trajectory. Its step
      ``(x^{f+1} - x^f) / h`` is ``v(x^{f+1}, t_{f+1})`` for the explicit reversal and
      exactly ``v(x^f, t_f)`` for a converged implicit one, so the term is only the
      integrator's error (a smoothness penalty on the field along the path), identically
      zero as ``reversal_iters`` grows, whatever the distance to the data (tested). It does
      not keep the policy near the data.
    - ``"initial"`` (default): the frozen initial flow, i.e. the pretrained base / BC
      flow, reverses the data (once, cached); the target is the step the data took under
      that flow and ``v`` is evaluated at that flow's ``x^f``. A real behaviour
      constraint: larger ``alpha`` stays closer to the data (GMM2D sweep in
      ``benchmarks/adaptation_methods/rql.py``).

    ``alpha`` multiplies a term in velocity units, ``|dv|^2 ~ |da|^2 / h^2``, so it is
    ``~F^2`` times stronger than the same number on actions. The value term is divided by
    the batch mean of ``|V|`` (TD3+BC normalisation) when ``normalize_q`` so that
    ``alpha`` means the same across reward scales.

Datasets are :class:`OfflineDataset` tuples ``(s, a, r, s', done)``;
:func:`diffusion_dataset` draws ``(conditioning, x1, reward_scale * r(x1))`` from a
diffusion task's base model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.policies.networks import FourierTimeEmbedding
from diffusiongym.utils.io import load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from diffusiongym.utils.validation import check_positive_int, check_tensor

__all__ = [
    "RQLConfig",
    "OfflineDataset",
    "FlowPolicy",
    "FlowValue",
    "RQL",
    "reversal_error",
    "flow_matching_bc",
    "diffusion_policy",
    "diffusion_dataset",
    "flow_kl_to_density",
    "collect_dataset",
    "evaluate_policy",
    "drift_agent",
]

BaseVelocity = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- data
@dataclass
class OfflineDataset:
    """Offline transitions ``(s, a, r, s', done)``.

    Attributes
    ----------
    states : Tensor, (N, ds)
        ``ds = 0`` for unconditional diffusion models.
    actions : Tensor, (N, da)
    rewards : Tensor, (N,)
    next_states : Tensor, (N, ds)
    dones : Tensor, (N,)
        1.0 where the episode terminated at ``s'`` (no bootstrap), else 0.0. Time-limit
        truncations are *not* terminations.
    """

    states: Tensor
    actions: Tensor
    rewards: Tensor
    next_states: Tensor
    dones: Tensor

    def __post_init__(self) -> None:
        n = self.actions.shape[0] if isinstance(self.actions, Tensor) else -1
        check_tensor("actions", self.actions, (-1, -1))
        check_tensor("states", self.states, (n, -1))
        check_tensor("next_states", self.next_states, tuple(self.states.shape))
        check_tensor("rewards", self.rewards, (n,))
        check_tensor("dones", self.dones, (n,))
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            setattr(self, name, getattr(self, name).float())

    def __len__(self) -> int:
        return self.actions.shape[0]

    @property
    def state_dim(self) -> int:
        return self.states.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def batch(self, size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self), (size,), generator=generator)
        return {"idx": idx, "s": self.states[idx], "a": self.actions[idx], "r": self.rewards[idx], "s2": self.next_states[idx], "done": self.dones[idx]}


# ----------------------------------------------------------------------- networks
def _mlp(in_dim: int, out_dim: int, hidden: int, layers: int, zero_init: bool) -> nn.Sequential:
    widths = [in_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [nn.Linear(a, b), nn.SiLU()]
    head = nn.Linear(widths[-1], out_dim)
    if zero_init:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return nn.Sequential(*mods, head)


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
        if not 0.0 <= t_start < t_end <= 1.0:
            raise ValueError(f"t_start, t_end: expected 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
        self.config = {"action_dim": action_dim, "state_dim": state_dim, "flow_steps": flow_steps, "t_start": t_start, "t_end": t_end, "x0_std": x0_std, "hidden": hidden, "layers": layers}
        self.action_dim, self.state_dim, self.flow_steps = action_dim, state_dim, flow_steps
        self.x0_std = float(x0_std)
        self.base = base
        self.register_buffer("times", torch.linspace(t_start, t_end, flow_steps + 1, dtype=torch.float64).float(), persistent=False)
        self.embed = FourierTimeEmbedding(8)
        self.net = _mlp(state_dim + action_dim + self.embed.dim, action_dim, hidden, layers, zero_init=base is not None)

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
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        out = self.net(torch.cat([s, x, self.embed(tt)], dim=1))
        if self.base is not None:
            out = out + self.base(x, tt)
        return out

    def step_sizes(self) -> Tensor:
        return self.times[1:] - self.times[:-1]

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.x0_std * torch.randn(n, self.action_dim, generator=generator, device=self.times.device)

    def sample(self, s: Tensor | None = None, x0: Tensor | None = None, n: int | None = None, generator: torch.Generator | None = None, return_path: bool = False) -> Tensor:
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

        ``iters = 0``: explicit Euler backwards in time; ``iters > 0``: that many
        fixed-point iterations of the implicit inverse of the forward Euler step.
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

    def sample_with_log_prob(self, n: int, s: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``x^F`` and its exact log-density under the discrete Euler map (change of variables).

        ``log q(x^F) = log N(x^0; 0, x0_std^2 I) - sum_f log |det(I + h_f dv/dx(x^f))|``,
        exact when the Euler map is injective. Jacobians by ``d`` backward passes: meant
        for low-dimensional actions. Returns ``((n, d), (n,))``, detached.
        """
        x = self.noise(n, generator)
        d = self.action_dim
        logq = (-0.5 * (x / self.x0_std).pow(2).sum(1) - d * math.log(self.x0_std) - 0.5 * d * math.log(2 * math.pi)).double()
        eye = torch.eye(d)
        for f, h in enumerate(self.step_sizes().tolist()):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                v = self(s, xg, self.times[f])
                rows = [torch.autograd.grad(v[:, i].sum(), xg, retain_graph=i < d - 1)[0] for i in range(d)]
            jac = torch.stack(rows, 1)  # (n, d, d): d v_i / d x_j
            logq = logq - torch.linalg.slogdet((eye + h * jac).double())[1]
            x = (x + h * v).detach()
        return x, logq


class FlowValue(nn.Module):
    """``V(s, x^f, f)``: MLP on ``[s, x^f, embed(f / F)]``, output shape ``(n,)``."""

    def __init__(self, action_dim: int, state_dim: int, flow_steps: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.action_dim, self.state_dim, self.flow_steps = action_dim, state_dim, flow_steps
        self.embed = FourierTimeEmbedding(8)
        self.net = _mlp(state_dim + action_dim + self.embed.dim, 1, hidden, layers, zero_init=False)

    def forward(self, s: Tensor, x: Tensor, f: Tensor | int) -> Tensor:
        ff = torch.as_tensor(f, dtype=x.dtype, device=x.device)
        if ff.ndim == 0:
            ff = ff.expand(x.shape[0])
        return self.net(torch.cat([s, x, self.embed(ff / self.flow_steps)], dim=1)).squeeze(1)


def reversal_error(policy: FlowPolicy, n: int = 1024, s: Tensor | None = None, iters: int = 0, seed: int = 0) -> float:
    """Max ``|reverse(forward(x^0))^0 - x^0|`` over ``n`` draws (the integrator's round-trip error)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = policy.noise(n, gen)
        a = policy.sample(s, x0=x0)
        back = policy.reverse(s, a, iters=iters)[0]
    return float((back - x0).abs().max())


# -------------------------------------------------------------------------- agent
@dataclass
class RQLConfig:
    """Hyper-parameters of :class:`RQL` (plain data; saved as JSON with checkpoints)."""

    gamma: float = 0.99  # discount on real environment transitions only
    alpha: float = 1.0  # weight of the behaviour-cloning term
    bc_reversal: str = "initial"  # "initial" (frozen initial flow) or "current" (the issue's; ~no gradient): which flow reverses the data for BC
    reversal_iters: int = 0  # fixed-point refinements of the reversal (0: explicit Euler)
    chain_discount: bool = False  # ablation: discount inside the flow chain (wrong)
    tau: float = 0.005  # Polyak rate of the target value network
    huber_delta: float = 1.0
    normalize_q: bool = False  # divide the value term by mean |V| (TD3+BC; unstable when V -> 0)
    policy_lr: float = 3e-4
    value_lr: float = 3e-4
    batch_size: int = 256
    value_hidden: int = 256
    value_layers: int = 3
    policy_delay: int = 1  # policy update every this many value updates
    warmup_updates: int = 0  # value-only updates before the policy starts moving
    flow_samples: int = 0  # flow indices per transition in each loss (0: all F + 1 / F; k: k random ones)
    grad_clip: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bc_reversal not in ("current", "initial"):
            raise ValueError(f"bc_reversal: expected 'current' or 'initial', got {self.bc_reversal!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma: expected a value in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau: expected a value in (0, 1], got {self.tau}")
        if self.alpha < 0:
            raise ValueError(f"alpha: expected alpha >= 0, got {self.alpha}")


class RQL:
    """Reversal Q-Learning agent around a :class:`FlowPolicy` (see the module docstring).

    Parameters
    ----------
    policy : FlowPolicy
        Trained in place (start it from a pretrained base / behaviour flow).
    config : RQLConfig
    """

    def __init__(self, policy: FlowPolicy, config: RQLConfig | None = None):
        if not isinstance(policy, FlowPolicy):
            raise TypeError(f"policy: expected a FlowPolicy, got {type(policy).__name__}")
        self.cfg = config if config is not None else RQLConfig()
        self.policy = policy
        self.initial_policy = copy.deepcopy(policy).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
            torch.manual_seed(self.cfg.seed)
            self.value = FlowValue(policy.action_dim, policy.state_dim, policy.flow_steps, self.cfg.value_hidden, self.cfg.value_layers)
        self.value_target = copy.deepcopy(self.value).requires_grad_(False)
        self.policy_opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=self.cfg.policy_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=self.cfg.value_lr)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.num_updates = 0
        self.history: dict[str, list[float]] = {}

    # ------------------------------------------------------------------- pieces
    def td_targets(self, batch: dict[str, Tensor]) -> Tensor:
        """Value targets for every flow index, shape ``(F + 1, n)``.

        ``y = r + gamma (1 - done) V_target(s', x'^0, 0)`` for all ``f``; with
        ``chain_discount`` (ablation) row ``f`` is ``gamma^{F - f} y``.
        """
        with torch.no_grad():
            s2 = batch["s2"]
            x0 = self.policy.noise(s2.shape[0], self.generator)
            boot = self.value_target(s2, x0, 0)
            y = batch["r"] + self.cfg.gamma * (1.0 - batch["done"]) * boot
            fs = self.policy.flow_steps
            if self.cfg.chain_discount:
                powers = torch.arange(fs, -1, -1, dtype=y.dtype)
                return (self.cfg.gamma**powers)[:, None] * y
            return y.expand(fs + 1, -1)

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One value update (and one policy update every ``policy_delay``); returns metrics."""
        cfg, pol = self.cfg, self.policy
        s, a = batch["s"], batch["a"]
        n, fs = a.shape[0], pol.flow_steps
        with torch.no_grad():
            path = pol.reverse(s, a, iters=cfg.reversal_iters)  # (F + 1, n, d), virtual trajectory
        targets = self.td_targets(batch)

        # Value: one network over (s, x^f, f), f-free target (gamma only across real steps).
        f_val = self._flow_indices(n, fs + 1)  # (k, n) indices into 0..F
        x_val = path.gather(0, f_val[..., None].expand(-1, -1, a.shape[1]))
        v_pred = self.value(s.repeat(f_val.shape[0], 1), x_val.reshape(-1, a.shape[1]), f_val.reshape(-1).to(a.dtype))
        value_loss = F.huber_loss(v_pred, targets.gather(0, f_val).reshape(-1), delta=cfg.huber_delta)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        nn.utils.clip_grad_norm_(self.value.parameters(), cfg.grad_clip)
        self.value_opt.step()
        with torch.no_grad():
            for p, pt in zip(self.value.parameters(), self.value_target.parameters()):
                pt.lerp_(p, cfg.tau)
        metrics = {"value_loss": float(value_loss.detach()), "v_mean": float(v_pred.detach().mean()), "target_mean": float(targets.mean())}

        if self.num_updates >= cfg.warmup_updates and self.num_updates % cfg.policy_delay == 0:
            if cfg.bc_reversal == "initial":
                bc_path = batch["bc_path"] if "bc_path" in batch else self._initial_reversal(s, a)
            else:
                bc_path = path
            f_pol = self._flow_indices(n, fs)  # (k, n) indices into 0..F-1
            k, d = f_pol.shape[0], a.shape[1]
            idx = f_pol[..., None].expand(-1, -1, d)
            h = pol.step_sizes().to(a.dtype)[f_pol].reshape(-1, 1)
            t = pol.times.to(a.dtype)[f_pol].reshape(-1)
            s_rep = s.repeat(k, 1)
            xf = path.gather(0, idx).reshape(-1, d)  # x^f from the reversal, detached: no gradient through the chain
            v = pol(s_rep, xf, t)
            self.value.requires_grad_(False)
            q = self.value(s_rep, xf + h * v, (f_pol.reshape(-1) + 1).to(a.dtype))  # one Euler hop, V at f + 1
            self.value.requires_grad_(True)
            bc_xf = bc_path.gather(0, idx).reshape(-1, d)
            bc_step = (bc_path.gather(0, idx + 1).reshape(-1, d) - bc_xf) / h
            # BC towards the reversal's own step (x^{f+1} - x^f) / h (velocity units), at that reversal's x^f
            v_bc = v if cfg.bc_reversal == "current" else pol(s_rep, bc_xf, t)
            bc = (v_bc - bc_step).pow(2).sum(1).mean()
            scale = q.detach().abs().mean().clamp_min(1e-6) if cfg.normalize_q else torch.tensor(1.0)
            policy_loss = -q.mean() / scale + cfg.alpha * bc
            self.policy_opt.zero_grad(set_to_none=True)
            policy_loss.backward()
            nn.utils.clip_grad_norm_(pol.parameters(), cfg.grad_clip)
            self.policy_opt.step()
            metrics.update({"policy_loss": float(policy_loss.detach()), "q_hop": float(q.detach().mean()), "bc": float(bc.detach())})
        self.num_updates += 1
        return metrics

    @torch.no_grad()
    def _initial_reversal(self, s: Tensor, a: Tensor, chunk: int = 4096) -> Tensor:
        """Reversal of ``a`` by the frozen initial flow, ``(F + 1, n, d)`` (fixed: cached per dataset)."""
        parts = [self.initial_policy.reverse(s[i : i + chunk], a[i : i + chunk], iters=self.cfg.reversal_iters) for i in range(0, a.shape[0], chunk)]
        return torch.cat(parts, dim=1)

    def _flow_indices(self, n: int, count: int) -> Tensor:
        """``(k, n)`` flow indices in ``0..count-1``: all of them, or ``flow_samples`` random ones."""
        if self.cfg.flow_samples <= 0 or self.cfg.flow_samples >= count:
            return torch.arange(count)[:, None].expand(-1, n)
        return torch.randint(count, (self.cfg.flow_samples, n), generator=self.generator)

    # ---------------------------------------------------------------- training
    def train(self, dataset: OfflineDataset, updates: int, callback: Callable[[int, dict[str, float]], Any] | None = None, progress: bool = False, log_every: int = 1) -> dict[str, list[float]]:
        """Run ``updates`` gradient steps on batches of ``dataset``; returns the history dict.

        Calling again continues the run (optimiser, target network and step count kept).
        ``callback(step, metrics)`` is called after every update. Raises ``FloatingPointError``
        as soon as a loss is not finite (the policy ran away from the data: alpha too small).
        """
        if not isinstance(dataset, OfflineDataset):
            raise TypeError(f"dataset: expected an OfflineDataset, got {type(dataset).__name__}")
        if dataset.action_dim != self.policy.action_dim or dataset.state_dim != self.policy.state_dim:
            raise ValueError(f"dataset: expected states of dim {self.policy.state_dim} and actions of dim {self.policy.action_dim}, got {dataset.state_dim} and {dataset.action_dim}")
        check_positive_int("updates", updates)
        torch.set_flush_denormal(True)
        bc_paths = self._initial_reversal(dataset.states, dataset.actions) if self.cfg.bc_reversal == "initial" else None
        for _ in tqdm(range(updates), disable=not progress, desc="rql", leave=False):
            batch = dataset.batch(self.cfg.batch_size, self.generator)
            if bc_paths is not None:
                batch["bc_path"] = bc_paths[:, batch["idx"]]
            metrics = self.update(batch)
            if not all(math.isfinite(v) for v in metrics.values()):
                bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
                raise FloatingPointError(f"RQL diverged at update {self.num_updates}: non-finite {', '.join(bad)}; raise alpha (or normalize_q / lower policy_lr)")
            if self.num_updates % log_every == 0:
                self.history.setdefault("step", []).append(float(self.num_updates))
                for k, val in metrics.items():
                    self.history.setdefault(k, []).append(val)
            if callback is not None:
                callback(self.num_updates, metrics)
        return self.history

    @torch.no_grad()
    def act(self, s: Tensor | None = None, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Actions ``x^F`` for states ``s`` ``(n, ds)`` (or ``n`` unconditional draws), shape ``(n, d)``."""
        return self.policy.sample(s, n=n, generator=generator)

    # --------------------------------------------------------------- checkpoint
    def save(self, path: str | Path) -> Path:
        """safetensors weights (networks and Adam moments) + JSON config; :meth:`load` resumes."""
        tensors: dict[str, Tensor] = {"generator_state": self.generator.get_state()}
        optimizers: dict[str, Any] = {}
        for name, opt in (("policy_opt", self.policy_opt), ("value_opt", self.value_opt)):
            opt_tensors, optimizers[name] = optimizer_tensors(opt, prefix=name)
            tensors.update(opt_tensors)
        config = {"rql": asdict(self.cfg), "policy": self.policy.config, "num_updates": self.num_updates, "history": self.history, "optimizers": optimizers}
        return save_checkpoint(path, {"policy": self.policy, "initial_policy": self.initial_policy, "value": self.value, "value_target": self.value_target}, config, tensors)

    def load(self, path: str | Path) -> "RQL":
        """Load a checkpoint written by :meth:`save` into this agent (same architecture)."""
        config, extra = load_checkpoint(path, {"policy": self.policy, "initial_policy": self.initial_policy, "value": self.value, "value_target": self.value_target})
        self.cfg = RQLConfig(**config["rql"])
        self.num_updates = int(config["num_updates"])
        self.history = {k: list(v) for k, v in config["history"].items()}
        self.generator.set_state(extra.pop("generator_state"))
        for name, opt in (("policy_opt", self.policy_opt), ("value_opt", self.value_opt)):
            load_optimizer_tensors(opt, extra, config["optimizers"][name], prefix=name)
        return self


# ------------------------------------------------------------- behaviour cloning
def flow_matching_bc(policy: FlowPolicy, dataset: OfflineDataset, updates: int, lr: float = 3e-4, batch_size: int = 256, seed: int = 0, progress: bool = False) -> dict[str, list[float]]:
    """Behaviour cloning of ``dataset``'s actions by conditional flow matching (in place).

    Path ``x_t = (1 - tau) x^0 + tau a`` with ``tau = (t - t_start) / (t_end - t_start)``,
    target velocity ``(a - x^0) / (t_end - t_start)``. Returns ``{"loss": [...]}``.
    """
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    t0, t1 = float(policy.times[0]), float(policy.times[-1])
    history: dict[str, list[float]] = {"loss": []}
    for _ in tqdm(range(updates), disable=not progress, desc="flow BC", leave=False):
        b = dataset.batch(batch_size, gen)
        x0 = policy.noise(batch_size, gen)
        tau = torch.rand(batch_size, 1, generator=gen)
        xt = (1 - tau) * x0 + tau * b["a"]
        loss = (policy(b["s"], xt, t0 + (t1 - t0) * tau[:, 0]) - (b["a"] - x0) / (t1 - t0)).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
    return history


# ------------------------------------------------------------ the diffusion gym
def diffusion_policy(task: Any, flow_steps: int = 20, hidden: int = 128, layers: int = 3) -> FlowPolicy:
    """A :class:`FlowPolicy` initialised at the task's base model (exactly its probability-flow ODE).

    Flow step ``f`` runs at diffusion time ``t_f = t_start + f (1 - t_start) / F``; the base
    velocity is ``task.environment.velocity(x, t)``; ``x^0 ~ N(0, beta(t_start)^2 I)`` as in
    :func:`diffusiongym.sample`. Unconditional (vector) models: ``state_dim = 0``.
    """
    env = task.environment
    if env.sample_shape is None or len(env.sample_shape) != 1:
        raise ValueError(f"task: expected a model with vector samples (d,), got sample_shape {env.sample_shape}")
    beta0 = float(env.scheduler.beta(torch.tensor(task.t_start, dtype=torch.float64)))

    def base(x: Tensor, t: Tensor) -> Tensor:
        return env.velocity(x, t)

    return FlowPolicy(env.sample_shape[0], 0, flow_steps, task.t_start, 1.0, beta0, base, hidden, layers)


def diffusion_dataset(task: Any, n: int, seed: int = 0, noise: str = "ode", steps: int | None = None) -> OfflineDataset:
    """``n`` one-step transitions ``(s = [], a = x1, r = reward_scale * r(x1), done = 1)``
    from the base model, sampled with :func:`diffusiongym.sample` (``noise`` ``"ode"`` or
    ``"memoryless"``; ``steps`` defaults to the task's). Invalid samples are dropped."""
    from diffusiongym.sampling import sample

    env = task.environment.with_noise(noise)
    traj = sample(env, n, steps=steps or task.steps, t_start=task.t_start, reward=task.reward, seed=seed)
    keep = traj.valid
    x1 = traj.x1[keep].float()
    m = x1.shape[0]
    empty = x1.new_zeros(m, 0)
    return OfflineDataset(empty, x1, task.reward_scale * traj.reward[keep].float(), empty, torch.ones(m))


def flow_kl_to_density(policy: FlowPolicy, log_density: Callable[[Tensor], Tensor], n: int = 4096, seed: int = 0) -> tuple[float, Tensor]:
    """Monte-Carlo ``KL(q || p) = E_q[log q(x) - log p(x)]`` of the policy's action law ``q``
    (exact change of variables through the Euler map) to a density ``p`` (e.g. the exact base
    mixture). Returns ``(kl, samples)``; ``kl`` lower-bounds the path KL (data processing)
    and is the KL that enters ``max E[lambda r] - KL(q || p_base) = log E_base[exp(lambda r)]``.
    """
    gen = torch.Generator().manual_seed(seed)
    x, logq = policy.sample_with_log_prob(n, generator=gen)
    logp = log_density(x.double())
    return float((logq - logp).mean()), x


def drift_agent(policy: FlowPolicy, env: Any) -> Any:
    """Make a diffusion :class:`FlowPolicy` act on a diffusiongym env with ``action_mode="drift"``.

    In drift mode the agent gives the *whole* drift and the env's action is
    ``a = drift / action_scale``; with ``noise="ode"`` (sigma = 0) the env step is exactly
    the policy's Euler step ``x^{f+1} = x^f + h_f v(x^f, t_f)``, so the episode's ``x1``
    is the policy's own sample from the same ``x^0`` (the env then reports no KL:
    ``info["kl_defined"]`` is False). The policy reads ``t_f`` from ``obs["t"]``; its grid
    must be the env's (``steps == F``, same ``t_start``).

    Parameters
    ----------
    policy : FlowPolicy
        Unconditional (``state_dim = 0``), e.g. from :func:`diffusion_policy`.
    env : DiffusionEnv or DiffusionVectorEnv (or a wrapper of one)

    Returns
    -------
    :class:`~diffusiongym.policies.agent.ControlAgent` mapping observations
    ``{"x": (n, d), "t": (n, 1)}`` to actions ``(n, d)`` (torch for the vector env, numpy
    for the single env).
    """
    from diffusiongym.policies.agent import ControlAgent

    if not isinstance(policy, FlowPolicy):
        raise TypeError(f"policy: expected a FlowPolicy, got {type(policy).__name__}")
    if policy.state_dim != 0:
        raise ValueError(f"policy: expected an unconditional policy (state_dim 0), got state_dim {policy.state_dim}")
    sim = env.unwrapped.sim
    if sim.action_mode != "drift":
        raise ValueError(f"env: expected action_mode 'drift', got {sim.action_mode!r}")
    times = sim.times.detach().cpu().double()
    if times.shape != policy.times.shape or not torch.allclose(times, policy.times.double(), atol=1e-6):
        raise ValueError(f"env: expected the policy's time grid ({policy.flow_steps} steps from {float(policy.times[0]):.4g} to 1), got {times.numel() - 1} steps from {float(times[0]):.4g}")

    def drift(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return policy(None, x.to(policy.times.dtype), t.to(policy.times.dtype)).to(x.dtype)

    return ControlAgent(drift, env)


# ---------------------------------------------------------- Gymnasium Box envs
def collect_dataset(env: Any, behaviour: Callable[[np.ndarray, np.random.Generator], np.ndarray], episodes: int, seed: int = 0) -> OfflineDataset:
    """Roll out ``behaviour(obs, rng) -> action`` in a Gymnasium env with Box spaces.

    Actions are stored normalised to ``[-1, 1]`` (``a = (2 action - low - high) / (high - low)``);
    ``done`` marks terminations only (time-limit truncation bootstraps).
    """
    low, high = env.action_space.low, env.action_space.high
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {k: [] for k in ("s", "a", "r", "s2", "d")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 100_003 + ep)
        done = False
        while not done:
            action = np.clip(np.asarray(behaviour(obs, rng), dtype=np.float32), low, high)
            nxt, r, term, trunc, _ = env.step(action)
            cols["s"].append(obs)
            cols["a"].append((2 * action - low - high) / (high - low))
            cols["r"].append(r)
            cols["s2"].append(nxt)
            cols["d"].append(float(term))
            obs, done = nxt, term or trunc
    t = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in cols.items()}
    return OfflineDataset(t["s"], t["a"], t["r"], t["s2"], t["d"])


def evaluate_policy(env: Any, policy: FlowPolicy, episodes: int, seed: int = 0) -> list[float]:
    """Undiscounted returns of the flow policy (normalised actions clipped to ``[-1, 1]``)."""
    low, high = env.action_space.low, env.action_space.high
    gen = torch.Generator().manual_seed(seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=10_000 + seed * 1000 + ep)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                a = policy.sample(torch.as_tensor(obs, dtype=torch.float32)[None], generator=gen)[0].clamp(-1, 1).numpy()
            obs, r, term, trunc, _ = env.step(low + (a + 1) * (high - low) / 2)
            total += float(r)
            done = term or trunc
        returns.append(total)
    return returns

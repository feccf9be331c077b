"""PPO / GRPO on the denoising MDP (DDPO / Flow-GRPO family), CleanRL style.

The policy is a trainable copy of the base model in its own parameterisation (e.g.
``ResidualModel(base, TimeMLP(d, d, zero_init=True))``). Step ``k`` of a rollout is the
Gaussian transition (``diffusiongym.logprob``)::

    pi_theta(x_{k+1} | x_k) = N(x_k + h_k b_theta(x_k, t_k), h_k sigma(t_k)^2 I),

with ``b_theta`` the policy's drift, i.e. control ``u = (b_theta - b_base) / sigma``.
One iteration:

1. roll out ``num_groups * group_size`` trajectories with the current policy; a group shares
   its conditioning (for conditional models, e.g. a class label) and its baseline;
2. terminal reward ``R_i = lambda r(x1_i)`` (``kl_in_return=True``: the Gymnasium return
   ``lambda r - sum_k 1/2 h |u_k|^2``), group-normalised advantage
   ``A_i = (R_i - mean_group R) / (std_group R + eps)``;
3. ``update_epochs`` passes over shuffled minibatches of (trajectory, step) pairs with the
   clipped surrogate ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho`` the ratio of the
   step's densities (current / sampling policy), plus ``kl_coef`` times the exact per-step
   Gaussian KL to the base ``1/2 h |u|^2`` (summed over steps, per trajectory; divided by the
   batch's return std when the advantages are std-normalised, so ``kl_coef = 1`` is the
   gradient of the task objective ``E[lambda r] - KL`` up to a positive factor; larger values
   stay closer to the base).

The rollout runs on the engine (:func:`diffusiongym.sample`); the Gymnasium vector env is a
thin view of the same chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.logprob import gaussian_log_prob
from diffusiongym.policies.efm import load_optimizer_tensors, optimizer_tensors
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import sample
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.io import load_checkpoint, save_checkpoint

__all__ = ["PGConfig", "PolicyGradientAgent"]


@dataclass
class PGConfig:
    """Hyper-parameters of :class:`PolicyGradientAgent` (names as in CleanRL's PPO)."""

    iterations: int = 50
    num_groups: int = 8  # groups per iteration (one conditioning / baseline each)
    group_size: int = 32  # trajectories per group
    update_epochs: int = 2
    num_minibatches: int = 8  # over the (trajectory, step) pairs
    clip_coef: float = 0.2
    kl_coef: float = 1.0  # weight of the KL to the base; 1 weighs it as in the objective lambda r - KL
    kl_in_return: bool = False  # advantage from lambda r - KL (the env's running cost) instead
    normalize_std: bool = True  # GRPO: divide by the group's std
    lr: float = 3e-3
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "num_groups", "group_size", "update_epochs", "num_minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size: expected at least 2 (a group baseline needs two samples), got {self.group_size}")
        if self.clip_coef <= 0 or self.kl_coef < 0:
            raise ValueError(f"clip_coef, kl_coef: expected clip_coef > 0 and kl_coef >= 0, got {self.clip_coef}, {self.kl_coef}")


def group_advantages(returns: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """``(R - mean_group R) [/ (std_group R + eps)]`` for ``returns`` of shape ``(G * group_size,)``
    laid out group after group; shape ``(n,)``."""
    r = returns.reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


class PolicyGradientAgent:
    """GRPO-style PPO agent fine-tuning ``policy`` on the base ``env``.

    Parameters
    ----------
    env : DiffusionEnvironment
        Base model, scheduler and noise (sigma > 0).
    policy : nn.Module
        Trainable model in ``env.parameterization``, starting at the base.
    reward : Reward
    reward_scale : float
        ``lambda``.
    config : PGConfig
    steps, t_start : the time grid.
    conditioning : dict, optional
        ``Task.conditioning``: name -> ``(space, sampler(n, generator, device))``; each group draws
        one value per name, shared by its ``group_size`` trajectories.
    """

    def __init__(
        self,
        env: DiffusionEnvironment,
        policy: nn.Module,
        reward: Reward,
        reward_scale: float = 1.0,
        config: PGConfig | None = None,
        *,
        steps: int = 100,
        t_start: float = DEFAULT_T_START,
        conditioning: dict[str, Any] | None = None,
    ):
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if env.noise.is_deterministic:
            raise ValueError("env: policy gradients need stochastic transitions; expected noise with sigma > 0, got the ODE")
        if not isinstance(policy, nn.Module):
            raise TypeError(f"policy: expected a torch.nn.Module in the {env.parameterization} parameterisation, got {type(policy).__name__}")
        if not isinstance(reward, Reward):
            raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
        self.config = config if config is not None else PGConfig()
        if not isinstance(self.config, PGConfig):
            raise TypeError(f"config: expected a PGConfig, got {type(self.config).__name__}")
        self.env, self.policy, self.reward = env, policy, reward
        self.reward_scale = float(reward_scale)
        self.steps, self.t_start = steps, t_start
        self.conditioning = dict(conditioning or {})
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("policy: expected trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr)
        self.iteration = 0
        self.history: dict[str, list[float]] = {
            "iteration": [], "mean_reward": [], "kl": [], "objective": [], "pg_loss": [], "kl_loss": [], "clip_fraction": [], "approx_kl": [],
        }

    def _conditions(self, gen: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        cfg = self.config
        cond = {}
        for name, (_space, sampler) in self.conditioning.items():
            values = sampler(cfg.num_groups, gen, device)
            cond[name] = values.repeat_interleave(cfg.group_size, dim=0)
        return cond

    def _step_mean(self, x: Tensor, k_index: Tensor, h: Tensor, t: Tensor, coef_x: Tensor, coef_out: Tensor, cond: dict[str, Tensor]) -> Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        out = self.policy(x, t, **cond)
        drift = coef_x[k_index].reshape(shape) * x + coef_out[k_index].reshape(shape) * out
        return x + h.reshape(shape) * drift

    def train(self, callback: Callable[[dict[str, float]], None] | None = None, progress: bool = False, until: int | None = None) -> dict[str, list[float]]:
        """Run the remaining iterations; returns the history (lists over iterations).

        ``until`` stops after that many iterations in all (default ``config.iterations``).

        ``mean_reward``, ``kl`` (path KL ``sum_k 1/2 h |u_k|^2`` of the rollout) and ``objective``
        (``lambda r - KL``) describe each iteration's rollout, i.e. the policy *before* its update.
        """
        torch.set_flush_denormal(True)
        cfg = self.config
        env = self.env
        n = cfg.num_groups * cfg.group_size
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not progress, desc="GRPO")
        stop = cfg.iterations if until is None else min(int(until), cfg.iterations)
        while self.iteration < stop:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.iteration)
            # ---- rollout (no grad) with the current policy
            self.policy.eval()
            cond = self._conditions(gen, torch.device("cpu"))
            traj = sample(
                env, n, steps=self.steps, t_start=self.t_start, policy=self.policy, reward=self.reward,
                reward_scale=self.reward_scale, cond=cond, generator=gen, store=("states", "drifts", "noises"),
            )
            states, base_drift = traj.states, traj.drifts  # (m + 1, n, ...), (m, n, ...)
            m = states.shape[0] - 1
            dtype = states.dtype
            times = traj.times
            h_k = (times[1:] - times[:-1]).to(dtype)
            t_k = times[:-1].to(dtype)
            sigma_k = env.sigma(times[:-1]).to(dtype)
            coef_x, coef_out = (c.to(dtype) for c in env.coefficients(times[:-1], "drift"))
            step_std = (h_k.sqrt() * sigma_k)
            # the sampling policy's log-density of each step: x_{k+1} = mean + std z exactly
            d = states[0, 0].numel()
            z2 = (traj.noises**2).reshape(m, n, -1).sum(-1)
            old_logp = -0.5 * z2 - d * step_std.log()[:, None] - 0.5 * d * torch.log(torch.tensor(2 * torch.pi, dtype=dtype))

            # ---- advantages from the terminal reward (or the env's return)
            r = torch.where(traj.valid, traj.reward, torch.zeros_like(traj.reward))
            returns = self.reward_scale * r
            if cfg.kl_in_return:
                returns = returns - traj.kl
            adv = group_advantages(returns, cfg.group_size, cfg.normalize_std)
            adv = torch.where(traj.valid, adv, torch.zeros_like(adv))
            # the KL penalty is divided by the same return scale as the advantages, so that
            # kl_coef = 1 is the gradient of lambda r - KL (up to a positive factor)
            kl_scale = cfg.kl_coef / (float(returns[traj.valid].std()) + 1e-6) if cfg.normalize_std else cfg.kl_coef

            # ---- PPO update over (step, trajectory) pairs
            self.policy.train()
            flat_k = torch.arange(m).repeat_interleave(n)
            flat_i = torch.arange(n).repeat(m)
            total = m * n
            mb = max(1, total // cfg.num_minibatches)
            stats = {"pg_loss": 0.0, "kl_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
            count = 0
            for _epoch in range(cfg.update_epochs):
                perm = torch.randperm(total, generator=gen)
                for start in range(0, total, mb):
                    sel = perm[start : start + mb]
                    k, i = flat_k[sel], flat_i[sel]
                    x, x_next = states[k, i], states[k + 1, i]
                    mb_cond = {name: value[i] for name, value in cond.items()}
                    mean = self._step_mean(x, k, h_k[k], t_k[k], coef_x, coef_out, mb_cond)
                    new_logp = gaussian_log_prob(x_next, mean, step_std[k])
                    log_ratio = new_logp - old_logp[k, i]
                    ratio = log_ratio.exp()
                    a = adv[i]
                    pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                    # exact per-step KL to the base: |mean - base_mean|^2 / (2 std^2) = 1/2 h |u|^2
                    base_mean = x + h_k[k].reshape(-1, *([1] * (x.ndim - 1))) * base_drift[k, i]
                    kl_step = (((mean - base_mean) ** 2).reshape(len(sel), -1).sum(1) / (2 * step_std[k] ** 2)).mean()
                    # per-trajectory sums over steps: m * (mean over pairs)
                    loss = m * (pg_loss + kl_scale * kl_step)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    with torch.no_grad():
                        stats["pg_loss"] += float(pg_loss)
                        stats["kl_loss"] += float(kl_step) * m
                        stats["clip_fraction"] += float(((ratio - 1).abs() > cfg.clip_coef).float().mean())
                        stats["approx_kl"] += float(((ratio - 1) - log_ratio).mean())
                    count += 1
            self.policy.eval()
            valid = traj.valid
            record = {
                "iteration": float(self.iteration),
                "mean_reward": float(traj.reward[valid].mean()),
                "kl": float(traj.kl[valid].mean()),
                "objective": float(traj.objective[valid].mean()),
                **{key: value / count for key, value in stats.items()},
            }
            for key, value in record.items():
                self.history[key].append(value)
            self.iteration += 1
            bar.update(1)
            if callback is not None:
                callback(record)
        bar.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Policy, optimiser state and progress to ``path`` (safetensors + JSON)."""
        tensors, opt_meta = optimizer_tensors(self.optimizer)
        meta = {
            "config": dataclasses.asdict(self.config), "iteration": self.iteration, "history": self.history,
            "reward_scale": self.reward_scale, "steps": self.steps, "t_start": self.t_start, "optimizer": opt_meta,
        }
        return save_checkpoint(path, {"policy": self.policy}, meta, tensors)

    @classmethod
    def load(cls, path: str | Path, env: DiffusionEnvironment, policy: nn.Module, reward: Reward, *, conditioning: dict[str, Any] | None = None) -> "PolicyGradientAgent":
        """Rebuild an agent saved with :meth:`save` (``policy`` built like the saved one); ``train()`` resumes."""
        meta, extra = load_checkpoint(path, {"policy": policy})
        agent = cls(env, policy, reward, meta["reward_scale"], PGConfig(**meta["config"]), steps=meta["steps"], t_start=meta["t_start"], conditioning=conditioning)
        load_optimizer_tensors(agent.optimizer, extra, meta["optimizer"])
        agent.iteration = int(meta["iteration"])
        agent.history = {k: list(v) for k, v in meta["history"].items()}
        return agent

"""PPO / GRPO on the denoising MDP (DDPO / Flow-GRPO family), acting through the vector env.

The agent collects its data from the Gymnasium vector env
(``gym.make_vec("diffusiongym/GMM2D-v0", num_envs=n, vectorization_mode="vector_entry_point")``,
``action_mode="control"``): observations ``{"x": (n, *shape), "t": (n, 1), **cond}``, actions
``a = u / action_scale`` and the env's rewards (``-1/2 |u|^2 h`` per step, plus
``lambda r(x1)`` on the last one). Step ``k`` is the Gaussian transition
(:func:`diffusiongym.logprob.euler_step_log_prob`)::

    pi_theta(x_{k+1} | x_k) = N(x_k + h_k (b(x_k, t_k) + sigma_k u_theta(x_k, t_k)), h_k sigma_k^2 I),

``b`` the base drift (computed once per visited state while collecting, no grad), so the
importance ratios of the update are exact and never call the base model again for a
control policy. The trainable ``policy`` is either

- ``policy_type="model"``: a copy of the base model in its own parameterisation (e.g.
  ``ResidualModel(base, TimeMLP(d, d, zero_init=True))``), ``u = coef_out (out_theta - out_base) / sigma``;
- ``policy_type="control"``: a control network ``u_theta(x, t, **cond)`` (zero-initialised: the base).

One iteration:

1. reset the ``num_envs = groups * group_size`` envs (a group shares its conditioning, e.g.
   a class label, and its baseline) and step them to ``t = 1`` with the current policy;
2. terminal reward ``R_i = lambda r(x1_i)`` (``kl_in_return=True``: the env's return
   ``lambda r - sum_k 1/2 h |u_k|^2``), group-normalised advantage
   ``A_i = (R_i - mean_group R) / (std_group R + eps)``;
3. ``update_epochs`` passes over shuffled minibatches of (trajectory, step) pairs with the
   clipped surrogate ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho`` the ratio of the
   step's densities (current / sampling policy), plus ``kl_coef`` times the exact per-step
   Gaussian KL to the base ``1/2 h |u_theta|^2`` (summed over steps, per trajectory; divided by
   the batch's return std when the advantages are std-normalised, so ``kl_coef = 1`` is the
   gradient of the task objective ``E[lambda r] - KL`` up to a positive factor; larger values
   stay closer to the base).

Usage::

    envs = gym.make_vec("diffusiongym/GMM2D-v0", num_envs=256, vectorization_mode="vector_entry_point", steps=50)
    agent = PolicyGradientAgent(envs, ResidualModel(base, TimeMLP(2, 2, zero_init=True)), PGConfig(group_size=32))
    history = agent.train()
    ControlAgent(agent.as_control(), envs)  # act on any diffusiongym env with the result
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

from diffusiongym.envs.vector_env import DiffusionVectorEnv
from diffusiongym.logprob import euler_step_log_prob
from diffusiongym.utils.io import load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["PGConfig", "PolicyGradientAgent", "Rollout", "group_advantages"]

POLICY_TYPES = ("model", "control")


@dataclass
class PGConfig:
    """Hyper-parameters of :class:`PolicyGradientAgent` (names as in CleanRL's PPO).

    The batch is the vector env's ``num_envs`` trajectories, ``num_envs / group_size`` groups.
    """

    iterations: int = 50
    group_size: int = 32  # trajectories per group (one conditioning / baseline each)
    update_epochs: int = 2
    num_minibatches: int = 8  # over the (trajectory, step) pairs
    clip_coef: float = 0.2
    kl_coef: float = 1.0  # weight of the KL to the base; 1 weighs it as in the objective lambda r - KL
    kl_in_return: bool = False  # advantage from lambda r - KL (the env's return) instead
    normalize_std: bool = True  # GRPO: divide by the group's std
    lr: float = 3e-3
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "group_size", "update_epochs", "num_minibatches"):
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


def _as_sample_shape(out: Tensor, x: Tensor) -> Tensor:
    """The policy's output as ``x``'s shape; a flat ``(n, prod(sample_shape))`` output (e.g. a
    :class:`~diffusiongym.policies.networks.TimeMLP` on images) is reshaped."""
    if out.shape == x.shape:
        return out
    if out.ndim == 2 and out.shape[0] == x.shape[0] and out.shape[1] == x[0].numel():
        return out.reshape(x.shape)
    raise ValueError(f"policy output: expected shape {tuple(x.shape)} (same as x) or ({x.shape[0]}, {x[0].numel()}), got {tuple(out.shape)}")


@dataclass
class Rollout:
    """One batch of episodes collected from the vector env (``m`` steps, ``n`` envs).

    Attributes
    ----------
    states : Tensor, (m + 1, n, *shape)
        Observed ``x`` from ``reset`` to the final observation.
    base_out : Tensor, (m, n, *shape)
        Base model output at each visited state (no grad).
    log_probs : Tensor, (m, n)
        ``log pi(x_{k+1} | x_k)`` under the policy that acted.
    step_rewards : Tensor, (m, n)
        The env's rewards (``-1/2 |u|^2 h``; the last row adds ``lambda r``).
    reward : Tensor, (n,)
        ``r(x1)`` from ``info["reward"]`` (0 where invalid).
    valid : Tensor, (n,) bool
    cond : dict of Tensor
        Conditioning of each env (e.g. ``label`` of shape ``(n,)``).
    """

    states: Tensor
    base_out: Tensor
    log_probs: Tensor
    step_rewards: Tensor
    reward: Tensor
    valid: Tensor
    cond: dict[str, Tensor]

    @property
    def returns(self) -> Tensor:
        """Undiscounted env return ``lambda r - KL``, shape ``(n,)``."""
        return self.step_rewards.sum(0)


class PolicyGradientAgent:
    """GRPO-style PPO agent fine-tuning ``policy`` on a diffusiongym vector env.

    Parameters
    ----------
    envs : DiffusionVectorEnv (or a wrapper of one)
        ``action_mode="control"``, ``sigma > 0``; its task supplies the base model, the
        reward, ``lambda`` and the conditioning. ``num_envs`` must be a multiple of
        ``config.group_size``.
    policy : nn.Module
        Trainable; ``policy(x, t, **cond)`` with ``x`` (n, *shape) and ``t`` (n,), output of
        shape ``(n, *shape)`` (or flat ``(n, prod(shape))``). Starts at the base (a
        zero-initialised residual or control).
    config : PGConfig
    policy_type : {"model", "control"}
        ``"model"``: output in the base model's parameterisation; ``"control"``: the control ``u``.
    """

    def __init__(self, envs: Any, policy: nn.Module, config: PGConfig | None = None, *, policy_type: str = "model"):
        vec = getattr(envs, "unwrapped", None)
        if not isinstance(vec, DiffusionVectorEnv):
            raise TypeError(f"envs: expected a diffusiongym DiffusionVectorEnv (gym.make_vec(..., vectorization_mode='vector_entry_point')), got {type(envs).__name__}")
        sim = vec.sim
        if sim.deterministic:
            raise ValueError("envs: policy gradients need stochastic transitions; expected noise with sigma > 0, got the ODE")
        if sim.action_mode != "control":
            raise ValueError(f"envs: expected action_mode='control' (actions a = u / action_scale), got {sim.action_mode!r}")
        if not isinstance(policy, nn.Module):
            raise TypeError(f"policy: expected a torch.nn.Module, got {type(policy).__name__}")
        if policy_type not in POLICY_TYPES:
            raise unknown_name_error("policy_type", policy_type, POLICY_TYPES)
        self.config = config if config is not None else PGConfig()
        if not isinstance(self.config, PGConfig):
            raise TypeError(f"config: expected a PGConfig, got {type(self.config).__name__}")
        if sim.num_envs % self.config.group_size:
            raise ValueError(f"envs: expected num_envs to be a multiple of group_size={self.config.group_size}, got {sim.num_envs}")
        self.envs, self.vec, self.sim = envs, vec, sim
        self.task = vec.task
        self.policy, self.policy_type = policy, policy_type
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("policy: expected trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr)
        # per-step scalars of the env's own grid, as tensors (m,) in the env's dtype
        s, dt, dev = sim.schedule, sim.dtype, sim.device
        self._h, self._sigma, self._coef_x, self._coef_out = (torch.tensor(v, dtype=dt, device=dev) for v in (s.h, s.sigma, s.coef_x, s.coef_out))
        self.iteration = 0
        self.history: dict[str, list[float]] = {
            "iteration": [], "mean_reward": [], "kl": [], "objective": [], "valid_fraction": [],
            "pg_loss": [], "kl_loss": [], "clip_fraction": [], "approx_kl": [],
        }

    @property
    def num_envs(self) -> int:
        return self.sim.num_envs

    # ------------------------------------------------------------------ the control
    def _control(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], base_out: Tensor, k: Tensor) -> Tensor:
        """``u_theta`` at ``(x, t)`` from the policy and the base output; ``k`` (n,) step indices."""
        out = _as_sample_shape(self.policy(x, t, **cond), x)
        if self.policy_type == "control":
            return out
        shape = (-1, *([1] * (x.ndim - 1)))
        return (out - base_out) * (self._coef_out[k] / self._sigma[k]).reshape(shape)

    def as_control(self) -> Callable[..., Tensor]:
        """The current policy as a control ``u(x, t, **cond)`` (for :func:`diffusiongym.sample`
        and :class:`~diffusiongym.policies.agent.ControlAgent`); any ``t`` where ``sigma > 0``."""
        env, policy, kind = self.task.environment, self.policy, self.policy_type

        def control(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            if kind == "control":
                return _as_sample_shape(policy(x, t, **cond), x)
            shape = (-1, *([1] * (x.ndim - 1)))
            tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
            _, coef_out = env.coefficients(tt, "drift")
            scale = (coef_out / env.sigma(tt)).to(x.dtype).reshape(shape)
            return (_as_sample_shape(policy(x, t, **cond), x) - env.model(x, t, **cond)) * scale

        return control

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def rollout(self, seed: int, cond: dict[str, Tensor] | None = None) -> Rollout:
        """Run every env from ``reset(seed=seed)`` to ``t = 1`` with the current policy.

        ``cond`` (name -> ``(n,)`` values) is passed to ``reset(options=...)``; by default each
        group of ``group_size`` envs shares one value drawn from the task's sampler.
        """
        n, m = self.num_envs, self.sim.steps
        gen = torch.Generator(device=self.sim.device).manual_seed(int(seed))
        if cond is None:
            groups = n // self.config.group_size
            cond = {name: sampler(groups, gen, self.sim.device).repeat_interleave(self.config.group_size, dim=0) for name, (_, sampler) in self.task.conditioning.items()}
        obs, _ = self.envs.reset(seed=int(seed), options=dict(cond))
        cond = {name: obs[name] for name in self.task.conditioning}
        x = obs["x"]
        states, base_outs, log_probs, rewards = [x], [], [], []
        info: dict[str, Any] = {}
        for k in range(m):
            t = obs["t"].reshape(-1)
            kk = torch.full((n,), k, dtype=torch.long, device=x.device)
            base_out = self.sim.base_output()  # shared with the env's own step: one model call
            u = self._control(x, t, cond, base_out, kk)
            obs, reward, terminated, _truncated, info = self.envs.step(self.vec.control_to_action(u))
            x_next = obs["x"]
            drift = self._coef_x[k] * x + self._coef_out[k] * base_out
            log_probs.append(euler_step_log_prob(x_next, x, drift, self._h[k], self._sigma[k], u))
            states.append(x_next)
            base_outs.append(base_out)
            rewards.append(reward)
            x = x_next
        if not bool(terminated.all()):  # pragma: no cover - the env's grid and ours are the same
            raise RuntimeError("rollout: the episodes did not terminate after the env's steps")
        return Rollout(torch.stack(states), torch.stack(base_outs), torch.stack(log_probs), torch.stack(rewards), info["reward"], info["valid"], cond)

    def _summary(self, batch: Rollout) -> dict[str, float]:
        lam = self.task.reward_scale
        kl = lam * batch.reward - batch.returns  # the env's running cost sum_k 1/2 h |u_k|^2
        valid = batch.valid
        return {
            "mean_reward": float(batch.reward[valid].mean()) if bool(valid.any()) else float("nan"),
            "kl": float(kl.mean()),
            "objective": float(batch.returns[valid].mean()) if bool(valid.any()) else float("nan"),
            "valid_fraction": float(valid.float().mean()),
        }

    @torch.no_grad()
    def evaluate(self, episodes: int = 1, seed: int = 12345) -> dict[str, float]:
        """Mean reward, KL (the env's running cost), objective and valid fraction of
        ``episodes * num_envs`` fresh episodes of the current policy (no update)."""
        parts = [self._summary(self.rollout(seed + e)) for e in range(episodes)]
        return {key: sum(p[key] for p in parts) / episodes for key in parts[0]}

    # ------------------------------------------------------------------ training
    def train(self, callback: Callable[[dict[str, float]], None] | None = None, progress: bool = False, until: int | None = None) -> dict[str, list[float]]:
        """Run the remaining iterations; returns the history (lists over iterations).

        ``until`` stops after that many iterations in all (default ``config.iterations``).

        ``mean_reward`` (valid samples), ``kl`` (the env's running cost ``sum_k 1/2 h |u_k|^2``),
        ``objective`` (the env's return ``lambda r - KL``) and ``valid_fraction`` describe each
        iteration's rollout, i.e. the policy *before* its update.
        """
        torch.set_flush_denormal(True)
        cfg = self.config
        n, m = self.num_envs, self.sim.steps
        times = self.sim.times
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not progress, desc="GRPO")
        stop = cfg.iterations if until is None else min(int(until), cfg.iterations)
        while self.iteration < stop:
            seed = cfg.seed * 1_000_003 + self.iteration
            gen = torch.Generator().manual_seed(seed)
            # ---- rollout through the vector env with the current policy (no grad)
            self.policy.eval()
            batch = self.rollout(seed)
            states, base_out, old_logp, cond = batch.states, batch.base_out, batch.log_probs, batch.cond

            # ---- advantages from the terminal reward (or the env's return)
            valid = batch.valid
            returns = self.task.reward_scale * batch.reward
            if cfg.kl_in_return:
                returns = batch.returns
            adv = group_advantages(returns, cfg.group_size, cfg.normalize_std)
            adv = torch.where(valid, adv, torch.zeros_like(adv))
            # the KL penalty is divided by the same return scale as the advantages, so that
            # kl_coef = 1 is the gradient of lambda r - KL (up to a positive factor)
            ret_std = float(returns[valid].std()) if int(valid.sum()) > 1 else 0.0
            kl_scale = cfg.kl_coef / (ret_std + 1e-6) if cfg.normalize_std else cfg.kl_coef

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
                    x, x_next, out_b = states[k, i], states[k + 1, i], base_out[k, i]
                    shape = (-1, *([1] * (x.ndim - 1)))
                    drift = self._coef_x[k].reshape(shape) * x + self._coef_out[k].reshape(shape) * out_b
                    u = self._control(x, times[k], {name: value[i] for name, value in cond.items()}, out_b, k)
                    new_logp = euler_step_log_prob(x_next, x, drift, self._h[k], self._sigma[k], u)
                    log_ratio = new_logp - old_logp[k, i]
                    ratio = log_ratio.exp()
                    a = adv[i]
                    pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                    # exact per-step Gaussian KL to the base: |mean_theta - mean_base|^2 / (2 h sigma^2) = 1/2 h |u|^2
                    kl_step = (0.5 * self._h[k] * (u**2).reshape(len(sel), -1).sum(1)).mean()
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
            record = {"iteration": float(self.iteration), **self._summary(batch), **{key: value / count for key, value in stats.items()}}
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
            "policy_type": self.policy_type, "num_envs": self.num_envs, "steps": self.sim.steps, "optimizer": opt_meta,
        }
        return save_checkpoint(path, {"policy": self.policy}, meta, tensors)

    @classmethod
    def load(cls, path: str | Path, envs: Any, policy: nn.Module) -> "PolicyGradientAgent":
        """Rebuild an agent saved with :meth:`save` on ``envs`` made like the saved one (same task,
        ``num_envs`` and ``steps``; ``policy`` built like the saved one); ``train()`` resumes."""
        meta, extra = load_checkpoint(path, {"policy": policy})
        agent = cls(envs, policy, PGConfig(**meta["config"]), policy_type=meta["policy_type"])
        if (agent.num_envs, agent.sim.steps) != (meta["num_envs"], meta["steps"]):
            raise ValueError(f"envs: expected num_envs={meta['num_envs']} and steps={meta['steps']} as saved, got {agent.num_envs} and {agent.sim.steps}")
        load_optimizer_tensors(agent.optimizer, extra, meta["optimizer"])
        agent.iteration = int(meta["iteration"])
        agent.history = {k: list(v) for k, v in meta["history"].items()}
        return agent

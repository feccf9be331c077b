"""PPO / GRPO on the denoising MDP (DDPO / Flow-GRPO family), acting through the vector env.

:class:`PolicyGradient` is a :class:`~diffusiongym.trainers.base.Trainer`. It collects its
data from its own :class:`~diffusiongym.envs.vector_env.DiffusionVectorEnv` over the task
(``num_envs = config.batch_size``, ``action_mode="control"``): observations
``{"x": (n, *shape), "t": (n, 1), **cond}``, actions ``a = u / action_scale`` and the env's
rewards (``-1/2 |u|^2 h`` per step, plus ``lambda r(x1)`` on the last one). Step ``k`` is the
Gaussian transition (:func:`diffusiongym.logprob.euler_step_log_prob`)::

    pi_theta(x_{k+1} | x_k) = N(x_k + h_k (b(x_k, t_k) + sigma_k u_theta(x_k, t_k)), h_k sigma_k^2 I),

``b`` the base drift (computed once per visited state while collecting, no grad), so the
importance ratios of the update are exact and never call the base model again. The
trainable model is either

- ``policy_type="model"``: a copy of the base model in its own parameterisation (default
  ``ResidualModel(base, TimeMLP(d, d, zero_init=True))``); its control is
  ``u = coef_out (out_theta - out_base) / sigma`` (:mod:`diffusiongym.policies.control`);
- ``policy_type="control"``: a control network ``u_theta(x, t, **cond)`` (default a
  zero-initialised ``TimeMLP``: the base).

One iteration (``docs/maths.md``, "Policy gradients"):

1. reset the envs (a group of ``group_size`` envs shares its conditioning, e.g. a class
   label, and its baseline) and step them to ``t = 1`` with the current policy;
2. return ``R_i = lambda r(x1_i) - sum_k c_k^i`` with ``c_k = 1/2 h_k |u_k|^2`` (the env's
   return; ``kl_in_return=False``: ``lambda r(x1_i)`` only). Step ``k``'s advantage
   (``advantage="to_go"``, default) uses its return to go
   ``G_k^i = lambda r(x1_i) - sum_{j > k} c_j^i`` with a per-step group baseline,
   ``A_k^i = (G_k^i - mean_group G_k) / (std_group R + eps)``; ``advantage="return"``: every
   step gets the whole return's ``A_i = (R_i - mean_group R) / (std_group R + eps)``;
3. ``update_epochs`` passes over shuffled minibatches of (trajectory, step) pairs with the
   clipped surrogate ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho`` the ratio of the
   step's densities (current / sampling policy), plus ``kl_coef`` times the exact per-step
   Gaussian KL to the base ``1/2 h |u_theta|^2`` (summed over steps, per trajectory; divided by
   the batch's return std when the advantages are std-normalised).

The KL ``E sum_k 1/2 h |u_theta|^2`` depends on ``theta`` twice: through the visited
states (the score-function term, carried by the KL inside the advantages) and explicitly (the
direct term ``kl_coef``). With both (``kl_in_return=True``, ``kl_coef = 1``, the defaults) the
first step of an update (ratio 1, nothing clipped) estimates the gradient of
``E[lambda r] - KL`` without bias, up to the positive std normalisation; without the first
(``kl_in_return=False``, DDPO-style) the KL's pull through the states is missing and training
stalls short of the optimum (``GMM2D-v0``, 30 iterations of 256, seeds 0 and 1: the rollouts'
objective levels off near -3.8 without it and -3.4 with it; the optimum is -3.0).

Return to go: ``c_j`` is a function of ``x_j`` alone (the KL is known in closed form at the
visited state), and ``E[grad log pi(x_{k+1} | x_k) | x_0 .. x_k] = 0``, so the costs
``c_0 .. c_k`` fixed before step ``k``'s action only add noise to its score-function term and
can be dropped (as can any baseline that depends on the step, like the group mean of ``G_k``):
the estimate stays unbiased and its variance drops. On the GMM tasks (80 iterations of 256,
lr 1e-2 with a cosine decay, seeds 0-2) this is worth about +0.01 of the oracle gap (0.962 ->
0.970 and 0.966 -> 0.973). What limits the method more is the gradient noise at a constant
learning rate: the policy random-walks around the optimum (0.87 and 0.86 of the gap), so a
decaying rate (``lr_schedule="cosine"``; the late iterations average the noise out) matters
most (``benchmarks/policy_gradient_ablation.py`` prints the ablation).

Usage::

    trainer = PolicyGradient("GMM2D-v0", config=PolicyGradientConfig(iterations=30))
    trainer.train()
    trainer.evaluate()                      # objective, kl, reward, valid_fraction, gap_closed
    ControlAgent(trainer.policy, trainer.envs)  # act on any diffusiongym env with the result
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusiongym.envs.vector_env import DiffusionVectorEnv
from diffusiongym.logprob import euler_step_log_prob
from diffusiongym.policies.control import ModelControl, output_control
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.policies.value import ControlPolicy
from diffusiongym.trainers.base import Trainer, TrainerConfig
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.ppo import (
    ADVANTAGES,
    Rollout,
    cat_rollouts,
    group_advantages,
    ppo_loss,
    ppo_update,
    rollout_metrics,
)
from diffusiongym.utils.runtime import derive_seed
from diffusiongym.utils.validation import check_positive_int, unknown_name_error

__all__ = [
    "PolicyGradient",
    "PolicyGradientConfig",
    "Rollout",
    "cat_rollouts",
    "group_advantages",
    "ppo_loss",
    "ppo_update",
    "rollout_metrics",
]

POLICY_TYPES = ("model", "control")


@dataclass
class PolicyGradientConfig(TrainerConfig):
    """Hyper-parameters of :class:`PolicyGradient` (PPO names as in CleanRL).

    Attributes
    ----------
    batch_size : int
        Trajectories per iteration: the vector env's ``num_envs``, a multiple of ``group_size``.
    group_size : int
        Trajectories per group (one conditioning value and one baseline each), at least 2.
    update_epochs : int
        Passes over the iteration's (trajectory, step) pairs.
    num_minibatches : int
        Minibatches per pass.
    clip_coef : float
        PPO ratio clipping ``eps > 0``.
    kl_coef : float
        Weight of the exact KL's direct term (``>= 0``; 1 weighs it as in ``lambda r - KL``).
    kl_in_return : bool
        Advantages from the env's return ``lambda r - KL`` (the KL's score-function term;
        default) instead of ``lambda r`` alone (biased, see the module docstring).
    advantage : {"to_go", "return"}
        With ``kl_in_return``: step ``k``'s advantage from its return to go
        ``lambda r - sum_{j > k} KL_j`` and a per-step group baseline (``"to_go"``, default:
        unbiased, lower variance) or from the whole return (``"return"``, as GRPO).
    normalize_std : bool
        GRPO: divide the advantages by the group's standard deviation.
    hidden, layers : int
        Width and depth of the default ``TimeMLP`` (used only when no model is given).
    """

    iterations: int = 50
    batch_size: int = 256
    lr: float = 3e-3
    max_grad_norm: float | None = 1.0
    group_size: int = 32
    update_epochs: int = 4
    num_minibatches: int = 8
    clip_coef: float = 0.2
    kl_coef: float = 1.0
    kl_in_return: bool = True
    advantage: str = "to_go"
    normalize_std: bool = True
    hidden: int = 64
    layers: int = 3

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"advantage": ADVANTAGES}

    def validate(self) -> None:
        super().validate()
        for name in ("group_size", "update_epochs", "num_minibatches", "hidden", "layers"):
            check_positive_int(name, getattr(self, name))
        if self.group_size < 2:
            raise ValueError(
                f"group_size: expected at least 2 (a group baseline needs two samples), got {self.group_size}"
            )
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size: expected a multiple of group_size={self.group_size}, got {self.batch_size}")
        if self.clip_coef <= 0:
            raise ValueError(f"clip_coef: expected a number > 0, got {self.clip_coef!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: expected a number >= 0, got {self.kl_coef!r}")


class PolicyGradient(Trainer):
    """GRPO-style PPO fine-tuning a model or a control network through a vector env.

    Parameters
    ----------
    task, reward, reward_scale, config, device, dtype, **task_options
        As every :class:`~diffusiongym.trainers.base.Trainer`; ``config`` is a
        :class:`PolicyGradientConfig`. The task's noise must have ``sigma > 0``.
    model : nn.Module, optional
        Trainable; ``model(x, t, **cond)`` with ``x`` ``(n, *shape)`` and ``t`` ``(n,)``. For
        ``policy_type="model"`` it outputs in the base model's parameterisation, shape of ``x``;
        for ``"control"`` it outputs ``u`` (shape of ``x`` or flat ``(n, prod(shape))``). It
        should start at the base (a zero-initialised residual or control). Default: a
        zero-initialised ``TimeMLP(d, d, hidden, layers)`` (inside a
        :class:`~diffusiongym.policies.networks.ResidualModel` for ``"model"``).
    policy_type : {"model", "control"}

    Attributes
    ----------
    envs : DiffusionVectorEnv
        The ``config.batch_size`` envs the data come from.
    model : nn.Module
    """

    config_class: ClassVar[type[TrainerConfig]] = PolicyGradientConfig
    config: PolicyGradientConfig
    supports_sharding = True

    def setup(self, model: Any, *, policy_type: str = "model") -> None:
        if policy_type not in POLICY_TYPES:
            raise unknown_name_error("policy_type", policy_type, POLICY_TYPES)
        if self.env.noise.is_deterministic:
            raise ValueError(
                "task: policy gradients need stochastic transitions; expected noise with sigma > 0, got the ODE"
            )
        self.policy_type = policy_type
        self.envs = DiffusionVectorEnv(  # one shard's envs (the whole batch unsharded)
            self.task,
            self.shard_size(self.config.batch_size),
            action_mode="control",
            device=self.device,
            dtype=self.dtype,
            compile=self.config.compile,
        )
        self.sim = self.envs.sim
        if model is None:
            model = self.build(self._default_model, "model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.configure_optimizer(model)
        if policy_type == "model":
            self._control_module: nn.Module = ModelControl(model, self.env, self.task.action_scale)
        else:
            self._control_module = ControlPolicy(model, self.env, self.task.action_scale)
        # per-step scalars of the env's grid as (m,) tensors; factor = coef_out / sigma
        s, dt, dev = self.sim.schedule, self.dtype, self.device
        self._h, self._sigma, self._coef_x, self._coef_out = (
            torch.tensor(v, dtype=dt, device=dev) for v in (s.h, s.sigma, s.coef_x, s.coef_out)
        )
        self._factor = torch.tensor([c / g for c, g in zip(s.coef_out, s.sigma)], dtype=dt, device=dev)

    def _default_model(self) -> nn.Module:
        d = int(torch.Size(self.task.sample_shape).numel())
        net = TimeMLP(d, d, hidden=self.config.hidden, layers=self.config.layers, zero_init=True).to(
            device=self.device, dtype=self.dtype
        )
        return ResidualModel(self.env.model, net) if self.policy_type == "model" else net

    @property
    def num_envs(self) -> int:
        return self.sim.num_envs

    @property
    def policy(self) -> nn.Module:
        """The current control ``u(x, t, **cond)``: a
        :class:`~diffusiongym.policies.control.ModelControl` (``policy_type="model"``) or a
        :class:`~diffusiongym.policies.value.ControlPolicy` (``"control"``) over :attr:`model`."""
        return self._control_module

    # ------------------------------------------------------------------ the control
    def _control(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], base_out: Tensor, k: Tensor | int) -> Tensor:
        """``u_theta`` at ``(x, t)`` (``t`` shape ``(n,)``) from the model and the base output
        ``(n, *shape)``; ``k``: the step index (int or ``(n,)``)."""
        if self.policy_type == "control":
            return self._control_module(x, t, **cond)
        out = self.model(x, t, **cond)
        if out.shape != x.shape:
            raise ValueError(f"model output: expected shape {tuple(x.shape)} (same as x), got {tuple(out.shape)}")
        factor = self._factor[k]
        return output_control(out, base_out, factor.reshape(-1, *([1] * (x.ndim - 1))) if factor.ndim else factor)

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def rollout(self, seed: int, cond: dict[str, Tensor] | None = None) -> Rollout:
        """Run every env from ``reset(seed=seed)`` to ``t = 1`` with the current policy.

        ``cond`` (name -> ``(n,)`` values) is passed to ``reset(options=...)``; by default each
        group of ``group_size`` envs shares one value drawn from the task's sampler.
        """
        n, m, g = self.num_envs, self.sim.steps, self.config.group_size
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        if cond is None:
            cond = {name: v.repeat_interleave(g, dim=0) for name, v in self.conditioning(n // g, gen).items()}
        obs, _ = self.envs.reset(seed=int(seed), options=dict(cond))
        cond = {name: obs[name] for name in self.task.conditioning}
        x = obs["x"]
        states, base_outs, log_probs, rewards = [x], [], [], []
        info: dict[str, Any] = {}
        for k in range(m):
            t = obs["t"].reshape(-1)
            base_out = self.sim.base_output()  # shared with the env's own step: one model call
            u = self._control(x, t, cond, base_out, k)
            obs, reward, _terminated, _truncated, info = self.envs.step(self.envs.control_to_action(u))
            x_next = obs["x"]
            drift = self._coef_x[k] * x + self._coef_out[k] * base_out
            log_probs.append(euler_step_log_prob(x_next, x, drift, self._h[k], self._sigma[k], u))
            states.append(x_next)
            base_outs.append(base_out)
            rewards.append(reward)
            x = x_next
        r, valid = self._terminal_reward(info, x, cond)
        return Rollout(
            torch.stack(states), torch.stack(base_outs), torch.stack(log_probs), torch.stack(rewards), r, valid, cond
        )

    def _sharded_rollout(self) -> Rollout:
        """This process's shards of the iteration's episodes: the groups' conditioning is drawn
        for the whole batch from the iteration's seed (the same on every rank: a group may span
        shards), and shard ``s`` resets its envs with a seed derived from it and ``s``."""
        seed, g, total = self.init_seed("rollout", self.iteration), self.config.group_size, self.config.batch_size
        n = self.num_envs
        gen = torch.Generator(device=self.device).manual_seed(seed)
        cond = {name: v.repeat_interleave(g, dim=0) for name, v in self.conditioning(total // g, gen).items()}
        parts = [
            self.rollout(derive_seed(seed, "shard", s), {k: v[s * n : (s + 1) * n] for k, v in cond.items()})
            for s in self.local_shards
        ]
        return cat_rollouts(parts)

    def _terminal_reward(self, info: dict[str, Any], x1: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``r(x1)`` (0 where invalid) and validity, ``(n,)`` each: the env's ``info`` when it
        holds them as ``(n,)`` tensors, else the task's reward (the same numbers)."""
        r, valid = info.get("reward"), info.get("valid")
        n = self.num_envs
        if isinstance(r, Tensor) and isinstance(valid, Tensor) and r.shape == (n,) and valid.shape == (n,):
            return r, valid.to(torch.bool)
        r, valid = self.task.reward(x1, **cond)
        return torch.where(valid, r.to(self.dtype), torch.zeros((), dtype=self.dtype, device=r.device)), valid

    def rollout_metrics(self, batch: Rollout) -> dict[str, float]:
        """:func:`rollout_metrics` of a rollout of this trainer."""
        return rollout_metrics(batch, self.task.reward_scale)

    # ------------------------------------------------------------------ training
    def _step(self) -> dict[str, float]:
        """Rollout with the current policy, then the PPO update (:func:`ppo_update`). ``reward``,
        ``kl``, ``objective`` and ``valid_fraction`` describe the rollout (the policy *before*
        its update); ``loss``, ``pg_loss``, ``kl_loss``, ``clip_fraction``, ``approx_kl`` and
        ``grad_norm`` are means over the update's minibatches."""
        self.model.eval()
        batch = self._sharded_rollout() if self.sharded else self.rollout(self.init_seed("rollout", self.iteration))
        states, base_out, cond = batch.states, batch.base_out, batch.cond
        times = self.sim.times

        def step_terms(k: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
            x, x_next, out_b = states[k, i], states[k + 1, i], base_out[k, i]
            shape = (-1, *([1] * (x.ndim - 1)))
            drift = self._coef_x[k].reshape(shape) * x + self._coef_out[k].reshape(shape) * out_b
            u = self._control(x, times[k], {name: value[i] for name, value in cond.items()}, out_b, k)
            new_logp = euler_step_log_prob(x_next, x, drift, self._h[k], self._sigma[k], u)
            # exact per-step Gaussian KL to the base: |mean_theta - mean_base|^2 / (2 h sigma^2) = 1/2 h |u|^2
            return new_logp, 0.5 * self._h[k] * (u**2).reshape(len(k), -1).sum(1)

        return {**self.rollout_metrics(batch), **ppo_update(self, batch, step_terms)}

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {"policy_type": self.policy_type}

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        if tensors:
            raise CheckpointError(f"extra: PolicyGradient keeps no extra tensors, got {sorted(tensors)[:5]}")
        if meta != {"policy_type": self.policy_type}:
            raise CheckpointError(
                f"extra.policy_type: the checkpoint has {meta.get('policy_type')!r}, this trainer's is {self.policy_type!r}"
            )
        return lambda: None

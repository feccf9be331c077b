"""PPO / GRPO on the jump steps of a discrete (CTMC) chain, under the Trainer contract.

On a :class:`~diffusiongym.discrete.tasks.DiscreteTask` each Euler jump step of the controlled
chain (:mod:`diffusiongym.discrete.chain`) is a categorical action per coordinate with exact
probabilities (:func:`~diffusiongym.discrete.chain.controlled_step`)::

    pi_theta(x_{k+1} | x_k) = prod_i P_theta(x_{k+1,i} | x_k),

the control being that of a fine-tuned posterior model (default a zero-initialised
:class:`~diffusiongym.discrete.models.ResidualPosterior`: the base),
``c = log_softmax(model) - log_softmax(base)`` (:func:`~diffusiongym.discrete.chain.control_from_model`,
here differentiable). The base rates of the visited states are stored while sampling, so the
ratios of the update are exact. One iteration is that of
:class:`~diffusiongym.trainers.policy_gradient.PolicyGradient` (``docs/maths.md``, "Policy
gradients" and "Discrete chains"), with the same :class:`PolicyGradientConfig` and the same
update (:func:`~diffusiongym.trainers.policy_gradient.ppo_update`):

1. sample ``batch_size`` chains with the current policy (``self.generator``), in groups of
   ``group_size`` (unconditional tasks: a group only shares its baseline);
2. return ``R = lambda r(x1) - sum_k cost_k`` with ``cost_k = h_k * KL rate`` the exact running
   cost (``kl_in_return=False``: ``lambda r(x1)`` only); step ``k``'s advantage from its return
   to go ``lambda r - sum_{j > k} cost_j`` with a per-step group baseline (``advantage="to_go"``,
   the default; ``"return"``: the whole return's group advantage), 0 for invalid chains;
3. clipped-ratio PPO over (step, chain) pairs plus ``kl_coef`` times the running cost of the
   step under the current policy (differentiable in the model).

Usage::

    trainer = DiscretePolicyGradient("DiscreteGrid-v0", config=PolicyGradientConfig(iterations=30))
    trainer.train()
    trainer.evaluate()   # objective, kl, reward, valid_fraction, gap_closed (exact oracle)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusiongym.discrete.chain import base_rates, controlled_step, draw_step
from diffusiongym.trainers.base import TrainerConfig
from diffusiongym.trainers.discrete_trainer import DiscreteTrainer
from diffusiongym.trainers.policy_gradient import PolicyGradientConfig
from diffusiongym.trainers.ppo import Rollout, cat_rollouts, ppo_update, rollout_metrics

__all__ = ["DiscretePolicyGradient", "step_log_prob"]


def step_log_prob(probs: Tensor, x_next: Tensor) -> Tensor:
    """``log pi(x_{k+1} | x_k) = sum_i log P(x_{k+1,i} | x_k)`` from the step's probabilities
    ``probs`` ``(n, D, S)`` (:func:`~diffusiongym.discrete.chain.controlled_step`) and the drawn
    tokens ``x_next`` ``(n, D)``; shape ``(n,)``, float64. Drawn tokens have positive
    probability; the clamp only keeps a (measure-zero) zero away from ``-inf``."""
    p = probs.gather(-1, x_next.unsqueeze(-1)).squeeze(-1)
    return p.clamp_min(torch.finfo(p.dtype).tiny).log().sum(-1)


class DiscretePolicyGradient(DiscreteTrainer):
    """GRPO-style PPO fine-tuning a posterior model on a discrete task (module docstring).

    Parameters
    ----------
    task : DiscreteTask or str
        A discrete task or its id (``"DiscreteGrid-v0"``, ``"DiscreteDigits-v0"``).
    reward, reward_scale, device, dtype, **task_options
        As for every :class:`~diffusiongym.trainers.base.Trainer` (task options: ``steps``,
        ``action_scale``, ``oracle``, ``name``).
    model : PosteriorModel, optional
        Trainable, on the base's path, starting at the base. Default:
        ``ResidualPosterior(base, hidden=config.hidden, layers=config.layers)``.
    config : PolicyGradientConfig, optional

    Attributes
    ----------
    env : PosteriorModel
        The base model (its chain is the reference process).
    model : PosteriorModel
    policy : callable
        ``c(x, t) = log_softmax(model) - log_softmax(base)``, ``(n, D, K)`` additive rate logits.
    """

    config_class: ClassVar[type[TrainerConfig]] = PolicyGradientConfig
    config: PolicyGradientConfig
    supports_sharding = True

    def setup(self, model: Any) -> None:
        self.setup_model(model, hidden=self.config.hidden, layers=self.config.layers)

    def control(self, x: Tensor, t: Tensor) -> Tensor:
        """The policy's control ``(n, D, K)`` at tokens ``x`` ``(n, D)`` and times ``t`` ``(n,)``,
        differentiable in :attr:`model` (the base's part is detached)."""
        with torch.no_grad():
            base_logp = torch.log_softmax(self.env(x, t), -1)
        return torch.log_softmax(self.model(x, t), -1) - base_logp

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def rollout(self, n: int | None = None, generator: torch.Generator | None = None) -> Rollout:
        """``n`` chains (default ``config.batch_size``) of the current policy on the task's grid,
        drawn with ``generator`` (default ``self.generator``): states ``(m + 1, n, D)``, base rates ``(m, n, D, K)`` (in
        ``base_out``), log-probabilities ``(m, n)``, step rewards ``-cost_k`` (the last adds
        ``lambda r``), ``r(x1)`` (0 where invalid) and validity."""
        n = self.config.batch_size if n is None else n
        path, grid = self.env.path, self.times.to(self.device)
        gen = self.generator if generator is None else generator
        m = grid.shape[0] - 1
        x = path.sample_source(n, generator=gen, device=self.device)
        states, rates_k, logps, costs = [x], [], [], []
        for k in range(m):
            t, h = grid[k].expand(n), (grid[k + 1] - grid[k]).expand(n)
            rates = base_rates(self.env, x, t, h, k == m - 1)
            probs, cost = controlled_step(rates, h, x, path.num_states, self.control(x, t.float()))
            x = draw_step(probs, torch.rand(x.shape, generator=gen, device=self.device, dtype=torch.float64))
            states.append(x)
            rates_k.append(rates)
            logps.append(step_log_prob(probs, x))
            costs.append(cost)
        valid = (x != path.mask_token).all(1) if path.mask_token is not None else torch.ones_like(x[:, 0], dtype=bool)
        r, rvalid = self.task.reward(x)
        valid = valid & rvalid
        r = torch.where(valid, r.double(), torch.zeros((), dtype=torch.float64, device=x.device))
        step_rewards = -torch.stack(costs)
        step_rewards[-1] += self.task.reward_scale * r
        return Rollout(torch.stack(states), torch.stack(rates_k), torch.stack(logps), step_rewards, r, valid, {})

    # ------------------------------------------------------------------ training
    def _step(self) -> dict[str, float]:
        """A rollout, then :func:`~diffusiongym.trainers.policy_gradient.ppo_update`. ``reward``,
        ``kl``, ``objective``, ``valid_fraction`` describe the rollout (the policy before its
        update); ``loss``, ``pg_loss``, ``kl_loss``, ``clip_fraction``, ``approx_kl`` and
        ``grad_norm`` are means over the update's minibatches."""
        self.model.eval()
        n = self.shard_size(self.config.batch_size)
        batch = cat_rollouts([self.rollout(n, gen) for gen in self.shard_generators()])
        grid = self.times.to(self.device)
        num_states = self.env.path.num_states

        def step_terms(k: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
            x, x_next, rates = batch.states[k, i], batch.states[k + 1, i], batch.base_out[k, i]
            probs, cost = controlled_step(rates, grid[k + 1] - grid[k], x, num_states, self.control(x, grid[k].float()))
            return step_log_prob(probs, x_next), cost

        return {**rollout_metrics(batch, self.task.reward_scale), **ppo_update(self, batch, step_terms)}

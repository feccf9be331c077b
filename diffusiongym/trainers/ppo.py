"""The PPO pieces shared by the policy-gradient trainers (continuous and discrete).

:class:`Rollout` (one batch of episodes), :func:`group_advantages` (GRPO's group-normalised
advantages), :func:`ppo_loss` (the clipped surrogate plus the exact per-step KL) and
:func:`ppo_update` (epochs of shuffled minibatches, gradients clipped by the trainer). The maths is
in ``docs/maths.md``, "Policy gradients"; :mod:`diffusiongym.trainers.policy_gradient` and
:mod:`diffusiongym.trainers.policy_gradient_discrete` build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusiongym.distributed.collectives import gather_cat, gather_offset
from diffusiongym.trainers.base import Trainer

__all__ = [
    "ADVANTAGES",
    "Rollout",
    "StepTerms",
    "cat_rollouts",
    "group_advantages",
    "ppo_loss",
    "ppo_update",
    "rollout_metrics",
    "returns_to_go",
    "step_advantages",
]

#: advantage estimators of :func:`ppo_update` (``PolicyGradientConfig.advantage``)
ADVANTAGES = ("to_go", "return")


def group_advantages(returns: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """``(R - mean_group R) [/ (std_group R + eps)]`` for ``returns`` of shape ``(G * group_size,)``
    laid out group after group; shape ``(n,)``."""
    r = returns.reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def returns_to_go(step_rewards: Tensor, terminal: Tensor) -> Tensor:
    """Step ``k``'s return to go ``G_k = lambda r - sum_{j > k} c_j``, shape ``(m, n)``.

    ``step_rewards`` ``(m, n)``: the env's rewards ``-c_j`` with ``terminal`` ``(n,)``
    (``lambda r``) added to the last row. ``c_j`` is a function of ``x_j`` alone (the exact
    per-step KL of the policy at the visited state), so the costs ``c_0 .. c_k`` do not
    depend on step ``k``'s action ``x_{k+1}`` and are left out of its advantage.
    """
    costs = -step_rewards.clone()
    costs[-1] += terminal
    after = costs.flip(0).cumsum(0).flip(0) - costs  # sum_{j > k} c_j
    return terminal.unsqueeze(0) - after


def step_advantages(
    to_go: Tensor, returns: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """``(G_k - mean_group G_k) [/ (std_group R + eps)]`` for returns to go ``to_go`` ``(m, n)``
    and whole returns ``returns`` ``(n,)`` (episodes laid out group after group): a per-step
    group baseline and, as :func:`group_advantages`, one scale per group, the standard
    deviation of its whole returns; shape ``(m, n)``."""
    m = to_go.shape[0]
    g = to_go.reshape(m, -1, group_size)
    adv = g - g.mean(2, keepdim=True)
    if normalize_std:
        adv = adv / (returns.reshape(1, -1, group_size).std(2, keepdim=True) + eps)
    return adv.reshape(m, -1)


@dataclass
class Rollout:
    """One batch of episodes (``m`` steps, ``n`` envs) for :func:`ppo_update`.

    Attributes
    ----------
    states : Tensor, (m + 1, n, *shape)
        Observed ``x`` from ``reset`` to the final observation.
    base_out : Tensor, (m, n, *shape)
        Base model output at each visited state (no grad); for a discrete chain
        (:mod:`~diffusiongym.trainers.policy_gradient_discrete`) the base jump rates ``(m, n, D, K)``.
    log_probs : Tensor, (m, n)
        ``log pi(x_{k+1} | x_k)`` under the policy that acted.
    step_rewards : Tensor, (m, n)
        The env's rewards (``-1/2 |u|^2 h``; the last row adds ``lambda r``).
    reward : Tensor, (n,)
        ``r(x1)`` (0 where invalid).
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


def cat_rollouts(parts: list[Rollout]) -> Rollout:
    """Rollouts of the same grid concatenated along the episodes."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str, dim: int) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts], dim)

    return Rollout(
        *(cat(name, 1) for name in ("states", "base_out", "log_probs", "step_rewards")),
        cat("reward", 0),
        cat("valid", 0),
        {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond},
    )


def rollout_metrics(batch: Rollout, reward_scale: float) -> dict[str, float]:
    """``reward`` (mean ``r`` over valid episodes), ``kl`` (the running cost, ``lambda r``
    minus the return), ``objective`` (the return ``lambda r - KL``), both over valid
    episodes, and ``valid_fraction`` of a rollout (in a process group: of every rank's
    episodes together)."""
    valid, reward, returns = gather_cat(batch.valid), gather_cat(batch.reward), gather_cat(batch.returns)
    nan = float("nan")
    any_valid = bool(valid.any())
    kl = reward_scale * reward - returns
    return {
        "reward": float(reward[valid].mean()) if any_valid else nan,
        "kl": float(kl[valid].mean()) if any_valid else nan,
        "objective": float(returns[valid].mean()) if any_valid else nan,
        "valid_fraction": float(valid.float().mean()),
    }


StepTerms = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def ppo_loss(
    new_logp: Tensor, old_logp: Tensor, adv: Tensor, kl: Tensor, clip_coef: float, kl_scale: float, steps: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO loss of a minibatch of ``b`` (step, trajectory) pairs, all arguments of shape ``(b,)``.

    ``steps * (mean(-min(rho A, clip(rho, 1 - eps, 1 + eps) A)) + kl_scale * mean(kl))`` with
    ``rho = exp(new_logp - old_logp)`` and ``kl`` the exact per-step KL to the base (the
    factor ``steps`` turns means over pairs into per-trajectory sums over steps). Returns the
    loss and its statistics ``loss``, ``pg_loss``, ``kl_loss``, ``clip_fraction``, ``approx_kl``
    (detached 0-d tensors: no host sync per minibatch).
    """
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    kl_step = kl.mean()
    loss = steps * (pg_loss + kl_scale * kl_step)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_step.detach() * steps,
            "clip_fraction": ((ratio - 1).abs() > clip_coef).float().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
        }
    return loss, stats


def ppo_update(trainer: Trainer, batch: Rollout, step_terms: StepTerms) -> dict[str, Tensor]:
    """The PPO update shared by the policy-gradient trainers (``docs/maths.md``, "Policy gradients").

    Group advantages of the batch's returns (``kl_in_return``; ``advantage="to_go"``: of each
    step's return to go, :func:`returns_to_go`, with a per-step group baseline; invalid
    episodes get 0), then
    ``update_epochs`` passes over shuffled minibatches (``trainer.generator``) of the
    ``m * n`` (step, trajectory) pairs with :func:`ppo_loss`; ``step_terms(k, i)`` (step and
    trajectory indices, ``(b,)`` each) returns the current policy's ``log pi(x_{k+1} | x_k)``
    and its exact per-step KL to the base, ``(b,)`` each, differentiable in ``trainer.model``.
    Returns the means over minibatches of the :func:`ppo_loss` statistics and ``grad_norm``
    (0-d tensors; the trainer's ``step`` turns them into floats once).

    Sharded (``batch`` holds this process's shards, in order): the group advantages and the
    return scale are those of the whole batch (the returns are gathered; groups may span
    shards and ranks), and each shard shuffles its own pairs with its own generator;
    minibatch ``j`` is the union of every shard's ``j``-th slice.
    """
    cfg = trainer.config
    m, n = batch.log_probs.shape
    terminal = trainer.task.reward_scale * batch.reward
    returns = batch.returns if cfg.kl_in_return else terminal
    returns, valid = gather_cat(returns), gather_cat(batch.valid)  # the whole batch, every rank's episodes
    if cfg.advantage == "to_go" and cfg.kl_in_return:
        to_go = gather_cat(returns_to_go(batch.step_rewards, terminal), dim=1)
        adv = step_advantages(to_go, returns, cfg.group_size, cfg.normalize_std)  # (m, N)
    else:
        adv = group_advantages(returns, cfg.group_size, cfg.normalize_std).expand(m, -1)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    # the KL penalty is divided by the same return scale as the advantages, so that
    # kl_coef = 1 is the gradient of lambda r - KL (up to a positive factor)
    ret_std = float(returns[valid].std()) if int(valid.sum()) > 1 else 0.0
    start, _ = gather_offset(n)
    adv = adv[:, start : start + n]
    kl_scale = cfg.kl_coef / (ret_std + 1e-6) if cfg.normalize_std else cfg.kl_coef

    trainer.model.train()
    device = batch.log_probs.device
    gens = trainer.shard_generators()
    n_shard = n // len(gens)
    flat_k = torch.arange(m, device=device).repeat_interleave(n_shard)
    flat_i = torch.arange(n_shard, device=device).repeat(m)
    total = m * n_shard
    mb = max(1, total // cfg.num_minibatches)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    stats: dict[str, Any] = dict.fromkeys(
        ("loss", "pg_loss", "kl_loss", "clip_fraction", "approx_kl", "grad_norm"), 0.0
    )
    count = 0
    for _epoch in range(cfg.update_epochs):
        perms = [torch.randperm(total, generator=gen, device=device) for gen in gens]
        for start in range(0, total, mb):
            sels = [perm[start : start + mb] for perm in perms]
            k = torch.cat([flat_k[sel] for sel in sels])
            i = torch.cat([flat_i[sel] + j * n_shard for j, sel in enumerate(sels)])
            new_logp, kl = step_terms(k, i)
            loss, terms = ppo_loss(new_logp, batch.log_probs[k, i], adv[k, i], kl, cfg.clip_coef, kl_scale, m)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            terms["grad_norm"] = trainer.clip_gradients(params)
            trainer.optimizer.step()
            for key, value in terms.items():
                stats[key] += value
            count += 1
    trainer.model.eval()
    return {key: value / count for key, value in stats.items()}

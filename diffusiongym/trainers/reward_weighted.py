"""Reward-weighted cross-entropy fine-tune of a discrete posterior model, under the Trainer contract.

On a :class:`~diffusiongym.discrete.tasks.DiscreteTask` (a base posterior model ``p(x1_i | x_t)``
on a mixture path, a reward on tokens, ``lambda``): draw base samples ``x1_j`` (or take given
ones), weight them ``g_j = softmax_j(beta r_j)`` (``beta = lambda`` by default) and fine-tune a
copy of the base with the cross-entropy (generalised-KL) loss on minibatches drawn from ``g``::

    loss = E_{j ~ g} E_{t ~ U[0, 1), x_t ~ p_t(. | x1_j)} [ -sum_i log p_theta(x1_{j,i} | x_t) ].

Its minimiser is the posterior of ``q ∝ p g``, i.e. of ``p* ∝ p exp(lambda r)`` (up to the
finite sample); with the mask source the chain of that posterior is exactly the optimal
tilted chain, and its control against the base is ``c = log p_theta - log p_base``
(:func:`~diffusiongym.discrete.chain.control_from_model`; ``docs/maths.md``, "Discrete chains").

One :class:`RewardWeightedTrainer` iteration is **one gradient step**. The data set is a fixed
function of the seed (drawn with a generator derived from it) or given; a resume redraws it
(or checks that the same data are given again).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusiongym.discrete.chain import sample_chain
from diffusiongym.distributed.collectives import gather_cat, gather_offset
from diffusiongym.discrete.models import check_tokens
from diffusiongym.discrete.train import cross_entropy_loss
from diffusiongym.trainers.base import TrainerConfig
from diffusiongym.trainers.discrete_trainer import DiscreteTrainer
from diffusiongym.trainers.checkpoint import CheckpointError, tensor_digest
from diffusiongym.trainers.flow_matching import check_weighted_data, efm_weights
from diffusiongym.utils.validation import check_positive_int

__all__ = ["RewardWeightedConfig", "RewardWeightedTrainer"]


@dataclass
class RewardWeightedConfig(TrainerConfig):
    """Hyper-parameters of :class:`RewardWeightedTrainer` (shared fields: :class:`TrainerConfig`).

    Attributes
    ----------
    iterations : int
        Gradient steps.
    max_grad_norm : float or None
        Default 1.
    num_samples : int
        Base samples drawn when no data are given.
    inverse_temperature : float or None
        ``beta`` of the weights ``softmax(beta r)``; ``None`` means the task's
        ``reward_scale`` (targets ``p*``).
    ess_warn_fraction : float
        Warn when the weights' effective sample size is below ``ess_warn_fraction * n``.
    """

    iterations: int = 2000
    lr: float = 2e-3
    max_grad_norm: float | None = 1.0
    num_samples: int = 12000
    inverse_temperature: float | None = None
    ess_warn_fraction: float = 0.02

    def validate(self) -> None:
        super().validate()
        check_positive_int("num_samples", self.num_samples)
        if not 0.0 < self.ess_warn_fraction < 1.0:
            raise ValueError(f"ess_warn_fraction: expected a number in (0, 1), got {self.ess_warn_fraction!r}")


class RewardWeightedTrainer(DiscreteTrainer):
    """Reward-weighted cross-entropy fine-tune (see the module docstring) on a discrete task.

    Parameters
    ----------
    task : DiscreteTask or str
        A discrete task or its id (``"DiscreteGrid-v0"``, ``"DiscreteDigits-v0"``).
    reward, reward_scale : optional
        Override the task's (the task's oracle is then dropped: it solves the original problem).
    model : PosteriorModel, optional
        The trainable copy, on the base's path and starting at the base. Default:
        ``ResidualPosterior(base, hidden=128, layers=2)`` (zero-initialised residual).
    config : RewardWeightedConfig, optional
    data : (x1, rewards) or (x1, rewards, valid), optional
        Tokens ``(n, D)`` long, rewards ``(n,)``, ``valid`` ``(n,)`` bool (default: finite
        rewards). Drawn from the base chain (``num_samples``) when omitted.
    device, dtype, **task_options
        As for every trainer (task options: ``steps``, ``action_scale``, ``oracle``, ``name``).

    Attributes
    ----------
    env : PosteriorModel
        The base model (the chain it defines is the reference process).
    policy : callable
        ``c(x, t) = log_softmax(model) - log_softmax(base)``, ``(n, D, K)`` additive rate logits.
    """

    config_class = RewardWeightedConfig
    config: RewardWeightedConfig
    supports_sharding = True

    def setup(self, model: Any, *, data: tuple[Tensor, ...] | None = None) -> None:
        self.setup_model(model, hidden=128, layers=2)
        self.data = self._check_data(data)
        self._data_digest = None if self.data is None else tensor_digest(*self.data)
        self._dataset: dict[str, Any] | None = None

    def _check_data(self, data: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        if data is None:
            return None
        x1, r, valid = check_weighted_data(data)
        path = self.env.path
        x1 = check_tokens(x1, path.length, path.vocab_size, "data: x1")
        return x1.to(self.device), r.to(self.device), valid.to(self.device)

    # ------------------------------------------------------------------ training
    def _weighted_data(self) -> dict[str, Any]:
        """The data set, its weights ``softmax(beta r)`` and their statistics (cached).

        Sharded: this process holds its shards of the data set (drawn shard by shard, each
        from a seed derived for it, or its rows of given data) and its part of the weights of
        the softmax over the whole data set."""
        if self._dataset is not None:
            return self._dataset
        cfg = self.config
        if self.data is not None:
            x1, r, valid = self.data
            if self.sharded:
                per = self.shard_size(x1.shape[0], "data")
                rows = slice(self.local_shards.start * per, self.local_shards.stop * per)
                x1, r, valid = x1[rows], r[rows], valid[rows]
        else:
            per = self.shard_size(cfg.num_samples, "num_samples")
            parts = []
            for seed in self.shard_seed("data"):
                gen = torch.Generator(device=self.device).manual_seed(seed)
                parts.append(sample_chain(self.env, per, times=self.times, reward=self.task.reward, generator=gen))
            x1, r, valid = (torch.cat([getattr(p, name) for p in parts]) for name in ("x1", "reward", "valid"))
        beta = float(self.task.reward_scale) if cfg.inverse_temperature is None else float(cfg.inverse_temperature)
        g, ess = efm_weights(gather_cat(beta * r), gather_cat(valid))  # the softmax over every shard
        start, n = gather_offset(x1.shape[0])
        g = g[start : start + x1.shape[0]]
        r, valid = gather_cat(r), gather_cat(valid)
        if ess < cfg.ess_warn_fraction * n:
            warnings.warn(
                f"RewardWeightedTrainer: effective sample size {ess:.1f} of {n} samples ({ess / n:.2%}) is below "
                f"ess_warn_fraction={cfg.ess_warn_fraction}; lower the inverse temperature or use more samples",
                RuntimeWarning,
                stacklevel=4,
            )
        stats = {
            "ess": ess,
            "ess_fraction": ess / n,
            "reward": float(r[valid].double().mean()),
            "valid_fraction": float(valid.float().mean()),
        }
        self._dataset = {"x1": x1, "weights": g.to(x1.device), "stats": stats}
        return self._dataset

    def _step(self) -> dict[str, float]:
        data = self._weighted_data()
        self.model.train()
        if not self.sharded:
            idx = torch.multinomial(data["weights"], self.config.batch_size, replacement=True, generator=self.generator)
            loss = cross_entropy_loss(self.model, data["x1"][idx], generator=self.generator)
        else:  # as EFMTrainer._sharded_loss: shard s draws from its samples, weighted by S G_s
            b, shards = self.shard_size(self.config.batch_size), self.config.rollout_shards
            n = data["x1"].shape[0] // len(self.local_shards)
            terms = []
            for j, gen in enumerate(self.shard_generators()):
                g = data["weights"][j * n : (j + 1) * n]
                mass = g.sum()
                if float(mass) <= 0.0:
                    continue
                idx = torch.multinomial(g / mass, b, replacement=True, generator=gen) + j * n
                part = cross_entropy_loss(self.model, data["x1"][idx], generator=gen)
                terms.append(part * (shards * mass).to(part.dtype))
            zero = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
            loss = torch.stack(terms).sum() / len(self.local_shards) if terms else zero
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self.clip_gradients(self.model.parameters())
        self.optimizer.step()
        self.model.eval()
        return {"loss": loss.detach(), "grad_norm": norm, **data["stats"]}

    # --------------------------------------------------------------- checkpoints
    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The digest of given data (drawn data are redrawn from the seed on resume)."""
        return {}, ({} if self._data_digest is None else {"data_digest": self._data_digest})

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        if tensors or sorted(set(meta) - {"data_digest"}):
            raise CheckpointError(
                f"extra: unexpected tensors {sorted(tensors)[:5]} or keys {sorted(set(meta) - {'data_digest'})}"
            )
        if meta.get("data_digest") != self._data_digest:
            raise CheckpointError(
                f"extra.data_digest: the checkpoint was trained on {'other data' if meta.get('data_digest') else 'data drawn from the base'}, "
                f"this trainer {'was given other data' if self._data_digest else 'was built without data='}; pass the same data set to resume"
            )
        return lambda: None

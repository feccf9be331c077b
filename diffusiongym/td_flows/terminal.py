"""In the diffusion gym: a flow model of the terminal state ``x1`` given ``(x_t, t)`` under the base policy.

The denoising chain is an MDP whose state is ``(x_t, t)`` and whose episode ends at ``t = 1``.
Its successor measure with ``gamma -> 1`` (the terminal state absorbing) is the law of the
terminal state, ``p(x1 | X_t = x)`` along the base SDE: a conditional flow model
``v_theta(z, tau | s = (x_t, t))`` (a :class:`~diffusiongym.td_flows.successor.SuccessorFlow`
with ``action_dim = 0``, ``out_dim = d``; ``tau`` the flow's own time) fitted by conditional
flow matching on pairs ``(x_k, t_k) -> x_m`` of base trajectories (Monte-Carlo targets: the
episode ends after a known number of steps, so nothing needs bootstrapping).

Then for *any* terminal reward ``r`` and scale ``lambda``, with no retraining,
``V(x, t) = -log E[exp(lambda r(X1)) | X_t = x] ≈ -log mean_j exp(lambda r(x1_j))`` over model
draws ``x1_j`` (:meth:`TerminalFlow.value`), the cost-to-go that
:class:`~diffusiongym.trainers.value_matching.ValueMatching` learns for one reward, and that the
:class:`~diffusiongym.oracle.TiltOracle` gives exactly on the GMM tasks (memoryless noise).

On the Trainer contract the task is an ordinary diffusion task; :attr:`TerminalFlow.policy` is
the zero control (the model describes the base policy), so ``evaluate`` reports the base's
metrics. The trajectory pool is a fixed function of the seed (redrawn on resume). Data-parallel
(``rollout_shards = S``, ``docs/distributed.md``): shard ``s`` holds ``num_trajectories / S``
pool trajectories drawn from its own seed and draws ``batch_size / S`` triples from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import sample
from diffusiongym.td_flows.successor import SuccessorFlow
from diffusiongym.trainers.base import Trainer, TrainerConfig
from diffusiongym.trainers.flow_matching import weighted_flow_matching_loss
from diffusiongym.utils.validation import check_positive_int, check_real, check_tensor

__all__ = ["TerminalFlowConfig", "TerminalFlow", "zero_control"]


def zero_control(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
    """The base policy as a control: ``u = 0``."""
    return torch.zeros_like(x)


@dataclass
class TerminalFlowConfig(TrainerConfig):
    """Hyper-parameters of :class:`TerminalFlow` (shared fields: :class:`TrainerConfig`).

    Attributes
    ----------
    iterations : int
        Gradient steps.
    batch_size : int
        ``(x_k, t_k, x1)`` triples per step, drawn from the pool.
    num_trajectories : int
        Base trajectories in the pool (all their grid points are training states).
    hidden, layers : int
        Size of the model's :class:`~diffusiongym.policies.networks.TimeMLP`.
    """

    iterations: int = 2000
    batch_size: int = 512
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    lr_final_factor: float = 0.05
    max_grad_norm: float | None = 10.0
    num_trajectories: int = 4096
    hidden: int = 128
    layers: int = 3

    def validate(self) -> None:
        super().validate()
        for name in ("num_trajectories", "hidden", "layers"):
            check_positive_int(name, getattr(self, name))


class TerminalFlow(Trainer):
    """Conditional flow of ``x1 | (x_t, t)`` under the base policy, and values for any terminal reward.

    Parameters
    ----------
    task : Task or str
        An unconditional diffusion task with vector samples ``(d,)`` (e.g. ``"GMM1D-v0"``).
    model : SuccessorFlow, optional
        ``SuccessorFlow(d + 1, 0, gamma=1, out_dim=d)``; default built from the config.
    config : TerminalFlowConfig, optional
    device, dtype, **task_options
        As for every trainer.
    """

    config_class: ClassVar[type[TrainerConfig]] = TerminalFlowConfig
    config: TerminalFlowConfig
    supports_sharding = True

    def setup(self, model: SuccessorFlow | None) -> None:
        shape = self.env.sample_shape
        if shape is None or len(shape) != 1 or getattr(self.task, "conditioning", {}):
            raise ValueError(f"task: expected an unconditional task with vector samples (d,), got shape {shape}")
        d = shape[0]
        cfg = self.config
        if model is None:
            model = self.build(lambda: SuccessorFlow(d + 1, 0, 1.0, cfg.hidden, cfg.layers, out_dim=d), "model")
        elif not isinstance(model, SuccessorFlow):
            raise TypeError(f"model: expected a SuccessorFlow, got {type(model).__name__}")
        if (model.state_dim, model.action_dim, model.out_dim) != (d + 1, 0, d):
            raise ValueError(f"model: expected state_dim={d + 1}, action_dim=0, out_dim={d}")
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.configure_optimizer(self.model)
        self._pool: Tensor | None = None

    @property
    def policy(self) -> Any:
        """The zero control: the model describes the base policy's terminal law."""
        return zero_control

    def pool(self) -> Tensor:
        """Base trajectories ``(m + 1, N, d)`` on the task's grid: this process's shards of the
        pool (``N = num_trajectories`` in one process), each drawn once from a seed derived from
        ``config.seed`` and its shard. The normaliser is fitted on the whole pool (gathered over
        ranks) at the first draw."""
        if self._pool is None:
            n = self.shard_size(self.config.num_trajectories, "num_trajectories")
            parts = [
                sample(
                    self.env,
                    n,
                    grid=self.times,
                    store="states",
                    generator=torch.Generator(device=self.device).manual_seed(seed),
                    device=self.device,
                    dtype=self.dtype,
                ).states
                for seed in self.shard_seed("pool")
            ]
            self._pool = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            if self.iteration == 0:  # a resumed run has the fitted normaliser in its checkpoint
                full = gather_cat(self._pool, 1)  # every rank's shards, in shard order
                m = full.shape[0] - 1
                x1 = full[-1]
                states = torch.cat(
                    [
                        full[:-1].reshape(-1, x1.shape[1]),
                        self.times[:-1].to(x1).repeat_interleave(x1.shape[0])[:, None],
                    ],
                    1,
                )
                self.model.fit_normalizer(states, x1.repeat(m, 1))
        return self._pool

    def _step(self) -> dict[str, float]:
        pool = self.pool()
        m = pool.shape[0] - 1
        gens = self.shard_generators()
        n = pool.shape[1] // len(gens)  # trajectories per shard
        b = self.shard_size(self.config.batch_size)
        times = self.times.to(device=self.device, dtype=self.dtype)
        self.model.train()
        losses = []
        for i, gen in enumerate(gens):  # shard i draws from its own generator and its own trajectories
            k = torch.randint(0, m, (b,), generator=gen, device=self.device)
            j = torch.randint(0, n, (b,), generator=gen, device=self.device)
            if i:
                j = j + i * n
            s = torch.cat([pool[k, j], times[k][:, None]], 1)
            losses.append(
                weighted_flow_matching_loss(
                    self.model,
                    "velocity",
                    self.model.scheduler,
                    self.model.normalize(pool[-1, j]),
                    t_range=(0.0, 1.0),
                    generator=gen,
                    cond={"s": s},
                )
            )
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()  # equal shards: the batch mean
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self.clip_gradients(self.model.parameters())
        self.optimizer.step()
        self.model.eval()
        return {"loss": loss.detach(), "grad_norm": norm}

    # ------------------------------------------------------------------ values
    @torch.no_grad()
    def terminal_samples(
        self, x: Tensor, t: Tensor | float, num_samples: int = 256, steps: int = 32, seed: int = 0
    ) -> Tensor:
        """Draws of ``x1 | X_t = x``, shape ``(n, num_samples, d)``."""
        d = self.model.out_dim
        check_tensor("x", x, (-1, d))
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        with self.eval_mode():
            return self.model.sample(torch.cat([x, tt[:, None]], 1), None, num_samples, steps=steps, generator=gen)

    @torch.no_grad()
    def value(
        self,
        x: Tensor,
        t: Tensor | float,
        reward: Reward | None = None,
        reward_scale: float | None = None,
        *,
        num_samples: int = 256,
        steps: int = 32,
        seed: int = 0,
    ) -> Tensor:
        """``V(x, t) = -log mean_j exp(lambda r(x1_j))`` over ``num_samples`` model draws, ``(n,)``.

        ``reward`` and ``reward_scale`` default to the task's; any reward works without retraining.
        The log of a Monte-Carlo mean is biased low by about ``Var[exp(lambda r)] / (2 N E[.]^2)``.
        """
        reward = self.task.reward if reward is None else reward
        scale = self.task.reward_scale if reward_scale is None else check_real("reward_scale", reward_scale)
        x1 = self.terminal_samples(x, t, num_samples, steps, seed)
        n, k, d = x1.shape
        r, _ = reward(x1.reshape(n * k, d))
        log_w = scale * r.reshape(n, k).to(torch.float64)
        return -(torch.logsumexp(log_w, 1) - torch.log(torch.tensor(float(k), dtype=torch.float64))).to(x.dtype)

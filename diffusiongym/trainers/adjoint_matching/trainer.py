"""Adjoint Matching: stochastic-optimal-control fine-tuning of a copy of the base model.

Domingo-Enrich et al., "Adjoint Matching" (2024); ``docs/maths.md``, "Adjoint Matching". The
fine-tuned model outputs in the *base model's own parameterisation*; under the memoryless
schedule (``sigma^2 = 2 eta``: only then does the optimum sample ``p* ∝ p_base exp(lambda r)``)
its control is ``u = coef_out (out_finetuned - out_base) / sigma``
(:class:`~diffusiongym.policies.control.ModelControl`). One iteration:

1. sample ``n`` paths ``x_0 .. x_m`` with the current fine-tuned model (no graph);
2. solve the lean adjoint ``a_k`` backwards along them with vector-Jacobian products of the
   **base** drift (:func:`~diffusiongym.trainers.adjoint_matching.lean_adjoint.lean_adjoint`;
   optionally with likelihood-ratio steps where the drift expands);
3. optionally add mixup restart paths late in the path (:mod:`.restarts`);
4. regress the control onto ``-sigma a``: ``updates_per_iteration`` gradient steps on
   ``mean w(t_k) |u_theta(x_k, t_k) + sigma(t_k) a_k|^2`` over a subset of grid times.

At the fixed point ``u = u* = -sigma grad V*``, and the running cost ``1/2 |u|^2 h`` of the
fine-tuned model's memoryless SDE is its KL to the base. Use the result as
``trainer.policy`` (a control), or the model itself: ``sample(env, policy=trainer.model)``
or ``env.with_model(trainer.model)`` (e.g. with ``noise="ode"``).

Shapes: ``x`` is ``(n, *sample_shape)``, ``t`` a tensor ``(n,)``; paths and adjoints
``(m + 1, n, *sample_shape)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from diffusiongym.distributed.collectives import all_sum, global_mean_loss
from diffusiongym.distributed.sampling import cat_trajectories
from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.control import ModelControl, output_control
from diffusiongym.policies.networks import ControlScaledNet, ResidualModel, TimeMLP
from diffusiongym.sampling import StepSchedule, Trajectory, sample
from diffusiongym.trainers.adjoint_matching.config import RESIDUALS, TIME_WEIGHTS, AdjointMatchingConfig
from diffusiongym.trainers.adjoint_matching.lean_adjoint import check_differentiable_reward, lean_adjoint
from diffusiongym.trainers.adjoint_matching.restarts import first_restart_index, mixup_states
from diffusiongym.trainers.base import Trainer, trajectory_metrics

__all__ = ["AdjointMatching", "Segment", "make_finetune_model", "time_weights"]


def time_weights(sigma: Tensor, kind: str) -> Tensor:
    """Per-time loss weights ``w(t_k)`` from ``sigma(t_k)`` (same shape).

    ``"uniform"``: 1. ``"clip"``: ``min(1, 1 / sigma^2)``. ``"inverse"``: ``1 / sigma^2``.
    The target ``-sigma a_k`` has a variance that grows like ``sigma^2`` where the memoryless
    ``sigma`` blows up (``t -> 0`` for the linear schedule) while the optimal control
    vanishes there; any positive weight keeps the minimiser ``u*``.
    """
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "clip":
        return (1.0 / sigma**2).clamp(max=1.0)
    if kind == "inverse":
        return 1.0 / sigma**2
    raise ValueError(f"time_weight: expected one of {list(TIME_WEIGHTS)}, got {kind!r}")


def make_finetune_model(
    env: DiffusionEnvironment, hidden: int = 64, layers: int = 2, num_frequencies: int = 4, residual: str = "auto"
) -> nn.Module:
    """The default fine-tuned copy of ``env.model`` (it starts equal to the base).

    ``residual="copy"``: ``env.model.trainable_copy()`` (models that provide one, e.g. the
    exact Gaussian mixtures: full fine-tuning of a copy, as in the paper). ``"control"`` /
    ``"plain"``: ``ResidualModel(env.model, net)`` with ``net`` a zero-initialised
    :class:`TimeMLP` wrapped in :class:`ControlScaledNet` (so that ``u = net(x, t)``) or bare;
    needs ``env.sample_shape = (d,)``. ``"auto"``: ``"copy"`` where available, else
    ``"control"``. Image models are fine-tuned as ``copy.deepcopy(base)`` or
    ``diffusiongym.add_lora(base)`` instead. The network draws its initialisation from the
    global RNG: build it under :func:`diffusiongym.utils.runtime.seeded` (as
    :meth:`Trainer.build <diffusiongym.trainers.base.Trainer.build>` does).
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {list(RESIDUALS)}, got {residual!r}")
    copier = getattr(env.model, "trainable_copy", None)
    if residual == "copy" and copier is None:
        raise ValueError(f"residual: 'copy' needs a base model with trainable_copy(), got {type(env.model).__name__}")
    if residual in ("copy", "auto") and copier is not None:
        return copier()
    shape = env.sample_shape
    if shape is None or len(shape) != 1:
        raise ValueError(
            f"env: the default residual MLP needs vector samples of shape (d,), got sample_shape={shape}; "
            "pass model=copy.deepcopy(base_model) (a trainable copy) or diffusiongym.add_lora(base_model) instead"
        )
    if not isinstance(env.model, nn.Module):
        raise TypeError(f"env.model: expected a torch.nn.Module to wrap, got {type(env.model).__name__}")
    mlp = TimeMLP(shape[0], shape[0], hidden=hidden, layers=layers, num_frequencies=num_frequencies, zero_init=True)
    return ResidualModel(env.model, mlp if residual == "plain" else ControlScaledNet(mlp, env))


class Segment(NamedTuple):
    """Paths on the grid from index ``start`` and their lean adjoints (regression data)."""

    states: Tensor  # (m + 1 - start, n, *shape)
    adjoint: Tensor  # (m + 1 - start, n, *shape)
    valid: Tensor  # (n,) bool
    cond: dict[str, Tensor]
    start: int


class AdjointMatching(Trainer):
    """Adjoint Matching trainer of a fine-tuned copy of the base model (see the module docstring).

    Parameters
    ----------
    task : Task, str or DiffusionEnvironment
        The problem (with an environment, ``reward`` is required). Training always uses its
        environment under the memoryless schedule (:attr:`env`).
    reward : Reward, optional
        Differentiable terminal reward (``reward.differentiable`` must be True).
    reward_scale : float, optional
        ``lambda`` in ``max E[lambda r(x1)] - KL``.
    model : nn.Module, optional
        The fine-tuned copy, in the base parameterisation (``copy.deepcopy(base)``,
        ``diffusiongym.add_lora(base)``, ...); its trainable parameters are optimised.
        Default: :func:`make_finetune_model` with ``config.residual``.
    config : AdjointMatchingConfig, optional
    device, dtype, **task_options
        As for every :class:`~diffusiongym.trainers.base.Trainer` (``steps``, ``t_start``, ...).
    """

    config_class = AdjointMatchingConfig
    config: AdjointMatchingConfig
    supports_sharding = True

    def setup(self, model: Any) -> None:
        check_differentiable_reward(self.task.reward)
        self._env = self.task.environment.as_memoryless()
        self.schedule = StepSchedule.build(self._env, self.times)
        if model is None:
            model = self.build(self._default_model, "model")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model: expected a torch.nn.Module in the base parameterisation, got {type(model).__name__}"
            )
        self.model = model.to(device=self.device)
        self.configure_optimizer(self.model)

    def _default_model(self) -> nn.Module:
        c = self.config
        model = make_finetune_model(self.env, c.hidden, c.layers, c.num_frequencies, c.residual)
        if isinstance(model, ResidualModel):
            model.net.to(dtype=self.dtype)  # the residual network in the trainer's precision
        return model

    @property
    def env(self) -> DiffusionEnvironment:
        """The task's environment under the memoryless schedule."""
        return self._env

    @property
    def policy(self) -> ModelControl:
        """The fine-tuned model's control ``u(x, t, **cond)`` against the base."""
        return ModelControl(self.model, self.env, self.task.action_scale)

    # ---------------------------------------------------------------- regression data
    def rollout(
        self,
        cond: dict[str, Tensor],
        num_samples: int | None = None,
        x: Tensor | None = None,
        start: int = 0,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        """Paths of the current model on the grid from index ``start`` (``num_samples`` fresh
        ones, or from states ``x``), storing what :meth:`segment` needs (``generator``: default
        the trainer's)."""
        store = ("states",) if self.config.likelihood_ratio is None else ("states", "noises", "controls")
        return sample(
            self.env,
            num_samples,
            x=x,
            grid=self.times[start:],
            control=self.policy,
            reward=self.task.reward,
            reward_scale=self.task.reward_scale,
            cond=cond,
            generator=self.generator if generator is None else generator,
            store=store,
            device=self.device,
            dtype=self.dtype,
            compile=self.config.compile,
        )

    def segment(
        self, traj: Trajectory, cond: dict[str, Tensor], start: int = 0, generator: torch.Generator | None = None
    ) -> Segment:
        """The lean adjoint along a :meth:`rollout` (with likelihood-ratio steps if configured)."""
        theta = self.config.likelihood_ratio
        options: dict[str, Any] = {}
        if theta is not None:
            options = {
                "likelihood_ratio": theta,
                "noises": traj.noises,
                "cost_to_go": traj.cost_to_go,
                "controls": traj.controls,
                "generator": self.generator if generator is None else generator,
            }
        adjoint, valid = lean_adjoint(
            self.env, traj.states, self.times[start:], self.task.reward, self.task.reward_scale, cond, **options
        )
        return Segment(traj.states, adjoint, valid & traj.valid, cond, start)

    def restart(self, states: Tensor, cond: dict[str, Tensor], generator: torch.Generator | None = None) -> Segment:
        """A segment of ``restarts * n`` paths (``n`` paths in ``states``) from mixup states of
        ``states`` at one random grid index ``k`` with ``t_k >= restart_after`` (:mod:`.restarts`)."""
        c = self.config
        gen = self.generator if generator is None else generator
        first = first_restart_index(self.schedule.t, c.restart_after)
        k, x, rows = mixup_states(states, first, max(1, round(c.restarts * states.shape[1])), gen)
        sub = {name: v[rows] for name, v in cond.items()}
        return self.segment(self.rollout(sub, x=x, start=k, generator=gen), sub, k, generator=gen)

    def regression_pairs(self, segments: list[Segment]) -> dict[str, Any]:
        """All ``(x_k^i, t_k, target)`` pairs of an iteration's segments, flattened: grid times
        ``start .. m - 1`` of their valid paths. Returns one row per pair in ``x``, ``t``,
        ``sigma``, ``factor`` (``coef_out / sigma``), ``target`` (``-sigma a``), ``k`` (grid
        index) and ``cond`` (a dict)."""
        parts = []
        for seg in segments:
            x = seg.states[:-1, seg.valid]  # (steps, n_valid, *shape)
            steps, n = x.shape[:2]
            shape = x.shape[2:]
            s = self.schedule
            per_k = {
                "t": s.t[seg.start :],
                "sigma": s.sigma[seg.start :],
                "factor": [c / g for c, g in zip(s.coef_out[seg.start :], s.sigma[seg.start :])],
            }
            col = {
                name: torch.tensor(v, dtype=x.dtype, device=x.device).repeat_interleave(n) for name, v in per_k.items()
            }
            sig = col["sigma"].reshape(-1, *([1] * len(shape)))
            parts.append(
                {
                    "x": x.reshape(steps * n, *shape),
                    "target": -sig * seg.adjoint[:-1, seg.valid].reshape(steps * n, *shape),
                    "k": torch.arange(seg.start, seg.start + steps).repeat_interleave(n).to(x.device),
                    **col,
                    "cond": {name: v[seg.valid].repeat(steps, *([1] * (v.ndim - 1))) for name, v in seg.cond.items()},
                }
            )
        pairs: dict[str, Any] = {
            name: torch.cat([p[name] for p in parts]) for name in ("x", "target", "k", "t", "sigma", "factor")
        }
        pairs["cond"] = {name: torch.cat([p["cond"][name] for p in parts]) for name in parts[0]["cond"]}
        return pairs

    # ------------------------------------------------------------------- the update
    def loss_times(self) -> Tensor:
        """Grid indices ``k`` the loss uses this gradient step (sorted, ``(K,)``): the last
        ``always_last`` and a random subset of the rest."""
        m, c = len(self.schedule), self.config
        if c.loss_times is None or c.loss_times >= m:
            return torch.arange(m)
        last = min(c.always_last, c.loss_times)
        rest = torch.randperm(m - last, generator=self.shared_generator(), device=self.device).cpu()
        rest = rest[: c.loss_times - last]
        return torch.cat([rest.sort().values, torch.arange(m - last, m)])

    def loss(self, pairs: dict[str, Any] | list[dict[str, Any]]) -> Tensor:
        """``mean w(t_k) |u_theta(x_k^i, t_k) + sigma(t_k) a_k^i|^2`` over the pairs at this
        step's :meth:`loss_times`, then over a random minibatch of ``minibatch_size`` of them
        (with shards, a list of each shard's pairs: ``minibatch_size / rollout_shards`` from
        each, the mean taken over all shards' rows on every rank)."""
        shards = pairs if isinstance(pairs, list) else [pairs]
        times = self.loss_times()
        mb = self.config.minibatch_size
        mb = None if mb is None else self.shard_size(mb, "minibatch_size")
        picked = []
        for gen, part in zip(self.shard_generators(), shards):
            rows = torch.isin(part["k"], times.to(part["k"].device)).nonzero().squeeze(1)
            if mb is not None and mb < rows.numel():
                rows = rows[torch.randperm(rows.numel(), generator=gen, device=self.device)[:mb].to(rows.device)]
            picked.append({name: part[name][rows] for name in ("x", "t", "target", "factor", "sigma")})
            picked[-1]["cond"] = {name: v[rows] for name, v in part["cond"].items()}
        sel = {name: torch.cat([p[name] for p in picked]) for name in ("x", "t", "target", "factor", "sigma")}
        x, t, target = sel["x"], sel["t"], sel["target"]
        factor = sel["factor"].reshape(-1, *([1] * (x.ndim - 1)))
        cond = {name: torch.cat([p["cond"][name] for p in picked]) for name in picked[0]["cond"]}
        with torch.no_grad():
            base = self.env.model(x, t, **cond)
        u = output_control(self.model(x, t, **cond), base, factor)
        weight = time_weights(sel["sigma"], self.config.time_weight)
        return global_mean_loss(weight * ((u - target) ** 2).reshape(x.shape[0], -1).sum(1))

    def update(self, pairs: dict[str, Any] | list[dict[str, Any]]) -> Tensor:
        """One gradient step on :meth:`loss`; returns the loss (detached, 0-d: no host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(pairs)
        loss.backward()
        if self.config.max_grad_norm is not None or self.sharded:  # (also averages over ranks)
            self.clip_gradients(self.model.parameters())
        self.optimizer.step()
        return loss.detach()

    def _step(self) -> dict[str, float]:
        c = self.config
        n = self.shard_size(c.batch_size)
        trajs, pairs = [], []
        for gen in self.shard_generators():  # each shard's paths, adjoints and restarts from its generator
            cond = self.conditioning(n, gen)
            with self.eval_mode():  # the paths are the policy's samples: no dropout
                traj = self.rollout(cond, num_samples=n, generator=gen)
                batch = self.segment(traj, cond, generator=gen)
                segments = [batch, self.restart(traj.states, cond, gen)] if c.restarts > 0 else [batch]
            pairs.append(self.regression_pairs(segments))
            trajs.append(dataclasses.replace(traj, valid=batch.valid))
        self.model.train()
        traj = cat_trajectories(trajs)
        any_valid = bool(all_sum(traj.valid.sum()) > 0)
        losses = [self.update(pairs) for _ in range(c.updates_per_iteration if any_valid else 0)]
        metrics = trajectory_metrics(traj, self.task, gather=True)
        return {"loss": sum(losses) / len(losses) if losses else float("nan"), **metrics}

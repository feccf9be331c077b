"""Value Matching: learn the cost-to-go ``V(x, t)`` and steer with ``u = -sigma grad_x V``.

Gradient-free in the reward (``docs/maths.md``, Value Matching). With ``lambda = reward_scale``,
step sizes ``h_k`` and the current control ``u_k = -sigma(t_k) grad V(x_k, t_k)``, each
iteration (:meth:`ValueMatching._step`)

1. samples ``n`` trajectories ``x_0..x_m`` with the current :class:`ValuePolicy`;
2. forms the observed cost-to-go ``C_k = sum_{i >= k} 1/2 |u_i|^2 h_i - lambda r(x_m)``
   (detached) at every grid point ``k = 0..m``;
3. regresses ``V(x_k, t_k)`` onto ``C_k`` with the weighted loss
   ``mean_k w_k (V(x_k, t_k) - C_k)^2``, ``w_k ∝ 1 / (1 + 1/2 int_{t_k}^1 sigma^2 dt)``
   (the variance of ``C_k`` grows with the noise still to come), on minibatches drawn from
   the newest trajectories and ``config.replay`` older batches.

The regression target is the cost-to-go *of the current control*, so this is approximate
policy iteration; its fixed point is ``V = V*`` (then ``u = u*``). Only reward *values* are
used: non-differentiable rewards work.

``config.target = "soft"`` fits ``V*`` itself instead, from the samples of any control. Add
to ``C_k`` the zero-mean terms ``sqrt(h_i) u_i . z_i`` of the steps ``i >= k`` (``z_i`` the
step's standard normal): ``T_k = -log (dP_base / dP_u)(x_k..x_m) - lambda r(x_m)``
(:func:`~diffusiongym.logprob.step_log_ratios`). Then ``E_u[exp(-T_k) | x_k] =
E_base[exp(lambda r) | x_k] = exp(-V*(x_k))`` exactly (importance sampling), so the loss
``f(V - T_k)``, ``f(d) = exp(d) - d - 1``, is minimised by ``V = V*`` whatever ``u`` sampled
the data: no policy iteration, and older samples in the replay buffer stay exact targets.
At the optimum ``T_k = V*(x_k)`` on every path, so the targets' variance falls as the control
improves (``docs/maths.md``, Value Matching).

:class:`ValueMatching` follows the :class:`~diffusiongym.trainers.base.Trainer` contract; its
checkpoints (:meth:`~diffusiongym.trainers.base.Trainer.save`) also hold the replay buffer,
and :func:`load_value_policy` rebuilds the trained policy from one without a trainer. The
digits recipe lives in :mod:`diffusiongym.trainers.value_matching_digits`.

The value networks themselves (the default one, and the spec a checkpoint rebuilds them
from) are in :mod:`diffusiongym.policies.value_nets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusiongym.distributed.collectives import all_sum, global_mean_loss
from diffusiongym.distributed.sampling import cat_trajectories
from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.value import ValuePolicy
from diffusiongym.policies.value_nets import build_value_net, default_value_net, value_net_spec
from diffusiongym.sampling import sample
from diffusiongym.trainers.base import Trainer, TrainerConfig, trajectory_metrics
from diffusiongym.trainers.checkpoint import CheckpointError, check_state, read_checkpoint
from diffusiongym.trainers.replay_buffer_state import ReplayBufferState
from diffusiongym.trainers.value_targets import (
    TARGETS,
    TIME_WEIGHTINGS,
    soft_center,
    soft_loss,
    soft_targets,
    time_weights,
)
from diffusiongym.utils.validation import check_positive_int

__all__ = [
    "ValueMatching",
    "ValueMatchingConfig",
    "build_value_net",
    "default_value_net",
    "load_value_policy",
    "time_weights",
    "value_net_spec",
]


@dataclass
class ValueMatchingConfig(TrainerConfig):
    """Hyper-parameters of :class:`ValueMatching` (shared fields: :class:`TrainerConfig`).

    Attributes
    ----------
    iterations, lr_schedule, lr_final_factor, max_grad_norm
        Shared fields with Value Matching's defaults (200, ``"cosine"``, 0.1, 1.0).
    updates_per_iteration : int
        Gradient steps on the regression loss per iteration.
    minibatch_size : int
        ``(x_k, t_k, C_k)`` triples per gradient step (drawn from all ``m + 1`` grid points
        of the buffered trajectories).
    replay : int
        How many past iterations' trajectories stay in the buffer besides the newest
        (0: on-policy regression only). Older targets are costs-to-go of older controls.
    time_weighting : {"variance", "uniform"}
        Per-time weight of the loss (see :func:`time_weights`).
    target : {"cost_to_go", "soft"}
        ``"cost_to_go"``: the squared loss onto ``C_k``, the current control's expected
        cost-to-go (policy iteration). ``"soft"``: the loss ``exp(d) - d - 1`` of ``d = V -
        T_k`` onto the importance-weighted targets ``T_k``, minimised by ``V*`` itself (module
        docstring). On the digits row, with a flattened value head, the soft target closes
        0.909 of the gap (3 seeds) where the squared one diverged (KL 49).
    center_targets : bool
        Regress onto ``C_k - c_k``, ``c_k`` the mean cost-to-go of the buffered trajectories
        at grid time ``k`` (for ``target="soft"``: the soft mean ``-log mean exp(-T_k)``, so
        that a zero network starts at the right constant), recomputed every iteration over
        every shard. ``c_k`` depends on
        ``t`` only, so ``grad_x V`` and the control are those of the uncentred fixed point;
        the network learns the variation of ``V`` in ``x`` instead of first spending its
        steps on an offset (on the digits row, ``r = log p(3 | x)`` puts ``C ~ 20`` with
        spread ~8: uncentred, 40 iterations left the control at zero). ``V`` itself is then
        the cost-to-go up to a function of ``t`` (a :class:`~diffusiongym.guidance.ValueTwist`
        built on it shifts ``log Z`` by that function's ``t_0`` value).
    """

    iterations: int = 200
    lr_schedule: str = "cosine"
    lr_final_factor: float = 0.1
    max_grad_norm: float | None = 1.0
    updates_per_iteration: int = 8
    minibatch_size: int = 2048
    replay: int = 0
    time_weighting: str = "variance"
    target: str = "cost_to_go"
    center_targets: bool = False

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"time_weighting": TIME_WEIGHTINGS, "target": TARGETS}

    def validate(self) -> None:
        super().validate()
        for name in ("updates_per_iteration", "minibatch_size"):
            check_positive_int(name, getattr(self, name))
        if self.replay < 0:
            raise ValueError(f"replay: expected a non-negative integer, got {self.replay!r}")


class ValueMatching(ReplayBufferState, Trainer):
    """Value Matching trainer (see the module docstring).

    Parameters
    ----------
    task : Task, str or DiffusionEnvironment
        The problem; its environment needs a stochastic noise (``sigma > 0``; memoryless
        for the exact optimum) and a ``sample_shape``. Conditioning (e.g. class labels) is
        drawn afresh every iteration from the task's samplers.
    reward, reward_scale
        Override the task's (only reward *values* are used).
    model : nn.Module, optional
        The value network ``V(x, t, **cond) -> (n,)`` or ``(n, 1)``, trained in place
        (moved to ``device`` and ``dtype``). Default: :func:`default_value_net`, initialised
        from ``config.seed``. A zero head starts at the base model (``u = 0``).
    config : ValueMatchingConfig, optional
    device, dtype, **options
        See :class:`~diffusiongym.trainers.base.Trainer`.

    Attributes
    ----------
    model : nn.Module
        The value network.
    policy : ValuePolicy
        ``u = -sigma grad V`` (shares :attr:`model`; ``action_scale`` from the task).
    buffer : list of dict
        The replay buffer: per kept iteration ``states`` ``(m + 1, N, *shape)``,
        ``cost_to_go`` ``(m + 1, N)`` (the targets: ``C_k``, or ``T_k`` for ``target="soft"``)
        and ``cond`` (``N`` valid samples), and ``counts``, the valid samples of each of this
        process's shards (``N`` = their sum; minibatches of shard ``s`` are drawn from its own
        samples).
    """

    config_class = ValueMatchingConfig
    config: ValueMatchingConfig
    supports_sharding = True

    def setup(self, model: nn.Module | None) -> None:
        env = self.env
        if env.sample_shape is None:
            raise ValueError("task: expected an environment with a sample_shape")
        if model is None:
            model = self.build(lambda: default_value_net(tuple(env.sample_shape), env.scheduler), "value_net")
        elif not isinstance(model, nn.Module):
            raise TypeError(
                f"model: expected an nn.Module value network V(x, t, **cond) -> (n,), got {type(model).__name__}"
            )
        self.model = model.to(device=self.device, dtype=self.dtype)
        self._policy = ValuePolicy(self.model, env, action_scale=self.task.action_scale)
        self.weights = time_weights(env, self.times, self.config.time_weighting)
        self.configure_optimizer(self.model)
        self.buffer: list[dict[str, Any]] = []

    @property
    def policy(self) -> ValuePolicy:
        return self._policy

    # ------------------------------------------------------------------ training
    def _step(self) -> dict[str, float]:
        cfg = self.config
        soft = cfg.target == "soft"
        m1 = self.task.steps + 1
        times = self.times.to(self.device, self.dtype)
        weights = self.weights.to(self.device, self.dtype)

        # 1. roll out the current control u = -sigma grad V (no graph kept), shard by shard
        self.model.eval()
        gens = self.shard_generators()
        n = self.shard_size(cfg.batch_size)
        trajs, entries = [], []
        for gen in gens:
            cond = self.conditioning(n, gen)
            traj = sample(
                self.env,
                n,
                grid=self.times,
                control=self.policy,
                reward=self.task.reward,
                reward_scale=self.task.reward_scale,
                cond=cond,
                generator=gen,
                store=("states", "controls", "noises") if soft else ("states",),
                device=self.device,
                dtype=self.dtype,
                compile=cfg.compile,
            )
            valid = traj.valid
            trajs.append(traj)
            targets = soft_targets(traj) if soft else traj.cost_to_go
            entries.append(
                {
                    "states": traj.states[:, valid].to(self.dtype),
                    "cost_to_go": targets[:, valid].to(self.dtype),  # (m + 1, N), detached
                    "cond": {k: v[valid] for k, v in cond.items()},
                }
            )
        self.buffer.append(
            {
                "states": torch.cat([e["states"] for e in entries], 1),
                "cost_to_go": torch.cat([e["cost_to_go"] for e in entries], 1),
                "cond": {k: torch.cat([e["cond"][k] for e in entries]) for k in entries[0]["cond"]},
                "counts": [e["cost_to_go"].shape[1] for e in entries],
            }
        )
        self.buffer = self.buffer[-(cfg.replay + 1) :]

        # 2. the regression set of each shard: every grid point of its buffered trajectories
        shards = [self._shard_data(j) for j in range(len(gens))]
        total = int(all_sum(torch.tensor([sum(d[2].shape[1] for d in shards)])).item())
        if cfg.center_targets and total > 0:
            offset = soft_center(shards, total) if soft else all_sum(sum(d[2].sum(1) for d in shards)) / total
            shards = [(states, conds, targets - offset[:, None]) for states, conds, targets in shards]
        per_shard = self.shard_size(cfg.minibatch_size, "minibatch_size")

        # 3. weighted regression of V(x_k, t_k) onto C_k
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses, norms = [], []
        for _ in range(cfg.updates_per_iteration if total > 0 else 0):
            xs, ks, ys, cs = [], [], [], []
            for gen, (states, conds, targets) in zip(gens, shards):
                num = states.shape[1]
                if num == 0:
                    continue
                flat = torch.randint(m1 * num, (per_shard,), generator=gen, device=self.device)
                k, i = flat // num, flat % num
                xs.append(states[k, i])
                ks.append(k)
                ys.append(targets[k, i])
                cs.append({key: value[i] for key, value in conds.items()})
            k = torch.cat(ks) if ks else torch.zeros(0, dtype=torch.long, device=self.device)
            x = torch.cat(xs) if xs else shards[0][0][0, :0]
            cond_mb = {key: torch.cat([c[key] for c in cs]) for key in (cs[0] if cs else {})}
            pred = self.policy.value(x, times[k], **cond_mb)
            target = torch.cat(ys) if ys else pred.detach()[:0]
            loss = global_mean_loss(weights[k] * (soft_loss(pred - target) if soft else (pred - target) ** 2))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(self.clip_gradients(params))
            self.optimizer.step()
            losses.append(loss.detach())
        self.model.eval()

        nan = float("nan")
        metrics = trajectory_metrics(cat_trajectories(trajs), self.task, gather=True)
        metrics["loss"] = sum(losses) / len(losses) if losses else nan
        metrics["grad_norm"] = sum(norms) / len(norms) if norms else nan
        return metrics

    def _shard_data(self, j: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """States ``(m + 1, N_j, *shape)``, conditioning and costs-to-go ``(m + 1, N_j)`` of
        this process's ``j``-th shard over the buffered iterations."""
        parts = []
        for entry in self.buffer:
            start = sum(entry["counts"][:j])
            stop = start + entry["counts"][j]
            parts.append(
                (entry["states"][:, start:stop], entry["cond"], entry["cost_to_go"][:, start:stop], start, stop)
            )
        states = torch.cat([p[0] for p in parts], 1)
        conds = {k: torch.cat([p[1][k][p[3] : p[4]] for p in parts]) for k in self.buffer[-1]["cond"]}
        return states, conds, torch.cat([p[2] for p in parts], 1)


def load_value_policy(
    path: str | Path, env: DiffusionEnvironment, value_net: nn.Module | None = None, device: str | torch.device = "cpu"
) -> ValuePolicy:
    """The trained :class:`ValuePolicy` from a :meth:`ValueMatching.save` checkpoint folder.

    Parameters
    ----------
    path : str or Path
        The checkpoint folder.
    env : DiffusionEnvironment
        The base environment (``sigma(t)`` and, for :class:`SignalScaled`, the scheduler);
        its ``sample_shape`` must be the checkpoint task's.
    value_net : nn.Module, optional
        An untrained network of the saved architecture to load into (required for other
        networks than :class:`TimeMLP` / :class:`TimeCNN`, optionally in
        :class:`SignalScaled`, which are rebuilt from the saved spec, and for networks with
        frozen parameters, which the checkpoint does not hold).
    device : str or torch.device

    Returns
    -------
    ValuePolicy
        In eval mode, ``action_scale`` of the checkpoint's task.
    """
    meta, tensors = read_checkpoint(path)
    where = Path(path) / "trainer.json"
    if meta.get("method") != ValueMatching.__name__:
        raise CheckpointError(f"{where}: method: expected a ValueMatching checkpoint, got {meta.get('method')!r}")
    if not isinstance(env, DiffusionEnvironment):
        raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
    shape = (meta.get("task") or {}).get("sample_shape")
    if env.sample_shape is None or list(env.sample_shape) != shape:
        raise ValueError(f"env: the checkpoint's task has sample_shape {shape}, env has {env.sample_shape}")
    extra = meta.get("extra") or {}
    frozen = set((meta.get("modules") or {}).get("model", []))
    if value_net is None:
        if frozen:
            raise ValueError(
                f"value_net: the checkpoint leaves out frozen parameters {sorted(frozen)[:5]}; pass a network holding them"
            )
        value_net = build_value_net(extra.get("value_net"), env.scheduler, source=f"{where}: extra.value_net")
    elif not isinstance(value_net, nn.Module):
        raise TypeError(f"value_net: expected an nn.Module, got {type(value_net).__name__}")
    prefix = "module.model."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    check_state(f"{where}: module 'model'", value_net, state, frozen)
    value_net.load_state_dict(state, strict=False)
    value_net.to(device).eval()
    return ValuePolicy(value_net, env, action_scale=float(extra.get("action_scale", 1.0)))

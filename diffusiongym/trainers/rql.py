"""Reversal Q-Learning (RQL): each flow (denoising) step of a flow policy is an RL action.

Oberai, Park, Levine (2026), "Reversal Q-Learning"; the maths (flow reversal, the shared TD
target of every flow step, the stepwise policy loss, the ``bc_reversal`` choices and the
``alpha`` scale) is in ``docs/maths.md``, "Reversal Q-Learning". One iteration
(:meth:`RQL.update`): reverse a batch of data actions through the flow, regress ``V(s, x^f, f)``
on ``r + gamma (1 - done) V_target(s', x'^0, 0)`` at every ``f`` (Huber, Polyak target), and,
every ``policy_delay`` updates after ``value_warmup``, step the policy on
``-V(s, x^f + v h_f, f + 1) + alpha w_f |v - (x^{f+1} - x^f) / h_f|^2`` (step weights ``w_f``:
``config.bc_weighting``, :meth:`RQL._bc_step_weights`; 1 by default).

Construction: ``RQL(task, config=..., steps=10)`` in the diffusion gym (the flow runs on the
task's grid; default model :func:`~diffusiongym.trainers.flow_diffusion.diffusion_policy`, default
data :func:`~diffusiongym.trainers.flow_diffusion.diffusion_dataset`), or
``RQL(OfflineTask(data), model=FlowPolicy(...), config=...)`` for any offline data set (e.g. a
Gymnasium Box env's, :func:`~diffusiongym.trainers.offline_data.collect_dataset`). The flow
policy, its reversal and BC live in :mod:`~diffusiongym.trainers.flow_policy`, the data in
:mod:`~diffusiongym.trainers.offline_data`, the diffusion-gym glue in
:mod:`~diffusiongym.trainers.flow_diffusion`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusiongym.distributed.collectives import all_mean
from diffusiongym.sampling import Trajectory
from diffusiongym.trainers.base import Trainer, TrainerConfig, make_lr_scheduler, make_optimizer
from diffusiongym.trainers.checkpoint import CheckpointError, check_state
from diffusiongym.trainers.rql_config import RQLConfig
from diffusiongym.trainers.flow_diffusion import (
    FlowDrift,
    diffusion_base,
    diffusion_dataset,
    diffusion_policy,
    terminal_metrics,
)
from diffusiongym.trainers.flow_policy import FlowPolicy, FlowValue
from diffusiongym.trainers.offline_data import OfflineDataset, OfflineTask
from diffusiongym.utils.validation import check_positive_int

__all__ = ["RQL", "RQLConfig"]


class RQL(Trainer):
    """Reversal Q-Learning on a diffusion task or on an offline data set (module docstring).

    Parameters
    ----------
    task : Task, str, DiffusionEnvironment or OfflineTask
        A diffusion task (unconditional, vector samples), or an :class:`OfflineTask` (a data
        set alone) for general offline RL.
    reward, reward_scale
        As for every trainer (diffusion tasks only).
    model : FlowPolicy, optional
        Trained in place. Default on diffusion tasks: :func:`diffusion_policy` on the task's
        grid (built reproducibly from ``config.seed``); required for an :class:`OfflineTask`.
    config : RQLConfig, optional
    dataset : OfflineDataset, optional
        Diffusion tasks only: the transitions ``(s = [], x1, reward_scale * r(x1), done = 1)``
        (default: ``config.dataset_size`` base samples, :func:`diffusion_dataset`).
    device, dtype, **task_options
        As for every trainer.

    Attributes
    ----------
    model : FlowPolicy
    initial_model : FlowPolicy
        Frozen copy of the model at construction (the ``"initial"`` BC reversal).
    value, value_target : FlowValue
    dataset : OfflineDataset
    """

    config_class: ClassVar[type[TrainerConfig]] = RQLConfig
    #: the schedules span each network's own updates (the policy's start after ``value_warmup``)
    lr_schedule_unit: ClassVar[str] = "update"
    supports_sharding = True
    config: RQLConfig

    def setup(self, model: FlowPolicy | None, *, dataset: OfflineDataset | None = None) -> None:
        """Build the flow policy, its frozen initial copy, the value networks and the optimisers."""
        if dataset is not None and not isinstance(dataset, OfflineDataset):
            raise TypeError(f"dataset: expected an OfflineDataset, got {type(dataset).__name__}")
        if model is not None and not isinstance(model, FlowPolicy):
            raise TypeError(f"model: expected a FlowPolicy, got {type(model).__name__}")
        dtype = self.dtype
        cfg = self.config
        self.offline = isinstance(self.task, OfflineTask)
        if self.offline:
            if dataset is not None:
                raise TypeError("dataset: an OfflineTask carries its own dataset; do not pass another")
            data = self.task.dataset
            if model is None:
                raise TypeError(
                    "model: required for an OfflineTask (a FlowPolicy over the dataset's states and actions)"
                )
        else:
            if model is None:
                model = self.build(
                    lambda: diffusion_policy(self.task, None, cfg.policy_hidden, cfg.policy_layers), "policy"
                )
            else:
                diffusion_base(self.task)  # checks the task is one RQL supports
            grid = self.times
            if (
                model.state_dim != 0
                or model.times.shape != grid.shape
                or not torch.allclose(model.times.detach().cpu().double(), grid, atol=1e-6)
            ):
                raise ValueError(
                    f"model: expected an unconditional FlowPolicy on the task's grid ({self.task.steps} steps from {self.task.t_start})"
                )
            if dataset is None:
                dataset = diffusion_dataset(
                    self.task,
                    cfg.dataset_size,
                    seed=self.init_seed("dataset"),
                    noise=cfg.dataset_noise,
                    steps=cfg.dataset_steps,
                )
            data = dataset
        if (data.state_dim, data.action_dim) != (model.state_dim, model.action_dim):
            raise ValueError(
                f"dataset: expected states of dim {model.state_dim} and actions of dim {model.action_dim}, got {data.state_dim} and {data.action_dim}"
            )
        self.dataset = data.to(self.device, dtype)
        self._dataset_fingerprint = self.dataset.fingerprint()
        self.model = model.to(device=self.device, dtype=dtype)
        self.initial_model = self.model.frozen_copy()
        self.value = self.build(
            lambda: FlowValue(model.action_dim, model.state_dim, model.flow_steps, cfg.value_hidden, cfg.value_layers),
            "value",
        ).to(device=self.device, dtype=dtype)
        self.value_target = copy.deepcopy(self.value).requires_grad_(False)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg, total=self.policy_updates(cfg.iterations))
        self.value_optimizer = make_optimizer(self.value.parameters(), cfg)
        self.value_lr_scheduler = make_lr_scheduler(self.value_optimizer, cfg)
        self._drift = FlowDrift(self.model)
        self._bc_paths: Tensor | None = None
        self.bc_weights = self._bc_step_weights()

    def _bc_step_weights(self) -> Tensor:
        """Weight of each flow step's BC term, shape ``(F,)``, mean 1 (``config.bc_weighting``).

        ``"memoryless"``: ``(1 / sigma^2(t))^p`` (``p = config.bc_weight_power``) of the task's
        memoryless noise at the step's midpoint (``sigma^2 = 2 eta``; ``1 / sigma^2 = t / (2 (1 - t))``
        on the linear path). ``1 / sigma^2`` is the rate at which a drift change costs path KL in the
        SDE with the flow's marginals: changes late in the flow (which move samples within or off
        the base's modes) cost far more KL than early ones (which reroute mass between modes, as
        the tilt ``p*`` does); ``p = 2`` sharpens that contrast (measured in ``rql_config.diffusion_recipe``)."""
        fs = self.model.flow_steps
        if self.config.bc_weighting == "uniform":
            return torch.ones(fs, device=self.device, dtype=self.dtype)
        if self.offline:
            raise ValueError("bc_weighting: 'memoryless' needs a diffusion task's scheduler; use 'uniform' offline")
        times = self.model.times.detach().double().cpu()
        mid = 0.5 * (times[1:] + times[:-1])
        eta = self.task.environment.scheduler.eta(mid).clamp_min(1e-12)
        w = (1.0 / (2.0 * eta)) ** self.config.bc_weight_power
        return (w / w.mean()).to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------- pieces
    def policy_updates(self, iterations: int) -> int:
        """Policy updates in the first ``iterations`` iterations (``value_warmup``, ``policy_delay``)."""
        warm, delay = self.config.value_warmup, self.config.policy_delay
        first = -(-warm // delay) * delay  # the first multiple of policy_delay >= value_warmup
        return 0 if iterations <= first else (iterations - 1 - first) // delay + 1

    def _policy_step_due(self) -> bool:
        return self.iteration >= self.config.value_warmup and self.iteration % self.config.policy_delay == 0

    def td_targets(self, batch: dict[str, Tensor]) -> Tensor:
        """Value targets for every flow index, shape ``(F + 1, n)``.

        ``y = r + gamma (1 - done) V_target(s', x'^0, 0)`` for all ``f``; with
        ``chain_discount`` (ablation) row ``f`` is ``gamma^{F - f} y``.
        """
        with torch.no_grad():
            s2 = batch["s2"]
            x0 = self._per_shard(s2.shape[0], lambda gen, k: self.model.noise(k, gen), dim=0)
            boot = self.value_target(s2, x0, 0)
            y = batch["r"] + self.config.gamma * (1.0 - batch["done"]) * boot
            fs = self.model.flow_steps
            if self.config.chain_discount:
                powers = torch.arange(fs, -1, -1, dtype=y.dtype, device=y.device)
                return (self.config.gamma**powers)[:, None] * y
            return y.expand(fs + 1, -1)

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One value update (and a policy update every ``policy_delay`` iterations after
        ``value_warmup``) on ``batch`` (keys of :meth:`OfflineDataset.batch`, optionally
        ``bc_path`` ``(F + 1, n, d)``); returns metrics."""
        cfg, pol = self.config, self.model
        s, a = batch["s"], batch["a"]
        n, fs, d = a.shape[0], pol.flow_steps, a.shape[1]
        with torch.no_grad():
            path = pol.reverse(s, a, iters=cfg.reversal_iters)  # (F + 1, n, d), virtual trajectory
        targets = self.td_targets(batch)

        # Value: one network over (s, x^f, f), f-free target (gamma only across real steps).
        f_val = self._flow_indices(n, fs + 1)  # (k, n) indices into 0..F
        x_val = path.gather(0, f_val[..., None].expand(-1, -1, d))
        v_pred = self.value(s.repeat(f_val.shape[0], 1), x_val.reshape(-1, d), f_val.reshape(-1).to(a.dtype))
        value_loss = F.huber_loss(v_pred, targets.gather(0, f_val).reshape(-1), delta=cfg.huber_delta)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.clip_gradients(self.value.parameters())
        self.value_optimizer.step()
        if self.value_lr_scheduler.last_epoch < cfg.iterations:
            self.value_lr_scheduler.step()
        with torch.no_grad():
            for p, pt in zip(self.value.parameters(), self.value_target.parameters()):
                pt.lerp_(p, cfg.tau)
        metrics = {
            "value_loss": float(value_loss.detach()),
            "v_mean": float(v_pred.detach().mean()),
            "target_mean": float(targets.mean()),
        }

        if self._policy_step_due():
            if cfg.bc_reversal == "initial":
                bc_path = batch["bc_path"] if "bc_path" in batch else self._initial_reversal(s, a)
            else:
                bc_path = path
            f_pol = self._flow_indices(n, fs)  # (k, n) indices into 0..F-1
            k = f_pol.shape[0]
            idx = f_pol[..., None].expand(-1, -1, d)
            h = pol.step_sizes()[f_pol].reshape(-1, 1)
            t = pol.times[f_pol].reshape(-1)
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
            bc = (self.bc_weights[f_pol].reshape(-1) * (v_bc - bc_step).pow(2).sum(1)).mean()
            scale = all_mean(q.detach().abs().mean()).clamp_min(1e-6) if cfg.normalize_q else 1.0
            policy_loss = -q.mean() / scale + cfg.alpha * bc
            self.optimizer.zero_grad(set_to_none=True)
            policy_loss.backward()
            self.clip_gradients(p for p in pol.parameters() if p.requires_grad)
            self.optimizer.step()
            if self.lr_scheduler.last_epoch < self.policy_updates(cfg.iterations):
                self.lr_scheduler.step()
            metrics.update(
                {
                    "policy_loss": float(policy_loss.detach()),
                    "q_hop": float(q.detach().mean()),
                    "bc": float(bc.detach()),
                }
            )
        return metrics

    @torch.no_grad()
    def _initial_reversal(self, s: Tensor, a: Tensor, chunk: int = 4096) -> Tensor:
        """Reversal of ``a`` by the frozen initial flow, ``(F + 1, n, d)``."""
        parts = [
            self.initial_model.reverse(s[i : i + chunk], a[i : i + chunk], iters=self.config.reversal_iters)
            for i in range(0, a.shape[0], chunk)
        ]
        return torch.cat(parts, dim=1)

    def _flow_indices(self, n: int, count: int) -> Tensor:
        """``(k, n)`` flow indices in ``0..count-1``: all of them, or ``flow_samples`` random ones."""
        k = self.config.flow_samples
        if k <= 0 or k >= count:
            return torch.arange(count, device=self.device)[:, None].expand(-1, n)
        return self._per_shard(n, lambda gen, m: torch.randint(count, (k, m), generator=gen, device=self.device), 1)

    def _per_shard(self, n: int, draw: Callable[[torch.Generator, int], Tensor], dim: int) -> Tensor:
        """``draw(generator, size)`` for each of this process's shards of ``n`` samples (in
        order), concatenated along ``dim``; one shard: ``draw(self.generator, n)``."""
        gens = self.shard_generators()
        if len(gens) == 1:
            return draw(gens[0], n)
        return torch.cat([draw(gen, n // len(gens)) for gen in gens], dim)

    def _step(self) -> dict[str, float]:
        if self.config.bc_reversal == "initial" and self._bc_paths is None:
            # computed here (not at construction) so that a resumed run computes it under the same flush mode
            self._bc_paths = self._initial_reversal(self.dataset.states, self.dataset.actions)
        size = self.shard_size(self.config.batch_size)
        parts = [self.dataset.batch(size, gen) for gen in self.shard_generators()]
        batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if self._bc_paths is not None:
            batch["bc_path"] = self._bc_paths[:, batch["idx"]]
        metrics = self.update(batch)
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise FloatingPointError(
                f"RQL diverged at iteration {self.iteration}: non-finite {', '.join(bad)}; raise alpha (or normalize_q / lower lr)"
            )
        return metrics

    # ------------------------------------------------------------------ acting
    @property
    def policy(self) -> FlowDrift:
        """The flow's velocity as a drift ``v(x, t, state=None)``: the *whole* drift of a
        diffusiongym env made with ``noise="ode"``, ``action_mode="drift"`` and the task's
        grid (``ControlAgent(trainer.policy, env)``; :func:`drift_agent` checks the env).
        Not a control: a deterministic flow has none (``sigma = 0``)."""
        return self._drift

    @torch.no_grad()
    def act(self, s: Tensor | None = None, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Actions ``x^F`` for states ``s`` ``(n, ds)`` (or ``n`` unconditional draws), shape ``(n, d)``."""
        return self.model.sample(s, n=n, generator=generator)

    def _require_diffusion(self, what: str) -> None:
        if self.offline:
            raise TypeError(
                f"{what}: an offline task has no environment or reward function; act with trainer.act(states) and roll out with evaluate_policy(env, trainer.model, episodes)"
            )

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0, **kwargs: Any) -> Trajectory:
        """``num_samples`` fresh flow samples (``x1``, reward, validity; no path KL: the flow
        is deterministic, ``running_cost`` is ``None``). No effect on training's RNG."""
        self._require_diffusion("sample")
        if kwargs:
            raise TypeError(f"sample: unexpected keyword arguments {sorted(kwargs)}")
        n = check_positive_int("num_samples", num_samples)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        x1 = self.model.sample(n=n, generator=gen)
        r, valid = self.task.reward(x1)
        return Trajectory(
            x1=x1,
            times=self.times,
            valid=valid & torch.isfinite(x1).all(1),
            reward=r,
            reward_scale=self.task.reward_scale,
        )

    def evaluate(self, num_samples: int = 4096, seed: int = 0) -> dict[str, float]:
        """``objective``, ``kl``, ``reward``, ``valid_fraction``, ``gap_closed`` of the draws of
        :meth:`sample` with the same ``seed``; ``kl`` is the exact terminal-law ``KL(q || p_base)``
        where the task has a mixture base, else NaN (see :func:`terminal_metrics`)."""
        self._require_diffusion("evaluate")
        return terminal_metrics(self.model, self.task, num_samples, seed)

    # -------------------------------------------------------------- checkpoints
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"policy": self.model, "value": self.value}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.optimizer, "value": self.value_optimizer}

    def lr_schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"policy": self.lr_scheduler, "value": self.value_lr_scheduler}

    def _frozen_modules(self) -> dict[str, nn.Module]:
        return {"value_target": self.value_target, "initial_policy": self.initial_model}

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The frozen networks (the target value network and the initial flow, the BC
        reference) and the data set's fingerprint (a resumed run must train on the same data)."""
        tensors = {
            f"{name}.{k}": v for name, module in self._frozen_modules().items() for k, v in module.state_dict().items()
        }
        return tensors, {"dataset": self._dataset_fingerprint}

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        if sorted(meta) != ["dataset"]:
            raise CheckpointError(f"extra: expected the key 'dataset', got {sorted(meta)[:5]}")
        if meta["dataset"] != self._dataset_fingerprint:
            raise CheckpointError(
                f"extra: dataset: the checkpoint was trained on {meta['dataset']}, this trainer has {self._dataset_fingerprint}"
            )
        staged = {}
        for name, module in self._frozen_modules().items():
            state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            check_state(f"extra: {name}", module, state)
            staged[name] = state
        leftover = sorted(k for k in tensors if k.split(".", 1)[0] not in staged)
        if leftover:
            raise CheckpointError(f"extra: unexpected tensors {leftover[:5]}")

        def apply() -> None:
            for name, module in self._frozen_modules().items():
                module.load_state_dict(staged[name])
            self._bc_paths = None  # the initial flow may have changed: reverse the data again

        return apply

    def task_fingerprint(self) -> dict[str, Any]:
        """The base's, plus the flow policy's architecture (grid, noise, sizes)."""
        return {**super().task_fingerprint(), "flow_policy": dict(self.model.spec)}

"""Saving and loading a trainer: the checkpoint half of the Trainer contract.

:class:`TrainerState` is a mixin of :class:`~diffusiongym.trainers.base.Trainer`. It writes
and reads one atomic checkpoint folder (format: :mod:`diffusiongym.trainers.checkpoint`) from
the hooks below, which a method overrides to save more: :meth:`~TrainerState.checkpoint_modules`,
:meth:`~TrainerState.optimizers`, :meth:`~TrainerState.lr_schedulers`,
:meth:`~TrainerState.generators` and :meth:`~TrainerState.extra_state` /
:meth:`~TrainerState.stage_extra_state` (e.g. the replay buffer of Value Matching, the round of
EFM). It relies on the trainer's ``task``, ``config``, ``iteration``, ``history``,
``optimizer``, ``lr_scheduler`` and ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from diffusiongym.distributed.group import barrier, is_main_process
from diffusiongym.trainers.checkpoint import (
    CheckpointError,
    check_header,
    read_checkpoint,
    stage_generators,
    stage_modules,
    stage_optimizers,
    write_checkpoint,
)
from diffusiongym.utils.io import frozen_parameter_names, optimizer_tensors

__all__ = ["TrainerState"]

_T = TypeVar("_T", bound="TrainerState")


class TrainerState:
    """:meth:`save` / :meth:`load` of a trainer and the hooks that say what a checkpoint holds."""

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules whose trainable state is saved (frozen parameters are left out)."""
        return {"model": self.model} if isinstance(getattr(self, "model", None), nn.Module) else {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer} if self.optimizer is not None else {}

    def lr_schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"optimizer": self.lr_scheduler} if self.lr_scheduler is not None else {}

    def generators(self) -> dict[str, torch.Generator]:
        return {"generator": self.generator}

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Method state beyond modules/optimisers/generators: ``(tensors, json_meta)``."""
        return {}, {}

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        """Validate :meth:`extra_state` output read from a checkpoint (raise on anything
        wrong, touching nothing) and return a function that applies it."""
        if tensors or meta:
            raise CheckpointError(
                f"extra: {type(self).__name__} keeps no extra state, got tensors {sorted(tensors)[:5]} and keys {sorted(meta)[:5]}"
            )
        return lambda: None

    def task_fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on with the live task."""
        t = self.task
        env = getattr(t, "environment", None)
        shape = (
            getattr(env, "sample_shape", None)
            if env is not None
            else getattr(getattr(t, "model", None), "sample_shape", None)
        )
        return {
            "name": str(getattr(t, "name", "")),
            "sample_shape": list(shape) if shape is not None else None,
            "parameterization": getattr(env, "parameterization", None),
            "reward": type(t.reward).__name__,
            "reward_scale": float(t.reward_scale),
            "steps": int(t.steps),
            "t_start": float(getattr(t, "t_start", 0.0)),
            "conditioning": sorted(getattr(t, "conditioning", {})),
        }

    def save(self, path: str | Path) -> Path:
        """Write an atomic checkpoint folder (see :mod:`diffusiongym.trainers.checkpoint`).

        In a process group call it on every rank: sharded state is gathered, rank 0 writes,
        and every rank returns once the folder is complete. It can be loaded under any world
        size that divides ``rollout_shards``."""
        tensors: dict[str, Tensor] = {}
        modules_meta: dict[str, list[str]] = {}
        for name, module in self.checkpoint_modules().items():
            frozen = frozen_parameter_names(module)
            modules_meta[name] = sorted(frozen)
            for key, value in module.state_dict().items():
                if key not in frozen:
                    tensors[f"module.{name}.{key}"] = value
        optim_meta = {}
        for name, opt in self.optimizers().items():
            opt_tensors, optim_meta[name] = optimizer_tensors(opt, prefix=f"optimizer-{name}")
            tensors.update(opt_tensors)
        for name, gen in self.generators().items():
            tensors[f"generator.{name}"] = gen.get_state()
        extra_tensors, extra_meta = self.extra_state()
        tensors.update({f"extra.{k}": v for k, v in extra_tensors.items()})
        meta = {
            "method": type(self).__name__,
            "config": self.config.to_dict(),
            "task": self.task_fingerprint(),
            "iteration": self.iteration,
            "history": self.history,
            "modules": modules_meta,
            "optimizers": optim_meta,
            "lr_schedulers": {name: s.state_dict() for name, s in self.lr_schedulers().items()},
            "extra": extra_meta,
        }
        if is_main_process():
            write_checkpoint(path, meta, tensors)
        barrier()
        return Path(path)

    def load(self: _T, path: str | Path) -> _T:
        """Restore a checkpoint of this method and task into this trainer; resume is exact.

        Everything is read and validated first; on any error (another method or task, other
        config, missing or misshapen tensors) the trainer is left exactly as it was and the
        error names the file and the field. Returns ``self``. In a process group every rank
        loads (each takes its own shards of sharded state).
        """
        meta, tensors = read_checkpoint(path)
        where = Path(path) / "trainer.json"
        apply = self._stage(meta, tensors, where)
        apply()
        return self

    def _stage(self, meta: dict[str, Any], tensors: dict[str, Tensor], where: Path) -> Callable[[], None]:
        iteration, history = check_header(meta, where, type(self).__name__, self.task_fingerprint(), self.config)
        used: set[str] = set()
        steps: list[Callable[[], None]] = []
        steps += stage_modules(self.checkpoint_modules(), meta.get("modules"), tensors, where, used)
        steps += stage_optimizers(self.optimizers(), self.lr_schedulers(), meta, tensors, where, used)
        steps += stage_generators(self.generators(), tensors, where, used)
        extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        used |= {f"extra.{k}" for k in extra}
        leftover = sorted(set(tensors) - used)
        if leftover:
            raise CheckpointError(f"{where}: weights: unexpected tensors {leftover[:5]}")
        try:
            steps.append(self.stage_extra_state(extra, meta.get("extra") or {}))
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: extra: {err}") from None

        def apply() -> None:
            for fn in steps:
                fn()
            self.iteration = iteration
            self.history = {k: [float(x) for x in v] for k, v in history.items()}

        return apply

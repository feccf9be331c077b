"""EFM's reference fit and control scale: what :class:`~diffusiongym.trainers.efm.EFMTrainer` adds
with ``EFMConfig(reference=True)`` and :meth:`ReferenceFit.select_control_scale`.

The reference is a second :class:`~diffusiongym.trainers.efm.EFMTrainer` on the same offline
samples with uniform weights (inverse temperature 0), stepped with the main one; the policy's
model is :class:`~diffusiongym.policies.delta.DeltaModel` ``base + scale (model - reference)``.
Its iterations use the seed of a standalone run with ``inverse_temperature=0.0``, so the pair is
exactly the two separate fits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.distributed.collectives import gather_cat, gather_offset
from diffusiongym.policies.control import ModelControl
from diffusiongym.policies.delta import DeltaModel
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.evaluation import trajectory_metrics
from diffusiongym.trainers.flow_matching import efm_weights
from diffusiongym.utils.runtime import seeded

__all__ = ["ReferenceFit"]


class ReferenceFit:
    """Mixin for :class:`~diffusiongym.trainers.efm.EFMTrainer` (placed before its other bases):
    the optional reference trainer, the :class:`DeltaModel` policy and their checkpoint state."""

    reference: Any
    delta: DeltaModel | None

    def _setup_reference(self, model: nn.Module, data: Any) -> None:
        cfg, env = self.config, self.env
        self.reference, self.delta = None, None
        if not cfg.reference:
            return
        if cfg.mode != "offline":
            raise ValueError("reference: the reference fit shares one offline data set; expected mode='offline'")
        # the same starting point, sharing the frozen base (and environment) with the model
        memo = {id(env.model): env.model, id(env): env}
        ref_config = replace(cfg, reference=False, inverse_temperature=0.0)
        self.reference = type(self)(
            self.task,
            model=copy.deepcopy(model, memo),
            config=ref_config,
            device=self.device,
            dtype=self.dtype,
            data=data,
        )
        self._set_delta(1.0)

    def _set_delta(self, scale: float) -> None:
        ref = None if self.reference is None else self.reference.model
        if self.delta is None:
            self.delta = DeltaModel(self.env.model, self.model, ref, scale)
            self._policy = ModelControl(self.delta, self.env, self.task.action_scale)
        else:
            self.delta.scale = scale

    def _reference_step(self, rd: dict[str, Any]) -> dict[str, float]:
        """One iteration of the reference on the main round's samples, uniformly weighted."""
        ref = self.reference
        if ref._round is None or ref._round["index"] != rd["index"]:
            valid = rd["valid"]
            g, _ = efm_weights(gather_cat(torch.zeros_like(valid, dtype=torch.float64)), gather_cat(valid))
            start, _ = gather_offset(valid.shape[0])
            ref._round = {**rd, "weights": g[start : start + valid.shape[0]].to(rd["x1"].device)}
        # the reference's optimiser and schedule are among this trainer's (stepped, synchronised
        # and saved with them); its iteration runs under the seed a standalone run would use
        ref.iteration = self.iteration
        with seeded(ref.init_seed("iteration", self.iteration), self.device):
            record = ref._step()
        return {"reference_loss": record["loss"]}

    def select_control_scale(self, scales: Sequence[float], num_samples: int, seed: int) -> dict[float, float]:
        """Set the policy's control scale (``u = scale * coef_out (model - reference) / sigma``)
        to the one in ``scales`` with the highest sampled objective ``lambda E[r] - KL``.

        Every scale is sampled with the same ``seed`` (common random numbers); use a seed
        other than the evaluation's. Needs no oracle. Returns ``{scale: objective}``."""
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
            raise ValueError(f"scales: expected a non-empty sequence of finite numbers, got {scales!r}")
        table: dict[float, float] = {}
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"scales: expected finite numbers, got {s!r}")
            self._set_delta(float(s))
            with torch.no_grad():
                traj = self.sample(num_samples, seed)
            table[float(s)] = trajectory_metrics(traj, self.task, gather=True)["objective"]
        finite = {s: v for s, v in table.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"select_control_scale: no scale gave a finite objective: {table}")
        self._set_delta(max(finite, key=finite.__getitem__))
        return table

    @property
    def control_scale(self) -> float:
        """The policy's control scale (``1`` until :meth:`select_control_scale` sets another)."""
        return 1.0 if self.delta is None else self.delta.scale

    # ------------------------------------------------------------- checkpoint hooks
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        extra = {} if self.reference is None else {"reference": self.reference.model}
        return {**super().checkpoint_modules(), **extra}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        extra = {} if self.reference is None else {"reference": self.reference.optimizer}
        return {**super().optimizers(), **extra}

    def lr_schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        extra = {} if self.reference is None else {"reference": self.reference.lr_scheduler}
        return {**super().lr_schedulers(), **extra}

    def generators(self) -> dict[str, torch.Generator]:
        extra = {} if self.reference is None else {"reference": self.reference.generator}
        return {**super().generators(), **extra}

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().extra_state()
        if self.delta is not None:
            meta = {**meta, "control_scale": self.delta.scale}
        return tensors, meta

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        meta = dict(meta)
        scale = meta.pop("control_scale", None)
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
        ):
            raise CheckpointError(f"extra.control_scale: expected a finite number, got {scale!r}")
        apply = super().stage_extra_state(tensors, meta)

        def apply_all() -> None:
            apply()
            if scale is not None:
                self._set_delta(float(scale))
            elif self.delta is not None:
                self._set_delta(1.0)

        return apply_all

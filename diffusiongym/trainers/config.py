"""The settings every method shares: :class:`TrainerConfig`, the optimiser and the learning-rate schedule.

A method's config subclasses :class:`TrainerConfig`; validation is strict (no coercion, errors
name the field) and :meth:`TrainerConfig.from_dict` reads a checkpoint's JSON back exactly.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from diffusiongym.utils.validation import check_positive_int, unknown_name_error

__all__ = ["TrainerConfig", "LR_SCHEDULES", "OPTIMIZERS", "make_optimizer", "make_lr_scheduler"]

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass
class TrainerConfig:
    """Settings every method shares (a method's config adds its own fields).

    Attributes
    ----------
    iterations : int
        Iterations of a full run; :meth:`Trainer.train` with no count runs up to it, and
        the learning-rate schedule spans it.
    batch_size : int
        Samples (trajectories) drawn per iteration.
    lr : float
        Learning rate.
    lr_schedule : {"constant", "cosine", "linear"}
        Decay from ``lr`` to ``lr * lr_final_factor`` over ``iterations`` (after the warm-up),
        through :mod:`torch.optim.lr_scheduler`; the rate then stays at its final value.
    lr_final_factor : float
        In ``[0, 1]``.
    warmup_iterations : int
        Linear warm-up from ``lr / (warmup_iterations + 1)``.
    optimizer : {"adam", "adamw", "sgd"}
        ``"sgd"`` uses momentum 0.9.
    weight_decay : float
    max_grad_norm : float or None
        Clip the gradient's global norm (``None``: no clipping).
    seed : int
        Determines the whole run (sampling, minibatches, initialisation, dropout).
    compile : bool
        Roll out (and sample, evaluate) with ``torch.compile``d Euler–Maruyama steps
        (:mod:`diffusiongym.compiled`): the first rollout pays the compilation, later ones run
        faster; results equal the eager ones to float32 rounding.
    rollout_shards : int
        Shards of each iteration's batch (``1``: the batch is drawn from the trainer's
        generator, one process only). With ``S > 1`` every batch-sized quantity is split into
        ``S`` equal shards, shard ``s`` drawn with its own generator seeded from ``seed``, the
        iteration and ``s``; ``W`` processes (``torchrun``; ``W`` must divide ``S``) each draw
        ``S / W`` shards, and the run is the same for every ``W`` (``docs/distributed.md``).
    gradient_checkpointing : bool
        Recompute the trained diffusers denoiser's block activations in the backward pass
        (``enable_gradient_checkpointing()`` on each diffusers model in the trained modules that
        has trainable parameters, e.g. a LoRA UNet): less memory per update, one more forward
        pass of each block; the same gradients up to float rounding
        (:mod:`diffusiongym.trainers.gradient_checkpointing`).
    """

    iterations: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_final_factor: float = 0.0
    warmup_iterations: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    compile: bool = False
    rollout_shards: int = 1
    gradient_checkpointing: bool = False

    #: string fields and their allowed values (merged along the class hierarchy)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types (no coercion: ``2.5`` is not an int, ``True`` is not a number) and
        ranges; raise naming the field. Subclasses extend it and call ``super().validate()``."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints.get(f.name))
        for cls in reversed(type(self).__mro__):
            for name, allowed in vars(cls).get("choices", {}).items():
                if getattr(self, name) not in allowed:
                    raise unknown_name_error(name, getattr(self, name), allowed)
        for name in ("iterations", "batch_size", "rollout_shards"):
            check_positive_int(name, getattr(self, name))
        _check_range("lr", self.lr, low=0.0, low_open=True)
        _check_range("lr_final_factor", self.lr_final_factor, low=0.0, high=1.0)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        if self.max_grad_norm is not None:
            _check_range("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        for name in ("warmup_iterations", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainerConfig:
        """Strict inverse of :meth:`to_dict`: unknown or missing keys and ill-typed values
        raise ``ValueError`` naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a dict of {cls.__name__} fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown or missing:
            raise ValueError(f"{source}: {cls.__name__} fields do not match: unknown {unknown}, missing {missing}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Strict check of ``value`` against a field annotation (int, float, str, bool, X | None)."""
    if hint is None:
        return
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        want = {bool: "a bool", int: "an integer", float: "a finite number", str: "a string"}[hint]
        raise ValueError(f"{name}: expected {want}, got {value!r}")


def _check_range(
    name: str, value: float, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name}: expected a number {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")


def make_optimizer(params: Iterable[Any], config: TrainerConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` over ``params`` (``lr`` defaults to ``config.lr``)."""
    params = list(params)
    if not params:
        raise ValueError("model: expected trainable parameters (requires_grad=True), found none")
    rate = config.lr if lr is None else lr
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=rate, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=rate, momentum=0.9, weight_decay=config.weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainerConfig, total: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """``config.lr_schedule`` over ``total`` scheduler steps (default ``config.iterations``),
    after ``config.warmup_iterations`` steps of linear warm-up."""
    total = config.iterations if total is None else total
    warm = config.warmup_iterations
    span = max(total - warm, 1)
    final = config.lr_final_factor
    main: torch.optim.lr_scheduler.LRScheduler
    if config.lr_schedule == "cosine":
        main = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(i / span, 1.0)))
        )
    elif config.lr_schedule == "linear":
        main = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=max(final, 1e-12), total_iters=span
        )
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warm])

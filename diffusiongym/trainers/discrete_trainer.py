"""The part every trainer on a discrete (CTMC) task shares: :class:`DiscreteTrainer`.

A :class:`~diffusiongym.discrete.tasks.DiscreteTask` has a base posterior model instead of a
diffusion environment, a jump-chain grid on ``[0, 1]`` and, as policy, the control of a fine-tuned
posterior ``c = log_softmax(model) - log_softmax(base)`` (``docs/maths.md``, "Discrete chains").
This base gives the discrete ``env``, ``times``, ``policy``, ``sample`` (so the Trainer's
``evaluate`` works unchanged, with the exact oracle's ``gap_closed``), ``task_fingerprint`` and
:meth:`DiscreteTrainer.setup_model` (task, device and model checks, optimiser, policy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.discrete.chain import DiscreteTrajectory, control_from_model, sample_chain, time_grid
from diffusiongym.discrete.models import PosteriorModel, ResidualPosterior
from diffusiongym.discrete.tasks import DiscreteTask
from diffusiongym.trainers.base import Trainer
from diffusiongym.utils.validation import check_positive_int

__all__ = ["DiscreteTrainer"]


class DiscreteTrainer(Trainer):
    """Base of the trainers on discrete tasks (see the module docstring)."""

    def setup_model(self, model: Any, hidden: int, layers: int) -> PosteriorModel:
        """Check the task, its device and ``model`` (default ``ResidualPosterior(base, hidden, layers)``,
        which starts at the base); set :attr:`model`, the optimiser and the policy. Returns the model."""
        if not isinstance(self.task, DiscreteTask):
            raise TypeError(f"task: expected a DiscreteTask or a discrete task id, got {type(self.task).__name__}")
        base = self.env
        base_device = next((b.device for b in base.buffers()), None) or next(
            (p.device for p in base.parameters()), self.device
        )
        if base_device != self.device:
            raise ValueError(
                f"device: the task's base model is on {base_device}, expected {self.device} (move it with task.model.to(device))"
            )
        if model is None:
            model = self.build(lambda: ResidualPosterior(base, hidden=hidden, layers=layers), "model").to(self.device)
        elif not isinstance(model, PosteriorModel):
            raise TypeError(
                f"model: expected a PosteriorModel (e.g. ResidualPosterior(base)), got {type(model).__name__}"
            )
        if model.path.config() != base.path.config():
            raise ValueError(f"model: expected the base's path {base.path.config()}, got {model.path.config()}")
        self.model = model
        self.configure_optimizer(model)
        self._policy = control_from_model(base, model)
        return model

    @property
    def env(self) -> PosteriorModel:  # type: ignore[override]
        """The base posterior model (its chain is the reference process)."""
        return self.task.model

    @property
    def times(self) -> Tensor:
        """The uniform jump-chain grid on [0, 1], float64 ``(steps + 1,)``."""
        return time_grid(self.task.steps)

    @property
    def policy(self) -> Callable[..., Tensor]:
        return self._policy

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0, steps: int | None = None, **kwargs: Any) -> DiscreteTrajectory:  # type: ignore[override]
        """Fresh chains of the current :attr:`policy` (no effect on training's RNG), on the task's
        grid or a uniform grid of ``steps`` jump steps."""
        n = check_positive_int("num_samples", num_samples)
        times = self.times if steps is None else time_grid(check_positive_int("steps", steps))
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        return sample_chain(
            self.env,
            n,
            times=times,
            control=self.policy,
            reward=self.task.reward,
            reward_scale=self.task.reward_scale,
            generator=gen,
            **kwargs,
        )

    def task_fingerprint(self) -> dict[str, Any]:
        t = self.task
        return {
            "name": str(t.name),
            "path": self.env.path.config(),
            "reward": type(t.reward).__name__,
            "reward_scale": float(t.reward_scale),
            "steps": int(t.steps),
        }

"""Reward-weighted regression on the Trainer contract: the worked example of ``docs/adding_a_method.md``.

Fine-tune a trainable copy of the base model by conditional flow matching (in the base's
parameterisation, e.g. velocity) on base samples weighted by ``g_i = softmax_i(lambda r(x1_i))``::

    loss = sum_i g_i E_{t, x0} |model(x_t, t) - target(x1_i, x0, t)|^2,  x_t = alpha x1_i + beta x0
    (velocity: target = d_alpha x1_i + d_beta x0)

The weighted samples represent ``p*(x1) ∝ p_base(x1) exp(lambda r(x1))``, so the minimiser is
the model of ``p*``; sampled with the memoryless noise, the fine-tuned model is the
optimally controlled process (``docs/maths.md``, "The objective and the tilted optimum"). Reward values only:
no reward gradients.

    python examples/reward_weighted_regression.py     # GMM1D-v0, prints gap_closed
"""

from __future__ import annotations

import dataclasses

import torch

from diffusiongym.policies.control import ModelControl
from diffusiongym.sampling import sample
from diffusiongym.trainers.base import Trainer, TrainerConfig
from diffusiongym.trainers.flow_matching import weighted_flow_matching_loss


@dataclasses.dataclass
class RWRConfig(TrainerConfig):
    """Shared fields (with this method's defaults) plus ``updates_per_iteration``."""

    iterations: int = 150
    batch_size: int = 2048
    lr: float = 2e-2
    lr_schedule: str = "cosine"
    max_grad_norm: float | None = 10.0
    updates_per_iteration: int = 4

    def validate(self) -> None:
        super().validate()
        if self.updates_per_iteration < 1:
            raise ValueError(f"updates_per_iteration: expected a positive integer, got {self.updates_per_iteration!r}")


class RewardWeightedRegression(Trainer):
    """Reward-weighted flow matching of the base model's trainable copy (see the module docstring).

    Parameters are the contract's: ``(task, reward=None, reward_scale=None, model=None, config=None)``;
    ``model`` defaults to ``task.environment.model.trainable_copy()``.
    """

    config_class = RWRConfig

    def setup(self, model):
        if model is None:
            model = self.build(self.env.model.trainable_copy, "model")
        self.model = model.to(self.device)
        self.configure_optimizer(self.model)  # config.optimizer and config.lr_schedule
        self._policy = ModelControl(self.model, self.env, action_scale=self.task.action_scale)

    @property
    def policy(self) -> ModelControl:
        return self._policy

    def _step(self) -> dict[str, float]:
        cfg, task, gen = self.config, self.task, self.generator
        # 1. samples of the base model and their self-normalised weights g = softmax(lambda r)
        with torch.no_grad():
            base = sample(
                self.env,
                cfg.batch_size,
                grid=self.times,
                reward=task.reward,
                generator=gen,
                device=self.device,
                dtype=self.dtype,
            )
        log_w = torch.where(base.valid, task.reward_scale * base.reward, torch.full_like(base.reward, -torch.inf))
        g = torch.softmax(log_w.double(), 0).to(self.dtype)
        x1 = base.x1
        # 2. weighted conditional flow matching, a few gradient steps on this batch
        losses = []
        for _ in range(cfg.updates_per_iteration):
            loss = weighted_flow_matching_loss(
                self.model,
                self.env.parameterization,
                self.env.scheduler,
                x1,
                g,
                t_range=(task.t_start, 1.0),
                time_power=1.0,
                generator=gen,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.clip_gradients(self.model.parameters())
            self.optimizer.step()
            losses.append(loss.detach())
        return {
            "loss": sum(losses) / len(losses),
            "ess": float(1.0 / (g.double() ** 2).sum()),
            "reward": float(base.reward[base.valid].mean()),
            "valid_fraction": float(base.valid.float().mean()),
        }


if __name__ == "__main__":
    trainer = RewardWeightedRegression("GMM1D-v0")
    trainer.train()
    print({k: round(v, 4) for k, v in trainer.evaluate().items()})

"""Settings of Reversal Q-Learning (:class:`RQLConfig`); see :mod:`diffusiongym.trainers.rql`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from diffusiongym.trainers.config import TrainerConfig
from diffusiongym.utils.validation import check_positive_int

__all__ = ["RQLConfig", "diffusion_recipe"]


@dataclasses.dataclass
class RQLConfig(TrainerConfig):
    """Settings of :class:`RQL`; one iteration is one value update (and a policy update every
    ``policy_delay`` after ``value_warmup``). ``lr`` is both networks' learning rate;
    ``max_grad_norm`` clips each network's gradient.

    Attributes
    ----------
    gamma : float
        Discount on real environment transitions only, in ``[0, 1]``.
    alpha : float
        Weight of the behaviour-cloning term (velocity units). It sets the KL of the result, not a
        KL-regularised objective: to land at a KL budget on the GMM tasks use the fitted rule
        ``alpha_for_kl`` of ``benchmarks/adaptation_methods/rql.py`` (``log alpha = a + b log KL``,
        measured by ``benchmarks/rql_frontier.py``; ``docs/methods/rql.md``).
    bc_reversal : {"initial", "current"}
        Which flow reverses the data for the BC target (module docstring).
    bc_weighting : {"uniform", "memoryless"}
        Weight of flow step ``f``'s BC term: 1, or ``1 / sigma^2(t_f)`` of the task's memoryless
        noise normalised to mean 1 (diffusion tasks only; :meth:`RQL._bc_step_weights`).
    bc_weight_power : float
        ``p >= 0`` in the ``"memoryless"`` weights ``(1 / sigma^2(t))^p`` (0: uniform).
    reversal_iters : int
        Fixed-point refinements of the reversal (0: explicit Euler).
    chain_discount : bool
        Ablation: discount inside the flow chain (wrong).
    tau : float
        Polyak rate of the target value network, in ``(0, 1]``.
    huber_delta : float
    normalize_q : bool
        Divide the value term by the batch mean of ``|V|`` (TD3+BC).
    value_hidden, value_layers : int
        Value MLP size.
    policy_hidden, policy_layers : int
        Residual MLP of the default diffusion policy (ignored when a model is given).
    policy_delay : int
        A policy update every this many value updates.
    value_warmup : int
        Value-only iterations before the policy starts moving.
    flow_samples : int
        Flow indices per transition in each loss (0: all ``F + 1`` / ``F``; ``k``: ``k`` random ones).
    dataset_size : int
        Base samples drawn for a diffusion task when no ``dataset`` is given.
    dataset_noise : {"ode", "memoryless"}
        Sampler of that data set.
    dataset_steps : int or None
        Its Euler steps (``None``: the task's ``steps``).
    """

    iterations: int = 1000
    batch_size: int = 256
    lr: float = 3e-4
    max_grad_norm: float | None = 10.0
    gamma: float = 0.99
    alpha: float = 1.0
    bc_reversal: str = "initial"
    bc_weighting: str = "uniform"
    bc_weight_power: float = 1.0
    reversal_iters: int = 0
    chain_discount: bool = False
    tau: float = 0.005
    huber_delta: float = 1.0
    normalize_q: bool = False
    value_hidden: int = 256
    value_layers: int = 3
    policy_hidden: int = 128
    policy_layers: int = 3
    policy_delay: int = 1
    value_warmup: int = 0
    flow_samples: int = 0
    dataset_size: int = 4096
    dataset_noise: str = "ode"
    dataset_steps: int | None = None

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "bc_reversal": ("initial", "current"),
        "bc_weighting": ("uniform", "memoryless"),
        "dataset_noise": ("ode", "memoryless"),
    }

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma: expected a value in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau: expected a value in (0, 1], got {self.tau}")
        if self.alpha < 0:
            raise ValueError(f"alpha: expected alpha >= 0, got {self.alpha}")
        if not self.bc_weight_power >= 0:
            raise ValueError(f"bc_weight_power: expected a number >= 0, got {self.bc_weight_power}")
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta: expected a positive number, got {self.huber_delta}")
        for name in ("value_hidden", "policy_hidden", "policy_delay", "dataset_size"):
            check_positive_int(name, getattr(self, name))
        if self.dataset_steps is not None:
            check_positive_int("dataset_steps", self.dataset_steps)
        for name in ("reversal_iters", "value_layers", "policy_layers", "value_warmup", "flow_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")


def diffusion_recipe(**overrides: object) -> RQLConfig:
    """The settings measured in the diffusion gym (GMM tasks, ``benchmarks/adaptation_methods/rql.py``):
    BC towards the frozen base flow's reversal of the data (one fixed-point refinement), each flow
    step's BC term weighted by the memoryless KL rate ``1 / sigma^2(t)`` (``bc_weighting``: it
    lifted the points from 0.4-0.55 to 0.8-0.9 of the exact reward-KL frontier's gain,
    ``benchmarks/rql_frontier.py``), no discount on the one-step episodes, Q normalised for the
    actor, batches of 128, a 128 x 2 value and a 64 x 2 policy residual, lr 1e-3, 2 flow samples
    per target, 100-step ODE data of the base. ``overrides`` replace any field (e.g. ``alpha``,
    ``iterations``, ``dataset_size``, ``seed``)."""
    options: dict[str, object] = dict(
        bc_reversal="initial",
        bc_weighting="memoryless",
        bc_weight_power=2.0,
        reversal_iters=1,
        gamma=1.0,
        normalize_q=True,
        batch_size=128,
        value_hidden=128,
        value_layers=2,
        policy_hidden=64,
        policy_layers=2,
        lr=1e-3,
        flow_samples=2,
        dataset_steps=100,
    )
    options.update(overrides)
    return RQLConfig(**options)  # type: ignore[arg-type]

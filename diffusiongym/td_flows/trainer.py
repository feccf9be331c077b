"""TD flows on the Trainer contract: learn a policy's successor measure from a transitions dataset.

``TDFlow(OfflineTask(dataset), config=TDFlowConfig(gamma=0.9), pi=policy)`` trains a
:class:`~diffusiongym.td_flows.successor.SuccessorFlow` ``v_theta(x, t | s, a)`` so that its
ODE samples ``m^pi(. | s, a) = (1 - gamma) sum_k gamma^k P(S_{k+1} in . | s, a, pi)``. One
iteration is one gradient step of TD²-CFM (default) or TD-CFM
(:mod:`~diffusiongym.td_flows.losses`) on a minibatch of transitions, followed by a Polyak
update of the target network.

How the contract's ``task`` fits: TD flows learn from transitions ``(s, a, s', done)`` of any
environment, not from a diffusion task, so ``task`` is the package's
:class:`~diffusiongym.trainers.offline_data.OfflineTask` (a dataset alone, as for offline
:class:`~diffusiongym.trainers.rql.RQL`); its rewards are ignored (a successor measure is
reward-free; rewards enter later, in :func:`~diffusiongym.td_flows.evaluation.q_value`).
The policy being evaluated is the keyword ``pi`` (``pi(states) -> actions``, torch, in the
dataset's action units), and :attr:`TDFlow.policy` returns it. :meth:`TDFlow.evaluate` and
:meth:`TDFlow.sample` of the contract (trajectories of a diffusion task) do not apply and raise
``TypeError`` naming what to use instead. Checkpoints hold the model, the target network, the
optimiser, the generator and the dataset's fingerprint; ``pi`` is code, not state: pass the same
one on resume.

Data-parallel (``rollout_shards = S``, ``docs/distributed.md``): every rank holds the whole
dataset; shard ``s`` draws ``batch_size / S`` transitions and its loss's noise from its own
generator, and the gradient is averaged over ranks (a stochastic ``pi`` should draw from its
own per-rank generator: its draws are not shard-invariant).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diffusiongym.distributed.collectives import any_rank
from diffusiongym.td_flows.losses import LOSSES, polyak_update, td_loss
from diffusiongym.td_flows.successor import SuccessorFlow
from diffusiongym.trainers.base import Trainer, TrainerConfig
from diffusiongym.trainers.checkpoint import CheckpointError, check_state
from diffusiongym.trainers.offline_data import OfflineTask
from diffusiongym.utils.validation import check_positive_int

__all__ = ["TDFlowConfig", "TDFlow"]


@dataclass
class TDFlowConfig(TrainerConfig):
    """Hyper-parameters of :class:`TDFlow` (shared fields: :class:`TrainerConfig`).

    Attributes
    ----------
    iterations : int
        Gradient steps.
    batch_size : int
        Transitions per step.
    gamma : float
        Discount of the successor measure, in ``[0, 1)``.
    loss : {"td2", "td"}
        TD²-CFM (lower-variance gradient) or TD-CFM.
    tau : float
        Polyak rate of the target network, ``theta_bar <- (1 - tau) theta_bar + tau theta``.
    flow_steps : int
        Euler steps of the target model's ODE inside the loss.
    hidden, layers : int
        Size of the default model's :class:`~diffusiongym.policies.networks.TimeMLP`.
    normalize : bool
        Standardise states with the dataset's mean and standard deviation (default model).
    """

    iterations: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_final_factor: float = 0.1
    max_grad_norm: float | None = 10.0
    gamma: float = 0.9
    loss: str = "td2"
    tau: float = 0.01
    flow_steps: int = 10
    hidden: int = 128
    layers: int = 3
    normalize: bool = True

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"loss": LOSSES}

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma: expected a discount in [0, 1), got {self.gamma!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau: expected a Polyak rate in (0, 1], got {self.tau!r}")
        for name in ("flow_steps", "hidden", "layers"):
            check_positive_int(name, getattr(self, name))


class TDFlow(Trainer):
    """Successor-measure flow of a policy, learnt by TD²-CFM / TD-CFM (module docstring).

    Parameters
    ----------
    task : OfflineTask
        The transitions (``dataset.states``, ``actions``, ``next_states``, ``dones``).
    model : SuccessorFlow, optional
        Default: ``SuccessorFlow(ds, da, gamma, hidden, layers)`` with the dataset's state
        statistics as normaliser (``config.normalize``), initialised from ``config.seed``.
        A given model must have ``model.gamma == config.gamma``.
    config : TDFlowConfig, optional
    pi : callable
        ``pi(states (n, ds)) -> actions (n, da)``: the evaluated policy (deterministic, or
        stochastic with its own generator). Required when the dataset has actions.
    device, dtype
        As for every trainer.

    Attributes
    ----------
    model, target : SuccessorFlow
        The trained flow and its Polyak average (the bootstrap).
    dataset : OfflineDataset
    """

    config_class: ClassVar[type[TrainerConfig]] = TDFlowConfig
    config: TDFlowConfig
    supports_sharding = True

    def setup(self, model: SuccessorFlow | None, *, pi: Callable[[Tensor], Tensor] | None = None) -> None:
        if not isinstance(self.task, OfflineTask):
            raise TypeError(
                f"task: expected an OfflineTask (a transitions dataset), got {type(self.task).__name__}; "
                "for diffusion tasks use TerminalFlow"
            )
        cfg = self.config
        data = self.task.dataset.to(self.device, self.dtype)
        if data.action_dim > 0 and not callable(pi):
            raise TypeError(f"pi: expected a callable pi(states) -> actions, got {type(pi).__name__}")
        if model is None:

            def factory() -> SuccessorFlow:
                flow = SuccessorFlow(data.state_dim, data.action_dim, cfg.gamma, cfg.hidden, cfg.layers)
                if cfg.normalize:
                    flow.fit_normalizer(torch.cat([data.states, data.next_states]))
                return flow

            model = self.build(factory, "model")
        elif not isinstance(model, SuccessorFlow):
            raise TypeError(f"model: expected a SuccessorFlow, got {type(model).__name__}")
        if (model.state_dim, model.action_dim, model.out_dim) != (data.state_dim, data.action_dim, data.state_dim):
            raise ValueError(
                f"model: expected state_dim={data.state_dim}, action_dim={data.action_dim} (the dataset's), got "
                f"state_dim={model.state_dim}, action_dim={model.action_dim}, out_dim={model.out_dim}"
            )
        if model.gamma != cfg.gamma:
            raise ValueError(f"model: its gamma {model.gamma} differs from config.gamma {cfg.gamma}")
        self.dataset = data
        self._fingerprint = data.fingerprint()
        self.pi = pi
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.configure_optimizer(self.model)

    @property
    def policy(self) -> Callable[[Tensor], Tensor] | None:
        """The evaluated policy ``pi`` (the one whose successor measure is learnt)."""
        return self.pi

    def _step(self) -> dict[str, float]:
        cfg = self.config
        size = self.shard_size(cfg.batch_size)
        self.model.train()
        # each shard draws its minibatch and the loss's noise from its own generator; the loss is
        # the mean of the shards' means (equal sizes), the base averages the gradient over ranks
        losses = [
            td_loss(
                cfg.loss,
                self.model,
                self.target,
                self.dataset.batch(size, gen),
                self.pi,
                gamma=cfg.gamma,
                steps=cfg.flow_steps,
                generator=gen,
            )
            for gen in self.shard_generators()
        ]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = self.clip_gradients(self.model.parameters())
        self.optimizer.step()
        polyak_update(self.target, self.model, cfg.tau)
        self.model.eval()
        if any_rank(not bool(torch.isfinite(loss))):
            raise FloatingPointError(f"TDFlow diverged at iteration {self.iteration}: loss {float(loss)}; lower lr")
        return {"loss": loss.detach(), "grad_norm": norm}

    # ------------------------------------------------------------------ not a diffusion task
    def sample(self, num_samples: int, seed: int = 0, **kwargs: Any) -> Any:
        raise TypeError(
            "sample: TDFlow learns from transitions, not a diffusion task; draw successor states with "
            "trainer.model.sample(s, a, num_samples) and values with diffusiongym.td_flows.q_value"
        )

    def evaluate(self, num_samples: int = 4096, seed: int = 0, steps: int | None = None) -> dict[str, float]:
        raise TypeError(
            "evaluate: TDFlow learns from transitions, not a diffusion task; evaluate Q with "
            "diffusiongym.td_flows.q_value (and compare with Monte-Carlo returns, or an exact successor measure)"
        )

    # -------------------------------------------------------------------- checkpoints
    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The target network and the dataset's fingerprint (a resume must use the same data)."""
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}, {"dataset": self._fingerprint}

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        if sorted(meta) != ["dataset"]:
            raise CheckpointError(f"extra: expected the key 'dataset', got {sorted(meta)[:5]}")
        if meta["dataset"] != self._fingerprint:
            raise CheckpointError(
                f"extra: dataset: the checkpoint was trained on {meta['dataset']}, this trainer has {self._fingerprint}"
            )
        state = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
        leftover = sorted(set(tensors) - {f"target.{k}" for k in state})
        if leftover:
            raise CheckpointError(f"extra: unexpected tensors {leftover[:5]}")
        check_state("extra: target", self.target, state)
        return lambda: self.target.load_state_dict(state)

    def task_fingerprint(self) -> dict[str, Any]:
        return {**super().task_fingerprint(), "successor_flow": dict(self.model.config)}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

"""Energy-weighted flow matching (EFM / QIPO family): reward adaptation without reward gradients.

Fine-tune a trainable copy of the base model with the conditional flow-matching /
diffusion loss in the base model's own parameterisation, on samples ``x1_i`` weighted by
``g_i = softmax_i(beta r_i + log w_i)`` (energy ``E = -r``)::

    loss = sum_i g_i E_{t, x0} |model(x_t, t) - target(x1_i, x0, t)|^2,   x_t = alpha x1_i + beta_t x0.

The conditional targets (conditional expectations given ``x1`` and ``x0``) are

==============  =================================
velocity        ``d_alpha x1 + d_beta x0``
epsilon         ``x0``
endpoint        ``x1``
score           ``-x0 / beta``
==============  =================================

and the minimiser of the weighted loss is the model of the weighted law
``q(x1) ∝ p_data(x1) g(x1)``. With samples from the base and ``beta = reward_scale`` this
is exactly ``p* ∝ p_base exp(lambda r)``; its memoryless SDE is the optimally controlled
process (same bridges as the base), so the objective ``E[lambda r] - KL`` is maximised.

Modes (``EFMConfig.mode``):

- ``"offline"``: one fixed data set (given, or drawn once from the base), weights
  ``softmax(beta r)``.
- ``"online"``: each round resamples from the current model (QIPO-style) and either
  ``weighting="importance"`` (default): ``log w_i = lambda r_i + log dP_base/dP_model(path_i)``
  (exact Girsanov weights from :func:`diffusiongym.logprob.path_log_ratio`, every round
  targets ``p*``; the weights become constant at the optimum) or
  ``weighting="tempered"``: ``log w_i = (lambda / rounds) r_i`` (QIPO: ``q_{k+1} ∝ q_k exp(beta_k r)``,
  the temperatures sum to ``lambda``).

The effective sample size ``1 / sum g_i^2`` of every round is logged and a
``RuntimeWarning`` is raised when it drops below ``ess_warn_fraction * n``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.logprob import path_log_ratio
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import sample
from diffusiongym.schedulers import Scheduler
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.io import load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["EFMConfig", "EFMTrainer", "efm_weights", "flow_matching_target", "weighted_flow_matching_loss"]


def efm_weights(log_weights: Tensor, valid: Tensor | None = None) -> tuple[Tensor, float]:
    """Self-normalised weights ``softmax(log_weights)`` and their effective sample size.

    Parameters
    ----------
    log_weights : Tensor, (n,)
        E.g. ``beta * r``; invalid or non-finite entries get weight 0.
    valid : Tensor, (n,) bool, optional

    Returns
    -------
    weights : Tensor, (n,), summing to 1 (float64)
    ess : float
        ``1 / sum_i g_i^2``, between 1 and ``n``.
    """
    lw = log_weights.detach().to(torch.float64).flatten()
    ok = torch.isfinite(lw)
    if valid is not None:
        ok = ok & valid.flatten().to(ok.device)
    if not bool(ok.any()):
        raise ValueError("log_weights: expected at least one finite, valid entry")
    lw = torch.where(ok, lw, torch.full_like(lw, -math.inf))
    g = torch.softmax(lw, 0)
    return g, float(1.0 / (g**2).sum())


def flow_matching_target(parameterization: str, scheduler: Scheduler, x1: Tensor, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The noisy point ``x_t`` and the conditional regression target of ``parameterization``.

    Parameters
    ----------
    x1, x0 : Tensor, (n, *sample_shape)
        Data and standard normal noise.
    t : Tensor, (n,)

    Returns
    -------
    x_t : Tensor, ``alpha x1 + beta x0``
    target : Tensor
        velocity ``d_alpha x1 + d_beta x0``, epsilon ``x0``, endpoint ``x1`` or score ``-x0 / beta``.
    """
    alpha, beta, d_alpha, d_beta = (c.to(x1.dtype).reshape(-1, *([1] * (x1.ndim - 1))) for c in scheduler(t.to(torch.float64)))
    x_t = alpha * x1 + beta * x0
    if parameterization == "velocity":
        target = d_alpha * x1 + d_beta * x0
    elif parameterization == "epsilon":
        target = x0
    elif parameterization == "endpoint":
        target = x1
    elif parameterization == "score":
        target = -x0 / beta
    else:
        raise unknown_name_error("parameterization", parameterization, ("velocity", "epsilon", "endpoint", "score"))
    return x_t, target


def _loss_weight(parameterization: str, scheduler: Scheduler, t: Tensor) -> Tensor:
    # The score target -x0/beta has variance 1/beta^2 (unbounded as t -> 1): weight by beta^2,
    # i.e. the epsilon loss, so every parameterisation has an O(1) per-time scale.
    if parameterization == "score":
        return scheduler.beta(t.to(torch.float64)) ** 2
    return torch.ones_like(t, dtype=torch.float64)


def weighted_flow_matching_loss(
    model: Callable[..., Tensor],
    parameterization: str,
    scheduler: Scheduler,
    x1: Tensor,
    weights: Tensor | None = None,
    *,
    t_range: tuple[float, float] = (DEFAULT_T_START, 1.0),
    time_power: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """``sum_i g_i |model(x_t, t) - target|^2`` (mean over dimensions), ``t`` drawn in ``t_range``.

    ``weights`` of shape ``(n,)`` summing to one (uniform when ``None``). ``t = t0 + (t1 - t0)
    (1 - (1 - U)^time_power)``: ``time_power = 1`` is uniform, larger values put more draws near
    ``t1`` (the data end). The per-time minimiser (the conditional expectation) does not depend
    on the time distribution, only how the network's capacity is spread. Scalar, differentiable.
    """
    n = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    u = torch.rand(n, generator=generator, dtype=x1.dtype, device=x1.device)
    t = t_range[0] + (t_range[1] - t_range[0]) * (1 - (1 - u) ** time_power)
    x_t, target = flow_matching_target(parameterization, scheduler, x1, x0, t)
    err = ((model(x_t, t, **(cond or {})) - target) ** 2).reshape(n, -1).mean(1)
    err = err * _loss_weight(parameterization, scheduler, t).to(err.dtype)
    if weights is None:
        return err.mean()
    return (weights.to(err.dtype) * err).sum()


@dataclass
class EFMConfig:
    """Hyper-parameters of :class:`EFMTrainer`.

    Attributes
    ----------
    mode : ``"offline"`` or ``"online"``
    weighting : ``"importance"`` or ``"tempered"`` (online mode only; see the module doc)
    rounds : int
        Data rounds (offline: 1; online: resample this many times).
    samples_per_round : int
        ``n`` samples drawn (and weighted) per round.
    iterations_per_round : int
        Gradient steps per round.
    batch_size : int
        Minibatch size; indices are drawn from the round's weights (importance resampling),
        an unbiased estimate of the weighted loss.
    beta : float or None
        Inverse temperature (offline); ``None`` means the task's ``reward_scale`` (targets ``p*``).
    lr, grad_clip, weight_decay : optimiser settings (Adam).
    lr_schedule : ``"cosine"`` or ``"constant"``
        ``"cosine"`` decays the learning rate from ``lr`` to 0 over all ``rounds *
        iterations_per_round`` steps (the fine detail that sets the modes' masses is learnt
        late; a constant rate leaves the last iterates noisy).
    t_min, t_max : float
        Training time range; ``t_min = None`` uses the grid's ``t_start``.
    time_power : float
        ``1``: uniform training times; ``> 1``: more of them near the data end, where the KL
        weighs drift errors most (memoryless: ``sigma -> 0`` as ``t -> 1``).
    ess_warn_fraction : float
        Warn when ``ESS < ess_warn_fraction * n``.
    seed : int
    """

    mode: str = "offline"
    weighting: str = "importance"
    rounds: int = 1
    samples_per_round: int = 4096
    iterations_per_round: int = 1000
    batch_size: int = 512
    beta: float | None = None
    lr: float = 1e-3
    grad_clip: float = 10.0
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    t_min: float | None = None
    t_max: float = 1.0
    time_power: float = 2.0
    ess_warn_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online"):
            raise unknown_name_error("mode", self.mode, ("offline", "online"))
        if self.lr_schedule not in ("cosine", "constant"):
            raise unknown_name_error("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.weighting not in ("importance", "tempered"):
            raise unknown_name_error("weighting", self.weighting, ("importance", "tempered"))
        for name in ("rounds", "samples_per_round", "iterations_per_round", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.mode == "offline" and self.rounds != 1:
            raise ValueError(f"rounds: offline mode trains on one data set, expected 1, got {self.rounds}")
        if not 0.0 < self.ess_warn_fraction < 1.0:
            raise ValueError(f"ess_warn_fraction: expected a number in (0, 1), got {self.ess_warn_fraction}")


class EFMTrainer:
    """Energy-weighted flow matching on a base environment.

    Parameters
    ----------
    env : DiffusionEnvironment
        The base model, scheduler and noise (the fine-tuned model is sampled with the same noise).
    model : nn.Module
        The trainable copy in ``env.parameterization`` (e.g.
        ``ResidualModel(base, TimeMLP(d, d, zero_init=True))``), starting at the base.
    reward : Reward
    reward_scale : float
        ``lambda``; the default inverse temperature.
    config : EFMConfig
    steps, t_start : sampling grid used to draw (online) samples.
    data : (x1, rewards) or (x1, rewards, valid), optional
        Offline data set; drawn from the base (``samples_per_round``) when omitted.

    Usage::

        trainer = EFMTrainer(task.environment, model, task.reward, task.reward_scale, EFMConfig())
        history = trainer.train()
        trainer.save("ckpt"); trainer = EFMTrainer.load("ckpt", env, model, reward); trainer.train()  # resume
    """

    def __init__(
        self,
        env: DiffusionEnvironment,
        model: nn.Module,
        reward: Reward,
        reward_scale: float = 1.0,
        config: EFMConfig | None = None,
        *,
        steps: int = 100,
        t_start: float = DEFAULT_T_START,
        data: tuple[Tensor, ...] | None = None,
    ):
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module in the {env.parameterization} parameterisation, got {type(model).__name__}")
        if not isinstance(reward, Reward):
            raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
        self.config = config if config is not None else EFMConfig()
        if not isinstance(self.config, EFMConfig):
            raise TypeError(f"config: expected an EFMConfig, got {type(self.config).__name__}")
        if self.config.mode == "online" and env.noise.is_deterministic:
            raise ValueError("env: online EFM samples with the SDE; expected noise with sigma > 0, got the ODE")
        self.env = env
        self.model = model
        self.reward = reward
        self.reward_scale = float(reward_scale)
        self.steps = steps
        self.t_start = t_start
        self.data = data
        if data is not None:
            if self.config.mode != "offline":
                raise ValueError("data: a fixed data set needs mode='offline'")
            if len(data) not in (2, 3) or data[0].shape[0] != data[1].shape[0]:
                raise ValueError("data: expected (x1, rewards) or (x1, rewards, valid) with matching batch sizes")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: expected trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.round = 0
        self.history: dict[str, list[float]] = {"round": [], "loss": [], "ess": [], "ess_fraction": [], "mean_reward": [], "kl": []}

    # ------------------------------------------------------------------ data
    def _round_data(self, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, float]:
        """Samples, rewards, weights and the round's KL estimate (nan offline)."""
        cfg = self.config
        lam = self.reward_scale
        if cfg.mode == "offline":
            beta = lam if cfg.beta is None else float(cfg.beta)
            if self.data is not None:
                x1, r = self.data[0], self.data[1]
                valid = self.data[2] if len(self.data) == 3 else torch.isfinite(r)
            else:
                traj = sample(self.env, cfg.samples_per_round, steps=self.steps, t_start=self.t_start, reward=self.reward, generator=gen)
                x1, r, valid = traj.x1, traj.reward, traj.valid
            g, _ = efm_weights(beta * r, valid)
            return x1, r, g, 0.0
        traj = sample(
            self.env, cfg.samples_per_round, steps=self.steps, t_start=self.t_start, policy=self.model, reward=self.reward,
            reward_scale=lam, generator=gen, store=("controls", "noises"),
        )
        if cfg.weighting == "importance":
            log_w = lam * traj.reward + path_log_ratio(traj)
        else:
            log_w = (lam / cfg.rounds) * traj.reward
        g, _ = efm_weights(log_w, traj.valid)
        return traj.x1, traj.reward, g, float(traj.kl[traj.valid].mean())

    # ------------------------------------------------------------------ training
    def _lr(self, step: int) -> float:
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / (cfg.rounds * cfg.iterations_per_round)))

    def train(self, callback: Callable[[dict[str, float]], None] | None = None, progress: bool = False, until: int | None = None) -> dict[str, list[float]]:
        """Run the remaining rounds (all of them, or what is left after a resume).

        ``until`` stops after that many rounds in all (default ``config.rounds``).

        ``callback(record)`` is called after every round with that round's numbers.
        Returns the history (lists over rounds): ``loss`` (mean over the round), ``ess``,
        ``ess_fraction``, ``mean_reward`` and ``kl`` of the round's samples (KL of the model
        that drew them; 0 offline, where the base drew them).
        """
        torch.set_flush_denormal(True)
        cfg = self.config
        t_min = self.t_start if cfg.t_min is None else cfg.t_min
        sched = self.env.scheduler
        bar = tqdm(total=cfg.rounds * cfg.iterations_per_round, initial=self.round * cfg.iterations_per_round, disable=not progress, desc="EFM")
        stop = cfg.rounds if until is None else min(int(until), cfg.rounds)
        while self.round < stop:
            # one generator per round, seeded by (seed, round): a resumed run is bit-identical
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.round)
            self.model.eval()
            x1, r, g, kl = self._round_data(gen)
            ess = float(1.0 / (g**2).sum())
            if ess < cfg.ess_warn_fraction * x1.shape[0]:
                warnings.warn(
                    f"EFM round {self.round}: effective sample size {ess:.1f} of {x1.shape[0]} samples "
                    f"({ess / x1.shape[0]:.2%}) is below ess_warn_fraction={cfg.ess_warn_fraction}; the weights have "
                    "collapsed onto a few samples (lower beta, use more samples or more online rounds)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.model.train()
            losses = []
            for it in range(cfg.iterations_per_round):
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr(self.round * cfg.iterations_per_round + it)
                idx = torch.multinomial(g, cfg.batch_size, replacement=True, generator=gen)
                loss = weighted_flow_matching_loss(self.model, self.env.parameterization, sched, x1[idx], t_range=(t_min, cfg.t_max), time_power=cfg.time_power, generator=gen)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(1)
            self.model.eval()
            record = {
                "round": float(self.round),
                "loss": sum(losses) / len(losses),
                "ess": ess,
                "ess_fraction": ess / x1.shape[0],
                "mean_reward": float(r[torch.isfinite(r)].mean()),
                "kl": kl,
            }
            for key, value in record.items():
                self.history[key].append(value)
            self.round += 1
            if callback is not None:
                callback(record)
        bar.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Model, optimiser state and progress to ``path`` (safetensors + JSON)."""
        tensors, opt_meta = optimizer_tensors(self.optimizer)
        config = {
            "config": dataclasses.asdict(self.config),
            "round": self.round,
            "history": self.history,
            "reward_scale": self.reward_scale,
            "steps": self.steps,
            "t_start": self.t_start,
            "optimizer": opt_meta,
        }
        return save_checkpoint(path, {"model": self.model}, config, tensors)

    @classmethod
    def load(cls, path: str | Path, env: DiffusionEnvironment, model: nn.Module, reward: Reward, *, data: tuple[Tensor, ...] | None = None) -> "EFMTrainer":
        """Rebuild a trainer saved with :meth:`save` (``model`` built like the saved one); ``train()`` resumes."""
        meta, extra = load_checkpoint(path, {"model": model})
        trainer = cls(env, model, reward, meta["reward_scale"], EFMConfig(**meta["config"]), steps=meta["steps"], t_start=meta["t_start"], data=data)
        load_optimizer_tensors(trainer.optimizer, extra, meta["optimizer"])
        trainer.round = int(meta["round"])
        trainer.history = {k: list(v) for k, v in meta["history"].items()}
        return trainer

"""The Trainer contract every adaptation method follows.

A method is a subclass of :class:`Trainer` with a config dataclass derived from
:class:`TrainerConfig` and one method, :meth:`Trainer._step` (one iteration: sample, build
targets, update). The base class gives the rest, the same for every method:

- construction ``Method(task_or_env, reward=None, reward_scale=None, model=None, config=None)``
  (a :class:`~diffusiongym.tasks.Task`, a registered task id, or a
  :class:`~diffusiongym.envs.environment.DiffusionEnvironment` plus a reward);
- :meth:`step` -> metrics, :meth:`train` (``iterations``, ``callback``, ``progress``, and a
  :class:`~diffusiongym.loggers.Logger` for the metrics and, on image tasks, sample grids),
  :attr:`history`, :attr:`policy` (a control ``u(x, t, **cond)`` usable by
  :func:`~diffusiongym.sample`, :class:`~diffusiongym.policies.agent.ControlAgent` and the
  Gymnasium envs), :meth:`evaluate` -> ``objective``, ``kl``, ``reward``,
  ``valid_fraction``, ``gap_closed`` (NaN without an oracle);
- :meth:`save` / :meth:`load` (instance methods): one atomic checkpoint folder
  (:mod:`diffusiongym.trainers.checkpoint`) with trainable weights, optimiser, learning-rate
  schedule, generator states and history; frozen weights are left out; a load is validated
  in full before the live trainer is touched, and resuming is bit-identical;
- determinism: every random draw comes from generators seeded from ``config.seed``; code
  that cannot take a generator (module initialisers, dropout) runs under
  :func:`~diffusiongym.utils.runtime.seeded` with a seed derived from it.

See ``docs/adding_a_method.md`` for a worked example.

Module size: this is the one Trainer contract (construction, step and train with logging,
sample and evaluate), whose parts share the trainer's state; the pieces that stand
alone live beside it (config.py, checkpoint.py, evaluation.py, sharding.py, and
trainer_state.py: save, load and the hooks a method overrides to put more in a checkpoint).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.distributed.collectives import all_mean, any_rank, average_gradients
from diffusiongym.distributed.group import is_main_process, shard_range, world_size
from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.loggers.base import Logger
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.tasks import TASK_OPTIONS, Task, resolve_task
from diffusiongym.timegrid import make_time_grid
from diffusiongym.trainers.evaluation import EVALUATION_KEYS, trajectory_metrics
from diffusiongym.trainers.gradient_checkpointing import enable_gradient_checkpointing
from diffusiongym.trainers.sharding import ShardedBatches
from diffusiongym.trainers.trainer_state import TrainerState
from diffusiongym.trainers.config import LR_SCHEDULES, OPTIMIZERS, TrainerConfig, make_lr_scheduler, make_optimizer
from diffusiongym.utils.runtime import derive_seed, flush_denormals, seeded
from diffusiongym.utils.validation import check_positive_int

__all__ = [
    "TrainerConfig",
    "Trainer",
    "resolve_task",
    "EVALUATION_KEYS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "make_optimizer",
    "make_lr_scheduler",
    "trajectory_metrics",
]


# ---------------------------------------------------------------------------- trainer
class Trainer(TrainerState, ShardedBatches, abc.ABC):
    """Base of every adaptation method (see the module docstring).

    Parameters
    ----------
    task : Task, str or DiffusionEnvironment
        The problem; with an environment, ``reward`` is required.
    reward : Reward, optional
        Overrides the task's reward.
    reward_scale : float, optional
        ``lambda`` in ``max E[lambda r(x1)] - KL``; overrides the task's.
    model : nn.Module, optional
        What is trained (method-specific default when omitted).
    config : TrainerConfig subclass, optional
    device, dtype
        Where and in which precision to sample and train.
    **options
        Task options ``steps``, ``t_start``, ``action_scale``, ``oracle``, ``conditioning``,
        ``name``, and the method's own keywords (those of its :meth:`setup`).

    Attributes
    ----------
    task, config, device, dtype, generator, iteration, history
    """

    config_class: ClassVar[type[TrainerConfig]] = TrainerConfig
    #: scheduler steps are taken by the base once per iteration ("iteration") or by the method ("update")
    lr_schedule_unit: ClassVar[str] = "iteration"
    #: whether the method draws its batch through :meth:`shard_generators` (``rollout_shards > 1``
    #: and multi-process runs need it; ``docs/distributed.md``)
    supports_sharding: ClassVar[bool] = False

    def __init__(
        self,
        task: Any,
        reward: Reward | None = None,
        reward_scale: float | None = None,
        model: nn.Module | None = None,
        config: TrainerConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ):
        task_options = {k: v for k, v in options.items() if k in TASK_OPTIONS}
        method_options = {k: v for k, v in options.items() if k not in TASK_OPTIONS}
        self.task = resolve_task(task, reward, reward_scale, **task_options)
        config = self.config_class() if config is None else config
        if type(config) is not self.config_class:
            raise TypeError(f"config: expected a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        self.config = config
        #: the shards of every batch this process draws (all of them in one process)
        self.local_shards = shard_range(config.rollout_shards)
        if (config.rollout_shards > 1 or world_size() > 1) and not self.supports_sharding:
            raise ValueError(
                f"rollout_shards: {type(self).__name__} draws its batch from one generator and cannot be sharded "
                f"(rollout_shards={config.rollout_shards}, world size {world_size()}); expected 1 in one process"
            )
        self._shard_gens: tuple[int, list[torch.Generator], torch.Generator] | None = None
        self._synced: set[int] = set()
        self._hooked: set[int] = set()
        self.device = torch.device(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.iteration = 0
        self.history: dict[str, list[float]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        accepted = [n for n, p in inspect.signature(self.setup).parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(method_options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unexpected keyword arguments {unknown}; expected some of {sorted([*accepted, *TASK_OPTIONS, 'device', 'dtype'])}"
            )
        self.setup(model, **method_options)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.checkpoint_modules())

    def setup(self, model: nn.Module | None) -> None:  # noqa: B027 (a hook: methods override it, the default does nothing)
        """Build the method's model, optimiser and schedule (called at the end of ``__init__``;
        ``model`` is the constructor's). Method-specific constructor keywords are declared as
        keyword-only parameters of the override, e.g. ``def setup(self, model, *, data=None)``."""

    # ------------------------------------------------------------- the method's part
    @abc.abstractmethod
    def _step(self) -> dict[str, float]:
        """One iteration; returns its metrics (floats or 0-d tensors, which :meth:`step` turns into
        floats once). Draw randomness from ``self.generator``."""

    @property
    @abc.abstractmethod
    def policy(self) -> Callable[..., Tensor]:
        """The trained control ``u(x, t, **cond)`` (or agent) in its current state."""

    # ---------------------------------------------------------------- shared pieces
    @property
    def env(self) -> DiffusionEnvironment:
        """The base environment (model, scheduler, noise) the method samples with."""
        return self.task.environment

    @functools.cached_property
    def times(self) -> Tensor:
        """The task's time grid, float64 ``(steps + 1,)`` (built once): its fixed grid where it
        has one (e.g. a text-to-image scheduler's), else uniform from ``t_start`` to 1."""
        if isinstance(self.task, Task):
            return self.task.time_grid()
        return make_time_grid(self.task.steps, self.task.t_start)

    def init_seed(self, *names: object) -> int:
        """A seed derived from ``config.seed`` for a named consumer (e.g. network init)."""
        return derive_seed(self.config.seed, *names)

    def build(self, factory: Callable[[], nn.Module], *names: object) -> nn.Module:
        """``factory()`` with the global RNG seeded from ``config.seed`` and ``names`` (its
        initialisation is reproducible; the caller's RNG state is restored)."""
        with seeded(self.init_seed("init", *names), self.device):
            return factory()

    def conditioning(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sample conditioning drawn from the task's samplers (empty if unconditional)."""
        gen = self.generator if generator is None else generator
        return {name: spec[1](n, gen, self.device) for name, spec in getattr(self.task, "conditioning", {}).items()}

    def configure_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """Set :attr:`optimizer` (``config.optimizer`` over ``module``'s trainable parameters) and
        :attr:`lr_scheduler` (``config.lr_schedule``); returns the optimiser."""
        self.optimizer = make_optimizer((p for p in module.parameters() if p.requires_grad), self.config)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, self.config)
        return self.optimizer

    def clip_gradients(self, parameters: Iterable[Tensor]) -> Tensor:
        """Clip to ``config.max_grad_norm`` (if set); returns the norm before clipping as a detached
        0-d tensor (no host sync: :meth:`step` turns the metrics into floats once per iteration).
        In a process group the gradients are first averaged over ranks, so the norm and the
        clipping are those of the global gradient."""
        parameters = list(parameters)
        if world_size() > 1:
            average_gradients(parameters)
            self._synced.update(id(p) for p in parameters)
        params = [p for p in parameters if p.grad is not None]
        limit = self.config.max_grad_norm
        if not params:
            return torch.zeros((), device=self.device)
        if limit is None:  # norm only: clipping at inf would turn an infinite norm into NaN gradients
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).detach()
        return nn.utils.clip_grad_norm_(params, limit).detach()

    # ------------------------------------------------------------------- training
    def step(self) -> dict[str, float]:
        """Run one iteration; append its metrics to :attr:`history` and return them."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else float("nan")
        if world_size() > 1:  # gradients not averaged by clip_gradients are averaged before each step
            for opt in self.optimizers().values():
                if id(opt) not in self._hooked:
                    opt.register_step_pre_hook(self._sync_before_step)
                    self._hooked.add(id(opt))
        with flush_denormals(), seeded(self.init_seed("iteration", self.iteration), self.device):
            metrics = self._step()
        if world_size() > 1:  # one all-reduce: the metrics are means over ranks (global ones stay)
            keys = list(metrics)
            values = all_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
            metrics = dict(zip(keys, values.tolist()))
        record = {  # the one host sync of the iteration's metrics
            "iteration": float(self.iteration),
            **{k: float(v) for k, v in metrics.items()},
            "lr": float(lr),
            "seconds": time.perf_counter() - start,
        }
        if record.get("valid_fraction", 1.0) == 0.0:
            warnings.warn(
                f"{type(self).__name__}: iteration {self.iteration}: the reward flagged every sample invalid "
                "(non-finite or out of its domain), so nothing was learnt; check the base model and the reward",
                RuntimeWarning,
                stacklevel=2,
            )
        self.iteration += 1
        if self.lr_schedule_unit == "iteration" and self.iteration <= self.config.iterations:
            for scheduler in self.lr_schedulers().values():
                scheduler.step()
        done = len(next(iter(self.history.values()))) if self.history else 0
        for key in record:
            self.history.setdefault(key, [float("nan")] * done)
        for key, values in self.history.items():
            values.append(record.get(key, float("nan")))
        return record

    def train(
        self,
        iterations: int | None = None,
        callback: Callable[[dict[str, float]], Any] | None = None,
        progress: bool = True,
        *,
        logger: Logger | None = None,
        log_every: int = 1,
        log_samples_every: int | None = None,
        log_num_samples: int = 16,
    ) -> dict[str, list[float]]:
        """Run ``iterations`` more iterations (default: up to ``config.iterations``).

        ``callback(record)`` runs after every iteration (log it, checkpoint, ...); returning
        ``True`` stops training. ``progress`` shows a tqdm bar. Returns :attr:`history`.

        In a process group (``docs/distributed.md``) the bar, the logger and sample grids are
        rank 0's only; the callback runs on every rank (so that it may call :meth:`save`, a
        collective) and training stops when it returns ``True`` on any rank.

        ``logger`` (a :class:`~diffusiongym.loggers.Logger`; flushed at the end, never closed)
        receives the record of every ``log_every``-th iteration (those with ``iteration %
        log_every == 0``) at ``step = iteration``, all keys but ``iteration``: with
        ``log_every=1`` exactly :attr:`history`. ``log_samples_every=k`` (image tasks,
        samples ``(C, H, W)``) also logs a grid ``"samples"`` of ``log_num_samples`` fresh
        samples of the policy (:meth:`sample`, a fixed seed, so the grids are comparable; no
        effect on training) before the first iteration and at ``step = iteration`` whenever
        ``iteration`` (completed iterations) is a multiple of ``k``.
        """
        todo = (
            max(self.config.iterations - self.iteration, 0)
            if iterations is None
            else check_positive_int("iterations", iterations)
        )
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected a callable callback(record), got {type(callback).__name__}")
        log_every, log_samples_every, log_num_samples = self._check_logging(
            logger, log_every, log_samples_every, log_num_samples
        )
        main = is_main_process()
        if not main:
            logger, log_samples_every = None, None
        if log_samples_every is not None and self.iteration == 0:
            self.log_samples(logger, log_num_samples)
        with tqdm(total=todo, disable=not (progress and main), desc=type(self).__name__, leave=False) as bar:
            for _ in range(todo):
                record = self.step()
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "objective") if k in record})
                if logger is not None and int(record["iteration"]) % log_every == 0:
                    logger.log_metrics({k: v for k, v in record.items() if k != "iteration"}, int(record["iteration"]))
                if log_samples_every is not None and self.iteration % log_samples_every == 0:
                    self.log_samples(logger, log_num_samples)
                stop = callback is not None and callback(record) is True
                if any_rank(stop) if world_size() > 1 else stop:
                    break
        if logger is not None:
            logger.flush()
        return self.history

    def _check_logging(
        self, logger: Any, log_every: Any, log_samples_every: Any, log_num_samples: Any
    ) -> tuple[int, int | None, int]:
        if logger is not None and not isinstance(logger, Logger):
            raise TypeError(
                "logger: expected a diffusiongym.loggers.Logger (CSVLogger, TensorBoardLogger, WandbLogger, "
                f"MultiLogger or a subclass), got {type(logger).__name__}"
            )
        log_every = check_positive_int("log_every", log_every)
        log_num_samples = check_positive_int("log_num_samples", log_num_samples)
        if log_samples_every is not None:
            log_samples_every = check_positive_int("log_samples_every", log_samples_every)
            if logger is None:
                raise ValueError("log_samples_every: sample grids need a logger; pass logger=")
            shape = getattr(self.env, "sample_shape", None)
            if shape is not None and len(shape) != 3:
                raise ValueError(
                    f"log_samples_every: sample grids need image samples (C, H, W); this task's samples are {tuple(shape)}"
                )
        return log_every, log_samples_every, log_num_samples

    def log_samples(self, logger: Logger, num_samples: int = 16, name: str = "samples") -> None:
        """Log a grid of ``num_samples`` fresh samples ``x1`` of the current policy under ``name``
        at ``step = iteration`` (seed derived from ``config.seed``: the same noise every time)."""
        x1 = self.sample(num_samples, seed=self.init_seed("log_samples")).x1
        if x1.ndim != 4:
            raise ValueError(f"log_samples_every: sample grids need image samples (N, C, H, W), got {tuple(x1.shape)}")
        logger.log_images(name, x1, self.iteration)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def sample(self, num_samples: int, seed: int = 0, steps: int | None = None, **kwargs: Any) -> Trajectory:
        """Fresh trajectories of the current :attr:`policy` (no effect on training's RNG), on the
        task's grid or a uniform grid of ``steps`` steps from ``task.t_start``."""
        n = check_positive_int("num_samples", num_samples)
        if steps is None or getattr(self.task, "times", None) is not None:  # a fixed grid: Task.time_grid checks steps
            grid = self.times if steps is None else self.task.time_grid(check_positive_int("steps", steps))
        else:
            grid = make_time_grid(check_positive_int("steps", steps), self.task.t_start)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        cond = self.conditioning(n, gen)
        with self.eval_mode():
            return sample(
                self.env,
                n,
                grid=grid,
                control=self.policy,
                reward=self.task.reward,
                reward_scale=self.task.reward_scale,
                cond=cond,
                generator=gen,
                device=self.device,
                dtype=self.dtype,
                **{"compile": self.config.compile, **kwargs},
            )

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Put the checkpointed modules in eval mode (no dropout) inside the block; restore after."""
        modes = {name: m.training for name, m in self.checkpoint_modules().items()}
        for module in self.checkpoint_modules().values():
            module.eval()
        try:
            yield
        finally:
            for name, module in self.checkpoint_modules().items():
                module.train(modes[name])

    def evaluate(self, num_samples: int = 4096, seed: int = 0, steps: int | None = None) -> dict[str, float]:
        """:data:`EVALUATION_KEYS` of ``num_samples`` fresh samples of the current policy:
        ``objective`` ``E[lambda r] - KL``, ``kl``, ``reward`` (unscaled), ``valid_fraction``
        and ``gap_closed`` (fraction of the oracle's gap; NaN without an oracle). ``steps``:
        evaluate on a grid other than the training one (e.g. finer)."""
        return trajectory_metrics(self.sample(num_samples, seed, steps=steps), self.task)

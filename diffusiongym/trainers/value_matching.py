"""Value Matching: learn the cost-to-go ``V(x, t)`` and steer with ``u = -sigma grad_x V``.

Gradient-free in the reward (``shared/DESIGN.md`` s. 7). With ``lambda = reward_scale``,
step sizes ``h_k`` and the current control ``u_k = -sigma(t_k) grad V(x_k, t_k)``, each
iteration

1. samples ``n`` trajectories ``x_0..x_m`` with the current :class:`ValuePolicy`;
2. forms the observed cost-to-go ``C_k = sum_{i >= k} 1/2 |u_i|^2 h_i - lambda r(x_m)``
   (detached) at every grid point ``k = 0..m``;
3. regresses ``V(x_k, t_k)`` onto ``C_k`` with the weighted loss
   ``mean_k w_k (V(x_k, t_k) - C_k)^2``, ``w_k ∝ 1 / (1 + 1/2 int_{t_k}^1 sigma^2 dt)``
   (the variance of ``C_k`` grows with the noise still to come).

The regression target is the cost-to-go *of the current control*, so this is
approximate policy iteration; its fixed point is ``V = V*`` (then ``u = u*``). Only
reward *values* are used: non-differentiable rewards work.

Training reads top to bottom in :meth:`ValueMatching.train`; hyper-parameters live in
:class:`ValueMatchingConfig`; logs go to the returned history and an optional
callback. :meth:`ValueMatching.save` / :meth:`ValueMatching.load` write and read a
safetensors + JSON folder holding everything needed to resume bit-for-bit on the CPU
(network, optimiser, random generator, replay buffer, history);
:func:`load_value_policy` rebuilds just the trained policy.

Digits: :func:`digits_value_task` is the shipped model made unconditional (null label) with
the non-differentiable reward ``1[classifier argmax = target]``; :func:`save_value_net` /
:func:`load_value_net` store a bare value network (safetensors + JSON), e.g. the shipped
``weights/value_digits.*`` (:data:`DIGITS_VALUE_WEIGHTS`, from
``benchmarks/value_matching_digits.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.networks import TimeMLP
from diffusiongym.policies.networks import SignalScaled, TimeCNN
from diffusiongym.policies.value import ValuePolicy
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.io import load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from diffusiongym.utils.validation import check_positive_int, unknown_name_error

DIGITS_VALUE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "value_digits"

__all__ = [
    "ValueMatchingConfig",
    "ValueMatching",
    "load_value_policy",
    "time_weights",
    "default_value_net",
    "digits_value_task",
    "save_value_net",
    "load_value_net",
    "DIGITS_VALUE_WEIGHTS",
]

CondSampler = Callable[[int, torch.Generator, torch.device], dict[str, Tensor]]
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
TIME_WEIGHTINGS = ("variance", "uniform")
HISTORY_KEYS = ("iteration", "loss", "reward", "kl", "objective", "valid_fraction", "lr", "grad_norm", "seconds")


@dataclass
class ValueMatchingConfig:
    """Hyper-parameters of :class:`ValueMatching`.

    Attributes
    ----------
    iterations : int
        Sampling rounds in a full run (the learning-rate schedule spans them).
    batch_size : int
        Trajectories sampled per iteration.
    updates_per_iteration : int
        Gradient steps on the regression loss per iteration.
    minibatch_size : int
        ``(x_k, t_k, C_k)`` triples per gradient step (drawn from all ``m + 1`` grid points
        of the buffered trajectories).
    replay : int
        How many past iterations' trajectories stay in the buffer besides the newest
        (0: on-policy regression only). Older targets are costs-to-go of older controls.
    lr, lr_schedule, lr_final_factor, warmup_iterations
        Learning rate, its schedule over ``iterations`` (``"constant"``, ``"cosine"``,
        ``"linear"`` decay to ``lr * lr_final_factor``) and a linear warm-up.
    optimizer : {"adam", "adamw", "sgd"}
    weight_decay : float
    grad_clip : float or None
        Clip the gradient's global norm (``None``: no clipping).
    time_weighting : {"variance", "uniform"}
        Per-time weight of the loss (see the module docstring).
    seed : int
        Seeds the trainer's generator (sampling, conditioning, minibatches).
    """

    iterations: int = 200
    batch_size: int = 256
    updates_per_iteration: int = 8
    minibatch_size: int = 2048
    replay: int = 0
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_final_factor: float = 0.1
    warmup_iterations: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    time_weighting: str = "variance"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "updates_per_iteration", "minibatch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("replay", "warmup_iterations", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not (isinstance(self.lr_final_factor, (int, float)) and 0 <= self.lr_final_factor <= 1):
            raise ValueError(f"lr_final_factor: expected a number in [0, 1], got {self.lr_final_factor!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a non-negative number, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip: expected a positive number or None, got {self.grad_clip!r}")
        for name, known in (("lr_schedule", LR_SCHEDULES), ("optimizer", OPTIMIZERS), ("time_weighting", TIME_WEIGHTINGS)):
            if getattr(self, name) not in known:
                raise unknown_name_error(name, getattr(self, name), known)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValueMatchingConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)


def time_weights(env: DiffusionEnvironment, times: Tensor, kind: str = "variance") -> Tensor:
    """Per-grid-point loss weights, shape ``(m + 1,)``, mean 1.

    ``"variance"``: ``w_k ∝ 1 / (1 + 1/2 sum_{i >= k} sigma(t_i)^2 h_i)`` (left-point rule
    for ``int_{t_k}^1 sigma^2 dt``); ``"uniform"``: all ones.
    """
    if kind not in TIME_WEIGHTINGS:
        raise unknown_name_error("time_weighting", kind, TIME_WEIGHTINGS)
    times = torch.as_tensor(times, dtype=torch.float64)
    if kind == "uniform":
        return torch.ones_like(times)
    h = times[1:] - times[:-1]
    sig2h = env.sigma(times[:-1]).to(torch.float64) ** 2 * h
    remaining = torch.cat([sig2h.flip(0).cumsum(0).flip(0), sig2h.new_zeros(1)])
    w = 1.0 / (1.0 + 0.5 * remaining)
    return w / w.mean()


def default_value_net(sample_shape: tuple[int, ...], scheduler: Any, num_classes: int | None = None) -> nn.Module:
    """A zero-initialised value network for ``sample_shape`` (the base control ``u = 0`` at
    the start): ``SignalScaled(TimeMLP)`` for vectors ``(d,)``, ``SignalScaled(TimeCNN)``
    for images ``(C, H, W)``; ``scheduler`` is the environment's."""
    if len(sample_shape) == 1:
        return SignalScaled(TimeMLP(sample_shape[0], out_dim=1, hidden=128, layers=3, zero_init=True), scheduler)
    if len(sample_shape) == 3:
        return SignalScaled(TimeCNN(sample_shape[0], num_classes=num_classes, output="value", zero_init=True), scheduler)
    raise ValueError(f"sample_shape: expected (d,) or (C, H, W), got {tuple(sample_shape)}")


def _lr_factor(cfg: ValueMatchingConfig, iteration: int) -> float:
    if iteration < cfg.warmup_iterations:
        return (iteration + 1) / (cfg.warmup_iterations + 1)
    span = max(cfg.iterations - cfg.warmup_iterations, 1)
    progress = min((iteration - cfg.warmup_iterations) / span, 1.0)
    final = cfg.lr_final_factor
    if cfg.lr_schedule == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "linear":
        return 1 - (1 - final) * progress
    return 1.0


def _make_optimizer(cfg: ValueMatchingConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


class ValueMatching:
    """Value Matching trainer (see the module docstring).

    Parameters
    ----------
    env : DiffusionEnvironment
        Base model with a stochastic noise (``sigma > 0``; memoryless for the exact optimum).
        Its scheduler should be the one the value network's :class:`SignalScaled` uses.
    reward : Reward
        Terminal reward ``r(x1)``; only its values are used.
    value_net : nn.Module
        ``value_net(x, t, **cond) -> (n,)`` or ``(n, 1)``; trained in place. Zero-init
        heads start at the base model (``u = 0``).
    config : ValueMatchingConfig, optional
    reward_scale : float
        ``lambda``.
    steps, t_start
        Euler–Maruyama grid (uniform, ``steps`` steps from ``t_start`` to 1).
    action_scale : float
        Passed to the :class:`ValuePolicy` (Gymnasium action normalisation).
    cond_sampler : callable, optional
        ``cond_sampler(n, generator, device) -> dict`` of per-sample conditioning tensors
        (e.g. class labels), drawn afresh every iteration.
    device : str or torch.device
        Where to sample and train (the network is moved there).

    Attributes
    ----------
    policy : ValuePolicy
        The current control (shares ``value_net``).
    iteration : int
        Iterations done so far (also after :meth:`load`).
    history : dict of lists
        One entry per iteration for each of ``HISTORY_KEYS``.
    """

    def __init__(
        self,
        env: DiffusionEnvironment,
        reward: Reward,
        value_net: nn.Module,
        config: ValueMatchingConfig | None = None,
        *,
        reward_scale: float = 1.0,
        steps: int = 100,
        t_start: float = DEFAULT_T_START,
        action_scale: float = 1.0,
        cond_sampler: CondSampler | None = None,
        device: str | torch.device = "cpu",
    ):
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if not isinstance(reward, Reward):
            raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
        if config is None:
            config = ValueMatchingConfig()
        if not isinstance(config, ValueMatchingConfig):
            raise TypeError(f"config: expected a ValueMatchingConfig, got {type(config).__name__}")
        if env.sample_shape is None:
            raise ValueError("env: expected a model with a sample_shape")
        if cond_sampler is not None and not callable(cond_sampler):
            raise TypeError(f"cond_sampler: expected a callable (n, generator, device) -> dict, got {type(cond_sampler).__name__}")
        self.env, self.reward, self.config = env, reward, config
        self.reward_scale = float(reward_scale)
        self.steps = check_positive_int("steps", steps)
        self.t_start = float(t_start)
        self.times = make_time_grid(self.steps, self.t_start)
        self.device = torch.device(device)
        self.cond_sampler = cond_sampler
        self.value_net = value_net.to(self.device)
        self.policy = ValuePolicy(self.value_net, env, action_scale=action_scale)
        self.weights = time_weights(env, self.times, config.time_weighting)
        self.optimizer = _make_optimizer(config, [p for p in self.value_net.parameters() if p.requires_grad])
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.iteration = 0
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.buffer: list[dict[str, Any]] = []

    @classmethod
    def from_task(cls, task: Any, value_net: nn.Module | None = None, config: ValueMatchingConfig | None = None, **kwargs: Any) -> "ValueMatching":
        """Build a trainer from a :class:`diffusiongym.tasks.Task` (its environment, reward,
        reward scale, grid, action scale and conditioning samplers); ``value_net``
        defaults to :func:`default_value_net`."""
        if value_net is None:
            value_net = default_value_net(task.sample_shape, task.environment.scheduler)
        cond_sampler = kwargs.pop("cond_sampler", None)
        if cond_sampler is None and task.conditioning:
            samplers = {name: spec[1] for name, spec in task.conditioning.items()}

            def cond_sampler(n: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
                return {name: fn(n, generator, device) for name, fn in samplers.items()}

        options = {"reward_scale": task.reward_scale, "steps": task.steps, "t_start": task.t_start, "action_scale": task.action_scale}
        options.update(kwargs)
        return cls(task.environment, task.reward, value_net, config, cond_sampler=cond_sampler, **options)

    # ------------------------------------------------------------------ sampling
    def collect(self, num_samples: int | None = None, *, store: tuple[str, ...] = ("states",), generator: torch.Generator | None = None) -> tuple[Trajectory, dict[str, Tensor]]:
        """Sample with the current policy; returns the trajectory and the conditioning used."""
        n = self.config.batch_size if num_samples is None else check_positive_int("num_samples", num_samples)
        gen = self.generator if generator is None else generator
        cond = self.cond_sampler(n, gen, self.device) if self.cond_sampler is not None else {}
        traj = sample(
            self.env,
            n,
            steps=self.steps,
            t_start=self.t_start,
            control=self.policy,
            reward=self.reward,
            reward_scale=self.reward_scale,
            cond=cond,
            generator=gen,
            store=store,
            device=self.device,
        )
        return traj, cond

    # ------------------------------------------------------------------ training
    def train(self, iterations: int | None = None, callback: Callable[[dict[str, float]], Any] | None = None, progress: bool = False) -> dict[str, list[float]]:
        """Run ``iterations`` more iterations (default: until ``config.iterations``).

        ``callback(record)`` is called after each iteration with that iteration's log
        record; returns ``self.history``.
        """
        cfg = self.config
        todo = max(cfg.iterations - self.iteration, 0) if iterations is None else check_positive_int("iterations", iterations)
        m1 = self.steps + 1
        times = self.times.to(self.device, torch.float32)
        weights = self.weights.to(self.device, torch.float32)
        for _ in tqdm(range(todo), disable=not progress, desc="value matching"):
            start = time.perf_counter()
            lr = cfg.lr * _lr_factor(cfg, self.iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

            # 1. roll out the current control u = -sigma grad V (no graph kept)
            self.value_net.eval()
            traj, cond = self.collect()
            valid = traj.valid
            cost_to_go = traj.cost_to_go  # (m + 1, n), detached
            self.buffer.append({
                "states": traj.states[:, valid].to(torch.float32),
                "cost_to_go": cost_to_go[:, valid].to(torch.float32),
                "cond": {k: v[valid] for k, v in cond.items()},
            })
            self.buffer = self.buffer[-(cfg.replay + 1):]

            # 2. the regression set: every grid point of every buffered trajectory
            states = torch.cat([b["states"] for b in self.buffer], 1)  # (m + 1, N, *shape)
            targets = torch.cat([b["cost_to_go"] for b in self.buffer], 1)  # (m + 1, N)
            conds = {k: torch.cat([b["cond"][k] for b in self.buffer]) for k in cond}
            num = states.shape[1]

            # 3. weighted regression of V(x_k, t_k) onto C_k
            self.value_net.train()
            losses, norms = [], []
            for _ in range(cfg.updates_per_iteration if num > 0 else 0):
                flat = torch.randint(m1 * num, (cfg.minibatch_size,), generator=self.generator, device=self.device)
                k, i = flat // num, flat % num
                mb_cond = {key: value[i] for key, value in conds.items()}
                pred = self.policy.value(states[k, i], times[k], **mb_cond)
                loss = (weights[k] * (pred - targets[k, i]) ** 2).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
                norms.append(float(nn.utils.clip_grad_norm_(self.value_net.parameters(), max_norm)))
                self.optimizer.step()
                losses.append(float(loss.detach()))

            record = self._record(traj, losses, norms, lr, time.perf_counter() - start)
            self.iteration += 1
            for key in HISTORY_KEYS:
                self.history[key].append(record[key])
            if callback is not None:
                callback(record)
        self.value_net.eval()
        return self.history

    def _record(self, traj: Trajectory, losses: list[float], norms: list[float], lr: float, seconds: float) -> dict[str, float]:
        valid = traj.valid
        nan = float("nan")
        mean = (lambda v: float(v[valid].mean())) if bool(valid.any()) else (lambda v: nan)
        return {
            "iteration": self.iteration,
            "loss": sum(losses) / len(losses) if losses else nan,
            "reward": mean(traj.reward),
            "kl": mean(traj.kl),
            "objective": mean(traj.objective),
            "valid_fraction": float(valid.float().mean()),
            "lr": lr,
            "grad_norm": sum(norms) / len(norms) if norms else nan,
            "seconds": seconds,
        }

    # ------------------------------------------------------------ save / resume
    def save(self, path: str | Path) -> Path:
        """Write a checkpoint folder (``weights.safetensors`` + ``config.json``) from which
        :meth:`load` resumes exactly and :func:`load_value_policy` rebuilds the policy."""
        tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors["generator_state"] = self.generator.get_state()
        for j, entry in enumerate(self.buffer):
            tensors[f"buffer.{j}.states"] = entry["states"]
            tensors[f"buffer.{j}.cost_to_go"] = entry["cost_to_go"]
            for key, value in entry["cond"].items():
                tensors[f"buffer.{j}.cond.{key}"] = value
        meta = {
            "method": "value_matching",
            "config": asdict(self.config),
            "iteration": self.iteration,
            "history": self.history,
            "reward_scale": self.reward_scale,
            "steps": self.steps,
            "t_start": self.t_start,
            "action_scale": self.policy.action_scale,
            "value_net": {"class": type(self.value_net).__name__, "config": getattr(self.value_net, "config", None)},
            "optimizer": opt_meta,
            "buffer_size": len(self.buffer),
            "buffer_cond_keys": sorted(self.buffer[0]["cond"]) if self.buffer else [],
        }
        return save_checkpoint(path, {"value_net": self.value_net}, meta, tensors)

    def load(self, path: str | Path) -> "ValueMatching":
        """Restore a checkpoint written by :meth:`save` into this trainer (same network
        architecture, environment and reward); :meth:`train` then continues the run."""
        meta, extra = load_checkpoint(path, {"value_net": self.value_net}, device=self.device)
        if meta.get("method") != "value_matching":
            raise ValueError(f"path: expected a value_matching checkpoint, got method {meta.get('method')!r}")
        self.config = ValueMatchingConfig.from_dict(meta["config"])
        self.reward_scale = float(meta["reward_scale"])
        self.steps, self.t_start = int(meta["steps"]), float(meta["t_start"])
        self.times = make_time_grid(self.steps, self.t_start)
        self.weights = time_weights(self.env, self.times, self.config.time_weighting)
        self.policy.action_scale = float(meta["action_scale"])
        self.iteration = int(meta["iteration"])
        self.history = {k: list(v) for k, v in meta["history"].items()}
        self.generator.set_state(extra["generator_state"].cpu())
        self.optimizer = _make_optimizer(self.config, [p for p in self.value_net.parameters() if p.requires_grad])
        load_optimizer_tensors(self.optimizer, extra, meta["optimizer"])
        self.buffer = []
        for j in range(int(meta["buffer_size"])):
            cond = {k: extra[f"buffer.{j}.cond.{k}"] for k in meta["buffer_cond_keys"]}
            self.buffer.append({"states": extra[f"buffer.{j}.states"], "cost_to_go": extra[f"buffer.{j}.cost_to_go"], "cond": cond})
        return self


def load_value_policy(path: str | Path, env: DiffusionEnvironment, value_net: nn.Module | None = None, device: str | torch.device = "cpu") -> ValuePolicy:
    """The trained :class:`ValuePolicy` from a :meth:`ValueMatching.save` folder.

    ``value_net`` (an untrained network of the saved architecture) may be omitted for
    :class:`~diffusiongym.policies.networks.TimeMLP` and :class:`TimeCNN`, which are
    rebuilt from the saved config.
    """
    meta, _ = load_checkpoint(path, None)
    spec = meta.get("value_net", {})
    if value_net is None:
        builders = {"TimeMLP": TimeMLP, "TimeCNN": TimeCNN}
        cls_name, config = spec.get("class"), spec.get("config")
        inner = config if cls_name != "SignalScaled" else (config or {}).get("net")
        inner_name = cls_name if cls_name != "SignalScaled" else (config or {}).get("net_class")
        if inner_name not in builders or inner is None:
            raise ValueError(f"value_net: the checkpoint holds a {cls_name!r}; pass an untrained instance to load it into")
        value_net = builders[inner_name](**inner)
        if cls_name == "SignalScaled":
            value_net = SignalScaled(value_net, env.scheduler)
    load_checkpoint(path, {"value_net": value_net}, device=device)
    value_net.to(device).eval()
    return ValuePolicy(value_net, env, action_scale=float(meta.get("action_scale", 1.0)))


# ----------------------------------------------------------------- digits recipe
def digits_value_task(target: int = 3, reward_scale: float = 10.0, steps: int = 25, mode: str = "is_class", device: str | torch.device = "cpu") -> Any:
    """The digits Value Matching setting: the shipped model *unconditional*, rewarded for class ``target``.

    The shipped :class:`~diffusiongym.models.digits.DigitsUNet` with the null label
    (:data:`~diffusiongym.models.digits.NULL_LABEL`: every class, about 10% each), the
    memoryless SDE on ``steps`` Euler steps from ``t = 0.01``, reward
    ``DigitClassifierReward(target, mode)`` (default the non-differentiable indicator
    ``argmax == target``) and ``reward_scale = lambda``. With base rate ``p0`` of the
    class, the tilted optimum ``p* ∝ p exp(lambda 1[class = target])`` puts
    ``p0 e^lambda / (1 - p0 + p0 e^lambda)`` on it (for the measured ``p0 = 0.097``: 0.94 at
    ``lambda = 5``, 0.9996 at the default ``lambda = 10``, the shipped value network's) at the
    optimal objective ``log(1 - p0 + p0 e^lambda)``.

    Returns a :class:`~diffusiongym.tasks.Task` (``name = "Digits-v0"``) whose conditioning
    sampler draws null labels, so :meth:`ValueMatching.from_task` and the Gymnasium envs
    use the unconditional model.
    """
    from dataclasses import replace

    import gymnasium

    from diffusiongym.models.digits import NULL_LABEL, digits_task
    from diffusiongym.rewards.images import DigitClassifierReward

    def null_labels(n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        return torch.full((int(n),), NULL_LABEL, dtype=torch.long, device=device)

    reward = DigitClassifierReward(target=target, mode=mode, device=device)
    task = digits_task(reward=reward, reward_scale=reward_scale, steps=steps, device=device)
    return replace(task, conditioning={"label": (gymnasium.spaces.Discrete(NULL_LABEL + 1), null_labels)})


def save_value_net(value_net: nn.Module, stem: str | Path, info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write a trained value network alone (no optimiser, no buffer): ``<stem>.safetensors``
    (float32 state dict) and ``<stem>.json`` (``{"value_net": {"class", "config"}, **info}``);
    :func:`load_value_net` reads it back. For shipping small pretrained value networks."""
    from diffusiongym.models.digits import save_module

    config = {"value_net": {"class": type(value_net).__name__, "config": getattr(value_net, "config", None)}, **(info or {})}
    return save_module(value_net, stem, config)


def load_value_net(stem: str | Path, scheduler: Any, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a :class:`TimeMLP` / :class:`TimeCNN` (optionally in :class:`SignalScaled`
    with ``scheduler``) saved by :func:`save_value_net`; returns ``(value_net, config)``."""
    import json

    from safetensors.torch import load_file

    stem = Path(stem)
    weights, cfg_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.exists() or not cfg_path.exists():
        raise FileNotFoundError(f"stem: expected {weights.name} and {cfg_path.name} in {stem.parent}")
    config = json.loads(cfg_path.read_text())
    spec = config.get("value_net", {})
    builders = {"TimeMLP": TimeMLP, "TimeCNN": TimeCNN}
    cls_name, net_cfg = spec.get("class"), spec.get("config") or {}
    inner_name, inner_cfg = (net_cfg.get("net_class"), net_cfg.get("net")) if cls_name == "SignalScaled" else (cls_name, net_cfg)
    if inner_name not in builders or inner_cfg is None:
        raise ValueError(f"stem: cannot rebuild a value network of class {cls_name!r} (expected TimeMLP, TimeCNN or SignalScaled of one)")
    net: nn.Module = builders[inner_name](**inner_cfg)
    if cls_name == "SignalScaled":
        net = SignalScaled(net, scheduler)
    net.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    return net.to(device).eval(), config

"""Batched Euler–Maruyama rollouts of the (controlled) SDE.

Controlled dynamics ``dX = (b + sigma u) dt + sigma dB`` on a grid
``t_0 < ... < t_m`` with ``h_k = t_{k+1} - t_k``::

    x_{k+1} = x_k + h_k (b + sigma u)(x_k, t_k) + sqrt(h_k) sigma(t_k) z_k,   z_k ~ N(0, I)

Running cost of step ``k``: ``1/2 |u_k|^2 h_k`` (Girsanov: its sum is the KL of the
controlled path law to the base one, for the sigma actually used). With ``sigma = 0``
no KL exists: ``running_cost`` is then ``None``.

The control is given either as ``control(x, t, **cond) -> u`` or as ``policy``, a
model in the base model's own parameterisation (e.g. a fine-tuned copy); then
``u = (b_policy - b_base) / sigma``.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusiongym.compiled import engine_rollout
from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.control import ModelControl, output_control
from diffusiongym.rewards.base import Reward
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.validation import (
    ArgumentTypeError,
    check_int,
    check_positive_int,
    check_real,
    check_tensor,
    unknown_name_error,
)

# fewer steps than this with a first-step amplification |1 + h coef_x| above STIFF_FACTOR warns
MIN_STABLE_STEPS = 5
STIFF_FACTOR = 30.0

__all__ = ["Trajectory", "sample", "StepSchedule", "STORABLE", "MIN_STABLE_STEPS", "STIFF_FACTOR"]


STORABLE = ("states", "drifts", "noises", "controls")
Control = Callable[..., Tensor]


@dataclass
class StepSchedule:
    """Per-step scalars of a grid, precomputed once (python floats: no tensor work per step).

    ``drift = coef_x * x + coef_out * model_output`` at ``t_k``; ``step_sigma = sqrt(h) sigma``.
    """

    times: Tensor
    t: list[float]
    h: list[float]
    sigma: list[float]
    step_sigma: list[float]
    coef_x: list[float]
    coef_out: list[float]
    deterministic: bool

    @classmethod
    def build(cls, env: DiffusionEnvironment, times: Tensor) -> StepSchedule:
        left = times[:-1]
        h = times[1:] - left
        sigma = env.sigma(left)
        coef_x, coef_out = env.coefficients(left, "drift")
        if not (torch.isfinite(coef_x).all() and torch.isfinite(coef_out).all()):
            bad = left[~(torch.isfinite(coef_x) & torch.isfinite(coef_out))]
            raise ValueError(
                f"grid: the drift is singular at t = {bad.tolist()[:3]} for {env.parameterization} with "
                f"{env.scheduler!r} and {env.noise!r}; start the grid later (t_start > 0)"
            )
        schedule = cls(
            times=times,
            t=left.tolist(),
            h=h.tolist(),
            sigma=sigma.tolist(),
            step_sigma=(h.sqrt() * sigma).tolist(),
            coef_x=coef_x.tolist(),
            coef_out=coef_out.tolist(),
            deterministic=env.noise.is_deterministic,
        )
        schedule.warn_if_stiff()
        return schedule

    def warn_if_stiff(self) -> None:
        """Warn when fewer than :data:`MIN_STABLE_STEPS` stochastic steps start with a first Euler step
        that amplifies the state by more than :data:`STIFF_FACTOR` (``|1 + h_0 coef_x(t_0)|``): the
        samples then blow up (measured std of ``x1`` 20-1000 instead of ~1 on the GMM tasks at 1-4 steps)."""
        stiff = abs(1.0 + self.h[0] * self.coef_x[0])
        if len(self.h) < MIN_STABLE_STEPS and not self.deterministic and stiff > STIFF_FACTOR:
            warnings.warn(
                f"steps={len(self.h)}: the first Euler-Maruyama step from t={self.t[0]:.4g} is stiff "
                f"(|1 + h b_x| = {stiff:.3g}); with fewer than {MIN_STABLE_STEPS} steps the samples blow up "
                "or are badly inflated. Use steps >= 5, a larger t_start, or noise='ode'/a constant noise.",
                RuntimeWarning,
                stacklevel=4,
            )

    def __len__(self) -> int:
        return len(self.h)


@dataclass
class Trajectory:
    """Result of :func:`sample`.

    Attributes
    ----------
    x1 : Tensor, (n, *sample_shape)
        Final states at ``t_m``.
    times : Tensor, (m + 1,)
        The grid (float64).
    reward : Tensor or None, (n,)
        ``r(x1)`` (unscaled) when a reward was given.
    valid : Tensor, (n,) bool
        Finite final state (and the reward's own validity).
    running_cost : Tensor or None, (m, n)
        ``1/2 |u_k|^2 h_k``; zeros without a control; ``None`` for ``sigma = 0`` (no KL).
    reward_scale : float
    states, drifts, noises, controls : Tensor or None
        Stored only when asked (``store=``): states ``(m + 1, n, ...)``, the others ``(m, n, ...)``.
        ``drifts`` holds the *base* drift ``b``; ``noises`` the standard normals ``z_k``.
    """

    x1: Tensor
    times: Tensor
    valid: Tensor
    reward: Tensor | None = None
    running_cost: Tensor | None = None
    reward_scale: float = 1.0
    states: Tensor | None = None
    drifts: Tensor | None = None
    noises: Tensor | None = None
    controls: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kl(self) -> Tensor | None:
        """Per-sample KL estimate ``sum_k 1/2 |u_k|^2 h_k`` (``None`` when ``sigma = 0``)."""
        return None if self.running_cost is None else self.running_cost.sum(0)

    @property
    def terminal_cost(self) -> Tensor:
        if self.reward is None:
            raise ValueError("reward: this trajectory was sampled without a reward")
        return -self.reward_scale * self.reward

    @property
    def total_cost(self) -> Tensor:
        """``KL - lambda r(x1)`` per sample (requires a reward and ``sigma > 0``)."""
        if self.kl is None:
            raise ValueError("noise: sigma = 0 (ODE) defines no KL, so no total cost")
        return self.kl + self.terminal_cost

    @property
    def objective(self) -> Tensor:
        """``lambda r(x1) - KL`` per sample (the Gymnasium return)."""
        return -self.total_cost

    @property
    def cost_to_go(self) -> Tensor:
        """``C_k = sum_{i >= k} 1/2 |u_i|^2 h_i - lambda r(x_m)``, shape ``(m + 1, n)``."""
        if self.running_cost is None:
            raise ValueError("noise: sigma = 0 (ODE) defines no KL, so no cost-to-go")
        tail = self.running_cost.flip(0).cumsum(0).flip(0)
        zero = torch.zeros_like(tail[:1])
        return torch.cat([tail, zero], 0) + self.terminal_cost


def resolve_generator(
    seed: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """The generator a sampler draws from: ``generator`` (checked: a ``torch.Generator`` on
    ``device``'s type), a new one seeded with ``seed``, or ``None`` (torch's global RNG) when neither
    is given. Giving both is a ``ValueError``."""
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: give at most one")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if seed is not None:
        seed = check_int("seed", seed, low=0)
    if generator is not None:
        if generator.device.type != device.type:
            raise ValueError(f"generator: expected a generator on {device}, got one on {generator.device}")
        return generator
    if seed is not None:
        return torch.Generator(device=device).manual_seed(int(seed))
    return None


def sample(
    env: DiffusionEnvironment,
    num_samples: int | None = None,
    *,
    x: Tensor | None = None,
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
    control: Control | None = None,
    policy: Callable[..., Tensor] | None = None,
    reward: Reward | None = None,
    reward_scale: float = 1.0,
    cond: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noises: Tensor | None = None,
    store: Sequence[str] | str = (),
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    compile: bool = False,
) -> Trajectory:
    """Sample ``n`` trajectories in lockstep with Euler–Maruyama.

    Parameters
    ----------
    env : DiffusionEnvironment
        Base model, scheduler and noise.
    num_samples : int, optional
        Batch size ``n`` (or give ``x``).
    x : Tensor, (n, *sample_shape), optional
        Initial state at ``t_0``; default ``N(0, beta(t_0)^2 I)``. Never modified.
    steps, t_start, t_end, grid
        Time grid (see :func:`diffusiongym.timegrid.make_time_grid`).
    control : callable, optional
        ``u(x, t, **cond)`` with ``t`` of shape ``(n,)``.
    policy : callable, optional
        A model in the base parameterisation; ``u = (b_policy - b_base) / sigma``.
    reward, reward_scale
        Terminal reward ``r`` and ``lambda``.
    cond : dict, optional
        Conditioning keyword arguments passed to the model (and control, reward) at every step.
    seed, generator
        Randomness; the same seed gives bit-identical trajectories on the CPU.
    noises : Tensor, (m, n, *sample_shape), optional
        Use these standard normals instead of drawing them (common random numbers).
    store : str or sequence of str
        Any of ``"states"``, ``"drifts"``, ``"noises"``, ``"controls"`` (or ``"all"``).
    progress : bool
        Show a tqdm bar.
    device, dtype
        Where and in which precision to simulate (default: ``x``'s, else CPU float32).
    requires_grad : bool
        Keep the autograd graph through the whole rollout (no in-place updates).
    compile : bool
        Run each step as one ``torch.compile``d graph (:mod:`diffusiongym.compiled`): the base model,
        the drift, a ``policy``'s control, the running cost and the update, with fixed shapes and no
        host sync per step (CUDA graphs on CUDA devices). The first call for a model, batch shape and
        ``store`` pays the compilation (seconds to a minute on a CPU); later ones reuse it. Same
        noise for the same seed; results equal the eager loop's to float32 rounding. A ``control``
        callable runs eagerly between the compiled steps (pass a fine-tuned model as ``policy=`` to
        fuse it). Not with ``requires_grad=True``.

    Raises
    ------
    TypeError
        An argument of the wrong type (e.g. ``reward`` a plain function: wrap it in
        :class:`~diffusiongym.rewards.base.CallableReward`), naming the argument.
    ValueError
        A bad value (shapes, ``steps`` outside ``1..100000``, ``reward_scale`` not finite, ...),
        naming the argument; a ``control`` or ``policy`` output of the wrong shape at the first step.
    """
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond: expected a dict of conditioning keyword arguments, got {type(cond).__name__}")
    cond = dict(cond or {})
    if reward is not None and not isinstance(reward, Reward):
        raise TypeError(
            f"reward: expected a diffusiongym Reward (wrap a function with CallableReward(fn)), got {type(reward).__name__}"
        )
    reward_scale = check_real("reward_scale", reward_scale)
    for name, fn in (("control", control), ("policy", policy)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable (x, t, **cond) -> tensor, got {type(fn).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"dtype: expected a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    if not isinstance(store, (str, list, tuple)):
        raise TypeError(
            f"store: expected a name or a sequence of names from {list(STORABLE)}, got {type(store).__name__}"
        )
    if isinstance(store, str):
        store = STORABLE if store == "all" else (store,)
    for name in store:
        if name not in STORABLE:
            raise unknown_name_error("store", name, STORABLE)
    if control is not None and policy is not None:
        raise ValueError("control, policy: give at most one")
    if not isinstance(env, DiffusionEnvironment):
        raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile: expected a bool, got {type(compile).__name__}")
    if compile and requires_grad:
        raise ValueError(
            "compile: the compiled path samples without autograd; use compile=False with requires_grad=True"
        )

    schedule = StepSchedule.build(env, make_time_grid(steps, t_start, t_end, grid))
    m = len(schedule)
    if schedule.deterministic and (control is not None or policy is not None):
        raise ValueError("control: with sigma = 0 (noise='ode') a control u has no effect; use noise > 0")

    if x is None:
        if num_samples is None:
            raise ValueError("num_samples: give the batch size or an initial x")
        n = check_positive_int("num_samples", num_samples)
        if env.sample_shape is None:
            raise ValueError("x: the model has no sample_shape; pass an initial x")
        device = torch.device(device) if device is not None else torch.device("cpu")
        gen = resolve_generator(seed, generator, device)
        beta0 = float(env.scheduler.beta(torch.tensor(schedule.t[0], dtype=torch.float64)))
        x = beta0 * torch.randn((n, *env.sample_shape), generator=gen, device=device, dtype=dtype)
    else:
        check_tensor("x", x)
        if num_samples is not None and check_positive_int("num_samples", num_samples) != x.shape[0]:
            raise ValueError(f"num_samples: expected {x.shape[0]} (x's batch size), got {num_samples}")
        if env.sample_shape is not None and tuple(x.shape[1:]) != env.sample_shape:
            raise ValueError(f"x: expected shape (n, {', '.join(map(str, env.sample_shape))}), got {tuple(x.shape)}")
        if device is not None and x.device != torch.device(device):
            raise ValueError(f"x: expected a tensor on {device}, got {x.device}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        device, dtype = x.device, x.dtype
        gen = resolve_generator(seed, generator, device)
        x = x.detach().clone() if not requires_grad else x.clone()
        n = x.shape[0]
    if noises is not None:
        check_tensor("noises", noises, (m, n, *x.shape[1:]), dtype=dtype)
        if noises.device != x.device:
            raise ValueError(f"noises: expected a tensor on {x.device}, got {noises.device}")

    if isinstance(control, ModelControl) and control.env is env:
        policy, control = control.model, None  # share the base call made for the drift
    has_control = control is not None or policy is not None
    running = None if schedule.deterministic else torch.zeros(m, n, dtype=dtype, device=device)
    storage: dict[str, list[Tensor]] = {name: [] for name in store}
    if "states" in storage:
        storage["states"].append(x.clone())
    times = schedule.times.to(device=device, dtype=dtype)
    sum_dims = tuple(range(1, x.ndim))

    grad_ctx = torch.enable_grad() if requires_grad else torch.no_grad()
    with grad_ctx:
        if compile:
            bar = lambda steps: tqdm(steps, disable=not progress, desc="sampling", leave=False)  # noqa: E731
            x = engine_rollout(env.model, policy, control, x, schedule, times, cond, gen, noises, storage, running, bar)
        else:
            for k in tqdm(range(m), disable=not progress, desc="sampling", leave=False):
                t_vec = times[k].expand(n)
                h, sig = schedule.h[k], schedule.sigma[k]
                out = env.model(x, t_vec, **cond)
                if out.shape != x.shape:
                    raise ValueError(
                        f"model output: expected shape {tuple(x.shape)} (same as x), got {tuple(out.shape)}"
                    )
                drift = torch.add(x * schedule.coef_x[k], out, alpha=schedule.coef_out[k])
                if "drifts" in storage:
                    storage["drifts"].append(drift.clone())
                if has_control:
                    if policy is not None:
                        out_policy = policy(x, t_vec, **cond)
                        if not isinstance(out_policy, Tensor) or out_policy.shape != x.shape:
                            got = (
                                tuple(out_policy.shape) if isinstance(out_policy, Tensor) else type(out_policy).__name__
                            )
                            raise ValueError(
                                f"policy output: expected shape {tuple(x.shape)} (same as x, the base model's output), got {got}"
                            )
                        u = output_control(out_policy, out, schedule.coef_out[k] / sig)
                    else:
                        u = control(x, t_vec, **cond)
                        if not isinstance(u, Tensor) or u.shape != x.shape:
                            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
                            raise ValueError(f"control output: expected shape {tuple(x.shape)} (same as x), got {got}")
                    running[k] = 0.5 * h * (u * u).sum(dim=sum_dims)
                    drift = drift + sig * u
                    if "controls" in storage:
                        storage["controls"].append(u.detach().clone())
                elif "controls" in storage:
                    storage["controls"].append(torch.zeros_like(x))
                if schedule.deterministic:
                    z = torch.zeros_like(x) if "noises" in storage else None
                    x = x + h * drift if requires_grad else x.add_(drift, alpha=h)
                else:
                    z = (
                        noises[k]
                        if noises is not None
                        else torch.randn(x.shape, generator=gen, device=device, dtype=dtype)
                    )
                    if requires_grad:
                        x = x + h * drift + schedule.step_sigma[k] * z
                    else:
                        x.add_(drift, alpha=h).add_(z, alpha=schedule.step_sigma[k])
                if "noises" in storage:
                    storage["noises"].append(z.clone())
                if "states" in storage:
                    storage["states"].append(x.clone())
        r_values, valid = None, torch.isfinite(x.reshape(n, -1)).all(1)
        if reward is not None:
            r_values, valid = reward(x, **cond)

    stacked = {name: torch.stack(vals) for name, vals in storage.items()}
    return Trajectory(
        x1=x,
        times=schedule.times,
        valid=valid,
        reward=r_values,
        running_cost=running,
        reward_scale=reward_scale,
        **stacked,
        info={"has_control": has_control, "deterministic": schedule.deterministic},
    )

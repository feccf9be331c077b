"""Adjoint Matching: stochastic-optimal-control fine-tuning of a copy of the base model.

Domingo-Enrich et al., "Adjoint Matching" (2024); ``shared/DESIGN.md`` s. 7. The fine-tuned
model outputs in the *base model's own parameterisation*; its control is
``u = (b_finetuned - b_base) / sigma`` under the memoryless schedule
``sigma^2 = 2 eta``. One iteration:

1. sample ``n`` trajectories ``x_0 .. x_m`` with the current fine-tuned model (no graph);
2. solve the *lean adjoint* backwards with vector-Jacobian products of the **base** drift::

       a_m = -lambda grad r(x_m),   a_k = a_{k+1} + h_k (d b_base / d x)(x_k, t_k)^T a_{k+1};

3. regress the control onto ``-sigma a``: loss ``mean over a subset of k of
   |u_theta(x_k, t_k) + sigma(t_k) a_k|^2``.

Variance: where the base drift separates narrow modes, the Monte-Carlo lean adjoint is a
near-delta (noise-fixed flows jump between modes): the information on how much mass each
mode should get is carried only by the rare paths that cross the low-density region between
modes, with huge adjoints (GMM1D-v0: along ``u*`` paths the sample mean of ``-sigma a`` at
``t = 0.1`` grows like ``log n``, far below ``E u*``), and the learnt mode weights end biased
low. Three tools address it, all with the same fixed point:

- ``AdjointMatchingConfig(likelihood_ratio=theta)``: at every step where the base drift
  expands (stretches a random direction by more than ``1 + theta``), the propagated adjoint
  is replaced by the likelihood-ratio estimate of the same conditional mean, computed from
  the step's Gaussian noise and the path's cost-to-go (see :func:`lean_adjoint`). No
  Jacobian product crosses the region between modes, so the mode weights get an unbiased,
  light-tailed signal: with the base mixture's trainable copy, GMM1D-v0's weights are learnt
  to about 0.01 and ``x1`` passes a two-sample test against ``p*``
  (``benchmarks/adjoint_matching_gmm.py``);
- ``restarts=...`` adds paths restarted late in the path from mixup states between the
  batch's states, so that region is sampled densely;
- ``bootstrap="horizon"`` regresses on a lambda-return adjoint bootstrapped on the model's
  own ``-u_theta / sigma`` (see :func:`lean_adjoint`), the TD(lambda) analogue of the
  paper's target, for free-form networks.

At the fixed point ``u = u* = -sigma grad V*`` and the fine-tuned model's memoryless SDE
samples ``p* ∝ p_base exp(lambda r)``; its running cost ``1/2 |u|^2 h`` is the KL to the base.
The fine-tuned model is used like the base: ``sample(env, policy=model)`` or
``env.with_model(model)`` (e.g. with ``noise="ode"`` for deterministic sampling).

Shapes: ``x`` is ``(n, *sample_shape)``, ``t`` a tensor ``(n,)``; adjoints have the shape
of the states, ``(m + 1, n, *sample_shape)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.noise import Memoryless
from diffusiongym.policies.networks import ControlScaledNet, ResidualModel, TimeMLP
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import StepSchedule, sample
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.io import frozen_parameter_names, load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from diffusiongym.utils.validation import check_positive_int

__all__ = [
    "AdjointMatchingConfig",
    "AdjointMatching",
    "lean_adjoint",
    "make_finetune_model",
    "check_differentiable_reward",
]


@dataclass
class AdjointMatchingConfig:
    """Hyper-parameters of :class:`AdjointMatching` (all in one place).

    Attributes
    ----------
    iterations : int
        Default number of iterations for :meth:`AdjointMatching.train`.
    batch_size : int
        Trajectories sampled per iteration.
    learning_rate : float
        Adam step size.
    weight_decay : float
        Adam (decoupled, AdamW) weight decay.
    loss_times : int or None
        Number of grid times the loss uses per iteration (``None``: all ``m``).
    always_last : int
        How many of them are always the last grid times (the rest drawn at random
        without replacement), as in the paper (the end of the path matters most).
    grad_clip : float or None
        Clip the parameter gradient norm.
    updates_per_iteration : int
        Gradient steps per sampled batch, each on a fresh subset of loss times. The
        lean adjoint depends on the base model only, so the targets stay exact
        regression data for the sampled states (they are only slightly off-policy).
    seed : int
        Seeds the trainer's generator (sampling and time subsets) and the default network.
    hidden, layers, num_frequencies : int
        Width, depth and time features of the default residual :class:`TimeMLP`.
    residual : str
        Default fine-tuned model: ``"copy"`` (the base model's own ``trainable_copy()``, e.g.
        a :class:`~diffusiongym.models.gmm.TrainableGaussianMixtureModel`: full fine-tuning
        of a copy, as in the paper), ``"control"`` (residual network scaled by
        ``sigma / coef_out(t)`` so that it outputs the control ``u`` itself; same
        conditioning in every parameterisation), ``"plain"`` (``base + net``) or ``"auto"``
        (``"copy"`` where the base model has ``trainable_copy``, else ``"control"``).
    time_weight : str
        Per-time loss weight, see :func:`time_weights`.
    bootstrap : str
        Regression target. ``"none"``: the paper's Monte-Carlo lean adjoint.
        ``"adaptive"``: the lambda-return adjoint of :func:`lean_adjoint` bootstrapped on
        the current model's own estimate ``a_hat = -u_theta / sigma`` wherever a step of the
        base drift expands by more than ``growth_limit`` (``trace="adaptive"``).
        ``"horizon"``: the same with a fixed ``lambda_k = exp(-h_k / bootstrap_horizon)``.
        All have the fixed point ``u*``; the bootstrapped ones have far lower variance where
        the base drift separates narrow modes (there the Monte-Carlo adjoint is a
        near-delta whose sample mean grows like ``log n``: GMM1D-v0).
    bootstrap_horizon : float
        ``tau`` of ``bootstrap="horizon"``.
    growth_limit : float
        ``rho`` of ``bootstrap="adaptive"``.
    target_ema : float or None
        Bootstrap on a target network, an exponential moving average (this decay per
        gradient step) of the fine-tuned model, instead of the model itself (as in DQN:
        damps the oscillations of bootstrapped regression). ``None``: the model itself.
    minibatch_size : int or None
        Each gradient step uses this many random ``(k, i)`` pairs from the loss times of
        the sampled batch (``None``: all of them).
    lr_schedule : str
        ``"constant"`` or ``"cosine"`` (decay to 0 over ``iterations``); set from the
        iteration count, so resuming continues the schedule exactly.
    restarts : float
        Extra trajectories per iteration, as a fraction of ``batch_size``, restarted at one
        random grid time ``t_k >= restart_after`` from *mixup* states
        ``x_i + c (x_j - x_i)`` (``c ~ U(0, 1)``, ``i, j`` random trajectories of the batch)
        and run to ``t = 1`` with the fine-tuned model; their pairs join the regression.
        The minimiser is unchanged (the target's conditional mean given ``x_k`` involves only
        the on-policy dynamics after ``t_k``; any state distribution with enough support
        will do), but the regression now sees the low-density region *between* modes,
        which is where the lean adjoint carries the information on how much mass each mode
        should get (on-policy, that region is almost never visited late in the path and the
        pathwise estimate of the mode weights is a rare-event one). ``0``: off.
    restart_after : float
        Earliest restart time.
    likelihood_ratio : float or None
        ``theta`` of :func:`lean_adjoint`: steps where the base drift stretches a random
        direction by more than ``1 + theta`` use the likelihood-ratio estimate instead of
        the propagated adjoint (same fixed point). It removes the Jacobian products that
        blow up between narrow modes, so the mode weights get an unbiased, light-tailed
        signal (GMM tasks); it costs two more vector-Jacobian products per step and, in
        high dimension, its noise grows with ``d``. ``None``: the paper's lean adjoint.
        Not combined with ``bootstrap``.
    """

    iterations: int = 400
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    loss_times: int | None = 20
    always_last: int = 5
    grad_clip: float | None = 10.0
    updates_per_iteration: int = 1
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    num_frequencies: int = 4
    residual: str = "auto"
    time_weight: str = "clip"
    bootstrap: str = "none"
    bootstrap_horizon: float = 0.05
    growth_limit: float = 1.0
    target_ema: float | None = None
    minibatch_size: int | None = None
    lr_schedule: str = "constant"
    restarts: float = 0.0
    restart_after: float = 0.5
    likelihood_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.likelihood_ratio is not None:
            _check_expansion_threshold(self.likelihood_ratio)
            if self.bootstrap != "none":
                raise ValueError(f"likelihood_ratio: not combined with bootstrap={self.bootstrap!r}; give one of them")
        if self.bootstrap not in ("none", "adaptive", "horizon"):
            raise ValueError(f"bootstrap: expected 'none', 'adaptive' or 'horizon', got {self.bootstrap!r}")
        if not (isinstance(self.bootstrap_horizon, (int, float)) and self.bootstrap_horizon > 0):
            raise ValueError(f"bootstrap_horizon: expected a positive time, got {self.bootstrap_horizon!r}")
        if not (isinstance(self.growth_limit, (int, float)) and self.growth_limit > 0):
            raise ValueError(f"growth_limit: expected a positive number, got {self.growth_limit!r}")
        if self.minibatch_size is not None:
            check_positive_int("minibatch_size", self.minibatch_size)
        if self.target_ema is not None and not (isinstance(self.target_ema, float) and 0.0 < self.target_ema < 1.0):
            raise ValueError(f"target_ema: expected a decay in (0, 1) or None, got {self.target_ema!r}")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, (int, float)) or not self.restarts >= 0:
            raise ValueError(f"restarts: expected a non-negative fraction of batch_size, got {self.restarts!r}")
        if isinstance(self.restart_after, bool) or not isinstance(self.restart_after, (int, float)) or not 0.0 <= self.restart_after < 1.0:
            raise ValueError(f"restart_after: expected a time in [0, 1), got {self.restart_after!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("iterations", "batch_size", "updates_per_iteration"):
            check_positive_int(name, getattr(self, name))
        if self.loss_times is not None:
            check_positive_int("loss_times", self.loss_times)
        if isinstance(self.always_last, bool) or not isinstance(self.always_last, int) or self.always_last < 0:
            raise ValueError(f"always_last: expected a non-negative integer, got {self.always_last!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected a positive number, got {self.learning_rate!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a positive number or None, got {self.grad_clip!r}")
        if self.time_weight not in TIME_WEIGHTS:
            raise ValueError(f"time_weight: expected one of {list(TIME_WEIGHTS)}, got {self.time_weight!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual: expected one of {list(RESIDUALS)}, got {self.residual!r}")


def _check_expansion_threshold(value: Any) -> float:
    """Validate ``likelihood_ratio`` (``theta >= 0``, a real number) and return it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"likelihood_ratio: expected a non-negative expansion threshold or None, got {value!r}")
    return float(value)


TIME_WEIGHTS = ("uniform", "clip", "inverse")
RESIDUALS = ("auto", "copy", "control", "plain")


def time_weights(sigma: Tensor, kind: str) -> Tensor:
    """Per-time loss weights ``w(t_k)`` from ``sigma(t_k)`` (same shape).

    ``"uniform"``: 1. ``"clip"``: ``min(1, 1 / sigma^2)``. ``"inverse"``: ``1 / sigma^2``.
    The regression target ``-sigma a_k`` has a variance that grows like ``sigma^2`` where
    the memoryless ``sigma`` blows up (``t -> 0`` for the linear schedule), while the
    optimal control vanishes there; any positive weight keeps the minimiser ``u*``.
    """
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "clip":
        return (1.0 / sigma**2).clamp(max=1.0)
    if kind == "inverse":
        return 1.0 / sigma**2
    raise ValueError(f"time_weight: expected one of {list(TIME_WEIGHTS)}, got {kind!r}")


def check_differentiable_reward(reward: Reward) -> Reward:
    """Raise unless ``reward`` is a :class:`Reward` declaring ``differentiable = True``."""
    if not isinstance(reward, Reward):
        raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
    if not getattr(reward, "differentiable", False):
        raise ValueError(
            f"reward: adjoint matching needs grad r, but {reward!r} declares differentiable=False; "
            "use a differentiable reward (e.g. CallableReward(fn, differentiable=True)) or a "
            "gradient-free method such as value matching"
        )
    return reward


def _memoryless(env: DiffusionEnvironment) -> DiffusionEnvironment:
    noise = env.noise
    if isinstance(noise, Memoryless) and noise.is_memoryless:
        return env
    return env.with_noise(Memoryless())


def lean_adjoint(
    env: DiffusionEnvironment,
    states: Tensor,
    times: Tensor,
    reward: Reward,
    reward_scale: float,
    cond: dict[str, Any] | None = None,
    bootstrap: Callable[..., Tensor] | None = None,
    trace: Tensor | str | None = None,
    growth_limit: float = 1.0,
    likelihood_ratio: float | None = None,
    noises: Tensor | None = None,
    cost_to_go: Tensor | None = None,
    controls: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Lean adjoint along sampled states (DESIGN.md s. 7).

    Parameters
    ----------
    env : DiffusionEnvironment
        The *base* model and its noise (the drift whose Jacobian is used).
    states : Tensor, (m + 1, n, *sample_shape)
        States ``x_0 .. x_m`` on the grid ``times`` (any control may have produced them).
    times : Tensor, (m + 1,)
        The grid.
    reward : Reward
        Differentiable terminal reward ``r``.
    reward_scale : float
        ``lambda``; the terminal cost is ``g = -lambda r``.
    cond : dict, optional
        Conditioning passed to the model and the reward.
    bootstrap : callable, optional
        ``bootstrap(x, t, **cond) -> a_hat`` (shape of ``x``, no graph needed): an estimate
        of ``E[a_k | x_k]``, e.g. ``-u_theta(x, t) / sigma(t)``. With ``trace`` it turns the
        recursion into the lambda-return adjoint (see Notes).
    trace : Tensor (m,) or "adaptive", optional
        ``lambda_k`` in ``[0, 1]`` per grid step (1: the plain lean adjoint), or
        ``"adaptive"``: per trajectory ``lambda_k = min(1, growth_limit / g_k)`` with
        ``g_k = |(I + h_k db/dx)^T a_hat_{k+1}| / |a_hat_{k+1}|`` the growth of the bootstrap
        direction over the step (plain Monte-Carlo where the base drift does not expand,
        bootstrapping where it does). Needs ``bootstrap``.
    growth_limit : float
        ``rho`` of the adaptive trace.
    likelihood_ratio : float, optional
        ``theta``: at a step where the base drift *expands*, i.e. ``(I + h_k db/dx)^T``
        stretches a random probe direction (drawn from ``generator``) by more than
        ``1 + theta``, replace the propagated adjoint by the likelihood-ratio estimate of
        the same conditional mean (see Notes). Needs ``noises`` and ``cost_to_go``.
        ``None``: the plain lean adjoint everywhere.
    noises : Tensor, (m, n, *sample_shape), optional
        The standard normals ``z_k`` that produced ``states``
        (``x_{k+1} = x_k + h_k (b + sigma u) + sigma_k sqrt(h_k) z_k``).
    cost_to_go : Tensor, (m + 1, n), optional
        ``C_k = sum_{i >= k} 1/2 |u_i|^2 h_i - lambda r(x_m)`` along the same paths
        (:attr:`diffusiongym.sampling.Trajectory.cost_to_go`).
    controls : Tensor, (m, n, *sample_shape), optional
        The controls ``u_k`` that produced the paths: ``g_k = -u_k / sigma_k`` then serves as
        a linear control variate of the likelihood-ratio steps (see Notes).
    generator : torch.Generator, optional
        Draws the probe directions.

    Notes
    -----
    Bootstrapped recursion (``lambda_k < 1``)::

        a_k = (I + h_k d b_base/dx (x_k, t_k))^T [lambda_k a_{k+1} + (1 - lambda_k) a_hat(x_{k+1}, t_{k+1})],

    with no bootstrap from ``x_m`` (there ``a_m = grad g`` is exact). Since the plain lean
    adjoint satisfies ``E[a_k | x_k] = E[(I + h_k db/dx)^T E[a_{k+1} | x_{k+1}] | x_k]``
    (Markov property), replacing ``a_{k+1}`` by any mix with ``E[a_{k+1} | x_{k+1}]`` keeps
    the conditional mean, so at the optimum (``a_hat = grad V*``) the fixed point is
    unchanged; the Jacobian products, whose tails blow up where the base drift separates
    modes, are damped by ``prod lambda``. This is the TD(lambda) analogue of the
    Monte-Carlo lean adjoint (an extension of the paper's estimator). The weights may
    depend on ``(x_0, .., x_{k+1})`` (never on later states) without changing this
    argument, which is what allows the adaptive trace.

    Likelihood-ratio steps (``likelihood_ratio=theta``): the Euler–Maruyama step is
    Gaussian, ``x_{k+1} ~ N(x_k + h_k (b + sigma u), sigma_k^2 h_k I)``, so for any ``f``,
    ``grad_{x_k} E[f(x_{k+1}) | x_k] = E[(I + h_k db/dx)^T z_k f(x_{k+1}) / (sigma_k sqrt(h_k))]``
    (the ``du/dx`` terms dropped, as in the lean adjoint: they vanish in expectation at the
    optimum). With ``f`` the cost-to-go this gives::

        a_k = (I + h_k d b_base/dx (x_k, t_k))^T z_k (C_{k+1} - c_k) / (sigma_k sqrt(h_k)),

    with ``c_k`` the leave-one-out batch mean of ``C_{k+1}`` (a baseline independent of
    ``z_k``, so the mean is unchanged). With ``controls``, ``C_{k+1}`` is replaced by
    ``C_{k+1} - s_k z_k . g_k`` and ``g_k`` added back (``s_k = sigma_k sqrt(h_k)``,
    ``g_k = -u_k / sigma_k``, a function of ``x_k``): since ``E[z z^T] = I`` the mean is
    the same, and the part of ``C_{k+1}`` linear in ``z_k`` no longer adds noise.

    This ``a_k`` has the conditional mean of the lean adjoint at the optimum but no
    Jacobian product after step ``k``. Where the base drift
    separates narrow modes, ``prod (I + h db/dx)`` explodes on the rare paths that linger
    between them, and the pathwise estimate of how much mass each mode should get is a
    rare-event one (from one state at ``t = 0.6`` of GMM1D-v0 the sample mean of
    ``-sigma a`` is 1.1-1.5 against ``u* = 4.49`` at 2e4 paths; with likelihood-ratio
    steps above ``theta = 0.1``, 4.35-4.54 with standard error 0.1). The step choice
    depends on ``x_k`` and an independent probe only, so every mix keeps the fixed point.

    Returns
    -------
    adjoint : Tensor, (m + 1, n, *sample_shape)
        ``a_k``, with ``a_m = grad g(x_m)`` and
        ``a_k = a_{k+1} + h_k (d b_base / dx)(x_k, t_k)^T a_{k+1}``. For states sampled
        from the base model this is the pathwise gradient ``d g(x_m) / d x_k`` with the
        noise held fixed. Rows of invalid trajectories are zero.
    valid : Tensor, (n,) bool
        Trajectories whose terminal reward and adjoint are finite.
    """
    check_differentiable_reward(reward)
    cond = dict(cond or {})
    m = states.shape[0] - 1
    if times.shape != (m + 1,):
        raise ValueError(f"times: expected shape ({m + 1},) to match states, got {tuple(times.shape)}")
    adaptive = isinstance(trace, str)
    if trace is not None:
        if bootstrap is None:
            raise ValueError("trace: a bootstrapped adjoint needs bootstrap=a_hat(x, t, **cond) as well")
        if adaptive:
            if trace != "adaptive":
                raise ValueError(f"trace: expected 'adaptive' or {m} values in [0, 1], got {trace!r}")
        else:
            trace = torch.as_tensor(trace, dtype=torch.float64).flatten()
            if trace.shape != (m,) or bool(((trace < 0) | (trace > 1)).any()):
                raise ValueError(f"trace: expected {m} values in [0, 1] (one per step), got shape {tuple(trace.shape)}")
    if not growth_limit > 0:
        raise ValueError(f"growth_limit: expected a positive number, got {growth_limit!r}")
    n = states.shape[1]
    if likelihood_ratio is not None:
        if trace is not None:
            raise ValueError("likelihood_ratio: not combined with a bootstrapped trace; give one of them")
        _check_expansion_threshold(likelihood_ratio)
        if noises is None or cost_to_go is None:
            raise ValueError("likelihood_ratio: needs the paths' noises (m, n, *shape) and cost_to_go (m + 1, n) as well")
        if tuple(noises.shape) != (m, *states.shape[1:]):
            raise ValueError(f"noises: expected shape {(m, *states.shape[1:])} (one z_k per step), got {tuple(noises.shape)}")
        if tuple(cost_to_go.shape) != (m + 1, n):
            raise ValueError(f"cost_to_go: expected shape {(m + 1, n)}, got {tuple(cost_to_go.shape)}")
        if controls is not None and tuple(controls.shape) != tuple(noises.shape):
            raise ValueError(f"controls: expected shape {tuple(noises.shape)} (one u_k per step), got {tuple(controls.shape)}")
    schedule = StepSchedule.build(env, times.to(torch.float64))
    with torch.enable_grad():
        x1 = states[-1].detach().requires_grad_(True)
        values, valid = reward(x1, **cond)
        if not values.requires_grad:
            raise ValueError(f"reward: {reward!r} declares differentiable=True but its values carry no gradient to x")
        (grad_r,) = torch.autograd.grad(values.masked_fill(~valid, 0.0).sum(), x1, allow_unused=True)
    if grad_r is None:
        grad_r = torch.zeros_like(x1)
    flat = grad_r.reshape(n, -1)
    valid = valid & torch.isfinite(flat).all(1)
    a = torch.where(valid.reshape(n, *([1] * (x1.ndim - 1))), -float(reward_scale) * grad_r, torch.zeros_like(grad_r))
    out = [a.detach()]
    def transport(k: int, vectors: list[Tensor]) -> list[Tensor]:
        """``(I + h_k d b_base / dx (x_k, t_k))^T v`` for each ``v`` (one model evaluation)."""
        xk = states[k].detach().requires_grad_(True)
        t_vec = torch.full((n,), schedule.t[k], dtype=xk.dtype, device=xk.device)
        result = []
        with torch.enable_grad():
            model_out = env.model(xk, t_vec, **cond)
            for i, v in enumerate(vectors):
                (vjp,) = torch.autograd.grad(model_out, xk, grad_outputs=v, retain_graph=i + 1 < len(vectors), allow_unused=True)
                # b = coef_x x + coef_out model(x, t), so v^T db/dx = coef_x v + coef_out v^T d model/dx
                step = schedule.coef_x[k] * v
                if vjp is not None:
                    step = step + schedule.coef_out[k] * vjp
                result.append((v + schedule.h[k] * step).detach())
        return result

    per_sample = (n,) + (1,) * (x1.ndim - 1)
    if likelihood_ratio is not None:
        step_sigma = torch.tensor(schedule.step_sigma, dtype=a.dtype, device=a.device).reshape(m, 1)
        z = noises.to(a)
        cost = cost_to_go[1:].to(a)  # C_{k+1}, (m, n)
        if controls is not None:
            sig = torch.tensor(schedule.sigma, dtype=a.dtype, device=a.device).reshape(m, *([1] * x1.ndim))
            guess = -controls.to(a) / sig  # g_k, (m, n, *shape)
            cost = cost - step_sigma * (z * guess).reshape(m, n, -1).sum(-1)
        # leave-one-out baseline over the valid paths (independent of z_k)
        cost = torch.where(valid, cost, torch.zeros_like(cost))
        others = (valid.sum().to(a) - valid.to(a)).clamp_min(1.0)
        centred = cost - (cost.sum(1, keepdim=True) - cost) / others  # (m, n)
    for k in reversed(range(m)):
        if likelihood_ratio is not None:
            probe = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
            lr_vec = z[k] * (centred[k] / step_sigma[k]).reshape(per_sample)
            if controls is not None:
                lr_vec = lr_vec + guess[k]
            lr_vec = torch.where(valid.reshape(per_sample), lr_vec, torch.zeros_like(a))
            ga, gp, glr = transport(k, [a, probe, lr_vec])
            growth = gp.reshape(n, -1).norm(dim=1) / probe.reshape(n, -1).norm(dim=1).clamp_min(torch.finfo(a.dtype).tiny)
            a = torch.where((growth > 1.0 + likelihood_ratio).reshape(per_sample), glr, ga)
        elif trace is None or k + 1 == m or (not adaptive and float(trace[k]) >= 1.0):
            (a,) = transport(k, [a])
        else:
            t_next = torch.full((n,), schedule.t[k + 1], dtype=states.dtype, device=states.device)
            with torch.no_grad():
                a_hat = bootstrap(states[k + 1].detach(), t_next, **cond).reshape(a.shape).to(a)
            a_hat = torch.where(valid.reshape(per_sample), a_hat, torch.zeros_like(a_hat))
            if adaptive:
                # lambda_k from the growth of a_hat(x_{k+1}) under this step's Jacobian: a function
                # of (x_k, x_{k+1}) only, never of the future, so the fixed point is kept (Notes).
                ga, gh = transport(k, [a, a_hat])
                norm = a_hat.reshape(n, -1).norm(dim=1)
                growth = gh.reshape(n, -1).norm(dim=1) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
                lam = torch.where(norm > 0, (growth_limit / growth).clamp(max=1.0), torch.ones_like(norm)).reshape(per_sample)
                a = lam * ga + (1.0 - lam) * gh
            else:
                lam_k = float(trace[k])
                (a,) = transport(k, [lam_k * a + (1.0 - lam_k) * a_hat])
        out.append(a)
    adjoint = torch.stack(out[::-1])
    finite = torch.isfinite(adjoint.reshape(m + 1, n, -1)).all(-1).all(0)
    valid = valid & finite
    adjoint = torch.where(valid.reshape(1, n, *([1] * (x1.ndim - 1))), adjoint, torch.zeros_like(adjoint))
    return adjoint, valid


def make_finetune_model(
    env: DiffusionEnvironment,
    hidden: int = 64,
    layers: int = 2,
    num_frequencies: int = 4,
    residual: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """The default fine-tuned copy of a base model (starts equal to it).

    ``residual="copy"``: ``env.model.trainable_copy()`` (models that provide one, e.g. the
    exact Gaussian mixtures). ``"control"`` / ``"plain"``: ``ResidualModel(env.model, net)``
    with ``net`` a zero-initialised :class:`TimeMLP` wrapped in :class:`ControlScaledNet`
    (or bare); needs ``env.sample_shape = (d,)``. ``"auto"``: ``"copy"`` where available,
    else ``"control"``. Image models should be fine-tuned as ``copy.deepcopy(base)`` or
    ``diffusiongym.add_lora(base)`` instead. The network's random init uses ``seed`` and
    leaves the global RNG untouched.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {list(RESIDUALS)}, got {residual!r}")
    copier = getattr(env.model, "trainable_copy", None)
    if residual == "copy" and copier is None:
        raise ValueError(f"residual: 'copy' needs a base model with trainable_copy(), got {type(env.model).__name__}")
    if residual in ("copy", "auto") and copier is not None:
        return copier()
    shape = env.sample_shape
    if shape is None or len(shape) != 1:
        raise ValueError(
            f"env: the default residual MLP needs vector samples of shape (d,), got sample_shape={shape}; "
            "pass model=copy.deepcopy(base_model) (a trainable copy) or diffusiongym.add_lora(base_model) instead"
        )
    if not isinstance(env.model, nn.Module):
        raise TypeError(f"env.model: expected a torch.nn.Module to wrap, got {type(env.model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = TimeMLP(shape[0], shape[0], hidden=hidden, layers=layers, num_frequencies=num_frequencies, zero_init=True)
    net: nn.Module = mlp if residual == "plain" else ControlScaledNet(mlp, env)
    return ResidualModel(env.model, net)


class AdjointMatching:
    """Adjoint Matching trainer for a fine-tuned copy of a base model.

    Parameters
    ----------
    env : DiffusionEnvironment
        Base model and scheduler. Training always uses the memoryless schedule
        (``env.with_noise("memoryless")``): only then does the optimum sample ``p*``.
    reward : Reward
        Differentiable terminal reward (``reward.differentiable`` must be True).
    reward_scale : float
        ``lambda`` in ``max E[lambda r(x1)] - KL``.
    model : nn.Module, optional
        The fine-tuned copy, in the base parameterisation, e.g.
        ``ResidualModel(base, TimeMLP(d, d, zero_init=True))`` or
        ``copy.deepcopy(base)`` or ``diffusiongym.add_lora(base)``; default :func:`make_finetune_model`. Its trainable
        parameters are optimised.
    config : AdjointMatchingConfig, optional
    steps, t_start : int, float
        The Euler–Maruyama grid used for training and evaluation.
    cond_samplers : dict, optional
        ``name -> sampler(n, generator, device) -> tensor`` for conditioned models (as in
        ``Task.conditioning``); drawn afresh for every batch.
    oracle : TiltOracle, optional
        Adds ``gap_closed`` to :meth:`evaluate`.
    """

    def __init__(
        self,
        env: DiffusionEnvironment,
        reward: Reward,
        reward_scale: float = 1.0,
        model: nn.Module | None = None,
        config: AdjointMatchingConfig | None = None,
        *,
        steps: int = 100,
        t_start: float = DEFAULT_T_START,
        cond_samplers: dict[str, Callable[..., Tensor]] | None = None,
        oracle: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        self.reward = check_differentiable_reward(reward)
        if not math.isfinite(float(reward_scale)):
            raise ValueError(f"reward_scale: expected a finite number, got {reward_scale!r}")
        self.config = config if config is not None else AdjointMatchingConfig()
        if not isinstance(self.config, AdjointMatchingConfig):
            raise TypeError(f"config: expected an AdjointMatchingConfig, got {type(self.config).__name__}")
        self.env = _memoryless(env)
        self.reward_scale = float(reward_scale)
        self.steps = check_positive_int("steps", steps)
        self.t_start = float(t_start)
        self.times = make_time_grid(self.steps, self.t_start)
        self.schedule = StepSchedule.build(self.env, self.times)
        self.device = torch.device(device)
        self.dtype = dtype
        c = self.config
        if model is None:
            model = make_finetune_model(self.env, c.hidden, c.layers, c.num_frequencies, c.residual, c.seed)
            if isinstance(model, ResidualModel):
                model.net.to(dtype=dtype)  # the residual network in the trainer's precision
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module in the base parameterisation, got {type(model).__name__}")
        self.model = model.to(device=self.device)
        self.target_model: nn.Module | None = None
        if c.target_ema is not None:
            self.target_model = copy.deepcopy(self.model).requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: expected trainable parameters (requires_grad=True), found none")
        self.optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(c.seed)
        self.cond_samplers = dict(cond_samplers or {})
        self.oracle = oracle
        self.iteration = 0
        self.history: dict[str, list[float]] = {k: [] for k in ("iteration", "loss", "reward", "kl", "objective", "seconds")}

    @classmethod
    def from_task(cls, task: Any, model: nn.Module | None = None, config: AdjointMatchingConfig | None = None, **kwargs: Any) -> "AdjointMatching":
        """Trainer on a :class:`diffusiongym.tasks.Task` (its reward, scale, grid, oracle)."""
        samplers = {name: spec[1] for name, spec in getattr(task, "conditioning", {}).items()}
        kwargs.setdefault("steps", task.steps)
        kwargs.setdefault("t_start", task.t_start)
        return cls(task.environment, task.reward, task.reward_scale, model, config, cond_samplers=samplers, oracle=task.oracle, **kwargs)

    # ------------------------------------------------------------------ control
    def control(self, x: Tensor, t: Tensor, model: nn.Module | None = None, **cond: Any) -> Tensor:
        """``u = (b_finetuned - b_base) / sigma`` at ``(x, t)`` (memoryless sigma), shape of ``x``.

        ``model`` defaults to the fine-tuned model (the target network is the other use)."""
        model = self.model if model is None else model
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        _, coef_out = self.env.coefficients(t.detach().to(torch.float64), "drift")
        factor = (coef_out / self.env.sigma(t.detach().to(torch.float64))).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        with torch.no_grad():
            base = self.env.model(x, t, **cond)
        return (model(x, t, **cond) - base) * factor

    def finetuned_env(self, noise: Any = None) -> DiffusionEnvironment:
        """``env.with_model(model)`` (optionally with another ``noise``, e.g. ``"ode"``)."""
        env = self.env.with_model(self.model)
        return env if noise is None else env.with_noise(noise)

    def _cond(self, n: int) -> dict[str, Tensor]:
        return {name: fn(n, self.generator, self.device) for name, fn in self.cond_samplers.items()}

    # ------------------------------------------------------------------ training
    def loss_times(self) -> Tensor:
        """Grid indices ``k`` used by the loss this iteration (sorted, shape ``(K,)``)."""
        m, c = self.steps, self.config
        if c.loss_times is None or c.loss_times >= m:
            return torch.arange(m)
        last = min(c.always_last, c.loss_times)
        fixed = torch.arange(m - last, m)
        rest = torch.randperm(m - last, generator=self.generator, device=self.device).cpu()[: c.loss_times - last]
        return torch.cat([rest.sort().values, fixed])

    def regression_pairs(
        self,
        states: Tensor,
        adjoint: Tensor,
        valid: Tensor,
        cond: dict[str, Any] | None = None,
        extra: Sequence[tuple[Tensor, Tensor, Tensor, dict[str, Any], int]] = (),
    ) -> dict[str, Any]:
        """All ``(x_k^i, t_k, target)`` pairs of one iteration, flattened (built once, shared by
        its ``updates_per_iteration`` gradient steps).

        ``states`` and ``adjoint`` have shape ``(m + 1, n, *sample_shape)`` (the batch);
        ``extra`` holds path segments ``(states, adjoint, valid, cond, start)`` that begin at
        grid index ``start`` (restarts). Pairs use grid times ``0 .. m - 1`` of valid paths.
        Returns a dict of tensors with one row per pair: ``x``, ``t``, ``sigma``, ``factor``
        (``coef_out / sigma``), ``target`` (``-sigma a``), ``k`` (grid index) and ``cond``.
        """
        parts = []
        for seg_states, seg_adjoint, seg_valid, seg_cond, start in [(states, adjoint, valid, cond, 0), *extra]:
            x = seg_states[:-1, seg_valid]  # (m - start, n_valid, *shape)
            steps, n = x.shape[:2]
            shape = x.shape[2:]
            ks = torch.arange(start, start + steps)
            per_k = {
                "t": self.schedule.t[start:], "sigma": self.schedule.sigma[start:],
                "factor": [c / s for c, s in zip(self.schedule.coef_out[start:], self.schedule.sigma[start:])],
            }
            col = {name: torch.tensor(v, dtype=x.dtype, device=x.device).repeat_interleave(n) for name, v in per_k.items()}
            sig = col["sigma"].reshape(-1, *([1] * len(shape)))
            parts.append({
                "x": x.reshape(steps * n, *shape),
                "target": -sig * seg_adjoint[:-1, seg_valid].reshape(steps * n, *shape),
                "k": ks.repeat_interleave(n).to(x.device),
                **col,
                "cond": {name: v[seg_valid].repeat(steps, *([1] * (v.ndim - 1))) for name, v in (seg_cond or {}).items()},
            })
        pairs = {name: torch.cat([p[name] for p in parts]) for name in ("x", "target", "k", "t", "sigma", "factor")}
        pairs["cond"] = {name: torch.cat([p["cond"][name] for p in parts]) for name in parts[0]["cond"]}
        return pairs

    def loss(self, pairs: dict[str, Any]) -> Tensor:
        """Adjoint-matching loss ``mean w(t_k) |u_theta(x_k^i, t_k) + sigma(t_k) a_k^i|^2`` over
        the :meth:`regression_pairs` at this step's :meth:`loss_times`, then over a random
        minibatch of ``config.minibatch_size`` of them."""
        rows = torch.isin(pairs["k"], self.loss_times().to(pairs["k"].device)).nonzero().squeeze(1)
        mb = self.config.minibatch_size
        if mb is not None and mb < rows.numel():
            rows = rows[torch.randperm(rows.numel(), generator=self.generator, device=self.device)[:mb].to(rows.device)]
        x, t, target = pairs["x"][rows], pairs["t"][rows], pairs["target"][rows]
        factor = pairs["factor"][rows].reshape(-1, *([1] * (x.ndim - 1)))
        cond = {name: v[rows] for name, v in pairs["cond"].items()}
        with torch.no_grad():
            base = self.env.model(x, t, **cond)
        u = (self.model(x, t, **cond) - base) * factor
        weight = time_weights(pairs["sigma"][rows], self.config.time_weight)
        return (weight * ((u - target) ** 2).reshape(x.shape[0], -1).sum(1)).mean()

    def adjoint(
        self,
        states: Tensor,
        cond: dict[str, Any] | None = None,
        start: int = 0,
        noises: Tensor | None = None,
        cost_to_go: Tensor | None = None,
        controls: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Regression targets' adjoint along ``states`` ``(m + 1 - start, n, *shape)`` on the
        grid from index ``start``: the plain lean adjoint, the lambda-return one
        bootstrapped on ``-u_theta / sigma`` when ``config.bootstrap`` asks for it, or the
        one with likelihood-ratio steps (``config.likelihood_ratio``; then the paths'
        ``noises`` ``(m - start, n, *shape)`` and ``cost_to_go`` ``(m + 1 - start, n)`` are
        needed, and their ``controls`` serve as a control variate).
        Returns ``(adjoint, valid)`` as :func:`lean_adjoint`."""
        c = self.config
        times = self.times[start:]
        if c.likelihood_ratio is not None:
            return lean_adjoint(
                self.env, states, times, self.reward, self.reward_scale, cond, likelihood_ratio=c.likelihood_ratio,
                noises=noises, cost_to_go=cost_to_go, controls=controls, generator=self.generator,
            )
        if c.bootstrap == "none":
            return lean_adjoint(self.env, states, times, self.reward, self.reward_scale, cond)
        trace: Tensor | str = "adaptive"
        if c.bootstrap == "horizon":
            trace = torch.exp(-torch.as_tensor(self.schedule.h[start:], dtype=torch.float64) / float(c.bootstrap_horizon))

        def a_hat(x: Tensor, t: Tensor, **c: Any) -> Tensor:
            sigma = self.env.sigma(t.detach().to(torch.float64)).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return -self.control(x, t, model=self.target_model, **c) / sigma

        return lean_adjoint(
            self.env, states, times, self.reward, self.reward_scale, cond, bootstrap=a_hat, trace=trace, growth_limit=c.growth_limit
        )

    def _restart(self, states: Tensor, cond: dict[str, Any]) -> list[tuple[Tensor, Tensor, Tensor, dict[str, Any], int]]:
        """Restart segment (see ``AdjointMatchingConfig.restarts``): mixup states at one random
        grid index ``k >= restart_after``, run to ``t = 1`` with the fine-tuned model, lean
        adjoint along it. Returns ``[(states, adjoint, valid, cond, k)]`` for :meth:`regression_pairs`."""
        c, m = self.config, self.steps
        first = next((k for k, t in enumerate(self.schedule.t) if t >= c.restart_after), m - 1)
        count = max(1, round(c.restarts * c.batch_size))
        n = states.shape[1]
        k = first + int(torch.randint(0, m - first, (1,), generator=self.generator, device=self.device))
        i = torch.randint(0, n, (count,), generator=self.generator, device=self.device)
        j = torch.randint(0, n, (count,), generator=self.generator, device=self.device)
        mix = torch.rand((count,) + (1,) * (states.ndim - 2), generator=self.generator, device=self.device, dtype=states.dtype)
        x = states[k, i] + mix * (states[k, j] - states[k, i])
        sub = {name: v[i] for name, v in cond.items()}
        seg = sample(
            self.env, x=x, grid=self.times[k:], policy=self.model, reward=self.reward, reward_scale=self.reward_scale,
            cond=sub, generator=self.generator, store=self._stored(),
        )
        adjoint, valid = self.adjoint(seg.states, sub, k, seg.noises, self._cost_to_go(seg), seg.controls)
        return [(seg.states, adjoint, valid & seg.valid, sub, k)]

    def _stored(self) -> tuple[str, ...]:
        return ("states", "noises", "controls") if self.config.likelihood_ratio is not None else ("states",)

    def _cost_to_go(self, traj: Any) -> Tensor | None:
        return traj.cost_to_go if self.config.likelihood_ratio is not None else None

    def _set_learning_rate(self) -> None:
        c = self.config
        factor = 1.0
        if c.lr_schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(self.iteration / c.iterations, 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = c.learning_rate * factor

    def step(self) -> dict[str, float]:
        """One iteration (sample, lean adjoint, restarts if configured, ``updates_per_iteration``
        gradient steps); returns its record (reward, KL and objective of the sampled batch)."""
        start = time.perf_counter()
        c = self.config
        cond = self._cond(c.batch_size)
        self.model.train()
        traj = sample(
            self.env, c.batch_size, grid=self.times, policy=self.model, reward=self.reward, reward_scale=self.reward_scale,
            cond=cond, generator=self.generator, store=self._stored(), device=self.device, dtype=self.dtype,
        )
        adjoint, valid = self.adjoint(traj.states, cond, 0, traj.noises, self._cost_to_go(traj), traj.controls)
        valid = valid & traj.valid
        extra = self._restart(traj.states, cond) if c.restarts > 0 else []
        pairs = self.regression_pairs(traj.states, adjoint, valid, cond, extra)
        self._set_learning_rate()
        losses = []
        for _ in range(c.updates_per_iteration if bool(valid.any()) else 0):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(pairs)
            loss.backward()
            if c.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            if self.target_model is not None:
                with torch.no_grad():
                    for p_t, p in zip(self.target_model.parameters(), self.model.parameters()):
                        p_t.lerp_(p, 1.0 - float(c.target_ema))
            losses.append(float(loss.detach()))
        loss_value = sum(losses) / len(losses) if losses else float("nan")
        self.iteration += 1
        r = traj.reward[valid] if bool(valid.any()) else traj.reward
        kl = traj.kl[valid] if bool(valid.any()) else traj.kl
        record = {
            "iteration": float(self.iteration),
            "loss": loss_value,
            "reward": float(r.mean()),
            "kl": float(kl.mean()),
            "objective": float((self.reward_scale * r - kl).mean()),
            "seconds": time.perf_counter() - start,
        }
        for key, value in record.items():
            self.history[key].append(value)
        return record

    def train(
        self,
        iterations: int | None = None,
        callback: Callable[[dict[str, float]], Any] | None = None,
        progress: bool = False,
    ) -> dict[str, list[float]]:
        """Run ``iterations`` more iterations (default ``config.iterations``); resumable.

        ``callback(record)`` is called after every iteration; returning ``True`` stops.
        Returns the full history (lists keyed by ``iteration``, ``loss``, ``reward``,
        ``kl``, ``objective``, ``seconds``).
        """
        torch.set_flush_denormal(True)
        n_iter = check_positive_int("iterations", iterations if iterations is not None else self.config.iterations)
        bar = tqdm(range(n_iter), disable=not progress, desc="adjoint matching")
        for _ in bar:
            record = self.step()
            if progress:
                bar.set_postfix(loss=f"{record['loss']:.3g}", objective=f"{record['objective']:.3f}")
            if callback is not None and callback(record) is True:
                break
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_samples: int = 4096, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
        """Objective, KL and mean reward of the fine-tuned model on fresh samples.

        Returns a dict with ``objective``, ``kl``, ``reward`` (floats), ``x1``
        ``(n, *sample_shape)`` and, with an oracle, ``gap_closed``.
        """
        self.model.eval()
        grid = self.times if steps is None else make_time_grid(steps, self.t_start)
        cond = self._cond(num_samples) if self.cond_samplers else {}
        traj = sample(
            self.env, num_samples, grid=grid, policy=self.model, reward=self.reward, reward_scale=self.reward_scale,
            cond=cond, seed=seed, device=self.device, dtype=self.dtype,
        )
        v = traj.valid
        out: dict[str, Any] = {
            "objective": float(traj.objective[v].mean()),
            "kl": float(traj.kl[v].mean()),
            "reward": float(traj.reward[v].mean()),
            "valid_fraction": float(v.float().mean()),
            "x1": traj.x1,
        }
        if self.oracle is not None:
            gap = self.oracle.optimal_objective - self.oracle.base_objective
            out["gap_closed"] = float(self.oracle.gap_closed(out["objective"])) if abs(gap) > 1e-12 else float("nan")
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Save the model's trainable weights (frozen base parameters are left out), the
        optimiser, generator state, iteration and history (safetensors + JSON)."""
        tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors["generator_state"] = self.generator.get_state()
        config = {
            "method": "adjoint_matching",
            "config": dataclasses.asdict(self.config),
            "iteration": self.iteration,
            "history": self.history,
            "reward_scale": self.reward_scale,
            "steps": self.steps,
            "t_start": self.t_start,
            "optimizer": opt_meta,
        }
        return save_checkpoint(path, self._modules(), config, tensors, exclude=self._frozen())

    def load(self, path: str | Path) -> "AdjointMatching":
        """Restore a checkpoint written by :meth:`save` into this trainer (same architecture);
        training then continues exactly where it stopped."""
        config, extra = load_checkpoint(path, self._modules(), device=self.device, allow_missing=self._frozen())
        if config.get("method") != "adjoint_matching":
            raise ValueError(f"path: expected an adjoint matching checkpoint, got method={config.get('method')!r}")
        self.generator.set_state(extra["generator_state"].cpu())
        load_optimizer_tensors(self.optimizer, extra, config["optimizer"])
        self.iteration = int(config["iteration"])
        self.history = {k: list(v) for k, v in config["history"].items()}
        return self

    def _frozen(self) -> dict[str, set[str]]:
        """Frozen parameters (e.g. the base weights under a LoRA or residual fine-tune) are not
        saved: the checkpoint holds what training changes; the base comes from the user."""
        frozen = frozen_parameter_names(self.model)
        return {name: frozen for name in self._modules()}

    def _modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.model}
        if self.target_model is not None:
            mods["target_model"] = self.target_model
        return mods

    def copy_model(self) -> nn.Module:
        """A detached deep copy of the fine-tuned model (e.g. to keep a snapshot)."""
        return copy.deepcopy(self.model)

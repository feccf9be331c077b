"""Twisted sequential Monte Carlo over the Euler–Maruyama denoising chain.

Target: the tilt of the *discretised* base chain, ``p*(x_{0:m}) ∝ p(x_{0:m}) exp(lambda r(x_m))``
(``docs/guidance.md``; it tends to ``p* ∝ p1 exp(lambda r)`` as the grid refines). With the base
kernel ``p_k(x'|x) = N(x + h b, h sigma^2 I)``, the proposal
``q_k(x'|x) = N(x + h (b + sigma u), h sigma^2 I)`` (``u = 0``: the base kernel) and a twist
``psi_k = exp(-V(., t_k))`` (:mod:`diffusiongym.guidance.twists`), particle ``i`` starts from the
base ``x_0 ~ N(0, beta(t_0)^2 I)`` with weight ``psi_0(x_0)`` and each step multiplies it by::

    w_k = psi_{k+1}(x') p_k(x'|x) / (psi_k(x) q_k(x'|x)),
    log p_k(x'|x) - log q_k(x'|x) = -sqrt(h) u.z - h |u|^2 / 2   for x' = x + h (b + sigma u) + sigma sqrt(h) z,

with ``psi_m = exp(lambda r)`` at the last step (the final reweighting). The product of the
weights telescopes to ``exp(lambda r(x_m)) dP_base/dQ`` whatever the twist, so the normalised
particle system targets ``p*`` exactly and the mean weight is unbiased for
``Z = E_base[exp(lambda r(X_m))]`` (``log Z`` is the optimal objective). When the effective
sample size ``ESS = (sum w)^2 / sum w^2`` of a replicate falls below ``ess_threshold * N`` its
particles are resampled (:mod:`~diffusiongym.guidance.resampling`) and ``Z`` picks up the
factor ``mean(w)``.

Replicates: ``replicates = R`` independent particle systems of ``num_particles = N`` each run
in one batch. Each gives an unbiased ``Z_r``; the estimate is ``log mean_r Z_r`` with the
delta-method standard error ``std(Z_r) / (sqrt(R) mean(Z_r))`` (NaN for ``R = 1``), and the
pooled particles are weighted by ``Z_r`` across replicates.

Each step is one call of the engine, :func:`diffusiongym.sample`, over a one-step grid (the
drift, control and noise code live there); the twist's base-model output at the new states is
remembered and reused by the next step, so a ``pred_final`` twist costs no extra evaluations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.guidance.resampling import RESAMPLING_SCHEMES, effective_sample_size, resample_indices
from diffusiongym.guidance.result import CountingModel, GuidanceResult, counting_environment
from diffusiongym.guidance.twists import Twist
from diffusiongym.logprob import path_log_ratio
from diffusiongym.policies.control import ModelControl
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import StepSchedule, resolve_generator, sample
from diffusiongym.tasks import check_reward
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.validation import ArgumentTypeError, check_positive_int, check_real, unknown_name_error

__all__ = ["smc", "SMCResult", "replicate_log_normalizer", "reindex_cond"]


@dataclass
class SMCResult(GuidanceResult):
    """:class:`~diffusiongym.guidance.result.GuidanceResult` of :func:`smc`, with the particle system.

    Attributes
    ----------
    particles : Tensor, (R N, *sample_shape)
        The weighted particles at ``t_m`` before the final resampling (replicate ``r`` holds
        rows ``r N .. (r + 1) N - 1``).
    log_weights : Tensor, (R N,)
        Their normalised log weights (``logsumexp = 0``; across replicates weighted by ``Z_r``).
    particle_cond : dict
        The conditioning of ``particles``.
    log_normalizer_replicates : Tensor, (R,)
        ``log Z_r`` of each replicate (float64).
    ess_history : Tensor, (m + 1, R)
        ESS of each replicate after the weighting at each grid point (before any resampling).
    resampled : Tensor, (m - 1, R) bool
        Whether replicate ``r`` resampled after step ``k = 1..m-1`` (the final resampling of
        ``x1`` is not counted).
    times : Tensor, (m + 1,)
        The grid (float64).
    """

    particles: Tensor | None = None
    log_weights: Tensor | None = None
    particle_cond: dict[str, Any] | None = None
    log_normalizer_replicates: Tensor | None = None
    ess_history: Tensor | None = None
    resampled: Tensor | None = None
    times: Tensor | None = None

    @property
    def num_resampling(self) -> int:
        """Resampling events over all replicates (final resampling excluded)."""
        return 0 if self.resampled is None else int(self.resampled.sum())


def replicate_log_normalizer(log_z: Tensor) -> tuple[float, float]:
    """``(log mean_r Z_r, se)`` from ``log Z_r`` of ``R`` independent unbiased estimates.

    ``se = std(Z_r) / (sqrt(R) mean(Z_r))`` (delta method for the log of the mean; NaN for ``R = 1``).
    """
    log_z = log_z.to(torch.float64).reshape(-1)
    r = log_z.numel()
    estimate = float(torch.logsumexp(log_z, 0) - math.log(r))
    if r < 2 or not math.isfinite(estimate):
        return estimate, math.nan
    ratio = torch.exp(log_z - log_z.max())
    return estimate, float(ratio.std() / (math.sqrt(r) * ratio.mean()))


def reindex_cond(cond: dict[str, Any], index: Tensor, n: int) -> dict[str, Any]:
    """Conditioning after a resampling: batched tensors (first dimension ``n``) become ``value[index]``;
    everything else (scalars, shared tensors) is kept."""
    return {k: v[index] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n else v for k, v in cond.items()}


def _log_mean_exp(lw: Tensor) -> Tensor:
    return torch.logsumexp(lw, dim=-1) - math.log(lw.shape[-1])


def _bind_control(
    control: Any, policy: Any, env: DiffusionEnvironment, counted_env: DiffusionEnvironment
) -> tuple[Any, Any, CountingModel | None]:
    """Make a proposal control count its base-model calls on ``counted_env``; wrap a policy model to count it."""
    if isinstance(control, ModelControl) and control.env is env:
        policy, control = control.model, None
    if control is not None and getattr(control, "env", None) is env and callable(getattr(control, "with_env", None)):
        control = control.with_env(counted_env)
    policy_counter = None
    if policy is not None:
        if not callable(policy):
            raise TypeError(f"policy: expected a callable model(x, t, **cond), got {type(policy).__name__}")
        policy_counter = CountingModel(policy)
        policy = policy_counter
    if control is not None and not callable(control):
        raise TypeError(f"control: expected a callable u(x, t, **cond), got {type(control).__name__}")
    return control, policy, policy_counter


def smc(
    env: DiffusionEnvironment,
    twist: Twist,
    reward: Reward,
    reward_scale: float = 1.0,
    num_particles: int = 256,
    *,
    replicates: int = 1,
    num_samples: int | None = None,
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
    control: Callable[..., Tensor] | None = None,
    policy: Callable[..., Tensor] | None = None,
    cond: dict[str, Any] | None = None,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    final_reweight: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> SMCResult:
    """Twisted SMC towards ``p* ∝ p exp(lambda r)`` over the Euler–Maruyama chain (module docstring).

    Parameters
    ----------
    env : DiffusionEnvironment
        The base model; ``sigma > 0`` (the kernel needs a density; memoryless for ``p*`` to be the
        tilt of the data law, as with the fine-tuning methods).
    twist : Twist
        ``psi_k = exp(-V(., t_k))`` at ``t_0 .. t_{m-1}`` (and at ``t_m`` with ``final_reweight=False``).
    reward, reward_scale
        ``r`` and ``lambda``; the final potential is ``exp(lambda r(x_m))`` (0 where ``r`` is invalid).
    num_particles : int
        ``N`` particles per replicate.
    replicates : int
        ``R`` independent particle systems (batched); ``R >= 2`` gives a standard error.
    num_samples : int, optional
        How many equally weighted outputs ``x1`` the final resampling draws (default ``R N``).
    steps, t_start, t_end, grid
        The time grid (:func:`~diffusiongym.timegrid.make_time_grid`).
    control, policy : callable, optional
        A proposal: a control ``u(x, t, **cond)`` or a model in the base parameterisation (as in
        :func:`~diffusiongym.sample`); the weights then include the Gaussian log-ratio. Default:
        the base kernel.
    cond : dict, optional
        Conditioning; tensors with first dimension ``R N`` are per particle and follow resampling.
    resampling : {"systematic", "multinomial"}
    ess_threshold : float in [0, 1]
        Resample a replicate when its ESS falls below ``ess_threshold * N`` (0: never, 1: every step).
    final_reweight : bool
        ``False`` uses the twist's own ``psi_m`` instead of ``exp(lambda r)`` at the end (then the
        target is ``p psi_m``, not ``p*``; a diagnostic).
    seed, generator, device, dtype, progress
        As in :func:`~diffusiongym.sample`; all randomness comes from the generator.

    Returns
    -------
    SMCResult
        ``x1`` (``num_samples`` equally weighted samples after a final resampling with ``resampling``),
        ``reward``, ``log_normalizer`` (``log Z``) ± ``log_normalizer_se``, the weighted
        ``particles`` and ``log_weights``, ``ess_history``, ``model_evals`` (base-network rows,
        plus the rows of ``policy`` when one is given).

    Raises
    ------
    TypeError
        A wrong type (``env``, ``twist``, ``reward``, ``control``, ``cond``, ...), naming it.
    ValueError
        A bad value (``num_particles``, ``ess_threshold`` outside [0, 1], an unknown ``resampling``,
        ``sigma = 0``, ...), naming it.
    RuntimeError
        Every particle of a replicate got zero weight.
    """
    if not isinstance(env, DiffusionEnvironment):
        raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
    if not isinstance(twist, Twist):
        raise TypeError(
            f"twist: expected a diffusiongym.guidance Twist (OracleTwist, ValueTwist, PredFinalTwist, ZeroTwist), got {type(twist).__name__}"
        )
    reward = check_reward(reward)
    reward_scale = check_real("reward_scale", reward_scale)
    n_per = check_positive_int("num_particles", num_particles)
    groups = check_positive_int("replicates", replicates)
    num_out = n_per * groups if num_samples is None else check_positive_int("num_samples", num_samples)
    if not isinstance(resampling, str) or resampling not in RESAMPLING_SCHEMES:
        raise unknown_name_error("resampling", resampling, RESAMPLING_SCHEMES)
    ess_threshold = check_real("ess_threshold", ess_threshold, low=0.0, high=1.0)
    if not isinstance(final_reweight, bool):
        raise ArgumentTypeError(f"final_reweight: expected a bool, got {final_reweight!r}")
    if not isinstance(progress, bool):
        raise ArgumentTypeError(f"progress: expected a bool, got {progress!r}")
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond: expected a dict of conditioning keyword arguments, got {type(cond).__name__}")
    if control is not None and policy is not None:
        raise ValueError("control, policy: give at most one")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if env.noise.is_deterministic:
        raise ValueError(
            "env: SMC needs sigma > 0 (with noise='ode' the kernel has no density); use a stochastic noise"
        )
    if env.sample_shape is None:
        raise ValueError("env: the model has no sample_shape; give the environment one")

    times = make_time_grid(steps, t_start, t_end, grid)
    StepSchedule.build(env, times)  # checks the grid once and warns if its first step is stiff
    m = times.numel() - 1
    n = n_per * groups
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = resolve_generator(seed, generator, device)
    if gen is None:
        gen = torch.Generator(device=device)
        gen.seed()
    counted_env, counter = counting_environment(env)
    control, policy, policy_counter = _bind_control(control, policy, env, counted_env)
    controlled = control is not None or policy is not None
    cond = dict(cond or {})
    times_x = times.to(device=device, dtype=dtype)

    beta0 = float(env.scheduler.beta(times[0]))
    x = beta0 * torch.randn((n, *env.sample_shape), generator=gen, device=device, dtype=dtype)
    with counter.remember():
        log_psi = twist(x, times_x[0], counted_env, **cond)
    log_w = log_psi.clone()
    log_z = torch.zeros(groups, dtype=torch.float64, device=device)
    ess_rows = [_ess(log_w, groups, 0)]
    resampled_rows = []
    final_r = final_valid = None

    for k in tqdm(range(m), disable=not progress, desc="smc", leave=False):
        with warnings.catch_warnings():  # one-step grids: the stiffness warning was given for the whole grid
            warnings.filterwarnings("ignore", message=r".*is stiff.*", category=RuntimeWarning)
            traj = sample(
                counted_env,
                x=x,
                grid=times[k : k + 2],
                control=control,
                policy=policy,
                cond=cond,
                generator=gen,
                store=("controls", "noises") if controlled else (),
            )
        x_new = traj.x1
        if k == m - 1 and final_reweight:
            final_r, final_valid = reward(x_new, **cond)
            log_psi_new = torch.where(
                final_valid, reward_scale * final_r.to(dtype), torch.full_like(final_r, -math.inf, dtype=dtype)
            )
        else:
            with counter.remember():
                log_psi_new = twist(x_new, times_x[k + 1], counted_env, **cond)
        increment = log_psi_new - log_psi
        if controlled:
            increment = increment + path_log_ratio(traj)
        log_w = torch.nan_to_num(log_w + increment, nan=-math.inf)  # a zero weight stays zero
        x, log_psi = x_new, log_psi_new
        ess_rows.append(_ess(log_w, groups, k + 1))
        if k == m - 1:
            break
        lw = log_w.view(groups, n_per)
        redo = ess_rows[-1] < ess_threshold * n_per
        resampled_rows.append(redo)
        if bool(redo.any()):
            log_z[redo] += _log_mean_exp(lw[redo]).to(torch.float64)
            local = resample_indices(lw[redo], resampling, generator=gen)
            index = torch.arange(n, device=device).view(groups, n_per)
            index[redo] = local + (torch.nonzero(redo).reshape(-1, 1) * n_per)
            index = index.reshape(-1)
            x, log_psi = x[index], log_psi[index]
            cond = reindex_cond(cond, index, n)
            counter.reindex(index)
            log_w = log_w.view(groups, n_per).clone()
            log_w[redo] = 0.0
            log_w = log_w.reshape(-1)
    counter.forget()

    lw = log_w.view(groups, n_per)
    log_z = log_z + _log_mean_exp(lw).to(torch.float64)
    estimate, se = replicate_log_normalizer(log_z)
    within = lw - torch.logsumexp(lw, dim=-1, keepdim=True)
    across = (log_z - torch.logsumexp(log_z, 0)).to(dtype)
    log_weights = (within + across[:, None]).reshape(-1)
    if final_r is None:
        final_r, final_valid = reward(x, **cond)
    index = resample_indices(log_weights, resampling, num=num_out, generator=gen)
    evals = counter.evals + (policy_counter.evals if policy_counter is not None else 0)
    return SMCResult(
        x1=x[index],
        reward=final_r[index],
        model_evals=evals,
        cond=reindex_cond(cond, index, n),
        log_normalizer=estimate,
        log_normalizer_se=se,
        info={"valid": final_valid[index], "twist": repr(twist), "resampling": resampling},
        particles=x,
        log_weights=log_weights,
        particle_cond=cond,
        log_normalizer_replicates=log_z,
        ess_history=torch.stack(ess_rows),
        resampled=torch.stack(resampled_rows) if resampled_rows else torch.zeros(0, groups, dtype=torch.bool),
        times=times,
    )


def _ess(log_w: Tensor, groups: int, k: int) -> Tensor:
    """ESS per replicate; a replicate whose weights are all zero is an error (nothing can be resampled)."""
    lw = log_w.view(groups, -1)
    dead = (lw == -math.inf).all(-1)
    if bool(dead.any()):
        raise RuntimeError(
            f"smc: every particle of replicate {int(torch.nonzero(dead)[0])} has zero weight at grid point {k} "
            "(the twist or the reward gave psi = 0 or NaN everywhere)"
        )
    return effective_sample_size(lw)

"""Exact Euler–Maruyama step log-probabilities vs an independent computation from stored
means (base drifts + controls) and noises."""

from __future__ import annotations

import math

import pytest
import torch

import diffusiongym as dg
from diffusiongym.logprob import (
    euler_step_log_prob,
    gaussian_log_prob,
    path_log_ratio,
    step_kl,
    step_log_prob,
    trajectory_log_probs,
)
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.tasks import make_task

CASES = [(p, s) for p in ("velocity", "epsilon", "endpoint", "score") for s in ("linear", "cosine")]
IDS = [f"{p}-{s}" for p, s in CASES]


def _task(parameterization: str, scheduler: str):
    # float64 throughout: the comparisons below are then exact to ~1e-9
    return make_task("GMM2D-v0", parameterization=parameterization, scheduler=scheduler, steps=12, t_start=0.02)


def _random_policy(task) -> ResidualModel:
    torch.manual_seed(0)
    net = TimeMLP(2, 2, hidden=16, layers=2).double()  # non-zero residual: policy != base
    return ResidualModel(task.environment.model, net)


def _independent_log_probs(traj, step_mean: torch.Tensor, env) -> torch.Tensor:
    """log N(x_{k+1}; mean_k, h_k sigma_k^2 I) written out from the stored noises:
    x_{k+1} - mean_k = sqrt(h_k) sigma_k z_k, so the density is that of z_k rescaled."""
    h = traj.times[1:] - traj.times[:-1]
    std = (h * env.sigma(traj.times[:-1]) ** 2).sqrt()
    resid = (traj.states[1:] - step_mean) / std[:, None, None]
    assert torch.allclose(resid, traj.noises, atol=1e-8)  # the stored means and noises reproduce the states
    d = traj.states.shape[-1]
    return -0.5 * (traj.noises**2).sum(-1) - d * std.log()[:, None] - 0.5 * d * math.log(2 * math.pi)


@pytest.mark.parametrize("parameterization,scheduler", CASES, ids=IDS)
def test_control_log_probs_match_stored_means_and_noises(parameterization, scheduler):
    task = _task(parameterization, scheduler)
    env = task.environment
    control = lambda x, t, **c: 0.3 * torch.sin(x) + t[:, None]  # noqa: E731  any smooth control
    traj = dg.sample(
        env, 64, steps=task.steps, t_start=task.t_start, control=control, seed=0, dtype=torch.float64, store="all"
    )
    h = (traj.times[1:] - traj.times[:-1])[:, None, None]
    sigma = env.sigma(traj.times[:-1])[:, None, None]
    mean = traj.states[:-1] + h * (traj.drifts + sigma * traj.controls)
    expected = _independent_log_probs(traj, mean, env)
    got = trajectory_log_probs(env, traj, control=control)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
    # under the base the mean lacks sigma u
    base_expected = _independent_log_probs_base(traj, env)
    torch.testing.assert_close(trajectory_log_probs(env, traj), base_expected, rtol=0, atol=1e-8)


def _independent_log_probs_base(traj, env) -> torch.Tensor:
    h = traj.times[1:] - traj.times[:-1]
    std = (h * env.sigma(traj.times[:-1]) ** 2).sqrt()
    mean = traj.states[:-1] + h[:, None, None] * traj.drifts
    d = traj.states.shape[-1]
    return (
        -0.5 * (((traj.states[1:] - mean) / std[:, None, None]) ** 2).sum(-1)
        - d * std.log()[:, None]
        - 0.5 * d * math.log(2 * math.pi)
    )


@pytest.mark.parametrize("parameterization,scheduler", CASES, ids=IDS)
def test_policy_log_probs_kl_and_path_ratio(parameterization, scheduler):
    task = _task(parameterization, scheduler)
    env = task.environment
    policy = _random_policy(task)
    traj = dg.sample(
        env, 64, steps=task.steps, t_start=task.t_start, policy=policy, seed=1, dtype=torch.float64, store="all"
    )
    h = (traj.times[1:] - traj.times[:-1])[:, None, None]
    sigma = env.sigma(traj.times[:-1])[:, None, None]
    mean = traj.states[:-1] + h * (traj.drifts + sigma * traj.controls)
    with torch.no_grad():
        got = trajectory_log_probs(env, traj, policy=policy)
        base = trajectory_log_probs(env, traj)
    torch.testing.assert_close(got, _independent_log_probs(traj, mean, env), rtol=0, atol=1e-7)
    # per-step Gaussian KL to the base = the engine's running cost 1/2 h |u|^2
    for k in (0, task.steps // 2, task.steps - 1):
        t_k, h_k = float(traj.times[k]), float(traj.times[k + 1] - traj.times[k])
        with torch.no_grad():
            kl = step_kl(env, traj.states[k], t_k, h_k, policy=policy)
        torch.testing.assert_close(kl, traj.running_cost[k], rtol=1e-7, atol=1e-10)
    # discrete Girsanov: log dP_base/dP_policy of the path = sum of step log-density differences
    torch.testing.assert_close(path_log_ratio(traj), (base - got).sum(0), rtol=1e-7, atol=1e-7)


def test_policy_log_prob_is_differentiable_and_zero_residual_equals_base():
    task = _task("velocity", "linear")
    env = task.environment
    policy = ResidualModel(task.environment.model, TimeMLP(2, 2, hidden=8, layers=1, zero_init=True).double())
    x = torch.randn(8, 2, dtype=torch.float64)
    x_next = x + 0.1 * torch.randn(8, 2, dtype=torch.float64)
    lp = step_log_prob(env, x, x_next, 0.5, 0.05, policy=policy)
    torch.testing.assert_close(lp, step_log_prob(env, x, x_next, 0.5, 0.05), rtol=1e-12, atol=1e-12)
    lp.sum().backward()
    assert policy.net.head.weight.grad is not None and policy.net.head.weight.grad.abs().sum() > 0


def test_euler_step_log_prob_from_stored_drift_equals_step_log_prob():
    # the policy-gradient form (base drift given, control added) is the same density
    task = _task("epsilon", "cosine")
    env = task.environment
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    x_next = x + 0.2 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(16, generator=g, dtype=torch.float64)
    h = 0.05 * torch.rand(16, generator=g, dtype=torch.float64) + 0.01
    control = lambda x, t, **c: torch.cos(x) * t[:, None]  # noqa: E731
    with torch.no_grad():
        drift = env.drift(x, t)
    sigma = env.sigma(t)
    torch.testing.assert_close(
        euler_step_log_prob(x_next, x, drift, h, sigma, control(x, t)),
        step_log_prob(env, x, x_next, t, h, control=control),
        rtol=0,
        atol=1e-10,
    )
    torch.testing.assert_close(
        euler_step_log_prob(x_next, x, drift, h, sigma), step_log_prob(env, x, x_next, t, h), rtol=0, atol=1e-10
    )
    with pytest.raises(ValueError, match="control"):
        euler_step_log_prob(x_next, x, drift, h, sigma, torch.zeros(16, 3, dtype=torch.float64))


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    std = torch.rand(5, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(mean, std[:, None]).log_prob(x).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)


def test_errors():
    task = make_task("GMM1D-v0", noise="ode")
    x = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="sigma = 0"):
        step_log_prob(task.environment, x, x, 0.5, 0.1)
    task = make_task("GMM1D-v0")
    with pytest.raises(ValueError, match="expected shape"):
        gaussian_log_prob(x, torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="at most one"):
        step_log_prob(task.environment, x, x, 0.5, 0.1, policy=task.environment.model, control=lambda x, t: x)
    traj = dg.sample(task.environment, 4, steps=3)
    with pytest.raises(ValueError, match="store"):
        trajectory_log_probs(task.environment, traj)
    with pytest.raises(ValueError, match="store"):
        path_log_ratio(traj)

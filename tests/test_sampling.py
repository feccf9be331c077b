"""Euler–Maruyama engine: samples match the exact mixture; oracle control reaches p*; seeding; errors."""

import math

import warnings

import pytest
import torch

import diffusiongym as dg
from diffusiongym.envs.environment import ENVIRONMENTS
from diffusiongym.parameterization import PARAMETERIZATIONS
from diffusiongym.tasks import make_task

N = 2000
MIX = dg.gmm_preset("2d")


def _exact(n, seed, mix=MIX):
    return mix.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.fixture(scope="module")
def null_threshold():
    """Energy-distance threshold: the largest of 20 exact-vs-exact draws of size N (about the
    95th-99th percentile of the null), times 1.5 for the O(h) Euler bias. Calibrated, not guessed:
    a wrong convention gives distances 10-100x larger (see test_wrong_convention_fails)."""
    null = [dg.energy_distance(_exact(N, 1000 + 2 * i), _exact(N, 1001 + 2 * i)) for i in range(20)]
    return 1.5 * max(null)


def _env(p, noise, sched="linear"):
    return ENVIRONMENTS[p](dg.GaussianMixtureModel(MIX, sched, p), scheduler=sched, noise=noise)


NOISES = {"ode": "ode", "memoryless": "memoryless", "constant": 0.7}


@pytest.mark.parametrize("noise", NOISES, ids=list(NOISES))
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_samples_match_exact_mixture(param, noise, null_threshold):
    traj = dg.sample(_env(param, NOISES[noise]), N, steps=100, seed=7)
    assert traj.valid.all()
    assert dg.energy_distance(traj.x1, _exact(N, 99)) < null_threshold
    # mean within 4 standard errors; covariance entries within 4 standard errors (+ 0.05 Euler bias)
    mean_err = (traj.x1.double().mean(0) - MIX.mean()).abs()
    assert torch.all(mean_err < 4 * MIX.covariance().diag().sqrt() / math.sqrt(N))
    cov_err = (torch.cov(traj.x1.double().T) - MIX.covariance()).abs()
    assert torch.all(cov_err < 4 * MIX.covariance().diag().max() * math.sqrt(2 / N) + 0.05)


@pytest.mark.parametrize("sched", ["cosine", "vp"])
@pytest.mark.parametrize("noise", ["ode", "memoryless"])
def test_other_schedulers(sched, noise, null_threshold):
    traj = dg.sample(_env("epsilon", noise, sched), N, steps=100, seed=3)
    assert dg.energy_distance(traj.x1, _exact(N, 98)) < null_threshold


def test_wrong_convention_fails(null_threshold):
    """A model built for the cosine path but sampled as linear must fail the test above."""
    model = dg.GaussianMixtureModel(MIX, "cosine", "velocity")
    env = dg.VelocityEnvironment(model, scheduler="linear", noise="memoryless")
    traj = dg.sample(env, N, steps=100, seed=7)
    assert dg.energy_distance(traj.x1, _exact(N, 99)) > 3 * null_threshold


@pytest.mark.parametrize("noise", ["ode", "memoryless", 0.7], ids=["ode", "memoryless", "constant"])
def test_intermediate_marginals(noise, null_threshold):
    sched = dg.LinearScheduler()
    traj = dg.sample(_env("score", noise), N, steps=100, seed=11, store="states")
    for k in (30, 60, 90):
        t = float(traj.times[k])
        exact_t = MIX.marginal(t, 1 - t)
        got = traj.states[k]
        assert dg.energy_distance(got, _exact(N, 500 + k, exact_t)) < null_threshold, t
    assert sched is not None


def test_oracle_control_reaches_tilted_target(null_threshold):
    task = make_task("GMM2D-v0")
    n = 2000
    traj = dg.sample(
        task.environment,
        n,
        steps=200,
        control=task.oracle.control(),
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=5,
    )
    target = task.oracle.target.sample(n, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
    assert dg.energy_distance(traj.x1, target) < dg.null_energy_threshold(task.oracle.target, n)
    # Mean return = optimal objective within 4 Monte-Carlo standard errors + 0.03 (Euler bias at
    # 200 steps, measured 0.033 on GMM1D with 16k samples, 0.015 at 400 steps).
    ret = traj.objective.double()
    se = float(ret.std()) / math.sqrt(n)
    assert abs(float(ret.mean()) - task.oracle.optimal_objective) < 4 * se + 0.03
    # and the base model is far from it
    base = dg.sample(task.environment, n, steps=100, reward=task.reward, reward_scale=task.reward_scale, seed=5)
    assert float(base.objective.mean()) < task.oracle.optimal_objective - 3


def test_seeding_is_bitwise_and_caller_tensors_untouched():
    env = _env("velocity", "memoryless")
    a = dg.sample(env, 64, steps=20, seed=3)
    b = dg.sample(env, 64, steps=20, seed=3)
    c = dg.sample(env, 64, steps=20, seed=4)
    assert torch.equal(a.x1, b.x1) and not torch.equal(a.x1, c.x1)
    x0 = torch.randn(8, 2)
    keep = x0.clone()
    dg.sample(env, x=x0, steps=5, seed=0)
    assert torch.equal(x0, keep)


def test_given_noises_reproduce_a_run_and_grad_path_matches():
    env = _env("velocity", "memoryless")
    task = make_task("GMM2D-v0")
    ref = dg.sample(env, 32, steps=10, seed=1, store=("states", "noises"))
    again = dg.sample(env, x=ref.states[0], steps=10, noises=ref.noises)
    torch.testing.assert_close(again.x1, ref.x1)
    grad_run = dg.sample(env, x=ref.states[0], steps=10, noises=ref.noises, requires_grad=True)
    # same maths, out-of-place float32 arithmetic: rounding differs at ~1e-6 relative, amplified
    # by the large first-step coefficients (1/t_start), hence 1e-4
    torch.testing.assert_close(grad_run.x1, ref.x1, rtol=1e-4, atol=1e-4)
    x0 = ref.states[0].clone().requires_grad_(True)
    out = dg.sample(env, x=x0, steps=10, noises=ref.noises, requires_grad=True, reward=task.reward)
    (grad,) = torch.autograd.grad(out.reward.sum(), x0)
    assert grad.shape == x0.shape and torch.isfinite(grad).all()


def test_policy_model_equals_its_control():
    """u = (b_policy - b_base) / sigma: sampling with a policy model equals sampling with that u."""
    task = make_task("GMM1D-v0")
    env = task.environment
    other = dg.GaussianMixtureModel(task.oracle.target, env.scheduler, "velocity")  # p* as a "fine-tuned" model
    policy_env = env.with_model(other)

    def control(x, t):
        return (policy_env.drift(x, t) - env.drift(x, t)) / env.sigma(t.double()).to(x)[:, None]

    a = dg.sample(env, 256, steps=50, policy=other, seed=2, reward=task.reward)
    b = dg.sample(env, 256, steps=50, control=control, seed=2, reward=task.reward)
    torch.testing.assert_close(a.x1, b.x1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.running_cost, b.running_cost, rtol=1e-3, atol=1e-5)
    # and the fine-tuned model's own SDE gives the same law of x1
    c = dg.sample(policy_env, 256, steps=50, seed=2)
    torch.testing.assert_close(a.x1, c.x1, rtol=1e-4, atol=1e-4)


def test_trajectory_costs():
    task = make_task("GMM1D-v0")
    traj = dg.sample(
        task.environment,
        128,
        steps=20,
        control=task.oracle.control(),
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=0,
    )
    assert traj.running_cost.shape == (20, 128)
    torch.testing.assert_close(traj.cost_to_go[0], traj.total_cost)
    torch.testing.assert_close(traj.cost_to_go[-1], -task.reward_scale * traj.reward)
    torch.testing.assert_close(traj.objective, task.reward_scale * traj.reward - traj.kl)
    base = dg.sample(task.environment, 16, steps=5, seed=0)
    assert torch.all(base.running_cost == 0)
    ode = dg.sample(task.environment.with_noise("ode"), 16, steps=5, seed=0, reward=task.reward)
    assert ode.running_cost is None and ode.kl is None
    with pytest.raises(ValueError, match="no KL"):
        _ = ode.total_cost


def test_store_shapes():
    env = _env("velocity", "memoryless")
    traj = dg.sample(env, 8, steps=6, seed=0, store="all", control=lambda x, t: torch.ones_like(x))
    assert traj.states.shape == (7, 8, 2)
    for name in ("drifts", "noises", "controls"):
        assert getattr(traj, name).shape == (6, 8, 2)
    torch.testing.assert_close(traj.states[-1], traj.x1)
    unstored = dg.sample(env, 8, steps=6, seed=0)
    assert unstored.states is None and unstored.noises is None


def test_errors_name_the_argument():
    env = _env("velocity", "memoryless")
    with pytest.raises(ValueError, match="num_samples"):
        dg.sample(env, 0)
    with pytest.raises(ValueError, match="steps"):
        dg.sample(env, 4, steps=0)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 2\)"):
        dg.sample(env, x=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        dg.sample(env, x=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x: expected a tensor on meta"):
        dg.sample(env, x=torch.zeros(4, 2), device="meta")
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dg.sample(env, x=[[0.0, 0.0]])
    with pytest.raises(ValueError, match="noises: expected shape"):
        dg.sample(env, x=torch.zeros(4, 2), steps=3, noises=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="noises: expected dtype"):
        dg.sample(env, x=torch.zeros(4, 2), steps=3, noises=torch.zeros(3, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="store"):
        dg.sample(env, 4, store="state")
    with pytest.raises(ValueError, match="control output"):
        dg.sample(env, 4, steps=2, control=lambda x, t: torch.zeros(4, 3))
    with pytest.raises(ValueError, match="sigma = 0"):
        dg.sample(env.with_noise("ode"), 4, control=lambda x, t: x)
    with pytest.raises(ValueError, match="singular"):
        dg.sample(env, 4, steps=10, t_start=0.0)
    with pytest.raises(ValueError, match="seed, generator"):
        dg.sample(env, 4, seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="env"):
        dg.sample(object(), 4)


def test_null_energy_threshold_is_factor_times_the_largest_null_distance():
    # pair i draws with seeds seed + 2i and seed + 2i + 1: the helper is exactly that recipe
    target = make_task("GMM1D-v0").oracle.target
    draw = lambda s: target.sample(300, generator=torch.Generator().manual_seed(s))  # noqa: E731
    null = [dg.energy_distance(draw(50 + 2 * i), draw(51 + 2 * i)) for i in range(3)]
    assert dg.null_energy_threshold(target, 300, draws=3, factor=2.0, seed=50) == pytest.approx(
        2.0 * max(null), rel=1e-12
    )
    with pytest.raises(ValueError, match="n"):
        dg.null_energy_threshold(target, 1)
    with pytest.raises(ValueError, match="draws"):
        dg.null_energy_threshold(target, 100, draws=0)


def test_model_control_gradients_do_not_depend_on_the_shared_base_call():
    # sample() shares its base call with a ModelControl of its own env; a control of an equal copy
    # of the env goes through ModelControl.forward: same costs, same gradients with respect to x0
    import copy

    from diffusiongym.policies.control import ModelControl

    task = dg.make_task("GMM1D-v0")
    env = task.environment
    policy = env.model.trainable_copy().double()
    with torch.no_grad():
        policy.means.add_(0.3)
    grads = []
    for control_env in (env, copy.copy(env)):
        x0 = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
        traj = dg.sample(
            env,
            x=x0,
            steps=10,
            control=ModelControl(policy, control_env),
            seed=1,
            dtype=torch.float64,
            requires_grad=True,
        )
        (g,) = torch.autograd.grad(traj.running_cost.sum(), x0)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_sample_warns_on_a_stiff_short_grid_like_the_envs():
    # one check (StepSchedule.build) for the engine and the envs: 2 memoryless steps from 1e-3 blow up
    env = dg.make_task("GMM1D-v0").environment
    with pytest.warns(RuntimeWarning, match="stiff"):
        traj = dg.sample(env, 2000, steps=2, seed=0)
    assert float(traj.x1.std()) > 100  # measured ~900 (1.2 with 5 steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dg.sample(env, 16, steps=5, seed=0)

"""Exact Gaussian-mixture model and reward-tilt oracle, checked against quadrature and autograd."""

import dataclasses
import math

import pytest
import torch

import diffusiongym as dg
from diffusiongym import oracle as oracle_module
from diffusiongym.envs.environment import ENVIRONMENTS
from diffusiongym.models.gmm import GaussianMixtureModel, gmm_preset
from diffusiongym.oracle import (
    gaussian_expectation,
    gaussian_tilt,
    has_gaussian_tilt,
    mixture_oracle,
    register_gaussian_tilt,
    tilt_mixture,
)
from diffusiongym.parameterization import PARAMETERIZATIONS
from diffusiongym.tasks import Task, make_task, with_reward

SCHEDULERS = {
    "linear": dg.LinearScheduler(),
    "cosine": dg.CosineScheduler(),
    "vp": dg.DiscreteVPScheduler.linear_ddpm(),
}
QUAD = torch.linspace(-8, 8, 40001, dtype=torch.float64)  # 1-D quadrature grid, spacing 4e-4


def _trapz(y):
    return torch.trapezoid(y, QUAD)


@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_four_environments_give_the_same_drift(sched_name):
    sched = SCHEDULERS[sched_name]
    mix = dg.gmm_preset("2d")
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(256, 2, generator=gen)
    t = torch.rand(256, generator=gen) * 0.9 + 0.05
    drifts, finals = [], []
    for p in PARAMETERIZATIONS:
        env = ENVIRONMENTS[p](dg.GaussianMixtureModel(mix, sched, p), scheduler=sched, noise="memoryless")
        # float64: in float32 the endpoint (1/beta^2 at t -> 1) and epsilon (1/alpha at t -> 0)
        # conversions amplify rounding to ~1e-4, a property of those parameterisations.
        drifts.append(env.drift(x.double(), t.double()))
        finals.append(env.pred_final(x.double(), t.double()))
    for d, f in zip(drifts[1:], finals[1:]):
        torch.testing.assert_close(d, drifts[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(f, finals[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_score_is_gradient_of_log_marginal(sched_name):
    sched = SCHEDULERS[sched_name]
    mix = dg.gmm_preset("2d")
    model = dg.GaussianMixtureModel(mix, sched, "score")
    for t in (0.1, 0.5, 0.9):
        a, b = (
            float(sched.alpha(torch.tensor(t, dtype=torch.float64))),
            float(sched.beta(torch.tensor(t, dtype=torch.float64))),
        )
        x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.marginal(a, b).log_prob(x).sum(), x)
        torch.testing.assert_close(
            model(x.detach(), torch.full((64,), t, dtype=torch.float64)), grad, rtol=1e-8, atol=1e-8
        )


def test_posterior_mean_matches_quadrature_1d():
    mix = dg.gmm_preset("1d")
    sched = dg.CosineScheduler()
    model = dg.GaussianMixtureModel(mix, sched, "endpoint")
    for t in (0.2, 0.6, 0.95):
        a, b = math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
        for x in (-1.0, 0.3, 1.4):
            # p(x1 | x_t = x) ∝ p1(x1) N(x; a x1, b^2)
            w = torch.exp(mix.log_prob(QUAD[:, None]) - 0.5 * ((x - a * QUAD) / b) ** 2)
            expected = _trapz(w * QUAD) / _trapz(w)
            got = model(torch.tensor([[x]], dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
            assert abs(float(got) - float(expected)) < 1e-6


@pytest.mark.parametrize(
    "reward",
    [dg.QuadraticReward([1.5], 2.0), dg.LinearReward([0.7]), dg.ConstantReward(0.3)],
    ids=["quadratic", "linear", "constant"],
)
def test_tilt_matches_quadrature_1d(reward):
    mix = dg.gmm_preset("1d")
    lam = 1.3
    target, log_norm = tilt_mixture(mix, reward, lam)
    r = reward(QUAD[:, None])[0]
    unnorm = torch.exp(mix.log_prob(QUAD[:, None]) + lam * r)
    assert abs(log_norm - math.log(float(_trapz(unnorm)))) < 1e-6
    torch.testing.assert_close(target.log_prob(QUAD[:, None]).exp(), unnorm / _trapz(unnorm), atol=1e-6, rtol=1e-5)


def test_value_function_matches_quadrature_1d():
    mix = dg.gmm_preset("1d")
    reward = dg.QuadraticReward([1.5], 1.0)
    oracle = dg.TiltOracle(mix, reward, 1.0, scheduler="linear")
    r = reward(QUAD[:, None])[0]
    for t in (0.1, 0.5, 0.9):
        xs = torch.tensor([[-1.0], [0.2], [1.2]], dtype=torch.float64)
        v = oracle.value(xs, torch.full((3,), t, dtype=torch.float64))
        for xv, vv in zip(xs[:, 0], v):
            w = torch.exp(mix.log_prob(QUAD[:, None]) - 0.5 * ((xv - t * QUAD) / (1 - t)) ** 2)
            expected = -math.log(float(_trapz(w * torch.exp(r)) / _trapz(w)))
            assert abs(float(vv) - expected) < 1e-6
    # At t = 0 the posterior is the prior: V*(x, 0) = -optimal objective.
    v0 = oracle.value(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert abs(float(v0) + oracle.optimal_objective) < 1e-10


def test_base_objective_is_exact_expectation():
    mix = dg.gmm_preset("2d")
    reward = dg.QuadraticReward(mix.means[-1], 1.0)
    oracle = dg.TiltOracle(mix, reward, 2.0)
    x = mix.sample(200000, generator=torch.Generator().manual_seed(0))
    mc = 2.0 * reward(x)[0]
    assert abs(float(mc.mean()) - oracle.base_objective) < 4 * float(mc.std()) / math.sqrt(len(mc))
    assert oracle.gap_closed(oracle.optimal_objective) == pytest.approx(1.0)
    assert oracle.gap_closed(oracle.base_objective) == pytest.approx(0.0)
    flat = dg.TiltOracle(mix, dg.ConstantReward(1.0), 2.0)
    assert flat.optimal_objective == pytest.approx(flat.base_objective)
    with pytest.raises(ValueError, match="zero gap"):
        flat.gap_closed(0.0)


def test_mixture_validation():
    with pytest.raises(ValueError, match="means"):
        dg.GaussianMixture([0.5, 0.5], [[0.0, 1.0]], [1.0])
    with pytest.raises(ValueError, match="covs"):
        dg.GaussianMixture([1.0], [[0.0, 1.0]], [[[1.0, 0.0], [0.0, -1.0]]])
    model = dg.GaussianMixtureModel(dg.gmm_preset("2d"))
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 2\)"):
        model(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="name"):
        dg.gmm_preset("3d")


@pytest.mark.parametrize("preset", ["1d", "2d"])
@pytest.mark.parametrize("parameterization", ["velocity", "epsilon", "endpoint", "score"])
def test_trainable_copy_equals_the_exact_model(preset, parameterization):
    # Cholesky route (trainable copy) vs eigenbasis route (exact model): same predictor.
    base = GaussianMixtureModel(gmm_preset(preset), "cosine", parameterization)
    copy = base.trainable_copy()
    assert all(p.requires_grad and p.dtype == torch.float64 for p in copy.parameters())
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(256, base.sample_shape[0], dtype=torch.float64, generator=gen)
    t = 1e-3 + 0.998 * torch.rand(256, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(copy(x, t), base(x, t), rtol=1e-10, atol=1e-10)
    # the copy factors C_k once per distinct time: a shared, an expanded, a scalar and repeated times agree too
    shared = torch.full((256,), 0.3, dtype=torch.float64)
    expanded = torch.tensor(0.3, dtype=torch.float64).expand(256)  # as the samplers pass t_k (no unique)
    for tt in (shared, expanded, t[torch.arange(256) % 7]):
        torch.testing.assert_close(copy(x, tt), base(x, tt), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(copy(x, 0.3), base(x, shared), rtol=1e-10, atol=1e-10)
    mix = copy.mixture()
    torch.testing.assert_close(mix.weights, base.mixture.weights)
    torch.testing.assert_close(mix.covs, base.mixture.covs)


def test_trainable_copy_is_differentiable_and_tracks_its_parameters():
    # Isotropic components (repeated eigenvalues) still give finite gradients, and after a
    # parameter change the copy is the exact model of its own mixture().
    base = GaussianMixtureModel(gmm_preset("2d"), "linear", "velocity")
    copy = base.trainable_copy()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 2, dtype=torch.float64, generator=gen)
    t = torch.rand(128, dtype=torch.float64, generator=gen).clamp(1e-3, 1.0)
    copy(x, t).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in copy.parameters())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    snapshot = copy.mixture()
    exact = GaussianMixtureModel(snapshot, "linear", "velocity")
    torch.testing.assert_close(copy(x, t), exact(x, t), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        copy.means.add_(1.0)  # mixture() is a detached snapshot, not a view of the parameters
    assert not snapshot.means.requires_grad and not torch.equal(snapshot.means, copy.means)


def test_quadratic_tilt_matches_the_information_form():
    # The stable form (no inverse of P) against cov' = (P^-1 + s A)^-1, mean' = cov' (P^-1 m + s A c),
    # log_z = 1/2 log det cov' - 1/2 log det P - 1/2 (m^T P^-1 m + s c^T A c - m'^T cov'^-1 m'), on a
    # batch of non-isotropic 2-D Gaussians and a full-matrix precision A.
    gen = torch.Generator().manual_seed(0)
    a_mat = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    reward = dg.QuadraticReward([0.3, -1.2], a_mat)
    root = torch.randn(5, 2, 2, dtype=torch.float64, generator=gen)
    cov = root @ root.mT + 0.1 * torch.eye(2, dtype=torch.float64)
    mean = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    s = 0.7
    log_z, new_mean, new_cov = gaussian_tilt(reward, mean, cov, s)
    p_inv = torch.linalg.inv(cov)
    cov_ref = torch.linalg.inv(p_inv + s * a_mat)
    c = reward.center
    mean_ref = (cov_ref @ ((p_inv @ mean[..., None])[..., 0] + s * (a_mat @ c))[..., None])[..., 0]

    def quad(m, prec):
        return (m[..., None, :] @ prec @ m[..., None])[..., 0, 0]

    log_z_ref = (
        0.5 * torch.logdet(cov_ref)
        - 0.5 * torch.logdet(cov)
        - 0.5 * (quad(mean, p_inv) + s * float(c @ a_mat @ c) - quad(mean_ref, torch.linalg.inv(cov_ref)))
    )
    torch.testing.assert_close(new_cov, cov_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_mean, mean_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_z, log_z_ref, rtol=1e-10, atol=1e-10)
    # E[r] = -1/2 (tr(A P) + (m - c)^T A (m - c))
    expected = -0.5 * (torch.einsum("ij,nji->n", a_mat, cov) + quad(mean - c, a_mat))
    torch.testing.assert_close(gaussian_expectation(reward, mean, cov), expected, rtol=1e-12, atol=1e-12)


@pytest.fixture
def _restore_tilts():
    saved = dict(oracle_module._TILTS)
    yield
    oracle_module._TILTS.clear()
    oracle_module._TILTS.update(saved)


class _Shifted(dg.QuadraticReward):
    """A subclass that changes evaluate(): it must not inherit the parent's closed form."""

    def evaluate(self, x, **cond):
        return super().evaluate(x, **cond) + 1.0


def test_tilt_registry_matches_exact_types(_restore_tilts):
    mix = dg.gmm_preset("1d")
    callable_reward = dg.CallableReward(lambda x: x[:, 0])
    shifted = _Shifted([1.5], 1.0)
    for reward in (callable_reward, shifted):
        assert not has_gaussian_tilt(reward) and mixture_oracle(mix, reward, 1.0) is None
        with pytest.raises(TypeError, match=rf"reward: {type(reward).__name__} has no closed-form Gaussian tilt"):
            dg.TiltOracle(mix, reward, 1.0)
    with pytest.raises(TypeError, match="reward_type"):
        register_gaussian_tilt(int, lambda *a: a, lambda *a: a)
    with pytest.raises(TypeError, match="mixture"):
        dg.TiltOracle(mix.means, dg.ConstantReward(0.0))

    # Registering the shifted bump (tilt of r + 1: same law, log_z + scale) makes the oracle exact for it.
    def shifted_tilt(reward, mean, cov, scale):
        log_z, m, c = gaussian_tilt(dg.QuadraticReward(reward.center, reward.precision), mean, cov, scale)
        return log_z + scale, m, c

    def shifted_expectation(reward, mean, cov):
        return gaussian_expectation(dg.QuadraticReward(reward.center, reward.precision), mean, cov) + 1.0

    register_gaussian_tilt(_Shifted, shifted_tilt, shifted_expectation)
    plain = dg.TiltOracle(mix, dg.QuadraticReward([1.5], 1.0), 1.3)
    oracle = mixture_oracle(mix, shifted, 1.3)
    assert oracle is not None
    assert oracle.optimal_objective == pytest.approx(plain.optimal_objective + 1.3, abs=1e-12)
    assert oracle.base_objective == pytest.approx(plain.base_objective + 1.3, abs=1e-12)
    torch.testing.assert_close(oracle.target.weights, plain.target.weights)


def test_task_and_reward_carry_no_gaussian_mixture_notions():
    assert "mixture" not in {f.name for f in dataclasses.fields(Task)}
    for name in ("gaussian_tilt", "gaussian_expectation", "tilt"):
        assert not hasattr(dg.Reward, name) and not hasattr(dg.GaussianMixture, name)


def test_with_reward_rebuilds_the_oracle_from_the_task_factory():
    task = make_task("GMM1D-v0")
    assert task.oracle is not None and task.oracle_factory is not None
    mix = task.environment.model.mixture
    flat = with_reward(task, dg.ConstantReward(1.0), 2.0)
    assert flat.reward_scale == 2.0 and flat.oracle.optimal_objective == pytest.approx(2.0, abs=1e-12)
    free = with_reward(task, dg.CallableReward(lambda x: x[:, 0]))  # no closed form: no oracle
    assert free.oracle is None and free.reward_scale == task.reward_scale
    back = with_reward(free, task.reward)  # the factory still knows the mixture
    assert back.oracle.optimal_objective == pytest.approx(task.oracle.optimal_objective, abs=1e-12)
    assert back.oracle.mixture is mix and back.oracle.scheduler is task.environment.scheduler
    assert task.mixture is mix  # transitional alias
    with pytest.raises(TypeError, match="reward: expected a diffusiongym Reward"):
        with_reward(task, lambda x: x[:, 0])
    bare = Task("bare", task.environment, task.reward, oracle=task.oracle)  # no factory: the oracle is dropped
    assert with_reward(bare, dg.ConstantReward(0.0)).oracle is None


# ------------------------------------------------------------------- reward-KL frontier
@pytest.mark.parametrize("task_id", ["GMM1D-v0", "GMM2D-v0"])
def test_frontier_endpoints_monotonicity_and_slope(task_id):
    oracle = make_task(task_id).oracle
    lam = oracle.reward_scale
    kl, reward = oracle.frontier([0.0, lam])
    # s = 0 is the base: zero KL and E_p[r] (base_objective / lambda, both exact)
    assert float(kl[0]) == 0.0
    assert float(reward[0]) == pytest.approx(oracle.base_objective / lam, abs=1e-12)
    # s = lambda is p* itself: lambda E r - KL is the optimal objective (same closed forms)
    assert lam * float(reward[1]) - float(kl[1]) == pytest.approx(oracle.optimal_objective, abs=1e-10)
    scales = torch.linspace(0.0, 3 * lam, 61, dtype=torch.float64)
    kl, reward = oracle.frontier(scales)
    assert bool((kl.diff() > 0).all()) and bool((reward.diff() > 0).all())
    # dKL/dE = s: central differences with step 1e-4 in s; the error is O(step^2) ~ 1e-8 relative
    s = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64) * lam
    eps = 1e-4
    kl_p, r_p = oracle.frontier(s + eps)
    kl_m, r_m = oracle.frontier(s - eps)
    torch.testing.assert_close((kl_p - kl_m) / (r_p - r_m), s, rtol=1e-5, atol=0)


@pytest.mark.parametrize("task_id", ["GMM1D-v0", "GMM2D-v0"])
def test_frontier_at_kl_inverts_the_frontier(task_id):
    oracle = make_task(task_id).oracle
    scales = torch.tensor([0.0, 0.2, 1.0, 3.0], dtype=torch.float64)
    kl, reward = oracle.frontier(scales)
    found, best = oracle.frontier_at_kl(kl)
    torch.testing.assert_close(found, scales, rtol=1e-7, atol=1e-9)  # bisection to 1e-10 relative in s
    torch.testing.assert_close(best, reward, rtol=1e-7, atol=1e-9)


def test_frontier_matches_monte_carlo_of_the_tilt():
    # KL(p*_s || p) = E_{p*_s}[log p*_s - log p] and E_{p*_s}[r] from 200k exact draws of p*_s;
    # 5 standard errors of the sample means (each ~1e-3 here) bound the difference.
    oracle = make_task("GMM2D-v0").oracle
    s = 0.7
    tilted, _ = tilt_mixture(oracle.mixture, oracle.reward, s)
    x = tilted.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    log_ratio = tilted.log_prob(x) - oracle.mixture.log_prob(x)
    r = oracle.reward(x)[0].double()
    kl, reward = oracle.frontier([s])
    n = math.sqrt(len(x))
    assert abs(float(log_ratio.mean()) - float(kl[0])) < 5 * float(log_ratio.std()) / n
    assert abs(float(r.mean()) - float(reward[0])) < 5 * float(r.std()) / n


def test_frontier_rejects_bad_inputs():
    oracle = make_task("GMM1D-v0").oracle
    with pytest.raises(ValueError, match="scales"):
        oracle.frontier([-0.1])
    with pytest.raises(ValueError, match="scales"):
        oracle.frontier([float("nan")])
    with pytest.raises(ValueError, match="kl"):
        oracle.frontier_at_kl([-1.0])
    with pytest.raises(ValueError, match="kl"):
        oracle.frontier_at_kl(float("inf"))
    flat = dg.TiltOracle(dg.gmm_preset("1d"), dg.ConstantReward(1.0), 1.0)
    assert float(flat.frontier_at_kl(0.0)[0][0]) == 0.0
    with pytest.raises(ValueError, match="kl: .* beyond the frontier"):
        flat.frontier_at_kl(0.1)  # a constant reward's tilts all equal the base: KL 0

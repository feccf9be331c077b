"""Adjoint Matching: lean adjoint vs autograd, control protocol, constant reward, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusiongym.models.gmm import TrainableGaussianMixtureModel
from diffusiongym.parameterization import PARAMETERIZATIONS
from diffusiongym.trainers.adjoint_matching import (
    AdjointMatching,
    AdjointMatchingConfig,
    ControlScaledNet,
    lean_adjoint,
    make_finetune_model,
)
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.rewards import CallableReward, ConstantReward
from diffusiongym.sampling import StepSchedule, sample
from diffusiongym.tasks import make_task, with_reward
from diffusiongym.timegrid import make_time_grid

torch.set_flush_denormal(True)

@pytest.fixture(autouse=True)
def _isolate_rng():
    """Keep the global RNG state from leaking between tests."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


def _autograd_pathwise(env, states, noises, times, reward, scale, k, policy=None):
    """d g(x_m) / d x_k by autograd through the rest of the sampled trajectory."""
    xk = states[k].clone().requires_grad_(True)
    traj = sample(env, x=xk, grid=times[k:], noises=noises[k:], reward=reward, policy=policy, requires_grad=True)
    (grad,) = torch.autograd.grad((-scale * traj.reward).sum(), xk)
    return grad


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("task_id", ["GMM1D-v0", "GMM2D-v0"])
def test_lean_adjoint_equals_autograd_on_base(task_id, parameterization):
    # With the fine-tuned model equal to the base, a_k is the pathwise gradient of
    # g = -lambda r(x_m) w.r.t. x_k with the noise fixed (DESIGN s. 7): both are the same
    # chain rule in float64, so they agree to rounding (1e-9 relative).
    task = make_task(task_id, parameterization=parameterization)
    env, times = task.environment, make_time_grid(12, 0.05)
    gen = torch.Generator().manual_seed(0)
    d = task.sample_shape[0]
    x0 = torch.randn(6, d, generator=gen, dtype=torch.float64)
    z = torch.randn(12, 6, d, generator=gen, dtype=torch.float64)
    traj = sample(env, x=x0, grid=times, noises=z, reward=task.reward, store="states")
    adjoint, valid = lean_adjoint(env, traj.states, times, task.reward, task.reward_scale)
    assert adjoint.shape == (13, 6, d) and bool(valid.all())
    torch.testing.assert_close(adjoint[-1], task.reward_scale * (traj.x1 - task.reward.center.to(traj.x1)))
    for k in (0, 5, 11):
        expected = _autograd_pathwise(env, traj.states, z, times, task.reward, task.reward_scale, k)
        scale = float(expected.abs().max()) + 1.0
        assert float((adjoint[k] - expected).abs().max()) / scale < 1e-9, k


def test_lean_adjoint_is_base_pathwise_gradient_along_controlled_states():
    # Along states of a *controlled* rollout, the lean adjoint is the pathwise gradient of the
    # BASE chain driven by the shifted noises z'_k = z_k + sqrt(h_k) u_k (which retraces the
    # same states): only base-drift Jacobians enter, no control terms.
    task = make_task("GMM2D-v0", parameterization="epsilon")
    env, times = task.environment, make_time_grid(10, 0.05)
    model = make_finetune_model(env, hidden=16, layers=1, residual="control", seed=3).double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(10, 5, 2, generator=gen, dtype=torch.float64)
    traj = sample(env, x=x0, grid=times, noises=z, policy=model, reward=task.reward, store=("states", "controls"))
    assert float(traj.controls.abs().max()) > 0.1  # the control is really non-zero
    h = (times[1:] - times[:-1]).to(z).reshape(-1, 1, 1)
    shifted = z + h.sqrt() * traj.controls
    base = sample(env, x=x0, grid=times, noises=shifted, reward=task.reward, store="states")
    torch.testing.assert_close(base.states, traj.states, rtol=1e-10, atol=1e-10)
    adjoint, _ = lean_adjoint(env, traj.states, times, task.reward, task.reward_scale)
    for k in (0, 6):
        expected = _autograd_pathwise(env, base.states, shifted, times, task.reward, task.reward_scale, k)
        torch.testing.assert_close(adjoint[k], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_finetune_model_starts_at_base_and_control_is_net_output(parameterization):
    task = make_task("GMM2D-v0", parameterization=parameterization)
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(hidden=16, layers=1, residual="control"))
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.05, 0.95, 7)
    torch.testing.assert_close(trainer.model(x, t), task.environment.model(x, t))
    # perturb the residual: with the "control" residual, u = (b_ft - b_base) / sigma = net(x, t)
    with torch.no_grad():
        trainer.model.net.net.head.bias.fill_(0.5)
    u = trainer.control(x, t)
    torch.testing.assert_close(u, trainer.model.net.net(x, t), rtol=1e-4, atol=1e-5)
    # and the engine computes the same u for the policy: running cost 1/2 |u|^2 h per step
    traj = sample(trainer.env, 7, steps=3, t_start=0.2, policy=trainer.model, seed=0, store=("states", "controls"))
    schedule = StepSchedule.build(trainer.env, make_time_grid(3, 0.2))
    u0 = trainer.control(traj.states[0], torch.full((7,), schedule.t[0]))
    torch.testing.assert_close(traj.controls[0], u0, rtol=1e-4, atol=1e-5)


def test_constant_reward_keeps_control_near_zero():
    # grad r = 0, so every adjoint is 0, the target is 0, and the zero-initialised residual
    # is already the minimiser: after training the control is still (numerically) zero.
    task = with_reward(make_task("GMM1D-v0"), ConstantReward(1.0))
    cfg = AdjointMatchingConfig(batch_size=32, hidden=16, layers=1, residual="control")
    trainer = AdjointMatching.from_task(task, config=cfg, steps=20)
    history = trainer.train(5)
    assert history["loss"] == pytest.approx([0.0] * 5, abs=1e-12)
    x = torch.linspace(-3, 3, 50).reshape(-1, 1)
    for t in (0.1, 0.5, 0.9):
        assert float(trainer.control(x, torch.full((50,), t)).detach().abs().max()) < 1e-6
    ev = trainer.evaluate(256, seed=0)
    assert ev["kl"] < 1e-10


@pytest.mark.parametrize("likelihood_ratio", [None, 0.1])
def test_constant_reward_keeps_the_mixture_copy_near_the_base(likelihood_ratio):
    # Same with the trainable mixture copy (the default for GMM tasks) at the benchmark's
    # learning rate. The copy (Cholesky route) and the base (eigenbasis route) agree only to
    # rounding (|u| ~ 1e-14 in float64, 6e-6 in float32), and Adam rescales even such tiny
    # gradients to steps of order lr, so the parameters jitter around the base instead of
    # staying bit-identical; the restoring target u = 0 keeps that jitter small. Measured
    # after 40 iterations: KL to the base 6e-5 nats, largest weight change 5e-4 (bounds 1e-3
    # and 0.01; the quadratic reward's optimum has KL 0.97). With likelihood-ratio steps the
    # cost-to-go is the constant -lambda plus the (tiny) running cost, which the baseline removes;
    # what is left is noise of the size of the jitter: measured KL 4e-4, weight change 1.4e-3.
    task = with_reward(make_task("GMM1D-v0"), ConstantReward(1.0))
    cfg = AdjointMatchingConfig(batch_size=256, learning_rate=3e-2, loss_times=None, residual="copy", likelihood_ratio=likelihood_ratio)
    trainer = AdjointMatching.from_task(task, config=cfg, steps=20, dtype=torch.float64)
    trainer.train(40)
    ev = trainer.evaluate(2048, seed=0)
    dw = float((trainer.model.mixture().weights - task.mixture.weights).abs().max())
    assert ev["kl"] < 1e-3 and dw < 0.01, (ev["kl"], dw)


def test_quadratic_reward_improves_objective_quickly():
    # A short run must already move the objective up from the base (-2.529) towards the
    # optimum (-1.439): 30 iterations of the residual MLP reach a gap_closed of about 0.3-0.5;
    # 0.15 leaves room for seed noise while a broken sign or adjoint gives <= 0.
    task = make_task("GMM1D-v0")
    cfg = AdjointMatchingConfig(batch_size=128, learning_rate=3e-3, hidden=32, layers=2, residual="control")
    trainer = AdjointMatching.from_task(task, config=cfg, steps=25)
    trainer.train(30)
    ev = trainer.evaluate(2048, seed=1, steps=50)
    assert ev["gap_closed"] > 0.15, ev["gap_closed"]


def test_non_differentiable_reward_is_a_clear_error():
    task = make_task("GMM1D-v0")
    reward = CallableReward(lambda x: (x[:, 0] > 0).float(), differentiable=False)
    with pytest.raises(ValueError, match="differentiable"):
        AdjointMatching(task.environment, reward, 1.0)
    with pytest.raises(TypeError, match="reward"):
        AdjointMatching(task.environment, lambda x: x, 1.0)
    lying = CallableReward(lambda x: (x[:, 0] > 0).float(), differentiable=True)
    states = torch.zeros(3, 4, 1)
    with pytest.raises(ValueError, match="no gradient"):
        lean_adjoint(task.environment, states, make_time_grid(2, 0.1), lying, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        AdjointMatchingConfig(batch_size=0)
    with pytest.raises(ValueError, match="time_weight"):
        AdjointMatchingConfig(time_weight="nope")
    with pytest.raises(ValueError, match="restarts"):
        AdjointMatchingConfig(restarts=-1.0)
    with pytest.raises(ValueError, match="restart_after"):
        AdjointMatchingConfig(restart_after=1.0)
    with pytest.raises(ValueError, match="residual"):
        AdjointMatchingConfig(residual="lora")
    task = make_task("GMM1D-v0")
    with pytest.raises(TypeError, match="env"):
        AdjointMatching("GMM1D-v0", task.reward)
    with pytest.raises(ValueError, match="trainable"):
        frozen = ResidualModel(task.environment.model, TimeMLP(1, 1).requires_grad_(False))
        AdjointMatching(task.environment, task.reward, model=frozen)
    with pytest.raises(ValueError, match="times"):
        lean_adjoint(task.environment, torch.zeros(3, 2, 1), make_time_grid(5, 0.1), task.reward, 1.0)


def test_residual_copy_needs_a_base_with_a_trainable_copy():
    task = make_task("GMM1D-v0")
    assert isinstance(make_finetune_model(task.environment), TrainableGaussianMixtureModel)  # "auto"
    assert isinstance(make_finetune_model(task.environment, residual="control"), ResidualModel)
    env = task.environment.with_model(ResidualModel(task.environment.model, TimeMLP(1, 1)))
    with pytest.raises(ValueError, match="trainable_copy"):
        make_finetune_model(env, residual="copy")
    assert isinstance(make_finetune_model(env), ResidualModel)  # "auto" falls back to the MLP


def test_restart_segment_is_on_policy_and_its_adjoint_is_the_lean_adjoint():
    # A restart segment starts at one grid index k >= restart_after from points between two
    # batch states, runs with the fine-tuned model to t = 1, and carries the lean adjoint of
    # that segment (the same recursion on the grid's tail), so its pairs have the same
    # conditional-mean target as on-policy ones.
    task = make_task("GMM1D-v0")
    cfg = _copy_config(batch_size=64, restarts=0.5, restart_after=0.6, likelihood_ratio=None)
    trainer = AdjointMatching.from_task(task, config=cfg, steps=20, dtype=torch.float64)
    traj = sample(trainer.env, 64, grid=trainer.times, policy=trainer.model, store="states", seed=0, dtype=torch.float64)
    ((states, adjoint, valid, cond, k),) = trainer._restart(traj.states, {})
    assert states.shape == (21 - k, 32, 1) and trainer.times[k] >= 0.6 and bool(valid.all()) and cond == {}
    lo = traj.states[k].min() - 1e-12
    hi = traj.states[k].max() + 1e-12
    assert bool(((states[0] >= lo) & (states[0] <= hi)).all())  # mixup stays within the batch's span
    expected, _ = lean_adjoint(trainer.env, states, trainer.times[k:], task.reward, task.reward_scale)
    torch.testing.assert_close(adjoint, expected, rtol=0, atol=0)
    # the iteration's regression pairs: 20 grid times x 64 batch paths, then (20 - k) x 32 restart
    # pairs labelled with their own grid times and targets -sigma(t_j) a_j
    batch_adjoint, batch_valid = trainer.adjoint(traj.states)
    pairs = trainer.regression_pairs(traj.states, batch_adjoint, batch_valid, {}, [(states, adjoint, valid, {}, k)])
    assert pairs["x"].shape[0] == 20 * 64 + (20 - k) * 32
    tail = slice(20 * 64, None)
    assert pairs["k"][tail].tolist() == [j for j in range(k, 20) for _ in range(32)]
    torch.testing.assert_close(pairs["x"][tail], states[:-1].reshape(-1, 1))
    sigma = torch.tensor(trainer.schedule.sigma[k:], dtype=torch.float64).repeat_interleave(32).reshape(-1, 1)
    torch.testing.assert_close(pairs["target"][tail], -sigma * adjoint[:-1].reshape(-1, 1))


def test_training_uses_memoryless_noise_even_for_an_ode_env():
    task = make_task("GMM1D-v0", noise="ode")
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(hidden=8, layers=1))
    assert trainer.env.noise.is_memoryless
    assert trainer.finetuned_env(noise="ode").noise.is_deterministic


RESUME_CASES = {
    # the mixture copy (GMM2D, score model) with time subsets, minibatches, restarts and
    # likelihood-ratio steps (their probe directions come from the trainer's generator)
    "copy": ("GMM2D-v0", "score", 15, dict(batch_size=32, loss_times=5, always_last=2, seed=7, restarts=0.5, minibatch_size=64,
                                          likelihood_ratio=0.1)),
    # the residual MLP with the bootstrapped target, its EMA target network and the cosine schedule
    "bootstrap": ("GMM1D-v0", "velocity", 10, dict(batch_size=32, loss_times=None, minibatch_size=64, updates_per_iteration=2,
                  bootstrap="horizon", grad_clip=None, hidden=16, layers=1, iterations=4, lr_schedule="cosine", target_ema=0.9,
                  seed=3, residual="control")),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_save_load_resume_is_exact(tmp_path, case):
    # 4 iterations straight == 2 iterations, save, load into a fresh trainer, 2 more: all state
    # (sampling generator, time subsets, restarts, Adam moments, EMA weights, schedule) is in the
    # checkpoint, so the weights are bit-identical.
    task_id, parameterization, steps, options = RESUME_CASES[case]
    task = make_task(task_id, parameterization=parameterization)
    cfg = AdjointMatchingConfig(**options)

    def trainer():
        return AdjointMatching.from_task(task, config=cfg, steps=steps)

    straight = trainer()
    straight.train(4)
    first = trainer()
    first.train(2)
    first.save(tmp_path / "ckpt")
    resumed = trainer().load(tmp_path / "ckpt")
    assert resumed.iteration == 2 and len(resumed.history["loss"]) == 2
    calls = []
    resumed.train(2, callback=calls.append)
    assert [c["iteration"] for c in calls] == [3.0, 4.0]
    pairs = [(straight.model, resumed.model)]
    if cfg.target_ema is not None:
        pairs.append((straight.target_model, resumed.target_model))
    for left, right in pairs:
        for a, b in zip(left.state_dict().values(), right.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.history["loss"] == pytest.approx(straight.history["loss"], rel=1e-6)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    if cfg.lr_schedule == "cosine":
        assert resumed.optimizer.param_groups[0]["lr"] < cfg.learning_rate
    assert not (tmp_path / "ckpt" / "weights.safetensors").with_suffix(".pt").exists()


def test_deepcopy_of_a_trainable_base_works_as_the_finetuned_model():
    # A trainable base (here a TimeMLP "velocity model") fine-tuned as a full copy.
    from diffusiongym.envs.environment import VelocityEnvironment

    torch.manual_seed(0)
    base = TimeMLP(2, 2, hidden=16, layers=1)
    base.sample_shape = (2,)
    env = VelocityEnvironment(base)
    ft = copy.deepcopy(base)
    reward = make_task("GMM2D-v0").reward
    trainer = AdjointMatching(env, reward, 1.0, model=ft, config=AdjointMatchingConfig(batch_size=16), steps=10)
    before = [p.clone() for p in ft.parameters()]
    trainer.train(2)
    assert any(not torch.equal(a, b) for a, b in zip(before, ft.parameters()))
    assert all(p.grad is None for p in base.parameters())


def test_control_scaled_net_scale():
    # sigma / coef_out for velocity under the linear schedule: coef_out = 2, sigma = sqrt(2 (1 - t) / t).
    task = make_task("GMM1D-v0")
    wrapper = ControlScaledNet(TimeMLP(1, 1), task.environment)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(wrapper.scale(t), torch.sqrt(2 * (1 - t) / t) / 2)


# ---------------------------------------------------------------- bootstrapped (lambda-return) adjoint
def _oracle_batch(n, steps=50, seed=5):
    task = make_task("GMM1D-v0")
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(hidden=8, layers=1), steps=steps)
    ustar = task.oracle.control()
    traj = sample(trainer.env, n, grid=trainer.times, control=ustar, store=("states", "noises", "controls"), seed=seed,
                  reward=task.reward, reward_scale=task.reward_scale)

    def a_star(x, t, **cond):  # E[a | x] at the optimum: grad V* = -u* / sigma
        return -ustar(x, t) / trainer.env.sigma(t.to(torch.float64)).to(x.dtype).reshape(-1, 1)

    return task, trainer, traj, ustar, a_star


def test_plain_lean_adjoint_misses_the_mode_transfer_but_bootstrapped_finds_it():
    # Along trajectories of the optimal control, E[-sigma a_k | x_k] = u*(x_k) for both estimators.
    # GMM1D-v0's plain (Monte-Carlo) lean adjoint is a near-delta (noise-fixed flows jump between
    # the narrow modes): its sample mean at t = 0.1 is ~0.11 at n = 8192 against E u* = 0.83
    # (and grows like log n: 0.08, 0.11, 0.15 at n = 1k, 8k, 64k). The lambda-return adjoint
    # bootstrapped on the exact grad V* (tau = 0.02) recovers u* to ~7% at t = 0.1 and ~2% at
    # t = 0.3 (residual: O(h) Euler error of the continuous u* on this 50-step grid); 15% bounds.
    # Likelihood-ratio steps (theta = 0.1, no model needed) do the same from the paths alone, with
    # no heavy tails; they estimate the 50-step chain's own gradient, which at t = 0.1 (sigma^2 = 18)
    # sits below the continuous u*: 0.66 / 0.72 / 0.78 against 0.83 on 50 / 100 / 200 steps
    # (standard error 0.02-0.06), so the bound there is 30%; at t = 0.3 measured 2% off (bound 15%).
    task, trainer, traj, ustar, a_star = _oracle_batch(8192)
    plain, _ = lean_adjoint(trainer.env, traj.states, trainer.times, task.reward, task.reward_scale)
    trace = torch.exp(-torch.tensor(trainer.schedule.h, dtype=torch.float64) / 0.02)
    boot, valid = lean_adjoint(trainer.env, traj.states, trainer.times, task.reward, task.reward_scale, bootstrap=a_star, trace=trace)
    assert bool(valid.all())
    mixed, valid = lean_adjoint(trainer.env, traj.states, trainer.times, task.reward, task.reward_scale, likelihood_ratio=0.1,
                                noises=traj.noises, cost_to_go=traj.cost_to_go, controls=traj.controls, generator=torch.Generator().manual_seed(0))
    assert bool(valid.all())
    for k in (5, 15):
        t = torch.full((8192,), trainer.schedule.t[k])
        u_mean = float(ustar(traj.states[k], t).mean())
        sig = trainer.schedule.sigma[k]
        assert float((-sig * plain[k]).mean()) < 0.4 * u_mean, k
        assert float((-sig * boot[k]).mean()) == pytest.approx(u_mean, rel=0.15), k
        assert float((-sig * mixed[k]).mean()) == pytest.approx(u_mean, rel={5: 0.3, 15: 0.15}[k]), k


def test_trace_one_is_plain_and_trace_zero_is_one_step():
    task, trainer, traj, _, a_star = _oracle_batch(64, steps=12)
    args = (trainer.env, traj.states, trainer.times, task.reward, task.reward_scale)
    plain, _ = lean_adjoint(*args)
    ones, _ = lean_adjoint(*args, bootstrap=a_star, trace=torch.ones(12))
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)
    # trace 0: a_k = (I + h_k db/dx)^T a_hat(x_{k+1}) depends on x_k, x_{k+1} only (k < m - 1)
    zero, _ = lean_adjoint(*args, bootstrap=a_star, trace=torch.zeros(12))
    moved = traj.states.clone()
    moved[6:] += 0.3
    zero_moved, _ = lean_adjoint(trainer.env, moved, trainer.times, task.reward, task.reward_scale, bootstrap=a_star, trace=torch.zeros(12))
    torch.testing.assert_close(zero_moved[:5], zero[:5], rtol=0, atol=0)
    assert not torch.equal(zero_moved[5], zero[5])
    # adaptive: between the two (elementwise convex mix at every step), finite
    adaptive, valid = lean_adjoint(*args, bootstrap=a_star, trace="adaptive")
    assert bool(valid.all()) and bool(torch.isfinite(adaptive).all())
    torch.testing.assert_close(adaptive[-2:], plain[-2:])  # no bootstrap from x_m


def test_bootstrap_arguments():
    task, trainer, traj, _, a_star = _oracle_batch(4, steps=5)
    args = (trainer.env, traj.states, trainer.times, task.reward, task.reward_scale)
    with pytest.raises(ValueError, match="bootstrap"):
        lean_adjoint(*args, trace=torch.ones(5))
    with pytest.raises(ValueError, match="trace"):
        lean_adjoint(*args, bootstrap=a_star, trace=torch.ones(4))
    with pytest.raises(ValueError, match="trace"):
        lean_adjoint(*args, bootstrap=a_star, trace="sometimes")
    for bad in ({"bootstrap": "td"}, {"bootstrap_horizon": 0.0}, {"growth_limit": -1.0}, {"minibatch_size": 0}, {"lr_schedule": "step"}, {"target_ema": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdjointMatchingConfig(**bad)


# ---------------------------------------------------------------- likelihood-ratio steps
def test_likelihood_ratio_step_formula():
    # One step of a 1-step segment from x_0 to x_1: with theta = 0 and an expanding base drift
    # (the mode boundary of GMM1D-v0 at t = 0.8), a_0 = (1 + h db/dx) z_0 (C_1 - c) / (sigma sqrt h)
    # + g_0 - (1 + h db/dx) z_0 (z_0 . g_0) with c the leave-one-out mean of C_1 - s z_0 g_0
    # (1-D here); with theta = inf it is the plain lean adjoint.
    task = make_task("GMM1D-v0")
    env = task.environment.with_noise("memoryless")
    times = torch.tensor([0.8, 0.82], dtype=torch.float64)
    x0 = torch.tensor([[0.30], [0.28], [0.32], [-0.6]], dtype=torch.float64)
    z = torch.tensor([[[0.5], [-1.0], [2.0], [0.1]]], dtype=torch.float64)
    u = 0.7 * torch.tanh(x0).unsqueeze(0)  # any function of x_0 as the "policy's" control
    traj = sample(env, x=x0, grid=times, noises=z, control=lambda x, t: 0.7 * torch.tanh(x),
                  reward=task.reward, reward_scale=task.reward_scale, store=("states", "noises", "controls"))
    torch.testing.assert_close(traj.controls, u)
    schedule = StepSchedule.build(env, times)
    h, sig = schedule.h[0], schedule.sigma[0]
    xr = x0.clone().requires_grad_(True)
    drift = schedule.coef_x[0] * xr + schedule.coef_out[0] * env.model(xr, torch.full((4,), 0.8, dtype=torch.float64))
    (slope,) = torch.autograd.grad(drift.sum(), xr)  # db/dx per sample (1-D, diagonal)
    factor = 1.0 + h * slope
    assert float(factor[:3].min()) > 1.0 + 0.1 and float(factor[3]) < 1.0  # three in the valley, one in a mode
    g = -u[0] / sig
    s_k = sig * h**0.5
    resid = traj.cost_to_go[1] - s_k * (z[0] * g).squeeze(1)
    loo = (resid.sum() - resid) / 3
    expected_lr = factor * (z[0] * ((resid - loo) / s_k).unsqueeze(1) + g)
    args = (env, traj.states, times, task.reward, task.reward_scale)
    kw = dict(noises=traj.noises, cost_to_go=traj.cost_to_go, controls=traj.controls, generator=torch.Generator().manual_seed(0))
    plain, _ = lean_adjoint(*args)
    mixed, valid = lean_adjoint(*args, likelihood_ratio=0.0, **kw)
    assert bool(valid.all())
    torch.testing.assert_close(mixed[0, :3], expected_lr[:3])
    torch.testing.assert_close(mixed[0, 3], plain[0, 3])  # contracting step: the propagated adjoint
    torch.testing.assert_close(mixed[1], plain[1])  # a_m = grad g either way
    never, _ = lean_adjoint(*args, likelihood_ratio=float("inf"), **kw)
    torch.testing.assert_close(never, plain, rtol=0, atol=0)


def test_likelihood_ratio_steps_are_unbiased_on_the_base():
    # On the base model (u = 0) the lean adjoint is the exact pathwise gradient of E[g(x_m) | x_k]
    # and the likelihood-ratio step an exact one too, so both sample means estimate the same
    # number; here from a state on GMM1D-v0's mode boundary late in the path (t = 0.85, 10 steps
    # to t = 1, where the pathwise tails are still mild: largest |a| ~500, standard error 0.04),
    # with every expanding step (theta = 0) replaced (every path has some) and an arbitrary
    # function of x_k as control variate (any such g_k keeps the mean). Measured: -1.682 (plain)
    # and -1.669 (likelihood ratio), 0.3 joint standard errors apart; the bound is 4.
    task = make_task("GMM1D-v0")
    env = task.environment.with_noise("memoryless")
    times = torch.linspace(0.85, 1.0, 11, dtype=torch.float64)
    n = 20000
    x0 = torch.full((n, 1), 0.2, dtype=torch.float64)
    traj = sample(env, x=x0, grid=times, reward=task.reward, reward_scale=task.reward_scale, store=("states", "noises"), seed=3)
    fake = torch.sin(traj.states[:-1])  # g_k = -sin(x_k) / sigma_k: a function of x_k only
    args = (env, traj.states, times, task.reward, task.reward_scale)
    plain, _ = lean_adjoint(*args)
    estimates = {"plain": plain[0, :, 0]}
    for name, controls in (("lr", None), ("lr+cv", fake)):
        mixed, _ = lean_adjoint(*args, likelihood_ratio=0.0, noises=traj.noises, cost_to_go=traj.cost_to_go, controls=controls,
                                generator=torch.Generator().manual_seed(1))
        assert float((mixed[0] != plain[0]).float().mean()) > 0.5  # likelihood-ratio steps did happen
        estimates[name] = mixed[0, :, 0]
    mean = {k: float(v.mean()) for k, v in estimates.items()}
    se = {k: float(v.std()) / n**0.5 for k, v in estimates.items()}
    for name in ("lr", "lr+cv"):
        assert abs(mean[name] - mean["plain"]) < 4 * (se[name] ** 2 + se["plain"] ** 2) ** 0.5, (mean, se)


def test_likelihood_ratio_arguments():
    task, trainer, traj, _, a_star = _oracle_batch(4, steps=5)
    args = (trainer.env, traj.states, trainer.times, task.reward, task.reward_scale)
    z, cost = torch.zeros(5, 4, 1), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="noises"):
        lean_adjoint(*args, likelihood_ratio=0.1, cost_to_go=cost)
    with pytest.raises(ValueError, match="noises"):
        lean_adjoint(*args, likelihood_ratio=0.1, noises=torch.zeros(4, 4, 1), cost_to_go=cost)
    with pytest.raises(ValueError, match="cost_to_go"):
        lean_adjoint(*args, likelihood_ratio=0.1, noises=z, cost_to_go=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="controls"):
        lean_adjoint(*args, likelihood_ratio=0.1, noises=z, cost_to_go=cost, controls=torch.zeros(5, 4, 2))
    with pytest.raises(ValueError, match="likelihood_ratio"):
        lean_adjoint(*args, likelihood_ratio=-0.1, noises=z, cost_to_go=cost)
    with pytest.raises(ValueError, match="likelihood_ratio"):
        lean_adjoint(*args, likelihood_ratio=0.1, noises=z, cost_to_go=cost, bootstrap=a_star, trace="adaptive")
    for bad in ({"likelihood_ratio": -1.0}, {"likelihood_ratio": True}, {"likelihood_ratio": 0.1, "bootstrap": "horizon"}):
        with pytest.raises(ValueError, match="likelihood_ratio"):
            AdjointMatchingConfig(**bad)


def _copy_config(**kw):
    # the benchmark row's settings (benchmarks/adaptation_methods/adjoint_matching.py)
    base = dict(batch_size=1024, loss_times=None, minibatch_size=8192, updates_per_iteration=8, learning_rate=3e-2,
                lr_schedule="cosine", grad_clip=None, time_weight="inverse", restarts=4.0, restart_after=0.7, residual="copy",
                likelihood_ratio=0.1, seed=0)
    base.update(kw)
    return AdjointMatchingConfig(**base)

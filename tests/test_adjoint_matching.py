"""Adjoint Matching: lean adjoint vs autograd, control protocol, constant reward, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusiongym.parameterization import PARAMETERIZATIONS
from diffusiongym.policies.adjoint_matching import (
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
    model = make_finetune_model(env, hidden=16, layers=1, seed=3).double()
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
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(hidden=16, layers=1))
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
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(batch_size=32, hidden=16, layers=1), steps=20)
    history = trainer.train(5)
    assert history["loss"] == pytest.approx([0.0] * 5, abs=1e-12)
    x = torch.linspace(-3, 3, 50).reshape(-1, 1)
    for t in (0.1, 0.5, 0.9):
        assert float(trainer.control(x, torch.full((50,), t)).detach().abs().max()) < 1e-6
    ev = trainer.evaluate(256, seed=0)
    assert ev["kl"] < 1e-10


def test_quadratic_reward_improves_objective_quickly():
    # A short run must already move the objective up from the base (-2.529) towards the
    # optimum (-1.439): 30 iterations reach a gap_closed of about 0.3-0.5 (see benchmark);
    # 0.15 leaves room for seed noise while a broken sign or adjoint gives <= 0.
    task = make_task("GMM1D-v0")
    cfg = AdjointMatchingConfig(batch_size=128, learning_rate=3e-3, hidden=32, layers=2)
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
    task = make_task("GMM1D-v0")
    with pytest.raises(TypeError, match="env"):
        AdjointMatching("GMM1D-v0", task.reward)
    with pytest.raises(ValueError, match="trainable"):
        frozen = ResidualModel(task.environment.model, TimeMLP(1, 1).requires_grad_(False))
        AdjointMatching(task.environment, task.reward, model=frozen)
    with pytest.raises(ValueError, match="times"):
        lean_adjoint(task.environment, torch.zeros(3, 2, 1), make_time_grid(5, 0.1), task.reward, 1.0)


def test_training_uses_memoryless_noise_even_for_an_ode_env():
    task = make_task("GMM1D-v0", noise="ode")
    trainer = AdjointMatching.from_task(task, config=AdjointMatchingConfig(hidden=8, layers=1))
    assert trainer.env.noise.is_memoryless
    assert trainer.finetuned_env(noise="ode").noise.is_deterministic


def test_save_load_resume_is_exact(tmp_path):
    # 4 iterations straight == 2 iterations, save, load into a fresh trainer, 2 more
    # (same sampling noise, time subsets and Adam moments): bit-identical weights.
    task = make_task("GMM2D-v0", parameterization="score")
    cfg = AdjointMatchingConfig(batch_size=32, hidden=16, layers=1, loss_times=5, always_last=2, seed=7)
    straight = AdjointMatching.from_task(task, config=cfg, steps=15)
    straight.train(4)
    first = AdjointMatching.from_task(task, config=cfg, steps=15)
    first.train(2)
    first.save(tmp_path / "ckpt")
    resumed = AdjointMatching.from_task(task, config=cfg, steps=15).load(tmp_path / "ckpt")
    assert resumed.iteration == 2 and len(resumed.history["loss"]) == 2
    calls = []
    resumed.train(2, callback=calls.append)
    assert [c["iteration"] for c in calls] == [3.0, 4.0]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.history["loss"] == pytest.approx(straight.history["loss"], rel=1e-6)
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

"""Value-function control and the Value Matching trainer, checked against closed forms and the
exact GMM optimum (``TiltOracle``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import diffusiongym as dg
from diffusiongym.utils.runtime import flush_denormals
from diffusiongym.policies.networks import CopyDifference, SignalScaled, TimeCNN, TimeMLP
from diffusiongym.policies.value import ControlPolicy, ValuePolicy
from diffusiongym.rewards.base import CallableReward
from diffusiongym.tasks import make_task
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig, load_value_policy, time_weights


class OracleValue(nn.Module):
    """The exact ``V*`` as a value network."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, x, t, **cond):
        return self.oracle.value(x, t)


class Quadratic(nn.Module):
    """``V(x, t) = c t |x|^2 / 2`` (one parameter ``c``): ``grad V = c t x``."""

    def __init__(self, c=1.5):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t, **cond):
        return 0.5 * self.c * t * (x.reshape(x.shape[0], -1) ** 2).sum(1)


@pytest.fixture(autouse=True)
def _flush_denormals():
    with flush_denormals():  # restored after each test (the trainers flush inside their steps anyway)
        yield


# --------------------------------------------------------------------------- ValuePolicy


def test_value_policy_is_minus_sigma_grad_v_closed_form():
    task = make_task("GMM2D-v0")
    env = task.environment
    policy = ValuePolicy(Quadratic(1.5), env, action_scale=5.0)
    x = torch.randn(16, 2)
    t = torch.linspace(0.05, 0.95, 16)
    x_before = x.clone()
    with torch.no_grad():  # the engine's context: the policy must still differentiate V
        u = policy(x, t)
    sigma = torch.sqrt(2 * (1 - t) / t)  # memoryless linear: sigma^2 = 2 eta = 2 (1 - t) / t
    torch.testing.assert_close(u, -sigma[:, None] * 1.5 * t[:, None] * x, rtol=1e-5, atol=1e-6)
    # no graph, caller's tensor untouched, no parameter gradients accumulated
    assert not u.requires_grad and u.grad_fn is None
    assert torch.equal(x, x_before) and x.grad is None
    assert policy.value_net.c.grad is None


def test_value_policy_with_exact_value_is_the_oracle_control():
    task = make_task("GMM1D-v0")
    policy = ValuePolicy(OracleValue(task.oracle), task.environment)
    x = torch.randn(32, 1, dtype=torch.float64)
    t = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(policy(x, t), task.oracle.control()(x, t), rtol=1e-10, atol=1e-10)
    # and its rollouts are the oracle's, bit for bit
    a = dg.sample(task.environment, 64, steps=20, control=policy, seed=1)
    b = dg.sample(task.environment, 64, steps=20, control=task.oracle.control(), seed=1)
    assert torch.equal(a.x1, b.x1)


def test_act_on_observations_tensor_and_numpy():
    task = make_task("GMM2D-v0")
    policy = ValuePolicy(Quadratic(1.0), task.environment, action_scale=task.action_scale)
    x = torch.randn(8, 2)
    t = torch.full((8, 1), 0.5)
    a = policy.act({"x": x, "t": t})
    torch.testing.assert_close(a, policy(x, t[:, 0]) / task.action_scale)
    one = policy.act({"x": x[0].numpy(), "t": np.array([0.5], dtype=np.float32)})  # single (unbatched) env
    assert isinstance(one, np.ndarray) and one.shape == (2,)
    np.testing.assert_allclose(one, a[0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="observation"):
        policy.act({"x": x})


def test_value_policy_acts_on_the_vector_env():
    """The exact V* driven through the Gymnasium vector env (observation -> normalised action)
    earns the optimal objective: mean return within 4 standard errors + 0.04 (the Euler bias
    of the 100-step grid, measured 0.02-0.03 with the engine) of log E[exp(lambda r)]."""
    from diffusiongym.envs.registry import make_vector_env

    task = make_task("GMM1D-v0")
    n = 1024
    env = make_vector_env("GMM1D-v0", num_envs=n)
    policy = ValuePolicy(OracleValue(task.oracle), task.environment, action_scale=task.action_scale)
    obs, _ = env.reset(seed=0)
    ret = torch.zeros(n, dtype=torch.float64)
    for _ in range(task.steps):
        obs, reward, terminated, _truncated, _ = env.step(policy.act(obs))
        ret += torch.as_tensor(reward, dtype=torch.float64)
    assert bool(torch.as_tensor(terminated).all())
    se = float(ret.std()) / math.sqrt(n)
    assert abs(float(ret.mean()) - task.oracle.optimal_objective) < 4 * se + 0.04


def test_control_policy_and_errors():
    net = TimeMLP(2, out_dim=2, hidden=16, layers=1)
    policy = ControlPolicy(net, action_scale=2.0)
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(policy(x, t), net(x, t))
    torch.testing.assert_close(policy.act({"x": x, "t": t[:, None]}), net(x, t) / 2.0)
    with pytest.raises(ValueError, match="net output"):
        ControlPolicy(TimeMLP(2, out_dim=3, hidden=8, layers=1))(x, t)
    with pytest.raises(TypeError, match="value_net"):
        ValuePolicy(lambda x, t: x, make_task("GMM1D-v0").environment)
    with pytest.raises(ValueError, match="sigma = 0"):
        ValuePolicy(Quadratic(), make_task("GMM1D-v0", noise="ode").environment)
    with pytest.raises(ValueError, match="action_scale"):
        ControlPolicy(net, action_scale=0.0)
    with pytest.raises(ValueError, match="value_net output"):
        ValuePolicy(TimeMLP(2, out_dim=2), make_task("GMM2D-v0").environment)(x, t)


def test_signal_scaled_gradient_carries_alpha():
    sched = dg.LinearScheduler()
    net = TimeMLP(2, out_dim=1, hidden=16, layers=2)
    wrapped = SignalScaled(net, sched)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    net.double()
    torch.testing.assert_close(wrapped(x, t), net(t[:, None] * x, t))  # alpha_t = t (linear)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(wrapped(xg, t).sum(), xg)
    y = (t[:, None] * x).requires_grad_(True)
    (gy,) = torch.autograd.grad(net(y, t).sum(), y)
    torch.testing.assert_close(g, t[:, None] * gy)


# --------------------------------------------------------------------------- image networks


def test_time_cnn_shapes_conditioning_and_value_policy_on_images():
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    labels = torch.tensor([0, 1, 2, 3])
    value = TimeCNN(1, hidden=16, blocks=2, num_classes=10, zero_init=False)
    assert value(x, t, label=labels).shape == (4, 1)
    # class-conditional: changing the labels changes the output
    assert not torch.allclose(value(x, t, label=labels), value(x, t, label=labels.flip(0)))
    with pytest.raises(ValueError, match="label"):
        value(x, t)
    field = TimeCNN(1, hidden=16, blocks=2, output="field")
    assert field(x, t).shape == x.shape and torch.equal(field(x, t), torch.zeros_like(x))  # zero-init head
    env = dg.VelocityEnvironment(lambda x, t, **c: -x, scheduler="linear", noise="memoryless", sample_shape=(1, 8, 8))
    u = ValuePolicy(SignalScaled(value, env.scheduler), env)(x, t, label=labels)
    assert u.shape == x.shape and torch.isfinite(u).all() and not u.requires_grad
    assert ControlPolicy(field, env)(x, t).shape == x.shape
    with pytest.raises(ValueError, match="output"):
        TimeCNN(1, output="logits")


def test_time_cnn_learns_a_value_on_random_images():
    """Regress V(x, t) = t mean(x) + (1 - t) mean(x^2) on random 8x8 images. Var(y) ~ 0.095; a
    network that ignores t keeps a residual ~ Var(t) E[(mean x - mean x^2)^2] ~ 0.08, one that
    ignores x ~ 0.05: beating Var(y) / 5 needs both inputs (measured: Var(y) / 7.4)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = TimeCNN(1, hidden=16, blocks=1, zero_init=False)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def batch(n):
        x, t = torch.randn(n, 1, 8, 8, generator=gen), torch.rand(n, generator=gen)
        return x, t, t * x.mean((1, 2, 3)) + (1 - t) * (x**2).mean((1, 2, 3))

    for _ in range(150):
        x, t, y = batch(64)
        loss = ((net(x, t)[:, 0] - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, t, y = batch(1024)
    with torch.no_grad():
        mse = float(((net(x, t)[:, 0] - y) ** 2).mean())
    assert mse < float(y.var()) / 5, (mse, float(y.var()))


# --------------------------------------------------------------------------- trainer pieces


def test_time_weights_memoryless_linear_closed_form():
    env = make_task("GMM1D-v0").environment
    times = dg.make_time_grid(50, 1e-3)
    w = time_weights(env, times)
    t, h = times[:-1], times[1:] - times[:-1]
    tail = torch.cat([(2 * (1 - t) / t * h).flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    expected = 1 / (1 + 0.5 * tail)
    torch.testing.assert_close(w, expected / expected.mean())
    assert torch.all(w[1:] >= w[:-1]) and math.isclose(float(w.mean()), 1.0)
    assert torch.equal(time_weights(env, times, "uniform"), torch.ones(51, dtype=torch.float64))


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        ValueMatchingConfig(lr=-1.0)
    with pytest.raises(ValueError, match="optimizer.*adam"):
        ValueMatchingConfig(optimizer="adm")
    with pytest.raises(ValueError, match="time_weighting.*variance"):
        ValueMatchingConfig(time_weighting="flat")
    with pytest.raises(ValueError, match="replay"):
        ValueMatchingConfig(replay=-1)
    with pytest.raises(ValueError, match="batch_size"):
        ValueMatchingConfig(batch_size=0)
    with pytest.raises(ValueError, match="minibatch_size"):
        ValueMatchingConfig(minibatch_size=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        ValueMatchingConfig(max_grad_norm=0.0)
    with pytest.raises(TypeError, match="grad_clip"):  # the shared name is max_grad_norm
        ValueMatchingConfig(grad_clip=1.0)
    with pytest.raises(ValueError, match="unknown.*learning_rate"):
        ValueMatchingConfig.from_dict({**ValueMatchingConfig().to_dict(), "learning_rate": 1.0})
    cfg = ValueMatchingConfig(replay=2, max_grad_norm=None)
    assert ValueMatchingConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.iterations, cfg.lr_schedule, cfg.lr_final_factor) == (200, "cosine", 0.1)  # the method's defaults
    with pytest.raises(TypeError, match="reward"):
        ValueMatching("GMM1D-v0", lambda x: x)
    with pytest.raises(TypeError, match="config"):
        ValueMatching("GMM1D-v0", config={"lr": 1.0})
    with pytest.raises(TypeError, match="model"):
        ValueMatching("GMM1D-v0", model=lambda x, t: x)
    with pytest.raises(ValueError, match="sigma = 0"):
        ValueMatching(make_task("GMM1D-v0", noise="ode"))


SMALL = {"iterations": 4, "batch_size": 32, "updates_per_iteration": 2, "minibatch_size": 64, "replay": 1, "seed": 3}


def _small(seed=3, **task_options):
    return ValueMatching(
        "GMM2D-v0",
        config=ValueMatchingConfig(**{**SMALL, "seed": seed}),
        steps=task_options.pop("steps", 10),
        **task_options,
    )


def _without_seconds(history):
    return {k: v for k, v in history.items() if k != "seconds"}


def test_init_is_seeded_from_the_config_and_leaves_the_global_rng_alone():
    """The default value network is initialised from ``config.seed`` (not from whatever the
    global RNG holds), and building or training a trainer does not move the global RNG."""
    torch.manual_seed(1)
    a = _small()
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = _small()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), _small(seed=4).model.parameters()))
    torch.set_rng_state(state)
    a.train(iterations=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_load_resume_is_exact(tmp_path):
    """2 + 2 iterations through a checkpoint equal 4 straight, bit for bit (network, optimiser,
    learning-rate schedule, generator and replay buffer restored); the saved policy reloads
    without the trainer."""
    straight = _small()
    straight.train(progress=False)
    first = _small()
    first.train(iterations=2, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = _small().load(tmp_path / "ckpt")
    assert resumed.iteration == 2 and resumed.history == first.history
    assert len(resumed.buffer) == 2 and all(
        torch.equal(a["states"], b["states"]) for a, b in zip(resumed.buffer, first.buffer)
    )
    resumed.train(progress=False)
    assert resumed.iteration == 4
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert _without_seconds(resumed.history) == _without_seconds(straight.history)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    resumed.save(tmp_path / "final")
    policy = load_value_policy(tmp_path / "final", resumed.env)
    x, t = torch.randn(8, 2), torch.full((8,), 0.4)
    assert torch.equal(policy(x, t), straight.policy(x, t))
    assert policy.action_scale == straight.task.action_scale
    with pytest.raises(ValueError, match="sample_shape"):
        load_value_policy(tmp_path / "final", make_task("GMM1D-v0").environment)


def test_refused_checkpoints_leave_the_trainer_untouched(tmp_path):
    """A checkpoint of another grid (steps), another config or with a damaged replay buffer is
    refused with an error naming the field, and the live trainer keeps its state."""
    from diffusiongym.trainers.checkpoint import CheckpointError

    source = _small()
    source.train(iterations=2, progress=False)
    source.save(tmp_path / "ckpt")

    def check_untouched(trainer, before):
        assert trainer.iteration == 0 and trainer.history == {} and trainer.buffer == []
        for a, b in zip(trainer.model.parameters(), before):
            assert torch.equal(a, b)

    other_steps = _small(steps=12)
    before = [p.detach().clone() for p in other_steps.model.parameters()]
    with pytest.raises(CheckpointError, match="task.steps"):
        other_steps.load(tmp_path / "ckpt")
    check_untouched(other_steps, before)

    other_config = ValueMatching("GMM2D-v0", config=ValueMatchingConfig(**{**SMALL, "replay": 2}), steps=10)
    with pytest.raises(CheckpointError, match="replay"):
        other_config.load(tmp_path / "ckpt")

    live = _small()
    tensors, meta = source.extra_state()
    bad_shape = {**tensors, "buffer.0.states": tensors["buffer.0.states"][:, :, :1]}
    with pytest.raises(CheckpointError, match=r"buffer.0.states"):
        live.stage_extra_state(bad_shape, meta)
    with pytest.raises(CheckpointError, match="buffer_size"):
        live.stage_extra_state(tensors, {**meta, "buffer_size": 3})  # replay=1 keeps at most 2
    with pytest.raises(CheckpointError, match="missing"):
        live.stage_extra_state({k: v for k, v in tensors.items() if k != "buffer.1.cost_to_go"}, meta)
    with pytest.raises(CheckpointError, match="cond_keys"):
        live.stage_extra_state(tensors, {**meta, "cond_keys": ["label"]})
    check_untouched(live, [p.detach().clone() for p in _small().model.parameters()])
    live.stage_extra_state(tensors, meta)()  # the good state applies
    assert len(live.buffer) == 2 and torch.equal(live.buffer[1]["cost_to_go"], source.buffer[1]["cost_to_go"])


def test_non_differentiable_reward_moves_mass():
    """Indicator reward 1[x > 0.25] on GMM1D (lambda = 2): the base puts 0.2 of its mass there,
    the optimum 0.2 e^2 / (0.8 + 0.2 e^2) = 0.65 (the modes' tails across 0.25 are below 1e-6).
    A few iterations must lift the fraction well above the base (> 0.35, about 10 standard
    errors at n = 2048; measured 0.46 and 0.48 on seeds 0 and 1); a sign error in the control
    would push it below 0.2."""
    reward = CallableReward(lambda x: (x[:, 0] > 0.25).float(), differentiable=False)
    cfg = ValueMatchingConfig(
        iterations=12, batch_size=128, updates_per_iteration=16, minibatch_size=512, replay=3, lr=2e-3, seed=0
    )
    trainer = ValueMatching("GMM1D-v0", reward, 2.0, config=cfg, steps=50)
    history = trainer.train(progress=False)
    assert len(history["loss"]) == 12 and all(math.isfinite(v) for v in history["loss"])
    metrics = trainer.evaluate(2048, seed=1)
    assert metrics["reward"] > 0.35, metrics


# --------------------------------------------------------------------------- against the optimum


@pytest.mark.slow
def test_gmm1d_gap_closed_and_value_close_to_oracle():
    """Small budget (20 iterations on a 50-step grid, ~15 s): the learned control must close
    > 60% of the gap between the base (-2.529) and the optimal objective (-1.439); measured 82%
    and 79% on seeds 0 and 1 (u* itself closes 95% on this grid; the benchmark's full budget on
    100 steps 97%). 4 standard errors of the 4096-sample mean are ~0.04 = 4% of the gap, so the
    bound leaves room for seeds while rejecting a base-like policy (0%) or a diverging one (< 0).
    The learned V must also track V* on its own states at t = 0.5: mse < 0.3 Var V* (measured
    0.11 and 0.20 Var V*; a V that is right only up to its mean over x scores 1.0)."""
    task = make_task("GMM1D-v0", steps=50)
    cfg = ValueMatchingConfig(
        iterations=20, batch_size=128, updates_per_iteration=16, minibatch_size=1024, replay=3, lr=2e-3, seed=0
    )
    records = []
    trainer = ValueMatching(task, config=cfg)
    trainer.train(callback=records.append, progress=False)
    assert [r["iteration"] for r in records] == list(range(20))
    assert set(trainer.history) >= {"loss", "reward", "kl", "objective"}
    traj = dg.sample(
        task.environment,
        4096,
        steps=task.steps,
        control=trainer.policy,
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=11,
        store="states",
    )
    gap = task.oracle.gap_closed(float(traj.objective.mean()))
    assert gap > 0.6, gap
    k = 25
    x, t = traj.states[k], float(traj.times[k])
    with torch.no_grad():
        v = trainer.policy.value(x, torch.full((x.shape[0],), t)).double()
    v_star = task.oracle.value(x.double(), t)
    assert float(((v - v_star) ** 2).mean()) < 0.3 * float(v_star.var())


# --------------------------------------------------------------------------- Gymnasium adapter


def test_control_action_is_the_one_conversion_for_agents_and_policies():
    """``ValuePolicy.act`` and ``ControlAgent`` share ``control_action``: same numbers for the
    same observation; unbatched numpy observations are recognised by ``sample_ndim``, and
    without it by ``t`` of shape (1,) with no leading batch of one."""
    from diffusiongym.policies.agent import control_action

    task = make_task("GMM2D-v0")
    policy = ValuePolicy(Quadratic(1.0), task.environment, action_scale=5.0)
    x, t = torch.randn(6, 2), torch.full((6, 1), 0.3)
    expected = policy(x, t[:, 0]) / 5.0
    torch.testing.assert_close(control_action(policy, {"x": x, "t": t}, 5.0), expected)
    torch.testing.assert_close(control_action(policy, {"x": x, "t": 0.3}, 5.0), expected)  # scalar t broadcasts
    one = control_action(policy, {"x": x[1].numpy(), "t": np.array([0.3], np.float32)}, 5.0)
    assert one.shape == (2,) and one.dtype == np.float32
    np.testing.assert_allclose(one, expected[1].numpy(), rtol=1e-6)
    batch_of_one = control_action(policy, {"x": x[:1].numpy(), "t": np.array([[0.3]], np.float32)}, 5.0, sample_ndim=1)
    assert batch_of_one.shape == (1, 2)
    with pytest.raises(ValueError, match=r"observation\['t'\]"):
        control_action(policy, {"x": x, "t": torch.zeros(4)}, 5.0)
    with pytest.raises(TypeError, match=r"observation\['x'\]"):
        control_action(policy, {"x": [1.0, 2.0], "t": 0.5}, 5.0)


# --------------------------------------------------------------------------- digits


def test_save_and_load_value_net_round_trip(tmp_path):
    from diffusiongym.trainers.value_matching_digits import load_value_net, save_value_net

    torch.manual_seed(0)
    sched = dg.LinearScheduler()
    net = SignalScaled(TimeCNN(1, hidden=8, blocks=1, zero_init=False), sched)
    save_value_net(net, tmp_path / "v", {"note": "test"})
    back, info = load_value_net(tmp_path / "v", sched)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    torch.testing.assert_close(back(x, t), net(x, t), rtol=0, atol=0)
    assert info["note"] == "test" and info["value_net"]["class"] == "SignalScaled"
    with pytest.raises(FileNotFoundError, match="stem"):
        load_value_net(tmp_path / "missing", sched)


@pytest.mark.slow
def test_shipped_digits_value_net_raises_the_target_class():
    """The shipped value network (``benchmarks/value_matching_digits.py``) on the unconditional
    digits model with reward 1[class = 3], lambda = 10: on 128 fresh samples (same noise for both)
    the base model draws class 3 at its base rate (measured 0.097 on 1024 samples; bound 0.25,
    > 5 binomial standard errors above it) and the learned control at > 0.7 (measured 0.891 on
    1024 samples; 0.7 is 7 standard errors at n = 128 below it and 7x the base rate), with a
    positive KL below 10 nats (measured 5.5; the optimum spends 2.3, so a control that only
    grows, e.g. with a sign error or a blow-up near t = 0, fails here or on validity)."""
    from diffusiongym.trainers.value_matching_digits import DIGITS_VALUE_WEIGHTS, digits_value_task, load_value_net

    net, info = load_value_net(DIGITS_VALUE_WEIGHTS, "linear")
    task = digits_value_task(**info["recipe"])
    assert info["recipe"] == {"target": 3, "reward_scale": 10.0, "steps": 25, "mode": "is_class"}
    policy = ValuePolicy(net, task.environment, action_scale=task.action_scale)
    n = 128
    common = dict(
        steps=task.steps,
        t_start=task.t_start,
        reward=task.reward,
        reward_scale=task.reward_scale,
        cond={"label": task.conditioning["label"][1](n)},
        seed=2024,
    )
    base = dg.sample(task.environment, n, **common)
    tuned = dg.sample(task.environment, n, control=policy, **common)
    assert float(base.reward.mean()) < 0.25
    assert float(tuned.reward.mean()) > 0.7, float(tuned.reward.mean())
    kl = float(tuned.kl.mean())
    assert 0 < kl < 10 and bool(tuned.valid.all()), kl


@pytest.mark.parametrize("centered", [True, False])
def test_centered_targets_ignore_a_constant_reward_offset(centered):
    # r and r + 10 have the same tilt, so the same optimal control. With center_targets the
    # regression targets C_k - mean_k C_k are the same for both (up to float32 rounding of
    # C ~ 10: ~1e-6), so training is identical; without it the network fits the offset first
    # and the parameters differ at O(lr) = 1e-3 after a few steps.
    task = make_task("GMM1D-v0")
    base = task.reward

    def trained(offset: float) -> list[torch.Tensor]:
        reward = CallableReward(lambda x: base.evaluate(x) + offset, differentiable=True)
        config = ValueMatchingConfig(
            iterations=3, batch_size=64, updates_per_iteration=4, minibatch_size=256, center_targets=centered, seed=0
        )
        trainer = ValueMatching(task, reward=reward, config=config)
        trainer.train(progress=False)
        return [p.detach().clone() for p in trainer.model.parameters()]

    gaps = [float((a - b).abs().max()) for a, b in zip(trained(0.0), trained(10.0))]
    if centered:
        assert max(gaps) < 1e-4
    else:
        assert max(gaps) > 1e-3


def test_copy_difference_starts_at_zero_and_trains_the_copy_only():
    base = TimeMLP(3, 3, hidden=16, layers=2)
    diff = CopyDifference(base)
    x, t = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.full((5,), 0.3)
    assert torch.equal(diff(x, t), torch.zeros(5, 3))
    assert all(not p.requires_grad for p in base.parameters())
    names = [name for name, _ in diff.named_parameters()]
    assert names and all(name.startswith("copy.") for name in names)  # the frozen base is not a submodule
    diff(x, t).pow(2).sum().backward()  # zero output, zero gradient; perturb the copy and try again
    with torch.no_grad():
        next(diff.copy.parameters()).add_(0.1)
    xg = x.clone().requires_grad_(True)
    out = diff(xg, t)
    (grad,) = torch.autograd.grad(out.sum(), xg)
    assert out.abs().max() > 0 and grad.abs().max() > 0  # differentiable in x through both networks
    with pytest.raises(TypeError, match="base"):
        CopyDifference(lambda x, t: x)

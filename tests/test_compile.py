"""The compiled fast path (``compile=True``) equals the eager engine, vector env and trainer rollout.

Tolerance. The compiled step computes the same float32 operations as the eager loop, but fused,
so roundings differ (vectorised ``exp``/``log``, no intermediate stores). The yardstick is the
eager float32 path's own rounding error: the same run in float64 with the same initial state and
noise. The compiled run must lie within ``FACTOR`` times that error of the eager float32 run (max
norm over every stored quantity). Measured on GMM1D/GMM2D at 100 steps: ratios 0.06 to 1.26 (2.1
at 20 steps, where the first, stiff steps amplify roundings); ``FACTOR = 4``. In relative terms the
final states agree to ~2e-6 (differences <= 5.3e-6 on |x1| <= 2.5).

Compilation dominates the runtime (a few graphs of small batches: about 30 s on one core).
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import diffusiongym as dg
from diffusiongym import compiled
from diffusiongym.sampling import StepSchedule, sample
from diffusiongym.tasks import make_task
from diffusiongym.timegrid import make_time_grid
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig

FACTOR = 4.0
N = 64


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _assert_close_to_eager(got, eager, exact, names):
    """``got`` (compiled) within FACTOR x the eager float32 error against ``exact`` (float64)."""
    for name in names:
        a, e, x = getattr(got, name), getattr(eager, name), getattr(exact, name)
        budget = FACTOR * _max_diff(e, x) + 1e-12
        assert _max_diff(a, e) <= budget, (name, _max_diff(a, e), _max_diff(e, x))


def _runs(env, kw, store=("noises",)):
    x0 = (1 - 1e-3) * torch.randn((N, *env.sample_shape), generator=torch.Generator().manual_seed(0))
    eager = sample(env, x=x0, seed=1, store=store, **kw)
    exact = sample(env, x=x0.double(), noises=eager.noises.double(), store=store, **kw)
    got = sample(env, x=x0, seed=1, store=store, compile=True, **kw)
    assert torch.equal(got.noises, eager.noises)  # the same seed draws the same noise, bit for bit
    return got, eager, exact


def test_engine_without_control_matches_eager_and_reuses_the_compiled_step():
    task = make_task("GMM2D-v0")
    env = task.environment
    got, eager, exact = _runs(env, {}, store="all")
    _assert_close_to_eager(got, eager, exact, ["x1", "states", "drifts"])
    assert not got.controls.any() and not got.running_cost.any()
    entries = len(compiled._entries(env.model))
    again = sample(env, N, seed=7, store="all", compile=True)  # another seed and initial state: same graph
    assert len(compiled._entries(env.model)) == entries
    eager_again = sample(env, N, seed=7, store="all")
    assert torch.equal(again.noises, eager_again.noises)
    assert _max_diff(again.x1, eager_again.x1) <= 1e-4 * float(eager_again.x1.abs().max())


def test_engine_with_a_policy_model_matches_eager():
    task = make_task("GMM1D-v0")
    policy = task.environment.model.trainable_copy()
    with torch.no_grad():
        policy.means.add_(0.3)  # a fine-tuned copy: a nonzero control
    got, eager, exact = _runs(task.environment, {"policy": policy, "reward": task.reward}, ("noises", "controls"))
    _assert_close_to_eager(got, eager, exact, ["x1", "running_cost", "controls"])
    assert float(eager.running_cost.sum(0).mean()) > 0.01  # the control is not negligible
    assert torch.equal(got.valid, eager.valid)
    assert _max_diff(got.reward, eager.reward) <= FACTOR * _max_diff(eager.reward, exact.reward) + 1e-12


def test_engine_with_an_eager_control_callable_matches_eager():
    task = make_task("GMM1D-v0")
    got, eager, exact = _runs(task.environment, {"control": task.oracle.control()}, ("noises", "controls"))
    _assert_close_to_eager(got, eager, exact, ["x1", "running_cost", "controls"])


def _vec_rollout(task, compile: bool, dtype=torch.float32, options=None, seed=None):
    env = dg.DiffusionVectorEnv(task, N, dtype=dtype, compile=compile)  # one task: one model, one compiled graph
    u_star = task.oracle.control()
    obs, _ = env.reset(seed=seed, options=options)
    states, rewards = [obs["x"]], []
    for _ in range(env.sim.steps):
        u = u_star(obs["x"], obs["t"].reshape(-1))
        obs, reward, _, _, info = env.step(env.control_to_action(u))
        states.append(info["final_x"] if "final_x" in info else obs["x"])
        rewards.append(reward)
    return torch.stack(states), torch.stack(rewards)


def test_vector_env_matches_eager():
    task = make_task("GMM2D-v0")
    shape = (N, 2)
    gen = torch.Generator().manual_seed(3)
    options = {"x": torch.randn(shape, generator=gen), "noise": torch.randn((task.steps, *shape), generator=gen)}
    x_c, r_c = _vec_rollout(task, True, options=options)
    x_e, r_e = _vec_rollout(task, False, options=options)
    x_x, r_x = _vec_rollout(task, False, torch.float64, {k: v.double() for k, v in options.items()})
    for got, eager, exact in ((x_c, x_e, x_x), (r_c, r_e, r_x)):
        assert _max_diff(got, eager) <= FACTOR * _max_diff(eager, exact) + 1e-12
    # seeded: the same initial states and noise as the eager env (another noise stream would move
    # the states by O(1); roundings moved them by 4e-5 of their largest value, |x| ~ 31)
    x_c, _ = _vec_rollout(task, True, seed=11)
    x_e, _ = _vec_rollout(task, False, seed=11)
    assert torch.equal(x_c[0], x_e[0])
    assert _max_diff(x_c, x_e) <= 1e-3 * float(x_e.abs().max())


def test_trainer_rollout_matches_eager():
    task = make_task("GMM1D-v0")
    trajs = []
    for flag in (True, False):
        config = AdjointMatchingConfig(hidden=8, layers=1, seed=2, compile=flag)
        trainer = AdjointMatching(task, config=config)
        with torch.no_grad():  # a nonzero fine-tune, so the fused control matters
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trajs.append(trainer.rollout({}, N))
    got, eager = trajs
    assert torch.equal(got.states[0], eager.states[0])
    # float32 MLP policy, no float64 reference: measured differences 8e-8 of the largest state and
    # 1.1e-5 of the largest running cost (a small control: KL 0.003); bounds 10x those
    assert _max_diff(got.states, eager.states) <= 1e-6 * float(eager.states.abs().max())
    assert _max_diff(got.running_cost, eager.running_cost) <= 1e-4 * float(eager.running_cost.abs().max())


# ------------------------------------------------------------------------ arguments and helpers
def test_arguments_are_checked():
    env = make_task("GMM1D-v0").environment
    with pytest.raises(TypeError, match="compile"):
        sample(env, 4, compile="yes")
    with pytest.raises(ValueError, match="compile"):
        sample(env, 4, compile=True, requires_grad=True)
    with pytest.raises(ValueError, match="compile"):
        AdjointMatchingConfig(compile=1)
    with pytest.raises(TypeError, match="compile"):
        gym.make_vec("diffusiongym/GMM1D-v0", num_envs=2, vectorization_mode="vector_entry_point", compile="yes")
    env = gym.make_vec("diffusiongym/GMM1D-v0", num_envs=2, vectorization_mode="vector_entry_point", compile=True)
    assert env.unwrapped.sim.compile  # passed through the registry (compiled at the first reset)


def test_wrong_output_shapes_raise_the_engines_error_before_compiling():
    env = dg.VelocityEnvironment(lambda x, t: x[:, :1], sample_shape=(2,), scheduler="linear", noise="memoryless")
    with pytest.raises(ValueError, match="model output: expected shape"):
        sample(env, 4, steps=5, compile=True)
    task = make_task("GMM2D-v0")
    with pytest.raises(ValueError, match="policy output: expected shape"):
        sample(task.environment, 4, steps=5, compile=True, policy=lambda x, t: x[:, :1])


def test_an_untraceable_model_raises_a_compile_error():
    base = make_task("GMM1D-v0").environment.model

    def model(x, t):
        out = base(x, t)
        return out if bool(out.abs().max() < 1e6) else out.clamp(-1e6, 1e6)  # data-dependent: no single graph

    env = dg.VelocityEnvironment(model, sample_shape=(1,), scheduler="linear", noise="memoryless")
    with pytest.raises(compiled.CompileError, match="compile=False"):
        sample(env, 4, steps=5, compile=True)


def test_step_table_and_modes():
    env = make_task("GMM1D-v0").environment
    schedule = StepSchedule.build(env, make_time_grid(7, 1e-3))
    rows = compiled.step_table(schedule, torch.float64, torch.device("cpu"))
    assert len(rows) == 7 and rows[0].shape == (8,)
    for k in (0, 6):
        t, h, sig, ssig, cx, co, factor, half_h = rows[k].tolist()
        assert (t, h, sig, ssig, cx, co) == (
            schedule.t[k],
            schedule.h[k],
            schedule.sigma[k],
            schedule.step_sigma[k],
            schedule.coef_x[k],
            schedule.coef_out[k],
        )
        assert factor == schedule.coef_out[k] / schedule.sigma[k] and half_h == 0.5 * schedule.h[k]
    ode = dg.VelocityEnvironment(env.model, scheduler="linear", noise="ode")
    ode_rows = compiled.step_table(StepSchedule.build(ode, make_time_grid(3, 1e-3)), torch.float16, "cpu")
    assert ode_rows[0].dtype == torch.float32 and ode_rows[0][compiled.FACTOR] == 0
    assert compiled.compile_mode(torch.device("cpu")) == "default"
    assert compiled.compile_mode(torch.device("cuda")) == "reduce-overhead"

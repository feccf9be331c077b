"""Conformance of the torch vector env (Gymnasium's checker covers single envs only)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import diffusiongym as dg
from diffusiongym.envs.simulator import to_action_tensor
from diffusiongym.policies.agent import ControlAgent
from diffusiongym.policies.networks import TimeMLP

pytestmark = pytest.mark.filterwarnings("ignore:steps=.*stiff:RuntimeWarning")


def make(n=4, **kw):
    kw.setdefault("steps", 5)
    return gym.make_vec("diffusiongym/GMM2D-v0", num_envs=n, vectorization_mode="vector_entry_point", **kw)


def _in_space(space, obs):
    return space.contains({k: v.cpu().numpy() for k, v in obs.items()})


def test_metadata_and_spaces_match_returned_values():
    env = make()
    assert isinstance(env, dg.DiffusionVectorEnv)
    assert env.metadata["autoreset_mode"] is AutoresetMode.NEXT_STEP
    obs, info = env.reset(seed=0)
    assert info == {}
    assert set(obs) == set(env.single_observation_space.spaces)
    assert obs["x"].shape == (4, 2) and obs["x"].dtype == torch.float32 and obs["t"].shape == (4, 1)
    assert _in_space(env.observation_space, obs)
    for _ in range(5):
        obs, reward, term, trunc, info = env.step(torch.zeros(4, 2))
        assert _in_space(env.observation_space, obs)
        assert reward.shape == term.shape == trunc.shape == (4,)
        assert term.dtype == trunc.dtype == torch.bool and not trunc.any()
    assert term.all() and set(info) == {
        "reward",
        "_reward",
        "valid",
        "_valid",
        "final_x",
        "_final_x",
        "kl_defined",
        "_kl_defined",
    }
    for key in ("reward", "valid", "final_x", "kl_defined"):  # Gymnasium's vector info convention
        assert info[f"_{key}"].dtype == torch.bool and info[f"_{key}"].shape == (4,) and info[f"_{key}"].all()
        assert info[key].shape[0] == 4
    assert info["kl_defined"].dtype == torch.bool and info["kl_defined"].all()
    assert env.action_space.shape == (4, 2) and env.single_action_space.shape == (2,)
    a = torch.as_tensor(env.action_space.sample())
    assert a.shape == (4, 2)


def test_seeding_determinism():
    a, b, c = make(), make(), make()
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    oc, _ = c.reset(seed=4)
    assert torch.equal(oa["x"], ob["x"]) and not torch.equal(oa["x"], oc["x"])
    for _ in range(5):
        ra = a.step(torch.full((4, 2), 0.1))
        rb = b.step(torch.full((4, 2), 0.1))
    assert torch.equal(ra[0]["x"], rb[0]["x"]) and torch.equal(ra[1], rb[1])


@pytest.mark.parametrize("mode", ["control", "drift", "model"])
def test_batch_equals_single_runs_with_the_same_noise(mode):
    n, steps = 3, 6
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 2, generator=gen)
    noise = torch.randn(steps, n, 2, generator=gen)
    actions = 0.3 * torch.randn(steps, n, 2, generator=gen)
    venv = make(n, steps=steps, action_mode=mode)
    venv.reset(seed=0, options={"x": x0, "noise": noise})
    vec_rewards = torch.zeros(n)
    for k in range(steps):
        obs, r, term, _, info = venv.step(actions[k])
        vec_rewards += r
    for i in range(n):
        env = gym.make("diffusiongym/GMM2D-v0", steps=steps, action_mode=mode).unwrapped
        env.reset(options={"x": x0[i].numpy(), "noise": noise[:, i].numpy()})
        total = 0.0
        for k in range(steps):
            obs_i, r, done, _, info_i = env.step(actions[k, i].numpy())
            total += r
        np.testing.assert_allclose(obs_i["x"], obs["x"][i].numpy(), rtol=1e-5, atol=1e-5)
        assert total == pytest.approx(float(vec_rewards[i]), rel=1e-5, abs=1e-5)
        assert info_i["reward"] == pytest.approx(float(info["reward"][i]), rel=1e-5, abs=1e-6)


def test_next_step_autoreset_ignores_action_and_keeps_final_observation():
    env = make(steps=2)
    env.reset(seed=1)
    env.step(torch.zeros(4, 2))
    obs, reward, term, _, info = env.step(torch.zeros(4, 2))
    assert term.all()
    assert torch.equal(obs["x"], info["final_x"]) and torch.all(obs["t"] == 1.0)
    final = obs["x"].clone()
    with pytest.raises(ValueError, match="action: expected finite"):  # validated even though ignored
        env.step(torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"action: expected shape"):
        env.step(torch.zeros(4, 3))
    obs, reward, term, trunc, info = env.step(torch.full((4, 2), 0.7))  # ignored
    assert not term.any() and not trunc.any() and torch.all(reward == 0) and info == {}
    assert torch.allclose(obs["t"], torch.full((4, 1), 1e-3))
    assert not torch.equal(obs["x"], final)
    obs, *_ = env.step(torch.zeros(4, 2))
    assert torch.allclose(obs["t"], torch.full((4, 1), 1e-3 + (1 - 1e-3) / 2))


def test_observations_are_copies():
    env, twin = make(), make()
    obs, _ = env.reset(seed=0)
    twin.reset(seed=0)
    obs["x"].add_(100.0)
    obs["t"].add_(1.0)
    assert torch.equal(env.step(torch.zeros(4, 2))[0]["x"], twin.step(torch.zeros(4, 2))[0]["x"])


def test_bad_actions_raise():
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action: expected shape \(4, 2\), got \(4, 3\)"):
        env.step(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="action: expected dtype torch.float32"):
        env.step(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="action: expected finite"):
        env.step(torch.full((4, 2), float("inf")))
    with pytest.raises(ValueError, match="action: expected a tensor on cpu, got meta"):
        env.step(torch.zeros(4, 2, device="meta"))
    with pytest.raises(ValueError, match="action: expected dtype torch.float32.*got numpy float64"):
        env.step(np.zeros((4, 2)))  # never cast silently
    with pytest.raises(TypeError, match="action: expected a torch.Tensor or numpy.ndarray"):
        env.step([[0.0, 0.0]] * 4)
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"x0": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="num_envs"):
        make(0)


def test_numpy_and_torch_actions_give_the_same_step():
    """One rule: a numpy array of the env's dtype is accepted (wrapped without a copy) and acts like the tensor."""
    a, b = make(), make()
    a.reset(seed=2)
    b.reset(seed=2)
    act = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
    ra, rb = a.step(act), b.step(torch.from_numpy(act.copy()))
    assert torch.equal(ra[0]["x"], rb[0]["x"]) and torch.equal(ra[1], rb[1])
    read_only = act.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy would warn on a read-only array
        a.step(read_only)
    wrapped = to_action_tensor("action", act, torch.float32, torch.device("cpu"))
    assert wrapped.data_ptr() == act.ctypes.data  # no copy on the CPU


def test_numpy_boundary_wrapper():
    env = dg.NumpyVectorEnv(make())
    obs, _ = env.reset(seed=0)
    assert isinstance(obs["x"], np.ndarray) and obs["x"].shape == (4, 2)
    for _ in range(5):
        obs, r, term, trunc, info = env.step(np.zeros((4, 2)))
    assert isinstance(r, np.ndarray) and term.all() and isinstance(info["reward"], np.ndarray)
    with pytest.raises(ValueError, match="actions: expected a floating-point"):
        env.step(np.zeros((4, 2), dtype=np.int64))


def test_cleanrl_style_loop_learns_a_control():
    """A minimal CleanRL-style REINFORCE loop on the torch vector env: Gaussian policy,
    batch-normalised returns as advantages, terminal reward rises."""
    torch.manual_seed(0)
    env = make(n=512, steps=10)
    policy = TimeMLP(2, 2, hidden=32, layers=2, zero_init=True)
    log_std = torch.nn.Parameter(torch.full((2,), -1.0))
    opt = torch.optim.Adam([*policy.parameters(), log_std], lr=3e-3)
    history = []
    for it in range(25):
        obs, _ = env.reset(seed=it)
        logps, rewards = [], torch.zeros(512)
        for _ in range(10):
            mean = policy(obs["x"], obs["t"][:, 0])
            dist = torch.distributions.Normal(mean, log_std.exp())
            action = dist.sample()
            logps.append(dist.log_prob(action).sum(1))
            obs, r, term, _, info = env.step(action)
            rewards += r
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        loss = -(torch.stack(logps).sum(0) * adv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(info["reward"].mean()))
    # terminal reward mean over the first vs last 5 iterations: measured -4.4 -> -2.9
    assert np.mean(history[-5:]) > np.mean(history[:5]) + 0.5


def test_oracle_control_through_vector_env_matches_engine():
    env = make(n=2000, steps=50)
    agent = ControlAgent(env.oracle.control(), env)
    obs, _ = env.reset(seed=0)
    total = torch.zeros(2000)
    for _ in range(50):
        obs, r, term, _, info = env.step(agent(obs))
        total += r
    task = env.unwrapped.task
    traj = dg.sample(
        task.environment,
        2000,
        steps=50,
        control=task.oracle.control(),
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=1,
    )
    se = float(total.std() + traj.objective.std()) / np.sqrt(2000)
    assert abs(float(total.mean()) - float(traj.objective.mean())) < 4 * se


def test_one_model_call_per_step_and_no_autograd_graph():
    """An agent reading ``sim.base_output()`` shares the env's model call; a trainable model's
    graph never reaches the observations (the env's dynamics are not differentiated through)."""
    task = dg.make_task("GMM2D-v0")
    calls = []
    model = dg.ResidualModel(task.environment.model, TimeMLP(2, 2, hidden=8, layers=1))

    def counted(x, t, **cond):
        calls.append(1)
        return model(x, t, **cond)

    counted.sample_shape = (2,)
    env = dg.make_env(dg.VelocityEnvironment(counted), task.reward, steps=3, num_envs=4)
    env.reset(seed=0)
    for _ in range(3):
        first = env.sim.base_output()
        assert env.sim.base_output() is first
        obs, reward, *_ = env.step(torch.zeros(4, 2))
        assert obs["x"].grad_fn is None and reward.grad_fn is None
    assert len(calls) == 3

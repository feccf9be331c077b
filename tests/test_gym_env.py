"""Single numpy env: Gymnasium's checker, episode semantics, errors, pickling, SB3."""

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import diffusiongym as dg
from diffusiongym.policies.agent import ControlAgent

# TextToImage-v0 needs a user pipeline folder (tests/test_text_to_image.py makes it on tiny components)
IDS = sorted(
    env_id for env_id in gym.registry if env_id.startswith("diffusiongym/") and env_id != "diffusiongym/TextToImage-v0"
)
ALLOWED = {"A Box observation space minimum value is -infinity", "A Box observation space maximum value is infinity"}
# several tests use 2-4 steps on purpose (episode semantics, not sample quality)
pytestmark = pytest.mark.filterwarnings("ignore:steps=.*stiff:RuntimeWarning")


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_passes_with_only_the_unbounded_state_warnings(env_id):
    env = gym.make(env_id, steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    messages = {str(w.message) for w in caught}
    unexpected = [m for m in messages if not any(a in m for a in ALLOWED)]
    assert not unexpected, unexpected


@pytest.mark.parametrize("mode", ["control", "drift", "model"])
def test_return_is_reward_minus_kl_exactly(mode):
    """Sum of step rewards == lambda r(x1) - sum 1/2 |u|^2 h, with u recomputed independently."""
    env = gym.make("diffusiongym/GMM2D-v0", steps=8, action_mode=mode).unwrapped
    task, sim = env.task, env.sim
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    total, kl = 0.0, 0.0
    for k in range(8):
        a = rng.uniform(-1, 1, size=2).astype(np.float32)
        x = torch.as_tensor(obs["x"])[None]
        t = float(sim.schedule.t[k])
        assert obs["t"][0] == pytest.approx(t, abs=1e-6)
        b = task.environment.drift(x, t)
        sigma = float(task.environment.sigma(t))
        h = sim.schedule.h[k]
        phys = torch.as_tensor(a)[None] * env.action_scale
        if mode == "control":
            u = phys
        elif mode == "drift":
            u = (phys - b) / sigma
        else:
            u = (task.environment.convert(phys, x, t, "drift") - b) / sigma
        kl += float(0.5 * h * (u**2).sum())
        obs, r, terminated, truncated, info = env.step(a)
        total += r
        assert truncated is False and terminated == (k == 7)
    x1 = torch.as_tensor(info["final_x"])[None]
    assert info["reward"] == pytest.approx(float(task.reward(x1)[0]), rel=1e-5)
    assert total == pytest.approx(task.reward_scale * info["reward"] - kl, rel=1e-4, abs=1e-4)
    assert info["valid"] and info["kl_defined"]
    np.testing.assert_allclose(obs["x"], info["final_x"])
    assert obs["t"][0] == 1.0


def test_ode_drift_mode_has_no_kl_and_control_mode_is_refused():
    env = gym.make("diffusiongym/GMM1D-v0", steps=3, noise="ode", action_mode="drift").unwrapped
    env.reset(seed=0)
    rewards = [env.step(np.zeros(1, np.float32))[1] for _ in range(2)]
    assert rewards == [0.0, 0.0]
    *_, info = env.step(np.zeros(1, np.float32))
    assert info["kl_defined"] is False
    with pytest.raises(ValueError, match="action_mode"):
        gym.make("diffusiongym/GMM1D-v0", noise="ode")


def test_bad_actions_and_finished_episodes_raise():
    env = gym.make("diffusiongym/GMM2D-v0", steps=2).unwrapped
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(np.zeros(2, np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action: expected shape \(2,\), got \(3,\)"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="action: expected a floating-point"):
        env.step(np.zeros(2, np.int64))
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="action: expected finite"):
            env.step(np.array([0.0, bad], np.float32))
    env.step(np.zeros(2, np.float32))
    env.step(np.zeros(2, np.float32))
    with pytest.raises(ResetNeeded, match="terminated"):
        env.step(np.zeros(2, np.float32))


def test_out_of_box_actions_are_applied_not_clipped():
    env = gym.make("diffusiongym/GMM1D-v0", steps=2).unwrapped
    env.reset(seed=0)
    _, r_big, *_ = env.step(np.array([3.0], np.float32))
    h = env.sim.schedule.h[0]
    assert r_big == pytest.approx(-0.5 * h * (3.0 * env.action_scale) ** 2, rel=1e-6)


def test_unknown_ids_and_kwargs_are_clear():
    with pytest.raises(gym.error.NameNotFound, match="Did you mean: `GMM2D`"):
        gym.make("diffusiongym/GMM3D-v0")
    with pytest.raises(ValueError, match="Did you mean 'GMM2D-v0'"):
        dg.make_task("GMM2d-v0")
    with pytest.raises(TypeError, match="Did you mean 'steps'"):
        gym.make("diffusiongym/GMM1D-v0", stpes=3)
    with pytest.raises(ValueError, match="parameterization"):
        gym.make("diffusiongym/GMM1D-v0", parameterization="velocty")
    with pytest.raises(ValueError, match="Did you mean 'bump'"):
        gym.make("diffusiongym/GMM1D-v0", reward="bmp")
    with pytest.raises(ValueError, match="steps"):
        gym.make("diffusiongym/GMM1D-v0", steps=0)
    with pytest.raises(ValueError, match="action_scale"):
        gym.make("diffusiongym/GMM1D-v0", action_scale=-1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"parameterization": "score", "scheduler": "cosine"},
        {"reward": "linear", "reward_scale": 0.5},
        {"dtype": "float64"},
    ],
)
def test_kwargs_reach_the_task(kwargs):
    env = gym.make("diffusiongym/GMM2D-v0", steps=3, **kwargs).unwrapped
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    if "parameterization" in kwargs:
        assert isinstance(env.task.environment, dg.ScoreEnvironment)
    if "reward" in kwargs:
        assert isinstance(env.task.reward, dg.LinearReward) and env.task.reward_scale == 0.5


def test_reward_object_and_user_factory_and_registration():
    reward = dg.CallableReward(lambda x: -x.abs().sum(1), differentiable=True)
    env = gym.make("diffusiongym/GMM1D-v0", steps=3, reward=reward).unwrapped
    assert env.task.reward is reward and env.oracle is None
    model = dg.GaussianMixtureModel(dg.gmm_preset("1d"), "linear", "epsilon")
    mine = dg.make_env(model, reward, parameterization="epsilon", steps=5)
    check_env(mine) if False else mine.reset(seed=0)
    assert isinstance(mine, dg.DiffusionEnv)
    venv = dg.make_env(dg.EpsilonEnvironment(model), reward, steps=5, num_envs=3)
    assert isinstance(venv, dg.DiffusionVectorEnv)
    env_id = dg.register_env("MyGMM-v0", lambda **kw: dg.make_task("GMM1D-v0", reward=reward, **kw))
    assert env_id == "diffusiongym/MyGMM-v0"
    gym.make(env_id, steps=2).reset(seed=0)
    with pytest.raises(ValueError, match="parameterization: required"):
        dg.make_env(model, reward)


def test_pickle_and_async_vector_env():
    env = gym.make("diffusiongym/GMM1D-v0", steps=3)
    clone = pickle.loads(pickle.dumps(env.unwrapped))
    a, _ = env.unwrapped.reset(seed=5)
    b, _ = clone.reset(seed=5)
    np.testing.assert_array_equal(a["x"], b["x"])
    sync = gym.make_vec("diffusiongym/GMM1D-v0", num_envs=2, vectorization_mode="sync", steps=3)
    obs, _ = sync.reset(seed=0)
    assert obs["x"].shape == (2, 1)
    asyn = gym.vector.AsyncVectorEnv([lambda: gym.make("diffusiongym/GMM1D-v0", steps=3)] * 2)
    try:
        obs, _ = asyn.reset(seed=0)
        for _ in range(3):
            obs, r, term, trunc, info = asyn.step(np.zeros((2, 1), np.float32))
        assert term.all() and r.shape == (2,)
    finally:
        asyn.close()


def test_oracle_agent_on_single_env_beats_base():
    """The exact control, acting through ControlAgent, earns a higher return than zero actions."""
    env = gym.make("diffusiongym/GMM1D-v0", steps=20).unwrapped
    agent = ControlAgent(env.oracle.control(), env)

    def run(policy, episodes=150):
        returns = []
        for i in range(episodes):
            obs, _ = env.reset(seed=i)
            total, done = 0.0, False
            while not done:
                obs, r, done, _, _ = env.step(policy(obs))
                total += r
            returns.append(total)
        return np.array(returns)

    # same seeds -> same initial states and Brownian increments: a paired comparison
    diff = run(agent) - run(lambda o: np.zeros(1, np.float32))
    # exact gap is 1.09 nats (less at 20 Euler steps); require 4 paired standard errors
    assert diff.mean() > 4 * diff.std() / np.sqrt(len(diff))
    assert diff.mean() > 0.4


@pytest.mark.slow
def test_stable_baselines3_ppo_raises_terminal_reward():
    from stable_baselines3 import PPO

    env = gym.make("diffusiongym/GMM1D-v0", steps=10)

    def evaluate(policy, n=4000):
        venv = dg.NumpyVectorEnv(
            gym.make_vec("diffusiongym/GMM1D-v0", num_envs=n, vectorization_mode="vector_entry_point", steps=10)
        )
        obs, _ = venv.reset(seed=123)
        done = False
        while not done:
            obs, _, term, _, info = venv.step(policy(obs))
            done = term.all()
        return info["reward"].mean(), info["reward"].std() / np.sqrt(n)

    base, se = evaluate(lambda o: np.zeros_like(o["x"]))
    model = PPO(
        "MultiInputPolicy",
        env,
        n_steps=500,
        batch_size=100,
        learning_rate=1e-3,
        gamma=1.0,
        policy_kwargs={"log_std_init": -1.0},
        seed=0,
        device="cpu",
    )
    model.learn(4000)
    trained, se2 = evaluate(lambda o: model.predict(o, deterministic=True)[0])
    # measured: base -1.93, PPO -1.61 (se 0.025 each); require 6 standard errors
    assert trained > base + 6 * (se + se2)

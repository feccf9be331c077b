"""Real Gymnasium clients on every registered id: spec JSON, rendering and RecordVideo, vector info
conventions, flat observations, stable-baselines3 (PPO, SAC), a CleanRL-style SAC loop, TorchRL."""

import importlib.util
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils.env_checker import check_env

import diffusiongym as dg

# TextToImage-v0 needs a user pipeline folder (tests/test_text_to_image.py makes it on tiny components)
IDS = sorted(
    env_id for env_id in gym.registry if env_id.startswith("diffusiongym/") and env_id != "diffusiongym/TextToImage-v0"
)
BUILTIN = [
    "diffusiongym/GMM1D-v0",
    "diffusiongym/GMM2D-v0",
    "diffusiongym/Digits-v0",
    "diffusiongym/DiscreteGrid-v0",
    "diffusiongym/DiscreteDigits-v0",
]
STEPS = 5  # >= MIN_STABLE_STEPS: no stiff-grid warning


def test_every_builtin_id_is_registered():
    assert set(BUILTIN) <= set(IDS)


@pytest.mark.parametrize("env_id", IDS)
def test_spec_json_round_trips_and_makes_the_env(env_id):
    spec = gym.spec(env_id)
    assert isinstance(spec.entry_point, str) and isinstance(spec.vector_entry_point, str)
    text = spec.to_json()
    again = EnvSpec.from_json(text)
    assert again == spec and json.loads(again.to_json()) == json.loads(text)
    env = gym.make(again, steps=STEPS)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert EnvSpec.from_json(env.spec.to_json()).kwargs["steps"] == STEPS  # the made env's spec too


@pytest.mark.parametrize("env_id", IDS)
def test_render_modes_none_and_rgb_array(env_id):
    env = gym.make(env_id, steps=STEPS, render_mode=None)
    assert env.render_mode is None
    env = gym.make(env_id, steps=STEPS, render_mode="rgb_array")
    meta = env.unwrapped.metadata
    assert meta["render_modes"] == ["rgb_array"] and meta["render_fps"] > 0
    env.reset(seed=0)
    frames = [env.render()]
    for _ in range(STEPS):
        env.step(env.action_space.sample())
        frames.append(env.render())
    for frame in frames:
        assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
        assert frame.shape[0] >= 64 and frame.shape[1] >= 64
    assert frames[0].shape == frames[-1].shape
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])  # the state moves
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum) value is -?infinity")
        check_env(gym.make(env_id, steps=STEPS, render_mode="rgb_array").unwrapped)  # Gymnasium's render checks
    venv = gym.make_vec(
        env_id, num_envs=2, vectorization_mode="vector_entry_point", steps=STEPS, render_mode="rgb_array"
    )
    venv.reset(seed=0)
    vframes = venv.render()
    assert len(vframes) == 2 and vframes[0].shape == frames[0].shape and vframes[0].dtype == np.uint8
    with (
        pytest.raises(ValueError, match="render_mode"),
        pytest.warns(UserWarning, match="not in the possible render_modes"),
    ):
        gym.make(env_id, render_mode="human_typo")


def test_rendered_frames_show_the_state():
    # image task: the frame is the image itself, x = -1 white background ... 1 full ink, 8x enlarged
    env = gym.make("diffusiongym/Digits-v0", steps=STEPS, render_mode="rgb_array").unwrapped
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    env.reset(seed=0, options={"x": x})
    frame = env.render()
    assert frame.shape == (64, 64, 3)
    np.testing.assert_array_equal(frame[::8, ::8, 0], np.round((x[0] + 1) * 127.5).astype(np.uint8))
    # 2-D task: a red marker at the state, over the base density (darker on the ring's modes)
    env = gym.make("diffusiongym/GMM2D-v0", steps=STEPS, render_mode="rgb_array").unwrapped
    env.reset(seed=0, options={"x": np.array([2.0, -1.0], np.float32)})
    frame = env.render()
    red = np.argwhere((frame[..., 0] > 200) & (frame[..., 1] < 60))
    col, row = red.mean(0)[::-1]
    # pixel centres: column (x + 4) / 8 * 127, row 127 - (y + 4) / 8 * 127
    assert abs(col - 6 / 8 * 127) <= 1 and abs(row - (127 - 3 / 8 * 127)) <= 1
    # discrete digits: the 8 x 8 token grid, all masked (red) at reset
    env = gym.make("diffusiongym/DiscreteDigits-v0", render_mode="rgb_array").unwrapped
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and (frame[..., 0] == 220).all()


def test_record_video_writes_an_mp4(tmp_path):
    pytest.importorskip("moviepy")
    env = gym.make("diffusiongym/GMM2D-v0", steps=STEPS, render_mode="rgb_array")
    env = gym.wrappers.RecordVideo(env, str(tmp_path / "videos"), episode_trigger=lambda i: True, disable_logger=True)
    for episode in range(2):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, done, _, _ = env.step(env.action_space.sample())
    env.close()
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 0 for v in videos)


@pytest.mark.parametrize("env_id", ["diffusiongym/DiscreteDigits-v0", "diffusiongym/Digits-v0"])
def test_render_collection_gathers_one_frame_per_step(env_id):
    env = gym.wrappers.RenderCollection(gym.make(env_id, steps=STEPS, render_mode="rgb_array"))
    env.reset(seed=0)
    for _ in range(STEPS):
        env.step(env.action_space.sample())
    frames = env.render()
    assert len(frames) == STEPS + 1 and all(f.dtype == np.uint8 for f in frames)


# ------------------------------------------------------------------------------------------ vector
def _vector_conformance(env, steps):
    """What Gymnasium's vector API promises (it ships no checker for custom vector envs)."""
    assert env.metadata["autoreset_mode"] is gym.vector.AutoresetMode.NEXT_STEP
    n = env.num_envs
    obs, info = env.reset(seed=0)

    def as_np(o):
        return {k: v.cpu().numpy() for k, v in o.items()}

    assert env.observation_space.contains(as_np(obs)) and info == {}
    for k in range(steps + 1):
        action = torch.as_tensor(env.action_space.sample())
        obs, reward, term, trunc, info = env.step(action)
        assert env.observation_space.contains(as_np(obs))
        assert reward.shape == term.shape == trunc.shape == (n,) and term.dtype == trunc.dtype == torch.bool
        assert not trunc.any() and bool(term.all()) == (k == steps - 1) and not (k == steps and term.any())
        for key, value in info.items():
            if key.startswith("_"):
                continue
            mask = info[f"_{key}"]
            assert mask.dtype == torch.bool and mask.shape == (n,)
            assert value.shape[0] == n
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key  # no NaN placeholders
        if k == steps - 1:
            assert {"reward", "valid"} <= set(info) and info["_reward"].all()
        if k == steps:  # the autoreset step: first observation, zero reward
            assert torch.all(reward == 0) and "reward" not in info


@pytest.mark.parametrize("env_id", IDS)
def test_vector_env_conformance_and_dict_info_to_list(env_id):
    venv = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point", steps=STEPS)
    _vector_conformance(venv, STEPS)
    wrapped = gym.wrappers.vector.DictInfoToList(dg.NumpyVectorEnv(venv))
    wrapped.reset(seed=1)
    for _ in range(STEPS):
        _, _, term, _, infos = wrapped.step(wrapped.action_space.sample())
    assert term.all() and isinstance(infos, list) and len(infos) == 3
    for info in infos:
        assert np.isfinite(info["reward"]) and isinstance(info["reward"], (float, np.floating))
        assert not any(k.startswith("_") for k in info)
    if "kl_defined" in infos[0]:
        assert all(bool(i["kl_defined"]) for i in infos)


def test_kl_defined_is_per_env_with_a_mask():
    venv = gym.make_vec(
        "diffusiongym/GMM1D-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        steps=STEPS,
        noise="ode",
        action_mode="drift",
    )
    venv.reset(seed=0)
    for _ in range(STEPS):
        *_, info = venv.step(torch.zeros(2, 1))
    assert info["kl_defined"].tolist() == [False, False] and info["_kl_defined"].all()


# ------------------------------------------------------------------------------- flat observations
@pytest.mark.parametrize("env_id", IDS)
def test_flat_obs_matches_flatten_observation(env_id):
    flat = gym.make(env_id, steps=STEPS, flat_obs=True)
    recipe = gym.wrappers.FlattenObservation(gym.make(env_id, steps=STEPS))
    space = flat.observation_space
    assert (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.float32
        and space.shape == recipe.observation_space.shape
    )
    a, _ = flat.reset(seed=4)
    b, _ = recipe.reset(seed=4)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    action = flat.action_space.sample()
    a, *_ = flat.step(action)
    b, *_ = recipe.step(action)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert space.contains(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum) value is -?infinity")
        check_env(gym.make(env_id, steps=STEPS, flat_obs=True).unwrapped)


def test_flat_obs_layout_follows_the_sorted_dict_keys():
    env = gym.make("diffusiongym/Digits-v0", steps=STEPS, flat_obs=True)
    x = np.full((1, 8, 8), 0.25, np.float32)
    obs, _ = env.reset(seed=0, options={"x": x, "label": 7})
    assert obs.shape == (10 + 1 + 64,)  # Gymnasium's Dict sorts its keys: label, t, x
    np.testing.assert_array_equal(obs[:10], np.eye(10, dtype=np.float32)[7])
    assert obs[10] == pytest.approx(0.01)  # t_start of Digits-v0
    np.testing.assert_array_equal(obs[11:], 0.25)


def test_stable_baselines3_sac_on_flat_observations():
    sb3 = pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("diffusiongym/GMM1D-v0", steps=10, flat_obs=True)
    sb3_check_env(env.unwrapped, warn=False)
    model = sb3.SAC(
        "MlpPolicy", env, learning_starts=50, batch_size=32, seed=0, device="cpu", policy_kwargs={"net_arch": [32, 32]}
    )
    model.learn(300)
    assert model.num_timesteps == 300 and model.replay_buffer.observations.shape[-1] == 2
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(action)


def test_cleanrl_style_sac_loop_on_flat_observations():
    """The essential shape of CleanRL's sac_continuous_action.py on a SyncVectorEnv of flat-obs envs:
    tanh-squashed Gaussian actor rescaled to the box, twin soft Q networks with Polyak targets, automatic
    entropy tuning, a replay buffer, ``final_obs``-free next-step autoreset handling."""
    torch.manual_seed(0)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("diffusiongym/GMM1D-v0", steps=10, flat_obs=True)] * 2)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))
    low, high = torch.as_tensor(envs.single_action_space.low), torch.as_tensor(envs.single_action_space.high)
    scale, bias = (high - low) / 2, (high + low) / 2

    def mlp(i, o):
        return torch.nn.Sequential(torch.nn.Linear(i, 32), torch.nn.ReLU(), torch.nn.Linear(32, o))

    actor, q1, q2 = mlp(obs_dim, 2 * act_dim), mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    q1_t, q2_t = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)
    q1_t.load_state_dict(q1.state_dict())
    q2_t.load_state_dict(q2.state_dict())
    log_alpha = torch.zeros(1, requires_grad=True)
    q_opt = torch.optim.Adam([*q1.parameters(), *q2.parameters()], lr=1e-3)
    a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    al_opt = torch.optim.Adam([log_alpha], lr=1e-3)

    def act(o):
        mean, log_std = actor(o).chunk(2, -1)
        std = torch.tanh(log_std).add(1).mul(3.5).sub(5).exp()  # log_std in [-5, 2]
        dist = torch.distributions.Normal(mean, std)
        u = dist.rsample()
        y = torch.tanh(u)
        logp = (dist.log_prob(u) - torch.log(scale * (1 - y.pow(2)) + 1e-6)).sum(-1)
        return y * scale + bias, logp

    buffer = {k: [] for k in ("o", "a", "r", "o2", "d")}
    obs, _ = envs.reset(seed=0)
    autoreset = np.zeros(2, bool)
    losses = []
    for step in range(300):
        with torch.no_grad():
            action = act(torch.as_tensor(obs))[0].numpy() if step >= 50 else envs.action_space.sample()
        nxt, reward, term, trunc, _ = envs.step(action.astype(np.float32))
        for i in np.flatnonzero(~autoreset):  # next-step autoreset: skip the reset transition
            for key, value in zip(buffer, (obs[i], action[i], reward[i], nxt[i], term[i])):
                buffer[key].append(value)
        autoreset = term | trunc
        obs = nxt
        if step >= 50:
            idx = np.random.default_rng(step).integers(0, len(buffer["o"]), 32)
            o, a, r, o2, d = (torch.as_tensor(np.asarray(buffer[k])[idx], dtype=torch.float32) for k in buffer)
            with torch.no_grad():
                a2, logp2 = act(o2)
                q_next = (
                    torch.min(q1_t(torch.cat([o2, a2], 1)), q2_t(torch.cat([o2, a2], 1)))[:, 0]
                    - log_alpha.exp() * logp2
                )
                target = r + (1 - d) * q_next  # gamma = 1: the return is the objective
            q_loss = ((q1(torch.cat([o, a], 1))[:, 0] - target) ** 2).mean() + (
                (q2(torch.cat([o, a], 1))[:, 0] - target) ** 2
            ).mean()
            q_opt.zero_grad()
            q_loss.backward()
            q_opt.step()
            pi, logp = act(o)
            a_loss = (
                log_alpha.exp().detach() * logp - torch.min(q1(torch.cat([o, pi], 1)), q2(torch.cat([o, pi], 1)))[:, 0]
            ).mean()
            a_opt.zero_grad()
            a_loss.backward()
            a_opt.step()
            al_loss = (-log_alpha.exp() * (logp.detach() - act_dim)).mean()
            al_opt.zero_grad()
            al_loss.backward()
            al_opt.step()
            with torch.no_grad():
                for net, tgt in ((q1, q1_t), (q2, q2_t)):
                    for p, pt in zip(net.parameters(), tgt.parameters()):
                        pt.mul_(0.995).add_(0.005 * p)
            losses.append(float(q_loss.detach()))
    envs.close()
    assert len(buffer["o"]) == 2 * 300 - 2 * (300 // 11)  # one reset transition per finished episode skipped
    assert np.isfinite(losses).all() and len(losses) == 250
    assert all(len(o) == obs_dim for o in buffer["o"][:3])


# ------------------------------------------------------------------------------- stable-baselines3
@pytest.mark.parametrize("env_id", IDS)
def test_stable_baselines3_make_vec_env_and_ppo(env_id):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs={"steps": STEPS})
    assert venv.render_mode == "rgb_array"  # make_vec_env's default, no TypeError fallback needed
    model = PPO(
        "MultiInputPolicy",
        venv,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    )
    model.learn(32)
    assert model.num_timesteps >= 32
    frames = venv.get_images()
    assert len(frames) == 2 and frames[0].dtype == np.uint8
    venv.close()


def test_stable_baselines3_make_vec_env_rejects_a_typo_with_the_close_match():
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_util import make_vec_env

    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'.*Did you mean 'steps'"):
        make_vec_env("diffusiongym/GMM1D-v0", n_envs=1, env_kwargs={"stpes": 3})


# ----------------------------------------------------------------------------------------- TorchRL
HAS_TORCHRL = importlib.util.find_spec("torchrl") is not None


@pytest.mark.skipif(not HAS_TORCHRL, reason="torchrl not installed")
@pytest.mark.parametrize("env_id", IDS)
def test_torchrl_gym_env_check_env_specs(env_id):
    from torchrl.envs import GymEnv
    from torchrl.envs.utils import check_env_specs

    env = GymEnv(env_id, steps=STEPS)
    check_env_specs(env, seed=0)
    rollout = env.rollout(STEPS + 3, break_when_any_done=True)
    assert rollout.shape[0] == STEPS
    assert bool(rollout[-1]["next", "terminated"]) and not bool(rollout[0]["next", "terminated"])
    env.close()

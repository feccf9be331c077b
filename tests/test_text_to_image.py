"""Text-to-image latent environments against the stock diffusers pipelines (tiny random components).

Parity tolerances: the env's ``integrator="scheduler"`` rollout and the pipeline compute the same
float32 operations in a different order; measured max |difference| <= 2.4e-5 on final latents of
max |value| ~ 6-37 (<= 8e-7 relative) over every case below, so ``PARITY = 1e-5`` relative leaves a
factor >10. The negative controls (wrong sign, missing scaling, wrong CFG) give >= 5e-2 relative.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import diffusers

import gymnasium as gym
import numpy as np
import pytest
import torch
import tiny_text_to_image as T
from gymnasium.utils.env_checker import check_env

from diffusiongym import sample
from diffusiongym.envs.simulator import DiffusionSimulator
from diffusiongym.rewards import BrightnessReward
from diffusiongym.tasks import make_task
from diffusiongym.timegrid import make_time_grid
from diffusiongym.text_to_image import DecodedReward, PromptSet, generate, load_components, text_to_image_environment

# diffusers' EulerDiscreteScheduler.set_timesteps converts a tensor with np.array (its own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PARITY = 1e-5  # relative (see the module docstring)
GAP = 5e-2  # a convention error is at least this far off (measured >= 0.1)
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(autouse=True)
def _rng_guard():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (stock pipeline, saved folder), built once."""
    root = tmp_path_factory.mktemp("pipelines")
    cache = {}

    def get(name):
        if name not in cache:
            family, sched, pred, *spacing = name.split("-")
            extra = {"timestep_spacing": spacing[0]} if spacing else {}
            if family == "sd":
                pipe = T.sd_pipeline(root / "vocab", sched, pred, **extra)
            else:
                pipe = T.sdxl_pipeline(root / "vocab", sched, pred)
            cache[name] = (pipe, T.save(pipe, root / name))
        return cache[name]

    return get


def _stock(pipe, steps, g, z, **kwargs):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, latents=z.clone(), output_type="latent", **kwargs)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_loader_reads_the_saved_folder(saved):
    pipe, folder = saved("sd-ddim-epsilon")
    comp = load_components(folder)
    assert comp.family == "sd" and comp.source == str(folder)
    assert type(comp.denoiser).__name__ == "UNet2DConditionModel" and type(comp.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(comp.denoiser.conv_out.weight, pipe.unet.conv_out.weight)
    assert torch.equal(
        comp.parts["text_encoder"].get_input_embeddings().weight, pipe.text_encoder.get_input_embeddings().weight
    )
    assert comp.latent_shape == (4, 8, 8) and comp.vae_scale_factor == 2
    half = load_components(folder, dtype=torch.bfloat16)
    assert half.denoiser.dtype == torch.bfloat16 and half.parts["text_encoder"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, g",
    [
        ("sd-ddim-epsilon", 1.0),
        ("sd-ddim-epsilon", 3.0),
        ("sd-ddim-v_prediction", 1.0),
        ("sd-ddim-v_prediction", 3.0),
        ("sd-euler-epsilon", 1.0),
        ("sd-euler-epsilon", 3.0),
        ("sd-euler-v_prediction", 3.0),
        ("xl-euler-epsilon", 1.0),
        ("xl-euler-epsilon", 3.0),
        ("xl-ddim-v_prediction", 3.0),
    ],
)
def test_scheduler_integrator_reproduces_the_stock_pipeline(saved, z, name, g):
    pipe, folder = saved(name)
    steps = 6
    ref = _stock(pipe, steps, g, z).images
    env = text_to_image_environment(folder, PROMPTS, guidance_scale=g, integrator="scheduler", steps=steps)
    out = generate(env, PROMPTS, z).x1
    assert _rel(out, ref) < PARITY
    assert float(ref.abs().max()) > 1.0  # a non-trivial output (the rollout moved)


def test_negative_controls_leave_an_order_one_gap(saved, z, monkeypatch):
    pipe, folder = saved("sd-ddim-v_prediction")
    ref = _stock(pipe, 6, 3.0, z).images
    env = text_to_image_environment(folder, PROMPTS, guidance_scale=3.0, integrator="scheduler", steps=6)
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    model = env.model
    with monkeypatch.context() as m:  # wrong sign in the v -> eps conversion
        alpha, beta = model.scheduler.alpha, model.scheduler.beta
        m.setattr(
            model,
            "to_parameterization",
            lambda out, x, t: (
                beta(t.double()).float()[:, None, None, None] * x - alpha(t.double()).float()[:, None, None, None] * out
            ),
        )
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP
    with monkeypatch.context() as m:  # guidance pushed from the text branch: out_text + g (out_text - out_uncond)
        m.setattr(model, "guide", lambda u, c, g: c + g * (c - u))
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP
    # per-sample guidance: a tensor of 3s is the scalar; g = 1 on one row is the unguided rollout
    assert _rel(generate(env, PROMPTS, z, guidance_scale=torch.tensor([3.0, 3.0])).x1, ref) < PARITY
    mixed = generate(env, PROMPTS, z, guidance_scale=torch.tensor([1.0, 3.0])).x1
    unguided = generate(env, PROMPTS, z, guidance_scale=1.0).x1
    assert _rel(mixed[0], unguided[0]) < PARITY and _rel(mixed[1], ref[1]) < PARITY
    # Euler-type scheduler without its input scaling x_e / sqrt(sigma^2 + 1): O(1) off
    pipe_e, folder_e = saved("sd-euler-epsilon")
    ref_e = _stock(pipe_e, 6, 3.0, z).images
    env_e = text_to_image_environment(folder_e, PROMPTS, guidance_scale=3.0, integrator="scheduler", steps=6)
    assert _rel(generate(env_e, PROMPTS, z).x1, ref_e) < PARITY
    unscaled = z * pipe_e.scheduler.init_noise_sigma
    idx = torch.arange(2)
    wrong = sample(env_e, x=unscaled, grid=env_e.step_grid.times, cond={"prompt": idx}).x1
    assert _rel(wrong, ref_e) > GAP


def test_euler_in_t_differs_from_ddim_by_order_h(saved, z):
    """Same grid (DDIM trailing: t = 0.8008 is a grid point for 5, 10 and 20 steps), Euler in t vs the
    scheduler's update: the gap at t = 0.8 halves with the step (measured ratios 2.08, 2.03), and the
    final gap shrinks too (slower: beta(t) is stiff near the data end, d log beta / dt ~ 500 at t = 1)."""
    pipe, folder = saved("sd-ddim-v_prediction-trailing")
    mids, finals = [], []
    for n in (5, 10, 20):
        caught: dict[int, torch.Tensor] = {}

        def keep(p, i, t, kwargs, caught=caught):
            caught[i] = kwargs["latents"].clone()
            return kwargs

        ref = _stock(pipe, n, 3.0, z, callback_on_step_end=keep).images
        k = 4 * n // 5
        env = text_to_image_environment(folder, PROMPTS, guidance_scale=3.0, integrator="scheduler", steps=n)
        assert abs(float(env.step_grid.times[k]) - 800 / 999) < 1e-12
        euler = text_to_image_environment(env.components, PROMPTS, guidance_scale=3.0)
        traj = generate(euler, PROMPTS, z, grid=env.step_grid.times, store="states")
        ours = generate(env, PROMPTS, z, store="states")
        assert _rel(ours.states[k], caught[k - 1]) < PARITY
        mids.append(float((traj.states[k] - caught[k - 1]).norm() / caught[k - 1].norm()))
        finals.append(float((traj.x1 - ref).norm() / ref.norm()))
    assert mids[0] > GAP  # not a float-level difference: a different discretisation
    for coarse, fine in zip(mids, mids[1:]):
        assert 1.8 < coarse / fine < 2.3  # first order (measured 2.08, 2.03)
    assert finals[0] > finals[1] > finals[2]


def test_decoding_matches_the_vae(saved, z):
    pipe, folder = saved("sd-ddim-epsilon")
    env = text_to_image_environment(folder, PROMPTS, decode_chunk_size=1)
    with torch.no_grad():
        expected = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    images = env.decode(z)
    assert images.shape == (2, 3, 16, 16) and not images.requires_grad
    assert _rel(images, expected) < PARITY
    reward = DecodedReward(BrightnessReward(tolerance=float("inf")), env.decoder)
    zg = z.clone().requires_grad_(True)
    values, valid = reward(zg)
    assert valid.all() and torch.allclose(values, BrightnessReward()(expected)[0], atol=1e-6)
    (grad,) = torch.autograd.grad(values.sum(), zg)
    assert grad.abs().sum() > 0


def test_gym_env_passes_check_env_and_takes_a_prompt_at_reset(saved):
    _, folder = saved("sd-ddim-epsilon")
    kwargs = dict(pipeline=folder, prompts=PROMPTS, reward=BrightnessReward(), guidance_scale=3.0, steps=5)
    env = gym.make("diffusiongym/TextToImage-v0", render_mode="rgb_array", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    allowed = (
        "A Box observation space minimum value is -infinity",
        "A Box observation space maximum value is infinity",
    )
    assert not [str(w.message) for w in caught if not any(a in str(w.message) for a in allowed)]
    obs, _ = env.reset(seed=1, options={"prompt": "a red cube"})
    base = env.unwrapped
    assert base.prompt() == "a red cube" and obs["prompt"] == base.prompts.index("a red cube") == 2
    cache = base.task.environment.model.cache
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert terminated and np.isfinite(reward) and env.render().shape[2] == 3
    calls = cache.encode_calls
    env.reset(options={"prompt": 0})
    env.step(np.zeros(env.action_space.shape, np.float32))
    assert base.prompt() == "a cat" and cache.encode_calls == calls  # encoded once, then cached
    vec = gym.make_vec("diffusiongym/TextToImage-v0", num_envs=2, vectorization_mode="vector_entry_point", **kwargs)
    obs, _ = vec.reset(options={"prompt": ["a dog", "a blue ball"]})
    assert obs["prompt"].tolist() == [1, 2]


def test_gym_env_with_the_scheduler_integrator_reproduces_the_pipeline(saved, z):
    pipe, folder = saved("sd-euler-epsilon")
    ref = pipe(
        PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, latents=z[:1].clone(), output_type="latent"
    ).images
    env = gym.make(
        "diffusiongym/TextToImage-v0",
        pipeline=folder,
        prompts=PROMPTS,
        reward=BrightnessReward(),
        guidance_scale=3.0,
        steps=4,
        noise="ode",
        integrator="scheduler",
        action_mode="model",
    ).unwrapped
    x0 = (z[0] * env.task.environment.step_grid.init_scale).numpy()
    env.reset(options={"prompt": "a cat", "x": x0})
    for _ in range(4):
        action = (env.sim.base_output() / env.action_scale)[0].numpy()
        obs, _, terminated, _, info = env.step(action)
    assert terminated and _rel(torch.as_tensor(info["final_x"]), ref[0]) < PARITY


def test_prompt_sets(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# comment\na cat\n\na dog\n")
    prompts = PromptSet(file, extra_slots=1)
    assert prompts.texts == ["a cat", "a dog"] and prompts.space.n == 3
    assert prompts.index("a new one") == 2
    with pytest.raises(ValueError, match="extra_slots"):
        prompts.index("one too many")
    gen = torch.Generator().manual_seed(0)
    assert set(prompts.sample(100, gen, "cpu").tolist()) == {0, 1}  # only the initial prompts are drawn
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PromptSet(tmp_path / "missing.txt")


def test_bad_inputs_name_what_is_wrong(saved, tmp_path):
    _, folder = saved("sd-ddim-epsilon")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_components(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_components(broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["vae"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="'vae'"):
        load_components(broken)
    (folder_index := json.loads((folder / "model_index.json").read_text()))["_class_name"] = "StableDiffusion3Pipeline"
    mislabelled = tmp_path / "sd3"  # an SD folder labelled as SD3: the SD3 denoiser is missing
    shutil.copytree(folder, mislabelled)
    (mislabelled / "model_index.json").write_text(json.dumps(folder_index))
    with pytest.raises(FileNotFoundError, match="'transformer'"):
        load_components(mislabelled)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="safetensors"):
        load_components(pickled)
    with pytest.raises(TypeError, match=r"\['pipeline', 'reward'\]"):
        gym.make("diffusiongym/TextToImage-v0", prompts=PROMPTS)
    with pytest.raises(TypeError, match="guidence_scale"):
        gym.make(
            "diffusiongym/TextToImage-v0",
            pipeline=folder,
            prompts=PROMPTS,
            reward=BrightnessReward(),
            guidence_scale=3.0,
        )
    ddpm = saved("sd-ddpm-epsilon")[1]
    with pytest.raises(ValueError, match="DDPMScheduler"):
        text_to_image_environment(ddpm, PROMPTS, integrator="scheduler", steps=4)
    with pytest.raises(ValueError, match="steps"):
        text_to_image_environment(folder, PROMPTS, integrator="scheduler")
    env = text_to_image_environment(folder, PROMPTS, integrator="scheduler", steps=4)
    with pytest.raises(ValueError, match="own grid"):
        sample(env, x=torch.zeros(1, 4, 8, 8), steps=4, cond={"prompt": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(ValueError, match="prompt"):
        env.model(torch.zeros(1, 4, 8, 8), 0.5)


def test_default_grid_is_the_schedulers_for_every_vp_scheduler(saved, z):
    """The default time grid is the scheduler's ``t_k = 1 - tau_k / (T - 1)`` for the Euler integrator
    too (Gym env and ``generate``), a repeated PNDM timestep counted once; ``linspace`` spacing, which
    evaluates the model at ``t = 1``, is refused naming ``time_grid``."""
    pipe, folder = saved("sd-ddim-epsilon")
    kwargs = dict(pipeline=folder, prompts=PROMPTS, reward=BrightnessReward(), guidance_scale=3.0, steps=5)
    env = gym.make("diffusiongym/TextToImage-v0", **kwargs).unwrapped
    sched = pipe.scheduler
    sched.set_timesteps(5)
    expected = torch.cat([1 - sched.timesteps.double() / 999, torch.ones(1, dtype=torch.float64)])
    assert torch.equal(env.task.times, expected) and env.task.t_start == float(expected[0])
    assert env.sim.beta0 == 1.0  # DDIM's init_noise_sigma, as the pipeline draws its latents
    assert torch.equal(env.sim.times, expected.float())
    # generate's default Euler rollout runs on the same grid (stored states at t_k)
    base = text_to_image_environment(folder, PROMPTS, guidance_scale=3.0, steps=5)
    traj = generate(base, PROMPTS[:1], z[:1], store="states")
    assert torch.equal(traj.times, expected) and traj.x1.shape == (1, 4, 8, 8)
    uniform = gym.make("diffusiongym/TextToImage-v0", time_grid="uniform", **kwargs).unwrapped
    assert uniform.task.times is None and torch.equal(uniform.sim.times, torch.linspace(0, 1, 6))
    comp = load_components(folder)
    pndm_scheduler = diffusers.PNDMScheduler.from_config(comp.scheduler.config, skip_prk_steps=True)
    pndm = dataclasses.replace(comp, parts={**comp.parts, "scheduler": pndm_scheduler})
    grid = text_to_image_environment(pndm, PROMPTS, steps=4).time_points()
    assert torch.allclose(grid, torch.tensor([1 - 751 / 999, 1 - 501 / 999, 1 - 251 / 999, 1 - 1 / 999, 1.0]).double())
    euler_linspace = diffusers.EulerDiscreteScheduler.from_config(comp.scheduler.config, timestep_spacing="linspace")
    linspace = dataclasses.replace(comp, parts={**comp.parts, "scheduler": euler_linspace})
    with pytest.raises(ValueError, match="time_grid"):
        text_to_image_environment(linspace, PROMPTS, steps=4)
    assert text_to_image_environment(linspace, PROMPTS, steps=4, time_grid="uniform").step_grid is None


def test_gmm_tasks_keep_their_uniform_grid():
    task = make_task("GMM1D-v0")
    assert task.times is None and task.init_std is None
    sim = DiffusionSimulator(task, 2, steps=7)
    assert torch.equal(sim.schedule.times, make_time_grid(7, task.t_start))
    assert sim.beta0 == float(task.environment.scheduler.beta(torch.tensor(task.t_start, dtype=torch.float64)))


def test_bad_time_grids_name_the_argument(saved, z):
    _, folder = saved("sd-ddim-epsilon")
    task = make_task(
        "diffusiongym/TextToImage-v0", pipeline=folder, prompts=PROMPTS, reward=BrightnessReward(), steps=4
    )
    times = task.times
    for bad in (times[:-1], times.flip(0), torch.cat([times[:-1], torch.tensor([1.5], dtype=torch.float64)])):
        with pytest.raises(ValueError, match="times"):
            dataclasses.replace(task, times=bad)
    with pytest.raises(ValueError, match="times"):  # another step count with the grid of 4 steps
        dataclasses.replace(task, steps=5)
    with pytest.raises(ValueError, match="t_start"):
        dataclasses.replace(task, t_start=0.0)
    with pytest.raises(ValueError, match="init_std"):
        dataclasses.replace(task, init_std=-1.0)
    with pytest.raises(ValueError, match="steps"):
        DiffusionSimulator(task, 1, steps=6)
    with pytest.raises(ValueError, match="time_grid"):
        text_to_image_environment(folder, PROMPTS, steps=4, time_grid="shifted")
    with pytest.raises(ValueError, match="time_grid"):
        text_to_image_environment(folder, PROMPTS, steps=4, integrator="scheduler", time_grid="uniform")
    env = text_to_image_environment(folder, PROMPTS, steps=4)
    with pytest.raises(ValueError, match="t_start"):  # beyond the grid's second point
        env.time_points(t_start=0.9)
    assert float(env.time_points(t_start=0.3)[0]) == 0.3  # a later start replaces the first point
    with pytest.raises(ValueError, match="grid"):
        generate(env, PROMPTS, z, grid=env.time_points(), steps=4)

"""SD3 and FLUX latent environments against the stock diffusers pipelines (tiny random components).

Every pipeline is built from tiny configs of the real classes (``SD3Transformer2DModel``,
``FluxTransformer2DModel``, ``AutoencoderKL`` with a ``shift_factor``, CLIP and T5 encoders, CLIP and
T5 tokenizers from a local vocabulary), saved with ``save_pretrained`` and loaded through the public
loader. Parity tolerance: with ``integrator="scheduler"`` the env and the pipeline do the same float32
operations in a different order (the guided batch is one call here, two for FLUX's true CFG); measured
max |difference| / max |latent| <= 9.5e-7 over every case below (latents of max |value| 14-19), so
``PARITY = 1e-5`` leaves a factor > 10. The negative controls (wrong velocity sign, wrong timestep
scale, wrong CFG formula, wrong guidance embedding, unshifted grid, transposed packing) measured
>= 0.146 relative, so ``GAP = 5e-2``; a missing ``shift_factor`` moves every VAE input by exactly
``shift_factor``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import gymnasium as gym
import numpy as np
import pytest
import tiny_text_to_image as T
import torch
from gymnasium.utils.env_checker import check_env

from diffusiongym.rewards import BrightnessReward
from diffusiongym.text_to_image import generate, load_components, text_to_image_environment
from diffusiongym.text_to_image.flow_families import calculate_shift, pack_latents, unpack_latents

PARITY = 1e-5  # relative (see the module docstring)
GAP = 5e-2  # a convention error is at least this far off (measured >= 0.146)
PROMPTS = ["a cat", "a dog"]
STEPS = 5
SEQ = T.T5_MAX_LENGTH
SD3_OPTIONS = {"max_sequence_length": SEQ}
FLUX_OPTIONS = {"max_sequence_length": SEQ, "height": 16, "width": 16}
BUILDERS = {
    "sd3": lambda root: T.sd3_pipeline(root),
    "sd3-dynamic": lambda root: T.sd3_pipeline(root, dynamic=True),
    "sd3-no-t5": lambda root: T.sd3_pipeline(root, t5=False),
    "flux": lambda root: T.flux_pipeline(root),  # guidance-distilled, dynamic shift
    "flux-plain": lambda root: T.flux_pipeline(root, guidance_embeds=False, dynamic=False),  # shift 3
}


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
    root = tmp_path_factory.mktemp("flow_pipelines")
    cache = {}

    def get(name):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "text_encoder_3=None cannot be saved" for the no-T5 pipeline
                pipe = BUILDERS[name](root / "vocab")
                pipe.set_progress_bar_config(disable=True)
                cache[name] = (pipe, T.save(pipe, root / name))
        return cache[name]

    return get


def _stock_sd3(pipe, g, z, output_type="latent"):
    out = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=g,
        latents=z.clone(),
        output_type=output_type,
        max_sequence_length=SEQ,
    )
    return out.images


def _stock_flux(pipe, z, true_cfg=1.0, negative=None, guidance=3.5, output_type="latent"):
    out = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        true_cfg_scale=true_cfg,
        negative_prompt=negative,
        guidance_scale=guidance,
        latents=pack_latents(z),  # the pipeline takes packed latents
        output_type=output_type,
        max_sequence_length=SEQ,
        height=16,
        width=16,
    )
    return unpack_latents(out.images, 8, 8) if output_type == "latent" else out.images


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _sd3_env(folder, g, **kwargs):
    return text_to_image_environment(
        folder, PROMPTS, guidance_scale=g, integrator="scheduler", steps=STEPS, family_options=SD3_OPTIONS, **kwargs
    )


def _flux_env(folder, g=None, negative=None, **options):
    return text_to_image_environment(
        folder,
        PROMPTS,
        guidance_scale=g,
        negative_prompt=negative,
        integrator="scheduler",
        steps=STEPS,
        family_options={**FLUX_OPTIONS, **options},
    )


def test_loader_reads_sd3_and_flux_folders(saved):
    pipe, folder = saved("sd3")
    comp = load_components(folder)
    assert comp.family == "sd3" and type(comp.denoiser).__name__ == "SD3Transformer2DModel"
    assert type(comp.parts["text_encoder_3"]).__name__ == "T5EncoderModel"
    assert torch.equal(comp.denoiser.proj_out.weight, pipe.transformer.proj_out.weight)
    assert comp.latent_shape == (4, 8, 8)
    no_t5 = load_components(saved("sd3-no-t5")[1])
    assert no_t5.parts["text_encoder_3"] is None and no_t5.parts["tokenizer_3"] is None
    flux_pipe, flux_folder = saved("flux")
    flux = load_components(flux_folder)
    assert flux.family == "flux" and type(flux.parts["tokenizer_2"]).__name__ == "T5Tokenizer"
    assert flux.latent_shape == (4, 128, 128)  # FluxPipeline's default 128 latent pixels, unpacked
    env = _flux_env(flux, g=1.0)
    assert env.sample_shape == (4, 8, 8) and env.model.sample_shape == (4, 8, 8)  # height=width=16 px
    assert env.decoder.shift_factor == pytest.approx(flux_pipe.vae.config.shift_factor)
    assert env.model.adapter.guidance == 3.5 and env.model.guidance_scale == 1.0  # the pipeline's defaults


@pytest.mark.parametrize("name", ["sd3", "sd3-dynamic", "sd3-no-t5"])
@pytest.mark.parametrize("g", [1.0, 3.0])
def test_sd3_base_rollout_reproduces_the_stock_pipeline(saved, z, name, g):
    pipe, folder = saved(name)
    ref = _stock_sd3(pipe, g, z)
    env = _sd3_env(folder, g)
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    assert float((ref - z).abs().max()) > 1.0  # the rollout moved


def test_sd3_grid_is_the_shifted_scheduler_grid(saved):
    """The SD3 pipeline's grid: sigmas uniform from 1 to the scheduler's smallest training sigma
    (itself shifted: ``s(1e-3)``), then shifted, ``s(u) = shift u / (1 + (shift - 1) u)``; with
    dynamic shifting the smallest is ``1e-3`` and the shift ``e^mu / (e^mu + 1 / u - 1)``."""
    shift = T.SD3_SHIFT

    def static(u):
        return shift * u / (1 + (shift - 1) * u)

    env = _sd3_env(saved("sd3")[1], 3.0)
    uniform = torch.linspace(1, static(1e-3), STEPS, dtype=torch.float64)
    assert torch.allclose(1 - env.step_grid.times[:-1], static(uniform), atol=1e-6)
    pipe, folder = saved("sd3-dynamic")
    dynamic = _sd3_env(folder, 3.0)
    mu = calculate_shift(16, max_shift=pipe.scheduler.config.max_shift)  # 16 image tokens (8x8 latent, patch 2)
    uniform = torch.linspace(1, 1e-3, STEPS, dtype=torch.float64)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / uniform - 1))
    assert torch.allclose(1 - dynamic.step_grid.times[:-1], shifted, atol=1e-6)
    assert not torch.allclose(shifted, uniform, atol=1e-2)  # the shift is not the identity here


@pytest.mark.parametrize(
    "name, true_cfg, negative, guidance",
    [
        ("flux", 1.0, None, 2.5),
        ("flux", 3.0, "ugly", 2.5),
        ("flux-plain", 1.0, None, None),
        ("flux-plain", 3.0, "ugly", None),
    ],
)
def test_flux_base_rollout_reproduces_the_stock_pipeline(saved, z, name, true_cfg, negative, guidance):
    pipe, folder = saved(name)
    ref = _stock_flux(pipe, z, true_cfg, negative, 3.5 if guidance is None else guidance)
    options = {} if guidance is None else {"guidance": guidance}
    env = _flux_env(folder, true_cfg, negative, **options)
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    assert float((ref - z).abs().max()) > 1.0


def test_sd3_negative_controls_leave_a_gap(saved, z, monkeypatch):
    pipe, folder = saved("sd3")
    ref = _stock_sd3(pipe, 3.0, z)
    env = _sd3_env(folder, 3.0)
    model = env.model
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    with monkeypatch.context() as m:  # velocity = +output instead of -output
        m.setattr(model, "to_parameterization", lambda out, x, t: out)
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 1.78
    with monkeypatch.context() as m:  # sigma instead of sigma * 1000
        m.setattr(model.adapter, "timestep", lambda mod, t: 1.0 - t)
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 0.33
    with monkeypatch.context() as m:
        m.setattr(model, "guide", lambda u, c, g: c + g * (c - u))
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 0.19
    # our Euler step in t on the scheduler's grid (the default) is the scheduler's step; on a uniform grid it is not
    euler = text_to_image_environment(env.components, PROMPTS, guidance_scale=3.0, family_options=SD3_OPTIONS)
    assert _rel(generate(euler, PROMPTS, z, steps=STEPS).x1, ref) < PARITY
    uniform = text_to_image_environment(
        env.components, PROMPTS, guidance_scale=3.0, family_options=SD3_OPTIONS, time_grid="uniform"
    )
    assert _rel(generate(uniform, PROMPTS, z, steps=STEPS).x1, ref) > GAP  # measured 0.15 (the shift ignored)


def test_flux_negative_controls_leave_a_gap(saved, z, monkeypatch):
    pipe, folder = saved("flux")
    ref = _stock_flux(pipe, z, 3.0, "ugly", 2.5)
    env = _flux_env(folder, 3.0, "ugly", guidance=2.5)
    model = env.model
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    with monkeypatch.context() as m:  # sigma * 1000 (SD3's convention) instead of sigma
        m.setattr(model.adapter, "timestep", lambda mod, t: (1.0 - t) * 1000)
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 0.33
    with monkeypatch.context() as m:  # the default embedded guidance instead of the one asked for
        m.setattr(model.adapter, "guidance", 3.5)
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 0.53
    with monkeypatch.context() as m:
        m.setattr(model, "guide", lambda u, c, g: c + g * (c - u))
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 0.39
    with monkeypatch.context() as m:  # 2x2 patches packed column-major
        m.setattr(model.adapter, "call", _transposed_call(model.adapter))
        assert _rel(generate(env, PROMPTS, z).x1, ref) > GAP  # measured 1.22
    # the dynamic shift matters: the pipeline's grid (the default) is exact, a uniform one O(h) off
    euler = text_to_image_environment(
        env.components, PROMPTS, guidance_scale=3.0, negative_prompt="ugly", family_options=_flux_options(2.5)
    )
    assert _rel(generate(euler, PROMPTS, z, steps=STEPS).x1, ref) < PARITY
    uniform = text_to_image_environment(
        env.components,
        PROMPTS,
        guidance_scale=3.0,
        negative_prompt="ugly",
        family_options=_flux_options(2.5),
        time_grid="uniform",
    )
    assert _rel(generate(uniform, PROMPTS, z, steps=STEPS).x1, ref) > GAP  # measured 0.19


def _flux_options(guidance):
    return {**FLUX_OPTIONS, "guidance": guidance}


def _transposed_call(adapter):
    original = adapter.call

    def call(model, x, timestep, kwargs):
        return original(model, x.transpose(-1, -2), timestep, kwargs).transpose(-1, -2)

    return call


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_decoding_matches_the_vae_with_its_shift_factor(saved, z, name, monkeypatch):
    pipe, folder = saved(name)
    vae = pipe.vae
    seen = []
    original = vae.decode

    def spy(latents, *args, **kwargs):
        seen.append(latents.detach().clone())
        return original(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    if name == "sd3":
        images = _stock_sd3(pipe, 3.0, z, output_type="pt")
        env = _sd3_env(pipe, 3.0)  # the pipeline object in memory: the same VAE, spied on
    else:
        images = _stock_flux(pipe, z, 1.0, None, 3.5, output_type="pt")
        env = _flux_env(pipe)
    x1 = generate(env, PROMPTS, z).x1
    ours = env.decode(x1)
    assert ours.shape == (2, 3, 16, 16) and not ours.requires_grad
    assert _rel((ours / 2 + 0.5).clamp(0, 1), images) < PARITY  # the pipeline's postprocessing
    stock_input, our_input = seen[0], seen[1]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift > 0 and _rel(our_input, stock_input) < PARITY
    assert torch.allclose(our_input, x1 / scale + shift, atol=1e-6)
    gap = (x1 / scale - stock_input).abs()  # without the shift factor every input is off by exactly it
    assert torch.allclose(gap, torch.full_like(gap, shift), atol=1e-5)


def test_flux_gym_env_passes_check_env_and_reproduces_the_pipeline(saved, z):
    pipe, folder = saved("flux")
    kwargs = dict(
        pipeline=folder,
        prompts=PROMPTS,
        reward=BrightnessReward(),
        steps=STEPS,
        family_options={**FLUX_OPTIONS, "guidance": 2.5},
    )
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
    assert obs["x"].shape == (4, 8, 8) and env.unwrapped.prompt() == "a red cube"
    for _ in range(STEPS):
        obs, reward, terminated, _, _ = env.step(np.zeros(env.action_space.shape, np.float32))
    assert terminated and np.isfinite(reward) and env.render().shape[2] == 3
    # integrator="scheduler", action_mode="model" with the base output: the pipeline's latents
    ref = pipe(
        PROMPTS[:1],
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        latents=pack_latents(z[:1]),
        output_type="latent",
        max_sequence_length=SEQ,
        height=16,
        width=16,
    ).images
    det = gym.make(
        "diffusiongym/TextToImage-v0", noise="ode", integrator="scheduler", action_mode="model", **kwargs
    ).unwrapped
    det.reset(options={"prompt": "a cat", "x": z[0].numpy()})
    for _ in range(STEPS):
        _, _, terminated, _, info = det.step((det.sim.base_output() / det.action_scale)[0].numpy())
    assert terminated and _rel(torch.as_tensor(info["final_x"]), unpack_latents(ref, 8, 8)[0]) < PARITY


@pytest.mark.parametrize("name", ["sd3", "flux"])  # SD3: shift 3; FLUX: dynamic shifting with FLUX's sigmas
def test_default_euler_grid_is_the_pipelines_and_reproduces_it(saved, z, name):
    """Without ``grid=``, the default Euler rollout (``generate`` and the Gym env with ``noise="ode"``)
    steps at ``t = 1 - sigma_k`` of the pipeline's own call and reproduces its latents."""
    pipe, folder = saved(name)
    if name == "sd3":
        ref, g, options = _stock_sd3(pipe, 3.0, z), 3.0, SD3_OPTIONS
    else:
        ref, g, options = _stock_flux(pipe, z, 1.0, None, 2.5), None, _flux_options(2.5)
    sigmas = pipe.scheduler.sigmas.to(torch.float64)  # as the pipeline's call left them
    assert not torch.allclose(sigmas, torch.linspace(1, 0, STEPS + 1, dtype=torch.float64), atol=1e-2)  # shifted
    env = text_to_image_environment(folder, PROMPTS, guidance_scale=g, steps=STEPS, family_options=options)
    assert env.integrator == "euler" and env.time_grid == "scheduler"
    assert torch.allclose(env.time_points(), 1 - sigmas, atol=1e-7)  # float32 sigmas, float64 grid
    assert _rel(generate(env, PROMPTS, z).x1, ref) < PARITY
    kwargs = dict(pipeline=folder, prompts=PROMPTS, reward=BrightnessReward(), steps=STEPS, family_options=options)
    if g is not None:
        kwargs["guidance_scale"] = g
    det = gym.make("diffusiongym/TextToImage-v0", noise="ode", action_mode="model", **kwargs).unwrapped
    assert torch.allclose(det.task.times, 1 - sigmas, atol=1e-7) and det.sim.beta0 == 1.0
    assert torch.allclose(det.sim.times.double(), 1 - sigmas, atol=1e-7)
    det.reset(options={"prompt": "a cat", "x": z[0].numpy()})
    for _ in range(STEPS):
        _, _, terminated, _, info = det.step((det.sim.base_output() / det.action_scale)[0].numpy())
    assert terminated and _rel(torch.as_tensor(info["final_x"]), ref[0]) < PARITY
    # memoryless noise (the task's default) is singular at t = 0: the same grid from DEFAULT_T_START
    vec = gym.make_vec(
        "diffusiongym/TextToImage-v0", num_envs=2, vectorization_mode="vector_entry_point", **kwargs
    ).unwrapped
    assert float(vec.sim.times[0]) == pytest.approx(1e-3) and float(vec.task.t_start) == pytest.approx(1e-3)
    assert torch.allclose(vec.sim.times[1:].double(), 1 - sigmas[1:], atol=1e-7)
    obs, _ = vec.reset(seed=0)
    assert np.isfinite(np.asarray(obs["x"])).all()
    # the opt-out: uniform in t from t_start, as before
    uni = gym.make("diffusiongym/TextToImage-v0", noise="ode", action_mode="model", time_grid="uniform", **kwargs)
    assert uni.unwrapped.task.times is None
    assert torch.allclose(uni.unwrapped.sim.times.double(), torch.linspace(1e-3, 1, STEPS + 1, dtype=torch.float64))


def test_bad_flow_inputs_name_what_is_wrong(saved, tmp_path):
    _, flux = saved("flux")
    _, plain = saved("flux-plain")
    with pytest.raises(ValueError, match="guidance_embeds"):
        _flux_env(plain, guidance=2.0)
    with pytest.raises(ValueError, match="height"):
        _flux_env(flux, height=18)  # FLUX needs multiples of vae_scale_factor * 2 = 4
    broken = tmp_path / "flux"
    shutil.copytree(flux, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_components(broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]  # T5 is optional for SD3, not for FLUX
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="'text_encoder_2'"):
        load_components(broken)

"""The diffusers bridge: conventions against an exact Gaussian mixture, exact agreement with
diffusers' own Euler loop, and offline loading of tiny random diffusers models."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from tiny_unets import tiny_unet
from torch import nn

from diffusiongym import GaussianMixture, energy_distance, gmm_preset, sample
from diffusiongym.envs.environment import EndpointEnvironment, EpsilonEnvironment, VelocityEnvironment
from diffusiongym.models.diffusers_bridge import DiffusersModel, diffusers_environment, scheduler_from_diffusers
from diffusiongym.models.diffusers_loader import load_diffusers_environment


@pytest.fixture(autouse=True)
def _rng_guard():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


class GMMDiffusersModel(nn.Module):
    """The exact predictor of a Gaussian mixture, written in *diffusers'* conventions only.

    VP: ``x_tau = sqrt(abar_tau) x + sqrt(1 - abar_tau) eps`` with ``log abar`` interpolated
    linearly in the (float) timestep ``tau``; outputs eps, x_data or ``v = alpha eps - sigma x``.
    Flow: ``x_s = (1 - s) x + s noise`` with ``s = timestep / T``; output ``noise - x_data``.
    Nothing here uses diffusiongym's time ``t``.
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        kind: str,
        prediction_type: str,
        alphas_cumprod=None,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.mixture, self.kind, self.prediction_type, self.T = mixture, kind, prediction_type, num_train_timesteps
        if alphas_cumprod is not None:
            self.log_abar = np.log(np.asarray(alphas_cumprod, dtype=np.float64))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        tau = timestep.detach().double().cpu().numpy()
        if self.kind == "flow":
            s = torch.as_tensor(tau / self.T, dtype=sample.dtype)
            alpha, sigma = 1 - s, s
        else:
            abar = torch.as_tensor(
                np.exp(np.interp(tau, np.arange(len(self.log_abar)), self.log_abar)), dtype=sample.dtype
            )
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        post = self.mixture.posterior(sample, alpha, sigma)
        x0 = post.x1_hat
        eps = (sample - alpha[:, None] * x0) / sigma[:, None]
        if self.kind == "flow":
            return (eps - x0,)
        if self.prediction_type == "epsilon":
            return (eps,)
        if self.prediction_type == "sample":
            return (x0,)
        return (alpha[:, None] * eps - sigma[:, None] * x0,)


def _scheduler(name: str, prediction_type: str):
    if name == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    cls = diffusers.DDPMScheduler if name == "ddpm" else diffusers.DDIMScheduler
    # squaredcos table for DDIM so that two different alphas_cumprod tables are covered
    schedule = "linear" if name == "ddpm" else "squaredcos_cap_v2"
    return cls(num_train_timesteps=1000, beta_schedule=schedule, prediction_type=prediction_type)


def _gmm_env(
    name: str, prediction_type: str, mixture: GaussianMixture, *, bridge_prediction_type=None, noise="memoryless"
):
    sched = _scheduler(name, prediction_type)
    kind = "flow" if name == "flow" else "vp"
    abar = None if kind == "flow" else sched.alphas_cumprod
    fake = GMMDiffusersModel(mixture, kind, prediction_type, abar)
    return diffusers_environment(
        fake, sched, noise=noise, prediction_type=bridge_prediction_type, sample_shape=(mixture.dim,)
    )


CASES = [
    ("ddpm", "epsilon"),
    ("ddpm", "v_prediction"),
    ("ddpm", "sample"),
    ("ddim", "epsilon"),
    ("ddim", "v_prediction"),
    ("flow", "flow"),
]
N = 1500
# Null calibration (exact-vs-exact draws, 2-D 8-mode ring, n = m = 1500, 200 seed pairs): the energy
# distance has mean 3.1e-3, 99th percentile 1.2e-2 and maximum 1.8e-2. Measured through the bridge
# (100 steps, seed 0): 1.9e-3 (DDPM, every prediction type), 6.7e-3 (DDIM cosine table), 5.5e-3
# (flow). The wrong conventions below score 3.1e-2 (epsilon read as v: nearly right at both ends
# of the path, the subtlest error), 3.5 and 389; reversed time / unflipped flow sign are gross too.
THRESHOLD = 0.02


@pytest.mark.parametrize("name,prediction_type", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_gmm_conventions_match_exact_mixture(name, prediction_type):
    mixture = gmm_preset("8gaussians")
    env = _gmm_env(name, prediction_type, mixture)
    expected = {
        "epsilon": EpsilonEnvironment,
        "v_prediction": EpsilonEnvironment,
        "sample": EndpointEnvironment,
        "flow": VelocityEnvironment,
    }
    assert type(env) is expected[prediction_type]
    traj = sample(env, N, steps=100, seed=0, dtype=torch.float64)
    exact = mixture.sample(N, generator=torch.Generator().manual_seed(1))
    assert energy_distance(traj.x1, exact) < THRESHOLD


WRONG = [
    ("ddpm", "v_prediction", "epsilon"),  # Salimans-Ho v read as noise
    ("ddpm", "epsilon", "v_prediction"),
    ("ddim", "sample", "epsilon"),
]


@pytest.mark.parametrize("name,truth,claimed", WRONG, ids=[f"{a}-{b}-as-{c}" for a, b, c in WRONG])
def test_wrong_prediction_type_fails_the_test(name, truth, claimed):
    mixture = gmm_preset("8gaussians")
    env = _gmm_env(name, truth, mixture, bridge_prediction_type=claimed)
    traj = sample(env, N, steps=100, seed=0, dtype=torch.float64)
    exact = mixture.sample(N, generator=torch.Generator().manual_seed(1))
    x1 = torch.nan_to_num(traj.x1, nan=1e3, posinf=1e3, neginf=-1e3)
    assert energy_distance(x1, exact) > THRESHOLD


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_reversed_time_or_sign_fails_the_test(name, monkeypatch):
    # diffusers' time runs from noise to data the other way: using t (not 1 - t) must fail.
    mixture = gmm_preset("8gaussians")
    env = _gmm_env(name, "epsilon" if name == "ddpm" else "flow", mixture)
    model = env.model
    if name == "ddpm":
        monkeypatch.setattr(model, "timestep", lambda t: t * (model.num_train_timesteps - 1))
    else:
        env = env.with_model(lambda x, t, **c: -model(x, t, **c))  # flow output not negated
    traj = sample(env, N, steps=100, seed=0, dtype=torch.float64)
    exact = mixture.sample(N, generator=torch.Generator().manual_seed(1))
    x1 = torch.nan_to_num(traj.x1, nan=1e3, posinf=1e3, neginf=-1e3)
    assert energy_distance(x1, exact) > THRESHOLD


def test_ode_matches_diffusers_flow_match_euler_loop():
    # Same model, same initial noise, same grid: our Euler ODE equals diffusers' scheduler loop.
    mixture = gmm_preset("2d")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    fake = GMMDiffusersModel(mixture, "flow", "flow")
    env = diffusers_environment(fake, sched, noise="ode", sample_shape=(2,))
    sched.set_timesteps(20)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x0.clone()
    for tau in sched.timesteps:
        out = fake(x, tau.expand(len(x)).double())[0]
        x = sched.step(out, tau, x).prev_sample
    grid = (1 - sched.sigmas.double()).clamp(0, 1)
    ours = sample(env, x=x0, grid=grid)
    # diffusers steps in float32 sigmas; both are the same Euler recursion (1e-5 covers float32 rounding)
    torch.testing.assert_close(ours.x1, x.to(ours.x1.dtype), atol=1e-5, rtol=1e-5)


def test_scheduler_mapping_values():
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ours, kind, pred, T = scheduler_from_diffusers(sched)
    assert (kind, pred, T) == ("vp", "epsilon", 1000)
    # at integer timesteps tau, t = 1 - tau / 999 reproduces diffusers' alphas_cumprod exactly
    tau = torch.tensor([0, 1, 500, 998, 999])
    t = 1 - tau.double() / 999
    torch.testing.assert_close(ours.alpha(t) ** 2, sched.alphas_cumprod[tau].double(), rtol=1e-6, atol=0)
    zero_snr = diffusers.DDIMScheduler(rescale_betas_zero_snr=True)
    ours_z, *_ = scheduler_from_diffusers(zero_snr)
    assert float(ours_z.alpha(torch.tensor(0.0, dtype=torch.float64)) ** 2) == pytest.approx(2.0**-24, rel=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler_from_diffusers(sched, prediction_type="velocity")
    with pytest.raises(TypeError, match="scheduler"):
        scheduler_from_diffusers(object())


# ------------------------------------------------------------------ tiny real UNets, offline
@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_load_tiny_unet_from_folder(tmp_path, layout):
    unet = tiny_unet()
    sched = diffusers.DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    if layout == "pipeline":
        unet.save_pretrained(tmp_path / "unet")
        sched.save_pretrained(tmp_path / "scheduler")
    else:
        unet.save_pretrained(tmp_path)
        sched.save_pretrained(tmp_path)
    env = load_diffusers_environment(tmp_path)
    assert isinstance(env, EpsilonEnvironment) and env.sample_shape == (1, 8, 8)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        v = unet(x, (1 - t) * 99).sample
    alpha, beta = env.scheduler.alpha(t.double()).float(), env.scheduler.beta(t.double()).float()
    expected = beta[:, None, None, None] * x + alpha[:, None, None, None] * v  # eps_hat from v
    torch.testing.assert_close(env.output(x, t), expected, atol=1e-5, rtol=1e-5)
    traj = sample(env, 4, steps=5, seed=0)
    assert traj.x1.shape == (4, 1, 8, 8) and bool(traj.valid.all())


def test_class_conditional_unet_and_guidance(tmp_path):
    unet = tiny_unet(num_class_embeds=11)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    env = load_diffusers_environment(tmp_path, null_class=10)
    assert isinstance(env, VelocityEnvironment)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.75])
    label = torch.tensor([3, 7])
    with torch.no_grad():
        cond = -unet(x, (1 - t) * 1000, class_labels=label).sample
        uncond = -unet(x, (1 - t) * 1000, class_labels=torch.tensor([10, 10])).sample
    torch.testing.assert_close(env.output(x, t, label=label), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        env.output(x, t, label=label, guidance_scale=3.0), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5
    )
    traj = sample(env, 2, steps=4, seed=0, cond={"label": label})
    assert traj.x1.shape == (2, 1, 8, 8)
    env_no_null = diffusers_environment(unet, sched)
    with pytest.raises(ValueError, match="null_class"):
        env_no_null.output(x, t, label=label, guidance_scale=2.0)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
def test_load_from_hub_cache_offline(tmp_path, monkeypatch):
    # A hub id resolved from a Hugging Face cache folder only (layout of huggingface_hub's cache).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--tiny-org--tiny-ddpm"
    snap = repo / "snapshots" / ("0" * 40)
    tiny_unet().save_pretrained(snap / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type="sample").save_pretrained(snap / "scheduler")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    env = load_diffusers_environment("tiny-org/tiny-ddpm", cache_dir=str(tmp_path))
    assert isinstance(env, EndpointEnvironment) and env.model.num_train_timesteps == 50
    with pytest.raises(FileNotFoundError, match="source"):
        load_diffusers_environment("tiny-org/not-cached", cache_dir=str(tmp_path))


def test_bad_inputs():
    with pytest.raises(TypeError, match="unet"):
        DiffusersModel(42, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="prediction_type"):
        diffusers_environment(tiny_unet(), diffusers.DDPMScheduler(), prediction_type="eps")
    with pytest.raises(FileNotFoundError, match="source"):
        load_diffusers_environment("/nonexistent/folder/for/sure")
    assert math.isfinite(THRESHOLD)


def test_offline_hub_id_without_hf_hub_offline_and_pickle_refusal(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = tmp_path / "models--tiny-org--tiny-ddpm"
    snap = repo / "snapshots" / ("1" * 40)
    tiny_unet().save_pretrained(snap / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(snap / "scheduler")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    env = load_diffusers_environment("tiny-org/tiny-ddpm", cache_dir=str(tmp_path))
    assert isinstance(env, EpsilonEnvironment)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_diffusers_environment("tiny-org/tiny-ddpm", cache_dir=str(tmp_path), revision="v2")
    (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_diffusers_environment("tiny-org/tiny-ddpm", cache_dir=str(tmp_path))
    tiny_unet().save_pretrained(snap / "unet", safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        load_diffusers_environment("tiny-org/tiny-ddpm", cache_dir=str(tmp_path))

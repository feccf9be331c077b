"""Every bad input raises a clear error: ``TypeError`` for a wrong type or an unknown keyword,
``ValueError`` for a bad value, and the message names the argument.

Categories: engine (sample / make_time_grid / logprob), schedulers, noise,
parameterisations, loaders, rewards, tasks, digits. The Gymnasium envs, vector envs, the
discrete package and checkpoints have their own suites (``test_env_bad_inputs.py``,
``test_trainer_contract.py``). Good inputs that used to be refused (numpy integers, empty
image batches, float64 under the float32 digits model) are checked at the end.
"""

from __future__ import annotations

import functools
import json
import math
import re
from types import SimpleNamespace

import diffusers
import gymnasium as gym
import numpy as np
import pytest
import torch

import diffusiongym as dg
from diffusiongym.logprob import gaussian_log_prob, path_log_ratio, step_log_prob, trajectory_log_probs, transition_mean
from diffusiongym.models.digit_classifier import load_digit_classifier
from diffusiongym.models.digits import DigitsUNet, digits_environment, digits_task, load_digits_model
from diffusiongym.models.digits_data import WEIGHTS_DIR
from diffusiongym.noise import CallableNoise, Constant, Memoryless, make_noise
from diffusiongym.parameterization import check_parameterization, convert
from diffusiongym.rewards import (
    BrightnessReward,
    CallableReward,
    ContrastReward,
    DigitClassifierReward,
    JPEGCompressibility,
    JPEGIncompressibility,
    LinearReward,
    QuadraticReward,
)
from diffusiongym.schedulers import DiscreteVPScheduler, LinearScheduler, make_scheduler
from diffusiongym.tasks import Task, gmm_task, make_task, register_task, with_reward
from diffusiongym.timegrid import make_time_grid
from diffusiongym.utils.validation import check_positive_int
from tiny_unets import tiny_unet

NAN = float("nan")


# ------------------------------------------------------------------------ shared objects
@functools.cache
def gmm2d():
    return make_task("GMM2D-v0")


@functools.cache
def digits_model():
    return load_digits_model()


@functools.cache
def classifier_reward():
    return DigitClassifierReward(target=None, mode="log_prob")


def images(n=2):
    return torch.zeros(n, 1, 8, 8)


def wrong_width(x, t, **cond):
    return x[:, :1]  # (n, 1) against x (n, 2): broadcasts silently unless checked


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny diffusers folders: a good pipeline and several broken ones; digits weights stems
    whose JSON asks for absurd sizes."""
    root = tmp_path_factory.mktemp("loaders")
    good = root / "good"
    tiny_unet().save_pretrained(good / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(good / "scheduler")

    pickled = root / "pickled"
    tiny_unet().save_pretrained(pickled / "unet", safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(pickled / "scheduler")
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").exists()

    def with_config(name, unet_edit=None, sched_edit=None):
        folder = root / name
        tiny_unet().save_pretrained(folder / "unet")
        diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(folder / "scheduler")
        for sub, file, edit in (("unet", "config.json", unet_edit), ("scheduler", "scheduler_config.json", sched_edit)):
            if edit:
                cfg = json.loads((folder / sub / file).read_text())
                cfg.update(edit)
                (folder / sub / file).write_text(json.dumps(cfg))
        return folder

    paths = SimpleNamespace(
        good=good,
        pickled=pickled,
        foreign_class=with_config("foreign_class", {"_class_name": "AutoencoderKL"}),
        builtin_class=with_config("builtin_class", {"_class_name": "__builtins__"}),
        huge_unet=with_config("huge_unet", {"sample_size": 10**9}),
        huge_timesteps=with_config("huge_timesteps", sched_edit={"num_train_timesteps": 10**9}),
        foreign_scheduler=with_config("foreign_scheduler", sched_edit={"_class_name": "ConfigMixin"}),
        empty_cache=root / "empty_cache",
    )
    for name, source, edit in (
        ("huge_digits", "digits_unet", {"channels": 10**6}),
        ("huge_classifier", "digit_classifier", {"hidden": 10**9}),
    ):
        cfg = json.loads((WEIGHTS_DIR / f"{source}.json").read_text())
        cfg["architecture"].update(edit)
        (root / f"{name}.json").write_text(json.dumps(cfg))
        (root / f"{name}.safetensors").write_bytes((WEIGHTS_DIR / f"{source}.safetensors").read_bytes())
        setattr(paths, name, root / name)
    return paths


# ------------------------------------------------------------------------------ cases
def case(category, name, thunk, error, argument):
    return pytest.param(thunk, error, argument, id=f"{category}-{name}")


x2 = torch.zeros(3, 2)

ENGINE = [
    case("engine", "num_samples_zero", lambda f: dg.sample(gmm2d().environment, 0), ValueError, "num_samples"),
    case("engine", "num_samples_float", lambda f: dg.sample(gmm2d().environment, 2.0), TypeError, "num_samples"),
    case("engine", "steps_zero", lambda f: dg.sample(gmm2d().environment, 2, steps=0), ValueError, "steps"),
    case("engine", "steps_float", lambda f: dg.sample(gmm2d().environment, 2, steps=2.5), TypeError, "steps"),
    case("engine", "steps_bool", lambda f: dg.sample(gmm2d().environment, 2, steps=True), TypeError, "steps"),
    case("engine", "steps_huge", lambda f: dg.sample(gmm2d().environment, 2, steps=10**9), ValueError, "steps"),
    case("engine", "t_start_nan", lambda f: dg.sample(gmm2d().environment, 2, t_start=NAN), ValueError, "t_start"),
    case("engine", "t_start_str", lambda f: dg.sample(gmm2d().environment, 2, t_start="0.1"), TypeError, "t_start"),
    case(
        "engine",
        "reward_function",
        lambda f: dg.sample(gmm2d().environment, 2, reward=lambda x: x.sum(1)),
        TypeError,
        "reward",
    ),
    case(
        "engine",
        "reward_scale_nan",
        lambda f: dg.sample(gmm2d().environment, 2, reward_scale=NAN),
        ValueError,
        "reward_scale",
    ),
    case(
        "engine",
        "reward_scale_str",
        lambda f: dg.sample(gmm2d().environment, 2, reward_scale="1"),
        TypeError,
        "reward_scale",
    ),
    case(
        "engine",
        "policy_shape",
        lambda f: dg.sample(gmm2d().environment, 2, steps=3, policy=wrong_width),
        ValueError,
        "policy",
    ),
    case(
        "engine",
        "policy_not_tensor",
        lambda f: dg.sample(gmm2d().environment, 2, steps=3, policy=lambda x, t: 0.0),
        ValueError,
        "policy",
    ),
    case("engine", "policy_not_callable", lambda f: dg.sample(gmm2d().environment, 2, policy=3), TypeError, "policy"),
    case(
        "engine",
        "control_shape",
        lambda f: dg.sample(gmm2d().environment, 2, steps=3, control=wrong_width),
        ValueError,
        "control",
    ),
    case(
        "engine", "control_not_callable", lambda f: dg.sample(gmm2d().environment, 2, control="u"), TypeError, "control"
    ),
    case("engine", "cond_list", lambda f: dg.sample(gmm2d().environment, 2, cond=[1]), TypeError, "cond"),
    case("engine", "seed_str", lambda f: dg.sample(gmm2d().environment, 2, seed="0"), TypeError, "seed"),
    case("engine", "seed_negative", lambda f: dg.sample(gmm2d().environment, 2, seed=-1), ValueError, "seed"),
    case("engine", "generator_int", lambda f: dg.sample(gmm2d().environment, 2, generator=1), TypeError, "generator"),
    case("engine", "dtype_int", lambda f: dg.sample(gmm2d().environment, 2, dtype=torch.int64), TypeError, "dtype"),
    case(
        "engine", "store_unknown", lambda f: dg.sample(gmm2d().environment, 2, store="everything"), ValueError, "store"
    ),
    case("engine", "env_wrong_type", lambda f: dg.sample(object(), 2), TypeError, "env"),
    case("engine", "x_wrong_shape", lambda f: dg.sample(gmm2d().environment, x=torch.zeros(3, 5)), ValueError, "x"),
    case("engine", "grid_steps_zero", lambda f: make_time_grid(0), ValueError, "steps"),
    case("engine", "grid_steps_none", lambda f: make_time_grid(None), TypeError, "steps"),
    case("engine", "grid_steps_huge", lambda f: make_time_grid(100_001), ValueError, "steps"),
    case("engine", "grid_not_numbers", lambda f: make_time_grid(grid="abc"), TypeError, "grid"),
    case("engine", "grid_nan", lambda f: make_time_grid(grid=[0.0, NAN, 1.0]), ValueError, "grid"),
    case("engine", "grid_reversed_ends", lambda f: make_time_grid(5, t_start=0.5, t_end=0.2), ValueError, "t_start"),
    case("engine", "log_prob_mean_shape", lambda f: gaussian_log_prob(x2, torch.zeros(3, 1), 1.0), ValueError, "mean"),
    case("engine", "log_prob_std_shape", lambda f: gaussian_log_prob(x2, x2, torch.ones(4)), ValueError, "std"),
    case("engine", "log_prob_x_type", lambda f: gaussian_log_prob([0.0], x2, 1.0), TypeError, "x"),
    case("engine", "step_h_str", lambda f: step_log_prob(gmm2d().environment, x2, x2, 0.5, "h"), TypeError, "h"),
    case(
        "engine",
        "step_t_shape",
        lambda f: step_log_prob(gmm2d().environment, x2, x2, torch.ones(4) / 2, 0.1),
        ValueError,
        "t",
    ),
    case("engine", "step_env_type", lambda f: step_log_prob("env", x2, x2, 0.5, 0.1), TypeError, "env"),
    case(
        "engine",
        "step_policy_type",
        lambda f: step_log_prob(gmm2d().environment, x2, x2, 0.5, 0.1, policy=1),
        TypeError,
        "policy",
    ),
    case(
        "engine",
        "transition_policy_shape",
        lambda f: transition_mean(gmm2d().environment, x2, 0.5, 0.1, policy=wrong_width),
        ValueError,
        "policy",
    ),
    case("engine", "trajectory_type", lambda f: trajectory_log_probs(gmm2d().environment, "traj"), TypeError, "traj"),
    case("engine", "path_ratio_type", lambda f: path_log_ratio(None), TypeError, "traj"),
]

SCHEDULERS = [
    case("schedulers", "unknown_name", lambda f: make_scheduler("linaer"), ValueError, "scheduler"),
    case("schedulers", "wrong_type", lambda f: make_scheduler(3), TypeError, "scheduler"),
    case("schedulers", "time_str", lambda f: LinearScheduler()("0.5"), TypeError, "t"),
    case("schedulers", "time_bool_tensor", lambda f: LinearScheduler()(torch.tensor([True])), TypeError, "t"),
    case("schedulers", "table_too_short", lambda f: DiscreteVPScheduler([0.5]), ValueError, "alphas_cumprod"),
    case("schedulers", "table_increasing", lambda f: DiscreteVPScheduler([0.5, 0.9]), ValueError, "alphas_cumprod"),
    case("schedulers", "table_not_numbers", lambda f: DiscreteVPScheduler("abc"), TypeError, "alphas_cumprod"),
    case("schedulers", "table_nan", lambda f: DiscreteVPScheduler([0.9, NAN]), ValueError, "alphas_cumprod"),
    case(
        "schedulers", "ddpm_huge", lambda f: DiscreteVPScheduler.linear_ddpm(10**9), ValueError, "num_train_timesteps"
    ),
    case(
        "schedulers", "ddpm_float", lambda f: DiscreteVPScheduler.linear_ddpm(1000.0), TypeError, "num_train_timesteps"
    ),
    case(
        "schedulers", "ddpm_beta_nan", lambda f: DiscreteVPScheduler.linear_ddpm(beta_end=NAN), ValueError, "beta_end"
    ),
    case("schedulers", "betas_out_of_range", lambda f: DiscreteVPScheduler.from_betas([0.1, 1.5]), ValueError, "betas"),
]

NOISE = [
    case("noise", "unknown_name", lambda f: make_noise("memoryles"), ValueError, "noise"),
    case("noise", "nan", lambda f: make_noise(NAN), ValueError, "noise"),
    case("noise", "negative", lambda f: make_noise(-1.0), ValueError, "noise"),
    case("noise", "wrong_type", lambda f: make_noise(object()), TypeError, "noise"),
    case("noise", "memoryless_scale_nan", lambda f: Memoryless(scale=NAN), ValueError, "scale"),
    case("noise", "memoryless_scale_str", lambda f: Memoryless(scale="1"), TypeError, "scale"),
    case("noise", "constant_zero", lambda f: Constant(0.0), ValueError, "value"),
    case("noise", "constant_inf", lambda f: Constant(float("inf")), ValueError, "value"),
    case("noise", "callable_not_callable", lambda f: CallableNoise(3), TypeError, "fn"),
]

PARAMETERIZATIONS = [
    case("parameterizations", "unknown", lambda f: check_parameterization("velocty"), ValueError, "parameterization"),
    case("parameterizations", "wrong_type", lambda f: check_parameterization(1), TypeError, "parameterization"),
    case(
        "parameterizations",
        "output_shape",
        lambda f: convert(torch.zeros(3, 1), x2, 0.5, LinearScheduler(), "velocity", "epsilon"),
        ValueError,
        "output",
    ),
    case(
        "parameterizations",
        "x_type",
        lambda f: convert(x2, [[0.0, 0.0]] * 3, 0.5, LinearScheduler(), "velocity", "epsilon"),
        TypeError,
        "x",
    ),
    case(
        "parameterizations",
        "source_unknown",
        lambda f: convert(x2, x2, 0.5, LinearScheduler(), "eps", "velocity"),
        ValueError,
        "source",
    ),
    case(
        "parameterizations",
        "target_unknown",
        lambda f: convert(x2, x2, 0.5, LinearScheduler(), "velocity", "drfit"),
        ValueError,
        "target",
    ),
    case(
        "parameterizations",
        "drift_needs_sigma",
        lambda f: convert(x2, x2, 0.5, LinearScheduler(), "velocity", "drift"),
        ValueError,
        "sigma",
    ),
    case(
        "parameterizations",
        "t_shape",
        lambda f: convert(x2, x2, torch.ones(5) / 2, LinearScheduler(), "velocity", "epsilon"),
        ValueError,
        "t",
    ),
    case(
        "parameterizations",
        "scheduler_name",
        lambda f: convert(x2, x2, 0.5, "linear", "velocity", "epsilon"),
        TypeError,
        "scheduler",
    ),
    case(
        "parameterizations",
        "environment",
        lambda f: dg.make_environment(dg.GaussianMixtureModel(dg.gmm_preset("1d")), "velocty"),
        ValueError,
        "parameterization",
    ),
]

LOADERS = [
    case(
        "loaders",
        "unknown_keyword",
        lambda f: dg.load_diffusers_environment(f.good, local_file_only=True),
        TypeError,
        "local_file_only",
    ),
    case("loaders", "source_type", lambda f: dg.load_diffusers_environment(123), TypeError, "source"),
    case(
        "loaders",
        "no_download_mode",
        lambda f: dg.load_diffusers_environment(f.good, local_files_only=False),
        TypeError,
        "local_files_only",
    ),
    case(
        "loaders",
        "guidance_nan",
        lambda f: dg.load_diffusers_environment(f.good, guidance_scale=NAN),
        ValueError,
        "guidance_scale",
    ),
    case("loaders", "dtype_int", lambda f: dg.load_diffusers_environment(f.good, dtype=torch.int8), TypeError, "dtype"),
    case("loaders", "pickle_weights", lambda f: dg.load_diffusers_environment(f.pickled), ValueError, "source"),
    case(
        "loaders", "foreign_model_class", lambda f: dg.load_diffusers_environment(f.foreign_class), ValueError, "source"
    ),
    case(
        "loaders",
        "builtins_model_class",
        lambda f: dg.load_diffusers_environment(f.builtin_class),
        ValueError,
        "source",
    ),
    case(
        "loaders", "huge_sample_size", lambda f: dg.load_diffusers_environment(f.huge_unet), ValueError, "sample_size"
    ),
    case(
        "loaders",
        "huge_timesteps",
        lambda f: dg.load_diffusers_environment(f.huge_timesteps),
        ValueError,
        "num_train_timesteps",
    ),
    case(
        "loaders",
        "foreign_scheduler_class",
        lambda f: dg.load_diffusers_environment(f.foreign_scheduler),
        ValueError,
        "scheduler",
    ),
    case(
        "loaders",
        "uncached_hub_id",
        lambda f: dg.load_diffusers_environment("tiny-org/nothing", cache_dir=str(f.empty_cache)),
        FileNotFoundError,
        "never downloads",
    ),
    case(
        "loaders",
        "null_class_negative",
        lambda f: dg.diffusers_environment(tiny_unet(), diffusers.DDPMScheduler(), null_class=-1),
        ValueError,
        "null_class",
    ),
    case("loaders", "digits_unknown_keyword", lambda f: load_digits_model(devce="cpu"), TypeError, "devce"),
    case(
        "loaders", "digits_guidance_nan", lambda f: load_digits_model(guidance_scale=NAN), ValueError, "guidance_scale"
    ),
    case("loaders", "digits_huge_config", lambda f: load_digits_model(path=f.huge_digits), ValueError, "channels"),
    case("loaders", "digits_path_type", lambda f: load_digits_model(path=3), TypeError, "path"),
    case(
        "loaders",
        "classifier_huge_config",
        lambda f: load_digit_classifier(path=f.huge_classifier),
        ValueError,
        "hidden",
    ),
]

REWARDS = [
    case(
        "rewards",
        "label_null",
        lambda f: classifier_reward()(images(), label=torch.tensor([3, 10])),
        ValueError,
        "label",
    ),
    case(
        "rewards",
        "label_negative",
        lambda f: classifier_reward()(images(), label=torch.tensor([-1, 3])),
        ValueError,
        "label",
    ),
    case(
        "rewards",
        "label_float",
        lambda f: classifier_reward()(images(), label=torch.tensor([3.0, 1.0])),
        TypeError,
        "label",
    ),
    case("rewards", "label_missing", lambda f: classifier_reward()(images()), ValueError, "label"),
    case(
        "rewards",
        "label_empty_batch",
        lambda f: classifier_reward()(images(0), label=torch.tensor([3])),
        ValueError,
        "label",
    ),
    case(
        "rewards",
        "target_out_of_range",
        lambda f: DigitClassifierReward(target=10, classifier=lambda x: x),
        ValueError,
        "target",
    ),
    case(
        "rewards",
        "target_float",
        lambda f: DigitClassifierReward(target=3.0, classifier=lambda x: x),
        TypeError,
        "target",
    ),
    case(
        "rewards",
        "mode_unknown",
        lambda f: DigitClassifierReward(mode="prob_log", classifier=lambda x: x),
        ValueError,
        "mode",
    ),
    case(
        "rewards",
        "classifier_logits_shape",
        lambda f: DigitClassifierReward(3, classifier=lambda x: x.flatten(1))(images()),
        ValueError,
        "classifier",
    ),
    case("rewards", "tolerance_nan", lambda f: BrightnessReward(tolerance=NAN), ValueError, "tolerance"),
    case("rewards", "tolerance_str", lambda f: ContrastReward(tolerance="0.5"), TypeError, "tolerance"),
    case("rewards", "quality_zero", lambda f: JPEGCompressibility(quality=0), ValueError, "quality"),
    case("rewards", "quality_float", lambda f: JPEGIncompressibility(quality=50.0), TypeError, "quality"),
    case("rewards", "image_shape", lambda f: BrightnessReward()(torch.zeros(2, 8, 8)), ValueError, "x"),
    case("rewards", "image_type", lambda f: BrightnessReward()(np.zeros((2, 1, 8, 8))), TypeError, "x"),
    case(
        "rewards",
        "image_integer",
        lambda f: BrightnessReward()(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)),
        TypeError,
        "x",
    ),
    case("rewards", "callable_not_callable", lambda f: CallableReward(3), TypeError, "fn"),
    case("rewards", "quadratic_center_matrix", lambda f: QuadraticReward([[1.0]]), ValueError, "center"),
    case("rewards", "linear_x_shape", lambda f: LinearReward([1.0, 0.0])(torch.zeros(2, 3)), ValueError, "x"),
    case("rewards", "reward_x_type", lambda f: LinearReward([1.0, 0.0])([[0.0, 0.0]]), TypeError, "x"),
]


def _task(**changes):
    base = gmm2d()
    fields = dict(name="t", environment=base.environment, reward=base.reward)
    fields.update(changes)
    return Task(**fields)


TASKS = [
    case("tasks", "unknown_keyword", lambda f: make_task("GMM1D-v0", stpes=5), TypeError, "stpes"),
    case("tasks", "unknown_task", lambda f: make_task("GMM1D-v9"), ValueError, "task"),
    case("tasks", "task_name_type", lambda f: make_task(3), TypeError, "task"),
    case("tasks", "reward_scale_nan", lambda f: make_task("GMM1D-v0", reward_scale=NAN), ValueError, "reward_scale"),
    case("tasks", "reward_scale_str", lambda f: make_task("GMM2D-v0", reward_scale="2"), TypeError, "reward_scale"),
    case("tasks", "reward_function", lambda f: make_task("GMM1D-v0", reward=lambda x: x[:, 0]), TypeError, "reward"),
    case("tasks", "reward_unknown_name", lambda f: make_task("GMM1D-v0", reward="bmp"), ValueError, "reward"),
    case("tasks", "steps_huge", lambda f: make_task("GMM1D-v0", steps=10**9), ValueError, "steps"),
    case("tasks", "steps_float", lambda f: make_task("GMM1D-v0", steps=5.0), TypeError, "steps"),
    case(
        "tasks",
        "gym_reward_function",
        lambda f: gym.make("diffusiongym/GMM1D-v0", reward=lambda x: x[:, 0]),
        TypeError,
        "reward",
    ),
    case(
        "tasks",
        "gmm_task_scale_nan",
        lambda f: gmm_task("g", dg.gmm_preset("1d"), gmm2d().reward, NAN),
        ValueError,
        "reward_scale",
    ),
    case("tasks", "gmm_task_mixture", lambda f: gmm_task("g", "1d", gmm2d().reward, 1.0), TypeError, "mixture"),
    case(
        "tasks",
        "with_reward_scale_nan",
        lambda f: with_reward(gmm2d(), gmm2d().reward, NAN),
        ValueError,
        "reward_scale",
    ),
    case("tasks", "with_reward_function", lambda f: with_reward(gmm2d(), lambda x: x[:, 0]), TypeError, "reward"),
    case("tasks", "task_reward_function", lambda f: _task(reward=lambda x: x[:, 0]), TypeError, "reward"),
    case("tasks", "task_environment", lambda f: _task(environment="GMM2D"), TypeError, "environment"),
    case("tasks", "task_steps_zero", lambda f: _task(steps=0), ValueError, "steps"),
    case("tasks", "task_t_start_one", lambda f: _task(t_start=1.0), ValueError, "t_start"),
    case("tasks", "task_action_scale", lambda f: _task(action_scale=-1.0), ValueError, "action_scale"),
    case("tasks", "task_reward_scale_inf", lambda f: _task(reward_scale=float("inf")), ValueError, "reward_scale"),
    case("tasks", "register_factory", lambda f: register_task("Bad-v0", 3), TypeError, "factory"),
    case("tasks", "digits_reward_function", lambda f: digits_task(reward=lambda x: x.sum()), TypeError, "reward"),
    case(
        "tasks",
        "digits_guidance_nan",
        lambda f: make_task("Digits-v0", guidance_scale=NAN),
        ValueError,
        "guidance_scale",
    ),
    case("tasks", "digits_unknown_keyword", lambda f: make_task("Digits-v0", guidance=2.0), TypeError, "guidance"),
    case(
        "tasks",
        "oracle_scale_nan",
        lambda f: dg.TiltOracle(dg.gmm_preset("1d"), gmm2d().reward, NAN),
        ValueError,
        "reward_scale",
    ),
]

DIGITS = [
    case(
        "digits",
        "label_negative",
        lambda f: digits_model()(images(), 0.5, label=torch.tensor([-1, 3])),
        ValueError,
        "label",
    ),
    case(
        "digits",
        "label_eleven",
        lambda f: digits_model()(images(), 0.5, label=torch.tensor([11, 3])),
        ValueError,
        "label",
    ),
    case(
        "digits",
        "label_float",
        lambda f: digits_model()(images(), 0.5, label=torch.tensor([1.0, 3.0])),
        TypeError,
        "label",
    ),
    case(
        "digits",
        "label_shape",
        lambda f: digits_model()(images(), 0.5, label=torch.tensor([1, 2, 3])),
        ValueError,
        "label",
    ),
    case(
        "digits",
        "guidance_nan_call",
        lambda f: digits_model()(images(), 0.5, label=torch.tensor([1, 3]), guidance_scale=NAN),
        ValueError,
        "guidance_scale",
    ),
    case("digits", "guidance_nan_init", lambda f: DigitsUNet(guidance_scale=NAN), ValueError, "guidance_scale"),
    case("digits", "channels_not_multiple_of_8", lambda f: DigitsUNet(channels=12), ValueError, "channels"),
    case("digits", "channels_float", lambda f: DigitsUNet(channels=32.0), TypeError, "channels"),
    case("digits", "x_shape", lambda f: digits_model()(torch.zeros(2, 1, 7, 7), 0.5), ValueError, "x"),
    case("digits", "x_type", lambda f: digits_model()(np.zeros((2, 1, 8, 8)), 0.5), TypeError, "x"),
    case(
        "digits", "x_integer", lambda f: digits_model()(torch.zeros(2, 1, 8, 8, dtype=torch.long), 0.5), TypeError, "x"
    ),
    case("digits", "t_shape", lambda f: digits_model()(images(), torch.ones(3) / 2), ValueError, "t"),
    case(
        "digits",
        "environment_guidance_inf",
        lambda f: digits_environment(guidance_scale=float("inf")),
        ValueError,
        "guidance_scale",
    ),
    case("digits", "environment_model_type", lambda f: digits_environment(model="unet"), TypeError, "model"),
    case("digits", "task_steps_zero", lambda f: digits_task(steps=0), ValueError, "steps"),
    case("digits", "task_reward_scale_nan", lambda f: digits_task(reward_scale=NAN), ValueError, "reward_scale"),
]


@pytest.mark.parametrize(
    "thunk,error,argument", ENGINE + SCHEDULERS + NOISE + PARAMETERIZATIONS + LOADERS + REWARDS + TASKS + DIGITS
)
def test_bad_input_raises_a_clear_error(folders, thunk, error, argument):
    with pytest.raises(error) as info:
        thunk(folders)
    if error is ValueError:  # a bad value, not a wrong type
        assert not isinstance(info.value, TypeError), repr(info.value)
    message = str(info.value)
    assert re.search(rf"(?<![\w]){re.escape(argument)}(?![\w])", message), f"{argument!r} not named in: {message}"


# ------------------------------------------------------------- good inputs that must work
def test_numpy_integers_and_floats_are_accepted():
    assert check_positive_int("n", np.int64(5)) == 5 and type(check_positive_int("n", np.int32(5))) is int
    grid = make_time_grid(np.int64(4), t_start=np.float32(0.1))
    assert grid.shape == (5,)
    env = gmm2d().environment
    traj = dg.sample(
        env, np.int64(3), steps=np.int16(4), seed=np.int64(0), reward=gmm2d().reward, reward_scale=np.float32(2.0)
    )
    ref = dg.sample(env, 3, steps=4, seed=0, reward=gmm2d().reward, reward_scale=2.0)
    torch.testing.assert_close(traj.x1, ref.x1, rtol=0, atol=0)
    task = make_task("GMM1D-v0", steps=np.int64(7), reward_scale=np.float64(0.5))
    assert (task.steps, task.reward_scale) == (7, 0.5) and type(task.steps) is int and type(task.reward_scale) is float
    assert DigitClassifierReward(target=np.int64(3), classifier=lambda x: x).target == 3
    assert make_noise(np.float32(0.5)).value == 0.5


@pytest.mark.parametrize(
    "reward",
    [
        BrightnessReward(),
        ContrastReward(),
        JPEGCompressibility(),
        JPEGIncompressibility(),
        DigitClassifierReward(3, mode="is_class"),
    ],
    ids=lambda r: type(r).__name__,
)
def test_image_rewards_accept_an_empty_batch(reward):
    values, valid = reward(images(0))
    assert values.shape == (0,) and valid.shape == (0,) and valid.dtype == torch.bool
    values, valid = classifier_reward()(images(0), label=torch.zeros(0, dtype=torch.long))
    assert values.shape == (0,) and valid.shape == (0,)


def test_classifier_reward_scores_the_requested_class_only():
    reward = classifier_reward()
    x = torch.zeros(2, 1, 8, 8)
    values, valid = reward(x, label=torch.tensor([9, 0]))
    logp = reward.log_probs(x)
    torch.testing.assert_close(values, torch.stack([logp[0, 9], logp[1, 0]]))
    assert bool(valid.all())


def test_digits_model_runs_float64_input_in_its_float32_weights():
    model = digits_model()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.5)
    label = torch.tensor([0, 3, 7, 10])
    out32 = model(x, t, label=label)
    out64 = model(x.double(), t.double(), label=label)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out32.double(), rtol=0, atol=0)  # the same float32 computation, cast
    env = digits_environment(model=model)
    traj = dg.sample(
        env, 2, steps=3, seed=0, dtype=torch.float64, cond={"label": torch.tensor([1, 2])}, reward=classifier_reward()
    )
    assert (
        traj.x1.dtype == torch.float64
        and traj.reward.dtype == torch.float64
        and bool(torch.isfinite(traj.reward).all())
    )


@pytest.fixture
def default_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_loaders_and_value_matching_work_under_a_float64_default_dtype(default_float64):
    from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig

    model = load_digits_model()
    assert next(model.parameters()).dtype == torch.float32  # the stored precision, not the global default
    assert next(load_digit_classifier().parameters()).dtype == torch.float32
    config = ValueMatchingConfig(iterations=1, batch_size=4, minibatch_size=4, updates_per_iteration=1)
    trainer = ValueMatching("Digits-v0", config=config, steps=20)
    history = trainer.train(progress=False)
    assert trainer.dtype == torch.float32 and history["valid_fraction"][-1] > 0 and math.isfinite(history["loss"][-1])
    gmm = ValueMatching("GMM1D-v0", config=config, steps=3)
    assert math.isfinite(gmm.train(progress=False)["loss"][-1])

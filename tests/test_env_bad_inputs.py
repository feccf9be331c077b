"""Bad inputs to the Gymnasium envs raise clear errors naming the argument (and good numpy inputs pass)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded

import diffusiongym as dg
from diffusiongym.discrete.env import DiscreteFlowEnv
from diffusiongym.envs.simulator import MIN_STABLE_STEPS

CONTINUOUS = ["diffusiongym/GMM1D-v0", "diffusiongym/GMM2D-v0", "diffusiongym/Digits-v0"]
DISCRETE = ["diffusiongym/DiscreteGrid-v0", "diffusiongym/DiscreteDigits-v0"]


def vec(env_id, n=2, **kw):
    kw.setdefault("steps", 5)
    return gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point", **kw)


@pytest.mark.parametrize("env_id", CONTINUOUS + DISCRETE)
def test_unknown_kwargs_raise_type_error_with_close_match(env_id):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'stpes'.*Did you mean 'steps'"):
        gym.make(env_id, stpes=5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'stpes'.*Did you mean 'steps'"):
        vec(env_id, stpes=5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'frameskip'"):  # TorchRL retries on this text
        gym.make(env_id, frameskip=4)


@pytest.mark.parametrize("env_id", CONTINUOUS + DISCRETE)
def test_numpy_integer_steps_are_accepted_and_bools_floats_refused(env_id):
    env = gym.make(env_id, steps=np.int64(5))
    env.reset(seed=0)
    for _ in range(5):
        *_, term, _, _ = env.step(env.action_space.sample())
    assert term
    venv = vec(env_id, steps=np.int32(5), n=np.int64(2))
    assert venv.num_envs == 2 and isinstance(venv.num_envs, int)
    for bad in (True, 5.0, "5"):
        with pytest.raises(TypeError, match="steps: expected a positive integer"):
            gym.make(env_id, steps=bad)
    with pytest.raises(ValueError, match="steps: expected a positive integer"):
        gym.make(env_id, steps=np.int64(0))


@pytest.mark.parametrize("env_id", CONTINUOUS + DISCRETE)
@pytest.mark.parametrize(
    "name,bad",
    [
        ("reward_scale", float("nan")),
        ("reward_scale", float("inf")),
        ("reward_scale", True),
        ("action_scale", True),
        ("action_scale", float("nan")),
        ("action_scale", 0.0),
        ("action_scale", "5"),
    ],
)
def test_bad_scales_are_refused_naming_the_argument(env_id, name, bad):
    with pytest.raises((TypeError, ValueError), match=f"^{name}: expected"):
        DiscreteFlowEnv(env_id, **{name: bad}) if env_id in DISCRETE else dg.envs.gym_env.DiffusionEnv(
            env_id.split("/")[1], **{name: bad}
        )
    with pytest.raises((TypeError, ValueError), match=f"{name}: expected"):
        gym.make(env_id, **{name: bad})


def test_numpy_scales_are_accepted():
    env = gym.make(
        "diffusiongym/GMM1D-v0", steps=5, reward_scale=np.float32(0.5), action_scale=np.float64(2.0)
    ).unwrapped
    assert env.task.reward_scale == 0.5 and env.action_scale == 2.0
    env = gym.make("diffusiongym/DiscreteGrid-v0", reward_scale=np.float64(0.5), action_scale=np.int64(2)).unwrapped
    assert env.reward_scale == 0.5 and env.action_scale == 2.0
    reward = dg.CallableReward(lambda x: -x.abs().sum(1), differentiable=True)
    model = dg.GaussianMixtureModel(dg.gmm_preset("1d"), "linear", "velocity")
    with pytest.raises(ValueError, match="reward_scale: expected a finite number"):
        dg.make_env(model, reward, parameterization="velocity", reward_scale=float("nan"))
    with pytest.raises(TypeError, match="action_scale: expected a finite real number"):
        dg.make_env(model, reward, parameterization="velocity", action_scale=True)


@pytest.mark.parametrize("env_id", DISCRETE)
def test_discrete_reset_options_are_refused(env_id):
    env = gym.make(env_id).unwrapped
    with pytest.raises(ValueError, match=r"options: unknown value 'x'"):
        env.reset(options={"x": np.zeros(2)})
    venv = vec(env_id)
    with pytest.raises(ValueError, match=r"options: unknown value 'noise'"):
        venv.reset(options={"noise": 1})
    env.reset(options={})  # empty is fine


@pytest.mark.parametrize("env_id", DISCRETE)
def test_discrete_single_env_needs_reset(env_id):
    env = gym.make(env_id, steps=2).unwrapped
    a = np.zeros(env.action_space.shape, np.float32)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(a)
    env.reset(seed=0)
    env.step(a)
    *_, term, _, _ = env.step(a)
    assert term
    with pytest.raises(ResetNeeded, match="terminated"):
        env.step(a)
    with pytest.raises(ValueError, match="action: expected a floating-point"):
        env.reset(seed=0) and env.step(np.zeros(env.action_space.shape, np.int64))


def test_vector_actions_are_validated_on_the_autoreset_step():
    for env_id, shape in (("diffusiongym/GMM2D-v0", (2, 2)), ("diffusiongym/DiscreteGrid-v0", (2, 2, 32))):
        venv = vec(env_id)
        venv.reset(seed=0)
        for _ in range(5):
            *_, term, _, _ = venv.step(torch.zeros(shape))
        assert term.all()
        with pytest.raises(ValueError, match="expected finite"):
            venv.step(torch.full(shape, float("nan")))
        with pytest.raises(ValueError, match="expected shape"):
            venv.step(torch.zeros(shape[:-1] + (shape[-1] + 1,)))
        _, reward, term, *_ = venv.step(torch.zeros(shape))  # the autoreset step itself still works
        assert not term.any() and torch.all(reward == 0)


def test_one_action_rule_for_the_continuous_and_discrete_vector_envs():
    for env_id, shape in (("diffusiongym/GMM2D-v0", (2, 2)), ("diffusiongym/DiscreteGrid-v0", (2, 2, 32))):
        venv = vec(env_id)
        venv.reset(seed=0)
        venv.step(np.zeros(shape, np.float32))  # numpy of the env's dtype: accepted
        venv.step(torch.zeros(shape))  # tensor: accepted
        with pytest.raises(ValueError, match="expected dtype torch.float32.*numpy float64"):
            venv.step(np.zeros(shape))  # never cast silently
        with pytest.raises(ValueError, match="expected dtype torch.float32"):
            venv.step(torch.zeros(shape, dtype=torch.float64))
        with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
            venv.step(np.zeros(shape).tolist())
    # a float64 env takes float64 numpy
    venv = vec("diffusiongym/GMM1D-v0", dtype="float64")
    venv.reset(seed=0)
    venv.step(np.zeros((2, 1)))


def test_labels_are_checked_at_reset_not_step():
    env = gym.make("diffusiongym/Digits-v0", steps=5).unwrapped
    for bad, match in (
        (10, r"options\['label'\]: expected values in Discrete\(10\)"),
        (-1, "expected values in"),
        (2.5, "expected integer values"),
    ):
        with pytest.raises(ValueError, match=match):
            env.reset(seed=0, options={"label": bad})
    obs, _ = env.reset(seed=0, options={"label": np.int64(3)})
    assert obs["label"] == 3
    venv = vec("diffusiongym/Digits-v0")
    with pytest.raises(ValueError, match=r"options\['label'\]: expected values in .* got 11 at index 1"):
        venv.reset(options={"label": torch.tensor([1, 11])})
    with pytest.raises(ValueError, match=r"options\['label'\]: expected a batch of 2"):
        venv.reset(options={"label": torch.tensor([1, 2, 3])})
    obs, _ = venv.reset(options={"label": torch.tensor([1, 2], dtype=torch.int32)})
    assert obs["label"].dtype == torch.long and obs["label"].tolist() == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("env_id", CONTINUOUS + DISCRETE)
def test_cuda_without_a_gpu_is_a_clear_value_error(env_id):
    with pytest.raises(ValueError, match="device: 'cuda' is not available"):
        vec(env_id, device="cuda")
    if env_id in CONTINUOUS:
        with pytest.raises(ValueError, match="device: 'cuda' is not available"):
            gym.make(env_id, device="cuda")
    with pytest.raises(ValueError, match="device: expected a torch device"):
        vec(env_id, device="gpu0")


@pytest.mark.parametrize("env_id", ["diffusiongym/GMM1D-v0", "diffusiongym/GMM2D-v0", "diffusiongym/Digits-v0"])
def test_stiff_few_step_grids_warn(env_id):
    with pytest.warns(RuntimeWarning, match=r"steps=1: the first Euler-Maruyama step .* is stiff"):
        gym.make(env_id, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym.make(env_id, steps=MIN_STABLE_STEPS)
        gym.make(env_id, steps=2, noise="ode", action_mode="drift")  # the ODE does not blow up


def test_the_warning_is_justified_on_gmm1d():
    """Base samples (zero action) at 3 steps blow up; at 5 they are of the data's size (|x1| < 5)."""
    for steps, blown in ((3, True), (MIN_STABLE_STEPS, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            venv = vec("diffusiongym/GMM1D-v0", n=256, steps=steps)
        venv.reset(seed=0)
        for _ in range(steps):
            *_, info = venv.step(torch.zeros(256, 1))
        # the data lie within |x| < 2.5; measured std of x1: 291 at 3 steps, 1.2 at 5
        assert (float(info["final_x"].std()) > 50) == blown


def test_render_before_reset_and_without_a_mode():
    env = gym.make("diffusiongym/GMM1D-v0", steps=5, render_mode="rgb_array").unwrapped
    with pytest.raises(ResetNeeded, match="render"):
        env.render()
    env = gym.make("diffusiongym/GMM1D-v0", steps=5).unwrapped
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode=None"):
        assert env.render() is None
    with pytest.raises(TypeError, match="flat_obs: expected a bool"):
        gym.make("diffusiongym/GMM1D-v0", flat_obs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "env_id,shape",
    [
        ("diffusiongym/GMM2D-v0", (2, 2)),
        ("diffusiongym/Digits-v0", (2, 1, 8, 8)),
        ("diffusiongym/DiscreteGrid-v0", (2, 2, 32)),
    ],
)
def test_vector_envs_on_the_gpu_take_numpy_and_cuda_actions(env_id, shape):
    venv = vec(env_id, device="cuda")
    obs, _ = venv.reset(seed=0)
    assert obs["x"].device.type == "cuda"
    venv.step(np.zeros(shape, np.float32))  # moved once to the GPU
    venv.step(torch.zeros(shape, device="cuda"))
    with pytest.raises(ValueError, match="expected a tensor on cuda"):
        venv.step(torch.zeros(shape))

"""The shipped digits model: offline loading, conditioning and guidance, sample quality, the task
factory, and the training script's determinism."""

from __future__ import annotations

import gymnasium
import pytest
import torch

from diffusiongym import sample
from diffusiongym.envs.environment import VelocityEnvironment
from diffusiongym.models.digits import (
    IMAGE_SHAPE,
    NULL_LABEL,
    DigitsUNet,
    digits_dataset,
    digits_environment,
    digits_task,
    load_digits_model,
    load_module,
    sample_labels,
    save_module,
)
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.tasks import TASKS, Task, make_task


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def test_dataset_split_and_scaling():
    x_train, y_train = digits_dataset("train")
    x_test, y_test = digits_dataset("test")
    assert x_train.shape == (1437, *IMAGE_SHAPE) and x_test.shape == (360, *IMAGE_SHAPE)
    assert float(x_train.min()) == -1.0 and float(x_train.max()) == 1.0
    assert set(y_test.tolist()) == set(range(10))
    # disjoint: no test image equals a training image at distance 0 unless the data repeat it
    all_x, _ = digits_dataset("all")
    assert len(all_x) == 1797
    with pytest.raises(ValueError, match="split"):
        digits_dataset("val")


def test_model_loads_offline_and_guidance_formula(model):
    assert isinstance(model, DigitsUNet) and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(4, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    label = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        cond = model(x, t, label=label)
        uncond = model(x, t)
        null = model(x, t, label=torch.full((4,), NULL_LABEL))
        guided = model(x, t, label=label, guidance_scale=2.5)
        zero = model(x, t, label=label, guidance_scale=0.0)
    assert cond.shape == x.shape
    torch.testing.assert_close(uncond, null)
    torch.testing.assert_close(zero, uncond)
    # the batched two-pass CFG equals the formula on separate passes (float32 batch effects only)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-2  # the label matters


def test_bad_labels_raise(model):
    x = torch.zeros(2, *IMAGE_SHAPE)
    with pytest.raises(ValueError, match="label"):
        model(x, 0.5, label=torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="label"):
        model(x, 0.5, label=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"label: expected shape \(2,\)"):
        model(x, 0.5, label=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 1, 8, 8\)"):
        model(torch.zeros(2, 64), 0.5)


def test_class_conditional_samples_are_recognised(model):
    # The bar: >= 90% of class-conditional samples recognised as the requested class.
    # 30 per class with the task's defaults (memoryless SDE, 50 steps, t_start 0.01); the
    # full-size measurement (1000 samples) is in the weights' JSON and the report.
    task = digits_task()
    labels = torch.arange(10).repeat_interleave(30)
    reward = DigitClassifierReward(target=None, mode="is_class")
    traj = sample(
        task.environment,
        len(labels),
        steps=task.steps,
        t_start=task.t_start,
        cond={"label": labels},
        reward=reward,
        seed=0,
    )
    assert bool(traj.valid.all())
    assert float(traj.reward.mean()) >= 0.9
    # samples are not copies of training images: their nearest-training distance is of the order
    # of a fresh test image's (test split: mean 2.14, min 1.02; shipped samples: mean 1.86, min 0.62)
    from diffusiongym.train.digits import nearest_distances

    d = nearest_distances(traj.x1, digits_dataset("train")[0])
    assert float(d.min()) > 0.3 and float(d.mean()) > 1.5


def test_digits_task_factory():
    assert TASKS["Digits-v0"] is digits_task  # registered where the model is defined
    assert make_task("Digits-v0", steps=10).oracle is None
    task = digits_task(steps=10)
    assert isinstance(task, Task) and task.name == "Digits-v0"
    assert isinstance(task.environment, VelocityEnvironment) and task.sample_shape == IMAGE_SHAPE
    space, sampler = task.conditioning["label"]
    assert space == gymnasium.spaces.Discrete(10)
    labels = sampler(64, torch.Generator().manual_seed(0), "cpu")
    assert labels.dtype == torch.int64 and labels.shape == (64,) and int(labels.min()) >= 0 and int(labels.max()) <= 9
    torch.testing.assert_close(labels, sample_labels(64, torch.Generator().manual_seed(0)))
    traj = sample(
        task.environment,
        8,
        steps=task.steps,
        t_start=task.t_start,
        cond={"label": labels[:8]},
        reward=task.reward,
        seed=0,
    )
    assert traj.reward.shape == (8,) and task.reward.differentiable
    assert float(traj.reward.max()) <= 0.0  # a log-probability


def test_environment_noise_and_save_load_roundtrip(tmp_path, model):
    env = digits_environment(noise="ode", model=model)
    x = torch.randn(2, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([1, 2])
    torch.testing.assert_close(
        env.drift(x, 0.5, label=label), model(x, torch.full((2,), 0.5), label=label)
    )  # ODE drift = v
    save_module(model, tmp_path / "copy", {"architecture": model.config})
    loaded, config = load_module(DigitsUNet, tmp_path / "copy")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.3, label=label), model(x, 0.3, label=label), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="weights"):
        load_digits_model(path=tmp_path / "missing")


def test_training_is_deterministic():
    from diffusiongym.train.digits import DigitsTrainConfig, train_classifier, train_flow_model

    x, y = digits_dataset("train")
    x, y = x[:64], y[:64]
    config = DigitsTrainConfig(
        model_steps=4, model_batch_size=16, log_every=2, classifier_epochs=1, classifier_batch_size=32
    )
    state = torch.get_rng_state()
    m1, h1 = train_flow_model(config, x, y)
    m2, h2 = train_flow_model(config, x, y)
    assert len(h1["loss"]) == 2 and h1 == h2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    c1, hc1 = train_classifier(config, x, y)
    c2, hc2 = train_classifier(config, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # seeded blocks: the caller's global RNG is untouched
    assert len(hc1["loss"]) == 1 and hc1 == hc2

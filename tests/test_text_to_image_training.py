"""Adjoint Matching and GRPO fine-tune a tiny Stable Diffusion text-to-image task through LoRA.

The pipeline is ``tests/tiny_text_to_image.py``'s (a real ``UNet2DConditionModel``, ``AutoencoderKL``
and ``CLIPTextModel`` with tiny random weights, saved and loaded through the public loader). The
trained model is ``add_lora(env.model, copy="share")`` (peft adapters on the UNet's attention
projections, the base weights shared and frozen); the rewards are differentiable rewards on the
decoded images: ``BrightnessReward`` and a ``CLIPScore`` on a tiny random ``CLIPModel`` that scores
each image against its own prompt (the task turns the prompt indices into texts under ``prompt=``, its
default ``text_keyword`` for rewards on pretrained models).

Validity tolerance: the tiny random VAE decodes base samples to pixels in [-1.95, 1.79] (measured,
16 samples), outside ``ImageReward``'s default ``[-1.5, 1.5]``; the rewards use ``tolerance=2`` so that
every sample counts (an invalid sample would only be skipped, and with groups of two a lone valid
sample makes GRPO's return std 0).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import tiny_text_to_image as T
from safetensors import safe_open
from transformers import CLIPConfig, CLIPModel

from diffusiongym import add_lora
from diffusiongym.models.lora import lora_state_dict
from diffusiongym.rewards import BrightnessReward, CLIPImagePreprocess, CLIPScore
from diffusiongym.rewards.clip_loading import CLIPBackbone
from diffusiongym.text_to_image import text_to_image_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig

# diffusers' schedulers convert tensors with np.array (their own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PROMPTS = ["a cat", "a red dog", "sky"]
STEPS = 4
ITERATIONS = 3
TOLERANCE = 2.0  # see the module docstring


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_training")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.save(T.sd_pipeline(root / "vocab", "ddim"), root / "sd")


def tiny_clip_score(folder) -> CLIPScore:
    """``CLIPScore(scale=10)`` on a tiny random ``CLIPModel`` (16x16 images, the tiny character tokenizer)."""
    tokenizer = T.tiny_tokenizer(folder / "_clip_vocab")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=T.MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16)
    torch.manual_seed(7)  # transformers initialises from the global RNG (restored by conftest)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=12))
    backbone = CLIPBackbone(model.eval().requires_grad_(False), tokenizer, CLIPImagePreprocess(16, (16, 16)))
    return CLIPScore(backbone, scale=10.0, tolerance=TOLERANCE)


@pytest.fixture(scope="module")
def tasks(folder):
    """reward name -> the TextToImage-v0 task (memoryless noise, 4 steps, guidance 3), built once."""
    cache = {}

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            if name == "clip":
                reward = tiny_clip_score(folder)  # the task passes each sample's text as prompt= by default
            else:
                reward = BrightnessReward(tolerance=TOLERANCE)
            cache[key] = text_to_image_task(
                pipeline=folder,
                prompts=PROMPTS,
                reward=reward,
                reward_scale=10.0,
                guidance_scale=3.0,
                steps=STEPS,
                **kwargs,
            )
        return cache[key]

    return get


def make_trainer(task, method: str, seed: int = 0, **config):
    model = add_lora(task.environment.model, rank=2, copy="share")
    if method == "am":
        cfg = AdjointMatchingConfig(iterations=ITERATIONS, batch_size=4, lr=1e-2, loss_times=None, seed=seed, **config)
        return AdjointMatching(task, model=model, config=cfg)
    cfg = PolicyGradientConfig(
        iterations=ITERATIONS,
        batch_size=4,
        group_size=2,
        update_epochs=1,
        num_minibatches=2,
        lr=1e-2,
        seed=seed,
        **config,
    )
    return PolicyGradient(task, model=model, config=cfg)


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("reward", ["brightness", "clip"])
@pytest.mark.parametrize("method", ["am", "grpo"])
def test_lora_training_changes_only_the_adapters(tasks, method, reward):
    task = tasks(reward)
    trainer = make_trainer(task, method)
    base = task.environment.model
    before_params, base_params = _snapshot(trainer.model), _snapshot(base)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".attn2.to_k." in n for n in trainable)  # cross-attention projections are adapted
    before = trainer.sample(4, seed=1).x1  # the LoRA copy starts equal to the base: base samples

    history = trainer.train(progress=False)
    assert len(history["loss"]) == ITERATIONS and np.isfinite(history["loss"]).all()
    assert history["valid_fraction"] == [1.0] * ITERATIONS

    after_params = _snapshot(trainer.model)
    changed = {n for n in after_params if not torch.equal(after_params[n], before_params[n])}
    assert changed <= trainable
    assert {n for n in trainable if ".lora_B." in n} <= changed  # every B left zero
    assert all(torch.equal(p, base_params[n]) for n, p in _snapshot(base).items())
    after = trainer.sample(4, seed=1).x1
    # measured relative change 6e-3 .. 3e-2 over the four cases; 1e-4 is far above float noise
    # (the same call is bit-identical, so any change comes from the adapters)
    assert float((after - before).abs().max() / before.abs().max()) > 1e-4


def test_clip_reward_scores_each_sample_against_its_own_prompt(tasks):
    task = tasks("clip")
    env, clip = task.environment, task.reward.reward
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([2, 0, 1])
    values, valid = task.reward(z, prompt=idx)
    images = env.decode(z)
    expected = clip.evaluate(images, prompt=[PROMPTS[i] for i in idx.tolist()])
    assert valid.all()
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    shuffled = clip.evaluate(images, prompt=[PROMPTS[i] for i in idx.roll(1).tolist()])
    assert float((shuffled - expected).abs().max()) > 1e-1  # the prompt matters (measured 2.3)
    z.requires_grad_(True)
    task.reward.evaluate(z, prompt=idx).sum().backward()
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().max()) > 0


@pytest.mark.parametrize("method", ["am", "grpo"])
def test_checkpoint_holds_the_adapters_only(tasks, method, tmp_path):
    trainer = make_trainer(tasks("brightness"), method)
    trainer.train(1, progress=False)
    folder = trainer.save(tmp_path / "ckpt")
    meta = json.loads((folder / "trainer.json").read_text())
    weights = folder / meta["weights"]
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    module_keys = {k for k in keys if k.startswith("module.")}
    assert module_keys == {f"module.model.{n}" for n in lora_state_dict(trainer.model)}
    assert all(k.startswith(("optimizer-optimizer.", "generator.")) for k in keys - module_keys)
    base_bytes = sum(p.numel() * p.element_size() for p in trainer.env.model.parameters())
    assert weights.stat().st_size < base_bytes / 3  # adapters (rank 2) + two Adam moments each


@pytest.mark.parametrize("method", ["am", "grpo"])
def test_resume_is_bit_identical(tasks, method, tmp_path):
    task = tasks("brightness")
    straight = make_trainer(task, method)
    straight.train(ITERATIONS, progress=False)
    first = make_trainer(task, method)
    first.train(1, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = make_trainer(task, method).load(tmp_path / "ckpt")
    resumed.train(ITERATIONS - 1, progress=False)
    a, b = lora_state_dict(straight.model), lora_state_dict(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key, values in straight.history.items():
        if key != "seconds":
            np.testing.assert_array_equal(resumed.history[key], values, err_msg=key)


def test_gradient_checkpointing_gives_the_same_gradients(tasks):
    task = tasks("brightness")
    plain = make_trainer(task, "am")
    ckpt = make_trainer(task, "am", gradient_checkpointing=True)
    assert ckpt.model.unet.is_gradient_checkpointing
    assert not plain.model.unet.is_gradient_checkpointing and not task.environment.model.unet.is_gradient_checkpointing
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 would leave the A gradients zero: give both copies the same nonzero B
        for (name, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
            if ".lora_B." in name:
                q.copy_(p.copy_(0.1 * torch.randn(p.shape, generator=g)))
    cond = plain.conditioning(4)
    with plain.eval_mode(), torch.no_grad():
        traj = plain.rollout(cond, num_samples=4)
        pairs = plain.regression_pairs([plain.segment(traj, cond)])
    grads, calls = [], []
    for trainer in (plain, ckpt):
        count = [0]
        block = trainer.model.unet.down_blocks[0].attentions[0].transformer_blocks[0]  # holds adapters
        forward = block.forward

        def counted(*args, forward=forward, count=count, **kwargs):  # (forward hooks skip the recomputation)
            count[0] += 1
            return forward(*args, **kwargs)

        block.forward = counted
        trainer.model.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(pairs).backward()
        del block.forward
        calls.append(count[0])
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert calls[1] == 2 * calls[0]  # the block really was recomputed in the backward pass
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0
    for name, grad in grads[0].items():
        # the recomputation runs the same float32 kernels (measured difference 0); 1e-6 of the
        # largest gradient allows for a reordered reduction
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6 * scale, msg=name)


def test_gradient_checkpointing_needs_a_trainable_diffusers_model():
    config = AdjointMatchingConfig(iterations=1, batch_size=8, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing: expected a trained model holding a diffusers"):
        AdjointMatching("GMM1D-v0", config=config)
    with pytest.raises(ValueError, match="gradient_checkpointing: expected a bool"):
        AdjointMatchingConfig(gradient_checkpointing=1)


def test_bfloat16_base_with_float32_adapters(tasks):
    """The frozen base (UNet, VAE, text encoder) in bfloat16, the adapters in float32 (peft casts
    each adapter's input to its own dtype): training updates float32 adapters only."""
    task = tasks("brightness", dtype=torch.bfloat16)
    base = task.environment.model
    assert base.unet.dtype == torch.bfloat16 and task.environment.decoder.vae.dtype == torch.bfloat16
    model = add_lora(base, rank=2, copy="share")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainer = AdjointMatching(
        task, model=model, config=AdjointMatchingConfig(iterations=1, batch_size=4, lr=1e-2, loss_times=None)
    )
    history = trainer.train(progress=False)
    assert np.isfinite(history["loss"]).all() and history["valid_fraction"] == [1.0]
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert all(float(p.detach().abs().max()) > 0 for n, p in trainer.model.named_parameters() if ".lora_B." in n)

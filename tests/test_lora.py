"""LoRA adapters (peft) on diffusers models and the digits UNet: exact start, frozen base,
Adjoint Matching on the adapters only, exact save/load, clear errors. Tiny models, no network."""

from __future__ import annotations

import copy
import subprocess
import sys

import diffusers
import peft  # noqa: F401  (a dev dependency: fail, never skip, when it is missing)
import pytest
import torch
from safetensors import safe_open
from tiny_unets import tiny_unet
from torch import nn

from diffusiongym import AdjointMatching, AdjointMatchingConfig, BrightnessReward, add_lora, load_lora, save_lora
from diffusiongym.models.diffusers_loader import load_diffusers_environment
from diffusiongym.models.digits import digits_environment, load_digits_model
from diffusiongym.models.lora import lora_settings, lora_state_dict, lora_targets

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def unet_dir(tmp_path):
    """A tiny flow-matching UNet saved in the pipeline layout (unet/, scheduler/)."""
    tiny_unet().save_pretrained(tmp_path / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    return tmp_path


def _inputs(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)


def _randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _count(model: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ diffusers UNet
def test_diffusers_unet_lora_starts_equal_and_trains_only_adapters(unet_dir):
    env = load_diffusers_environment(unet_dir)
    base_state = {k: v.clone() for k, v in env.model.state_dict().items()}
    rng = torch.get_rng_state()
    model = add_lora(env.model, rank=4)
    assert torch.equal(torch.get_rng_state(), rng)  # A's init is seeded, the global RNG untouched
    # default targets: the mid block's attention projections
    assert lora_settings(model)["target_modules"] == [f"unet.mid_block.attentions.0.{n}" for n in ATTENTION]
    assert (model.parameterization, model.sample_shape) == (env.model.parameterization, env.model.sample_shape)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t), env.model(x, t))  # B = 0: bit-identical at init
        assert torch.equal(env.with_model(model).output(x, t), env.output(x, t))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sorted(trainable) == sorted(lora_state_dict(model))
    n_train, n_total = _count(model)
    # measured: 512 of 42,121 parameters (1.2 %) at rank 4
    assert n_train == 4 * 2 * (16 * 4) and n_train / n_total < 0.02
    # the base model is untouched (deep copy)
    assert not any("lora" in n for n, _ in env.model.named_parameters())
    assert all(torch.equal(v, base_state[k]) for k, v in env.model.state_dict().items())
    # alpha / rank scaling
    scaled = add_lora(env.model, rank=4, alpha=8.0)
    assert scaled.unet.mid_block.attentions[0].to_q.scaling["default"] == 2.0


def test_default_targets_without_attention_and_copy_modes():
    from diffusiongym.models.diffusers_bridge import diffusers_environment

    env = diffusers_environment(tiny_unet(attention=False), diffusers.FlowMatchEulerDiscreteScheduler())
    names = lora_targets(env.model)
    modules = dict(env.model.named_modules())
    # no attention: every Linear / Conv layer (time embedding, resnets, samplers, conv_in, conv_out)
    assert names and all(isinstance(modules[n], (nn.Linear, nn.Conv2d)) for n in names)
    assert len(names) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in env.model.modules())
    shared = add_lora(env.model, copy="share")
    base_ptrs = {p.data_ptr() for p in env.model.parameters()}
    frozen = [p for n, p in shared.named_parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in base_ptrs for p in frozen)  # no second copy of the base
    copied = add_lora(env.model)
    assert not any(p.data_ptr() in base_ptrs for p in copied.parameters())
    inplace_base = copy.deepcopy(env.model)
    assert add_lora(inplace_base, copy=False) is inplace_base
    x, t = _inputs()
    with torch.no_grad():
        ref = env.model(x, t)
        assert (
            torch.equal(shared(x, t), ref) and torch.equal(copied(x, t), ref) and torch.equal(inplace_base(x, t), ref)
        )


# Margin (measured before choosing the threshold): tiny flow UNet, lambda = 50, 6 iterations of
# batch 8 on 10 steps, then the objective on 64 samples with the same evaluation noise before and
# after. Over training seeds 0, 1, 2 and 20 evaluation seeds each, the gain was 0.354 +- 0.012,
# 0.366 +- 0.013 and 0.387 +- 0.012 (min 0.330); the test asserts > 0.1.
MIN_GAIN = 0.1


def test_adjoint_matching_trains_only_the_adapters(unet_dir):
    env = load_diffusers_environment(unet_dir)
    base_state = {k: v.clone() for k, v in env.model.state_dict().items()}
    model = add_lora(env.model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: v.clone() for n, v in lora_state_dict(model).items()}
    # random UNet samples leave [-1.5, 1.5]: keep every finite sample valid
    reward = BrightnessReward(tolerance=float("inf"))
    config = AdjointMatchingConfig(batch_size=8, lr=1e-2, loss_times=None, seed=0)
    trainer = AdjointMatching(env, reward, 50.0, model=model, config=config, steps=10, t_start=0.05)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == _count(model)[0]
    start = trainer.evaluate(num_samples=64, seed=1)
    history = trainer.train(6, progress=False)
    end = trainer.evaluate(num_samples=64, seed=1)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    # frozen base weights: bit-identical, in the trained copy and in the environment's base
    assert all(torch.equal(p, frozen_before[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(v, base_state[k]) for k, v in env.model.state_dict().items())
    # adapters moved (B from zero), so the control is no longer zero
    after = lora_state_dict(trainer.model)
    assert all(not torch.equal(after[n], lora_before[n]) for n in after if ".lora_B." in n)
    x, t = _inputs()
    with torch.no_grad():
        assert float(trainer.policy(x, t.clamp(0.1, 0.9)).abs().max()) > 1e-4
    assert end["kl"] > 0 and end["reward"] > start["reward"]
    assert end["objective"] > start["objective"] + MIN_GAIN, (start["objective"], end["objective"])


def test_adjoint_matching_checkpoint_holds_only_the_adapters_and_resumes_exactly(unet_dir, tmp_path):
    # The trainer's checkpoint leaves out frozen parameters (the base UNet the user already
    # has): only LoRA weights, optimiser state and counters; resuming is bit-identical.
    from safetensors.torch import load_file

    env = load_diffusers_environment(unet_dir)
    reward = BrightnessReward(tolerance=float("inf"))
    config = AdjointMatchingConfig(batch_size=4, lr=1e-2, loss_times=3, always_last=1, seed=0)

    def trainer():
        return AdjointMatching(env, reward, 50.0, model=add_lora(env.model), config=config, steps=6, t_start=0.05)

    straight = trainer()
    straight.train(3, progress=False)
    first = trainer()
    first.train(2, progress=False)
    first.save(tmp_path / "ckpt")
    (weights,) = (tmp_path / "ckpt").glob("weights-*.safetensors")
    saved = load_file(str(weights))
    keys = [k for k in saved if k.startswith("module.model.")]
    assert keys and all(".lora_" in k for k in keys), keys[:5]
    full = sum(v.numel() for v in first.model.state_dict().values())
    assert sum(saved[k].numel() for k in keys) < 0.05 * full
    resumed = trainer().load(tmp_path / "ckpt")
    resumed.train(1, progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for key, values in straight.history.items():  # bit-identical history (NaN gap_closed: no oracle)
        if key != "seconds":
            assert resumed.history[key] == pytest.approx(values, rel=0, abs=0, nan_ok=True), key


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip_is_exact(unet_dir, tmp_path):
    env = load_diffusers_environment(unet_dir)
    model = add_lora(env.model, rank=4, alpha=2.0)
    _randomise_adapters(model)
    x, t = _inputs()
    with torch.no_grad():
        expected = model(x, t)
        assert not torch.equal(expected, env.model(x, t))
    path = save_lora(model, tmp_path / "out" / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora_state_dict(model))  # adapter weights only
    assert meta["format"] == "diffusiongym-lora" and '"rank": 4' in meta["settings"]
    assert path.stat().st_size < 10_000  # 512 floats + metadata (the UNet itself is 42k floats)
    fresh = load_lora(add_lora(env.model, rank=4, alpha=2.0, seed=7), path)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), expected)
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(model).values()))
    # a plain base model: load_lora builds add_lora(base, **saved settings) first, base untouched
    rebuilt = load_lora(env.model, path)
    assert rebuilt is not env.model and lora_settings(rebuilt) == lora_settings(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t), expected)
        assert not torch.equal(env.model(x, t), expected)


def test_load_checks_settings_and_base(unet_dir, tmp_path):
    env = load_diffusers_environment(unet_dir)
    model = add_lora(env.model, rank=4)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="rank 4 in the file vs 2"):
        load_lora(add_lora(env.model, rank=2), path)
    with pytest.raises(ValueError, match="alpha"):
        load_lora(add_lora(env.model, rank=4, alpha=1.0), path)
    with pytest.raises(ValueError, match="target_modules"):
        load_lora(add_lora(env.model, rank=4, target_modules=["to_q", "to_v"]), path)
    other = add_lora(load_diffusers_environment(unet_dir).model, rank=4)
    with torch.no_grad():
        other.unet.conv_in.weight.add_(1e-3)  # another base model, same architecture
    with pytest.raises(ValueError, match="check_base=False"):
        load_lora(other, path)
    assert load_lora(other, path, check_base=False) is other
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a diffusiongym LoRA adapter"):
        load_lora(model, tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="path"):
        load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="add_lora"):
        save_lora(env.model, tmp_path / "base.safetensors")


# ------------------------------------------------------------------ digits UNet (no diffusers)
def test_digits_unet_accepts_lora_and_one_adjoint_matching_step():
    base = load_digits_model()
    model = add_lora(base)
    names = lora_settings(model)["target_modules"]
    # no attention in DigitsUNet: every Linear / Conv layer (21), not the label embedding
    assert len(names) == 21 and "conv_in" in names and "time_mlp.0" in names and "label_emb" not in names
    n_train, n_total = _count(model)
    assert n_train / n_total < 0.1  # measured: 29,480 of 354,345 (8.3 %) at rank 4
    x, t = _inputs(3)
    label = torch.tensor([1, 5, 9])
    with torch.no_grad():
        assert torch.equal(model(x, t, label=label), base(x, t, label=label))
        assert torch.equal(model(x, t, label=label, guidance_scale=2.0), base(x, t, label=label, guidance_scale=2.0))
    env = digits_environment(model=base)
    config = AdjointMatchingConfig(batch_size=2, loss_times=None, seed=0)
    trainer = AdjointMatching(
        env, BrightnessReward(tolerance=float("inf")), 10.0, model=model, config=config, steps=3, t_start=0.05
    )
    trainer.train(1, progress=False)
    assert any(not torch.equal(v, torch.zeros_like(v)) for n, v in lora_state_dict(model).items() if ".lora_B." in n)
    assert all(p.grad is None for p in base.parameters())


# ------------------------------------------------------------------ errors, optional import
def test_bad_arguments_raise_clear_errors(unet_dir):
    env = load_diffusers_environment(unet_dir)
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            add_lora(env.model, rank=rank)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(env.model, alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        add_lora(env.model, dropout=1.0)
    with pytest.raises(ValueError, match="copy"):
        add_lora(env.model, copy="deep")
    with pytest.raises(ValueError, match="target_modules.*Did you mean 'to_q'"):
        add_lora(env.model, target_modules=["to_qq"])
    with pytest.raises(ValueError, match="target_modules: the regular expression"):
        add_lora(env.model, target_modules=r"nothing\.here")
    with pytest.raises(ValueError, match="target_modules: LoRA adapts nn.Linear"):
        add_lora(env.model, target_modules=["mid_block"])
    with pytest.raises(ValueError, match="target_modules: Sequential has no attention"):
        add_lora(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(add_lora(env.model))
    with pytest.raises(TypeError, match="model"):
        add_lora(lambda x, t: x)


def test_missing_peft_names_the_extra(unet_dir, monkeypatch):
    env = load_diffusers_environment(unet_dir)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"pip install diffusiongym\[lora\]"):
        add_lora(env.model)


def test_import_diffusiongym_does_not_import_peft():
    code = (
        "import sys, diffusiongym; print(sorted(m for m in ('peft', 'transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

"""Bring your own diffusers model: load it from a folder, sample it, make a Gymnasium env, fine-tune it.

    python examples/diffusers_model.py --model path/to/pipeline_folder   # your model (DDPM/DDIM/flow)
    python examples/diffusers_model.py --quick                           # a tiny random UNet, a few seconds

Without ``--model`` the script saves a tiny randomly initialised 8x8 ``UNet2DModel`` and a DDIM
scheduler in the diffusers pipeline layout (``unet/``, ``scheduler/``) to a temporary folder and
loads that, so it runs offline; a real model works the same way (nothing is ever downloaded: pass a
folder, or a hub id already in your Hugging Face cache). The reward is the mean brightness of the
image (``BrightnessReward``); Adjoint Matching fine-tunes LoRA adapters on the UNet (needs peft:
``pip install "diffusiongym[lora]"``) and the script prints the mean reward and KL before and after.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import diffusers
import torch

import diffusiongym as dg


def save_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny 8x8 one-channel UNet and a 100-step DDIM scheduler (``prediction_type="sample"``: the UNet
    predicts the clean image), saved as a pipeline folder. Its last layer is scaled down so that the
    random network predicts images near 0, inside the image rewards' range [-1, 1]."""
    torch.manual_seed(seed)  # a script: the global RNG seeds the UNet's initialisation
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    unet.save_pretrained(folder / "unet")
    diffusers.DDIMScheduler(num_train_timesteps=100, prediction_type="sample").save_pretrained(folder / "scheduler")
    return folder


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers pipeline or model folder (default: a tiny random UNet)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 training iterations of 8 samples")
    args = parser.parse_args(argv)
    iterations, batch, steps = (3, 8, 10) if args.quick else (100, 32, 50)

    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or save_tiny_pipeline(Path(tmp))
        # DDPM/DDIM (epsilon, v_prediction, sample) -> EpsilonEnvironment / EndpointEnvironment,
        # FlowMatchEulerDiscreteScheduler -> VelocityEnvironment; memoryless noise by default
        env = dg.load_diffusers_environment(source)
    print(f"{type(env).__name__}, sample shape {env.sample_shape}, scheduler {type(env.scheduler).__name__}")

    reward = dg.BrightnessReward()
    base = dg.sample(env, 64, steps=steps, reward=reward, seed=0)  # the engine: (64, C, H, W) samples
    print(f"base model: mean brightness {base.reward.mean():.3f}")

    # the same model as a Gymnasium env (numpy, one episode at a time)
    gym_env = dg.make_env(env, reward, reward_scale=10.0, steps=steps)
    obs, _ = gym_env.reset(seed=0)
    for _ in range(steps):
        obs, step_reward, terminated, _, info = gym_env.step(gym_env.action_space.sample())
    assert terminated and obs["x"].shape == env.sample_shape

    # fine-tune LoRA adapters (the base stays frozen) towards brighter images
    model = dg.add_lora(env.model, rank=4)
    config = dg.AdjointMatchingConfig(iterations=iterations, batch_size=batch, seed=0)
    trainer = dg.AdjointMatching(env, reward, 10.0, model=model, config=config, steps=steps)
    trainer.train(progress=not args.quick)
    after = trainer.evaluate(num_samples=64, seed=1)
    result = {"base_reward": float(base.reward.mean()), "reward": after["reward"], "kl": after["kl"]}
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

"""Text-to-image at published model sizes with random weights (no download): our rollout against the
stock diffusers pipeline, and one LoRA training step of Adjoint Matching and GRPO.

Rows (each with wall time and peak memory):

- ``rollout ours`` / ``rollout stock``: ``diffusiongym.text_to_image.generate`` with
  ``integrator="scheduler"`` (the scheduler's own DDIM / flow-Euler update, classifier-free guidance)
  against ``pipeline(prompts, latents=z, output_type="latent")`` for the same latents, prompts,
  guidance and step count; the ratio ours / stock (target <= 1) and the relative difference of the
  final latents (the parity check, float16 rounding on a GPU).
- ``AM step`` / ``GRPO step``: one iteration of ``AdjointMatching`` / ``PolicyGradient`` (GRPO) on the
  ``TextToImage-v0`` task (memoryless noise, a differentiable reward on the decoded images) with
  ``add_lora(env.model, rank=4, copy="share")`` (adapters in float32 over the frozen base), with and
  without ``gradient_checkpointing``; timed after one warm-up iteration.

Sizes. Full (the default; meant for a GPU, float16): the SD1.5 ``UNet2DConditionModel`` config
written below (860M parameters), SD's ``AutoencoderKL`` config, a 2-layer random CLIP text encoder
of width 768, 64x64 latents (512x512 images), batch 8, 50 DDIM steps, guidance 7.5; and, once the SD3
adapter is in (``text_to_image/flow_families.py``), the SD3-medium ``SD3Transformer2DModel`` config
(2B parameters, no T5: zeros, as ``StableDiffusion3Pipeline`` without ``text_encoder_3``), 128x128
latents (1024x1024 images), 28 flow-Euler steps, guidance 7. ``--quick`` (CPU, float32): the same block
structure at a reduced width (UNet ``block_out_channels`` (32, 64, 128, 128), cross-attention width 64;
the full SD1.5 UNet takes minutes per rollout on two CPU cores; SD3: 2 layers of width 64), a small VAE,
32x32 latents, batch 2, 4 SD steps and 8 SD3 steps (the memoryless flow SDE is stiff below 5 steps).
``--family sd|sd3`` runs one family (the full-size run of both takes several minutes on a GPU).

Memory: ``torch.cuda.max_memory_allocated`` on a GPU (peak, and peak above what was allocated before
the call); on the CPU the process's peak resident set above the resident set before the call
(``/proc/self/status`` ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; an estimate:
the allocator reuses freed memory).

Run ``python benchmarks/text_to_image.py --quick`` (CPU) or ``python benchmarks/text_to_image.py`` on a
GPU; ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from _timing import best_times
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import diffusiongym.text_to_image as t2i
from diffusiongym import add_lora
from diffusiongym.rewards import BrightnessReward
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig

PROMPTS = [
    "a photo of a cat",
    "a red bicycle by a lake",
    "an astronaut riding a horse",
    "a bowl of fruit, oil painting",
    "a castle in the snow",
    "a robot reading a book",
    "sunset over the ocean",
    "a city street at night",
]

# ------------------------------------------------------------------ published configs (random weights)
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
SD_VAE = dict(  # its vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD_SCHEDULER = dict(  # its scheduler/scheduler_config.json, as a DDIMScheduler
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
SD3_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD3_VAE = dict(
    SD_VAE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def reduced_unet(width: int = 32, cross: int = 64) -> dict[str, Any]:
    """SD1.5's block structure at ``block_out_channels`` ``(w, 2w, 4w, 4w)``."""
    return dict(SD15_UNET, block_out_channels=(width, 2 * width, 4 * width, 4 * width), cross_attention_dim=cross)


def small_vae(latent_channels: int = 4, **extra: Any) -> dict[str, Any]:
    """Four levels (8x upsampling, as SD's) at ``block_out_channels`` (32, 32, 64, 64), one layer each."""
    return dict(
        SD_VAE, latent_channels=latent_channels, block_out_channels=(32, 32, 64, 64), layers_per_block=1, **extra
    )


# ------------------------------------------------------------------ components
def char_tokenizer(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (no merges; nothing downloaded)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789!,.'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>"
    )


def text_encoder(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None) -> torch.nn.Module:
    """A 2-layer random CLIP text encoder of width ``hidden`` (with a projection for SD3)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def sd_pipeline(quick: bool, folder: Path) -> Any:
    tokenizer = char_tokenizer(folder / "vocab")
    unet_cfg = reduced_unet() if quick else SD15_UNET
    if quick:
        unet_cfg = dict(unet_cfg, sample_size=32)
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**(small_vae() if quick else SD_VAE)),
        text_encoder=text_encoder(tokenizer, unet_cfg["cross_attention_dim"]),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**unet_cfg),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd3_pipeline(quick: bool, folder: Path) -> Any:
    tokenizer = char_tokenizer(folder / "vocab")
    cfg = SD3_TRANSFORMER
    if quick:
        cfg = dict(
            cfg,
            sample_size=32,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=64,
            pooled_projection_dim=96,
            pos_embed_max_size=32,
        )
    clip_l, clip_g = (32, 64) if quick else (768, 1280)  # pooled = clip_l + clip_g = pooled_projection_dim
    return diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel(**cfg),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=diffusers.AutoencoderKL(
            **(small_vae(16, **{k: SD3_VAE[k] for k in ("scaling_factor", "shift_factor")}) if quick else SD3_VAE)
        ),
        text_encoder=text_encoder(tokenizer, clip_l, clip_l),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(tokenizer, clip_g, clip_g),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


# ------------------------------------------------------------------ measuring
def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Peak memory of one call of ``fn`` (GiB): ``peak`` and ``above`` what was in use before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_gib": peak / 2**30, "above_gib": (peak - before) / 2**30}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return {"peak_gib": float("nan"), "above_gib": float("nan")}
    return {"peak_gib": peak / 2**20, "above_gib": (peak - before) / 2**20}


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def rollout_rows(
    name: str, pipe: Any, steps: int, batch: int, guidance: float, device: torch.device, repeats: int
) -> list[dict]:
    """Our scheduler-integrator rollout against the stock pipeline, same latents and prompts."""
    prompts = (PROMPTS * batch)[:batch]
    env = t2i.text_to_image_environment(
        pipe, prompts, guidance_scale=guidance, integrator="scheduler", steps=steps, offload_text_encoders=False
    )
    shape = env.sample_shape
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = env.model.unet.dtype
    z = torch.randn(batch, *shape, generator=gen, device=device, dtype=torch.float32)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return t2i.generate(env, prompts, z).x1

    def stock() -> torch.Tensor:
        out = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=z.to(dtype).clone(),
            output_type="latent",
        )
        return out.images

    fns = {"ours": synced(ours, device), "stock": synced(stock, device)}
    a, b = fns["ours"](), fns["stock"]()  # warm-up (and the prompt encoding of ours, cached from here on)
    diff = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    times = best_times(fns, repeats)
    mem = {k: measure(f, device) for k, f in fns.items()}
    return [
        {
            "row": f"{name} rollout {k}",
            "seconds": times[k],
            "ratio": times[k] / times["stock"],
            **mem[k],
            "latent_rel_diff": diff,
        }
        for k in ("ours", "stock")
    ]


def training_rows(
    name: str, pipe: Any, steps: int, batch: int, guidance: float, device: torch.device, checkpointing: list[bool]
) -> list[dict]:
    """One LoRA training iteration of Adjoint Matching and GRPO (after a warm-up iteration)."""
    task = t2i.text_to_image_task(
        pipeline=pipe,
        prompts=PROMPTS,
        reward=BrightnessReward(tolerance=float("inf")),  # random VAE: every finite image counts
        reward_scale=10.0,
        guidance_scale=guidance,
        steps=steps,
        noise="memoryless",
        offload_text_encoders=False,
    )
    rows = []
    for method in ("AM", "GRPO"):
        for ckpt in checkpointing:
            model = add_lora(task.environment.model, rank=4, copy="share")
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # float32 adapters over the float16 base
            if method == "AM":
                config = AdjointMatchingConfig(
                    iterations=2,
                    batch_size=batch,
                    lr=1e-4,
                    loss_times=min(10, steps),
                    always_last=min(5, steps),
                    minibatch_size=batch,
                    gradient_checkpointing=ckpt,
                )
                trainer: Any = AdjointMatching(task, model=model, config=config, device=device)
            else:
                config = PolicyGradientConfig(
                    iterations=2,
                    batch_size=batch,
                    group_size=max(2, batch // 2),
                    update_epochs=1,
                    num_minibatches=steps,
                    lr=1e-4,
                    gradient_checkpointing=ckpt,
                )
                trainer = PolicyGradient(task, model=model, config=config, device=device)
            step = synced(trainer.step, device)
            step()  # warm-up
            start = time.perf_counter()
            mem = measure(step, device)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "row": f"{name} {method} step{' +ckpt' if ckpt else ''}",
                    "seconds": seconds,
                    **mem,
                    "loss": float(trainer.history["loss"][-1]),
                }
            )
            del trainer, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def sd3_available() -> str | None:
    """``None`` when the SD3 adapter is registered, else why not."""
    try:
        importlib.import_module("diffusiongym.text_to_image.flow_families")
    except ImportError as err:
        return f"pending (diffusiongym.text_to_image.flow_families: {err})"
    if "sd3" not in t2i.FAMILIES:
        return "pending (no 'sd3' family registered)"
    return None


def print_rows(rows: list[dict]) -> None:
    print(f"{'row':<32} {'seconds':>9} {'ratio':>6} {'peak GiB':>9} {'above GiB':>9}  notes")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        notes = []
        if "latent_rel_diff" in r:
            notes.append(f"final latents rel diff {r['latent_rel_diff']:.1e}")
        if "loss" in r:
            notes.append(f"loss {r['loss']:.3g}")
        if "error" in r:
            notes.append(r["error"])
        seconds = f"{r['seconds']:.3f}" if "seconds" in r else ""
        peak = f"{r['peak_gib']:.3f}" if "peak_gib" in r else ""
        above = f"{r['above_gib']:.3f}" if "above_gib" in r else ""
        print(f"{r['row']:<32} {seconds:>9} {ratio:>6} {peak:>9} {above:>9}  {'; '.join(notes)}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes for a CPU (see the module docstring)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="SD steps (SD3: --sd3-steps)")
    parser.add_argument("--sd3-steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--family", choices=("sd", "sd3", "all"), default="all", help="which rows to run")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 50)
    sd3_steps = args.sd3_steps or (8 if args.quick else 28)  # the memoryless flow needs >= 5 steps
    repeats = args.repeats or (2 if args.quick else 3)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"device {device}, dtype {dtype}, batch {batch}, SD steps {steps}, SD3 steps {sd3_steps}, "
        f"{'quick (reduced sizes)' if args.quick else 'full size'}, torch threads {torch.get_num_threads()}, "
        f"load average {load[0]}"
    )
    warnings.filterwarnings("ignore", message=".*__array__ implementation.*")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        want_sd3 = args.family in ("sd3", "all")
        families = [("SD1.5", sd_pipeline, steps, 7.5)] if args.family in ("sd", "all") else []
        why = sd3_available() if want_sd3 else None
        if want_sd3 and why is None:
            families.append(("SD3", sd3_pipeline, sd3_steps, 7.0))
        for name, build, n_steps, guidance in families:
            torch.manual_seed(0)  # a script: random weights from the global RNG
            start = time.perf_counter()
            pipe = build(args.quick, Path(tmp) / name)
            pipe.to(device)  # float32 as built on the CPU (casting prints diffusers' notice)
            if dtype != torch.float32:
                pipe.to(dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            denoiser = getattr(pipe, "unet", None) or pipe.transformer
            params = sum(p.numel() for p in denoiser.parameters())
            print(
                f"{name}: denoiser {type(denoiser).__name__} {params / 1e6:.1f}M parameters, built in "
                f"{time.perf_counter() - start:.1f} s"
            )
            try:
                rows += rollout_rows(name, pipe, n_steps, batch, guidance, device, repeats)
                if not args.no_training:
                    rows += training_rows(name, pipe, n_steps, batch, guidance, device, checkpointing)
            except Exception as err:  # noqa: BLE001 - a benchmark row reports its failure and the rest go on
                if name == "SD1.5":
                    raise
                rows.append({"row": f"{name}", "error": f"failed: {type(err).__name__}: {err}"[:200]})
            del pipe, denoiser
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if want_sd3 and why is not None:
            rows.append({"row": "SD3", "error": why})
    print_rows(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])

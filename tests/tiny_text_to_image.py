"""Tiny randomly initialised text-to-image pipelines of the real diffusers/transformers classes.

Nothing is downloaded: the CLIP tokenizer is built from a vocabulary written here (every
character alone and as a word end, no merges), the networks from tiny configs with fixed seeds.
:func:`save_sd_pipeline` / :func:`save_sdxl_pipeline` write a pipeline folder with
``save_pretrained`` (safetensors weights) and return the stock pipeline object.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!,. "
MAX_LENGTH = 12
LATENT_SIZE = 8  # latents (4, 8, 8); images (3, 16, 16) with the two-level VAE below

SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "ddpm": diffusers.DDPMScheduler,
}


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (``vocab.json`` + an empty ``merges.txt`` in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS.strip():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH, pad_token="<|endoftext|>"
    )


def tiny_text_encoder(seed: int, vocab_size: int, hidden: int = 16, projection: int | None = None):
    """``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when ``projection`` is given)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection is not None else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 1) -> diffusers.AutoencoderKL:
    """Two-level ``AutoencoderKL``: 16x16x3 images <-> 8x8x4 latents (SD's scaling factor 0.18215)."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * LATENT_SIZE,
    ).eval()


def tiny_unet(
    seed: int, cross_attention_dim: int, sdxl_projection: int | None = None
) -> diffusers.UNet2DConditionModel:
    """``UNet2DConditionModel`` on 8x8x4 latents; with ``sdxl_projection`` SDXL's ``text_time`` conditioning."""
    torch.manual_seed(seed)
    extra = {}
    if sdxl_projection is not None:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=4 * 6 + sdxl_projection,
        )
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        **extra,
    )
    with torch.no_grad():  # random init leaves the output convolution near zero: make it matter
        unet.conv_out.weight.mul_(3.0)  # output std ~1 (measured 0.33 before)
    return unet.eval()


def scheduler(name: str, prediction_type: str = "epsilon", **kwargs):
    """SD's scheduler config (scaled-linear betas, ``leading`` spacing, ``steps_offset=1``)."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    if name == "ddim":
        config.update(clip_sample=False, set_alpha_to_one=False)
    if name == "ddpm":
        config.update(clip_sample=False)
    config.update(kwargs)
    return SCHEDULERS[name](**config)


def sd_pipeline(folder: Path, scheduler_name: str = "ddim", prediction_type: str = "epsilon", **scheduler_kwargs):
    """A tiny ``StableDiffusionPipeline`` (no safety checker)."""
    tokenizer = tiny_tokenizer(folder / "_vocab")
    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(2, len(tokenizer)),
        tokenizer=tokenizer,
        unet=tiny_unet(3, 16),
        scheduler=scheduler(scheduler_name, prediction_type, **scheduler_kwargs),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(folder: Path, scheduler_name: str = "euler", prediction_type: str = "epsilon"):
    """A tiny ``StableDiffusionXLPipeline``: two CLIP encoders (16 + 8 wide), pooled projection 8."""
    tokenizer = tiny_tokenizer(folder / "_vocab")
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(2, len(tokenizer), hidden=16),
        text_encoder_2=tiny_text_encoder(4, len(tokenizer), hidden=8, projection=8),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet(5, 24, sdxl_projection=8),
        scheduler=scheduler(scheduler_name, prediction_type),
    )


def save(pipe, folder: Path) -> Path:
    """``pipe.save_pretrained(folder)`` (safetensors); returns ``folder``."""
    pipe.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------ flow transformers (SD3 / FLUX)
T5_MAX_LENGTH = 16  # max_sequence_length passed to the pipelines and the env in the tests
SD3_SHIFT = 3.0  # SD3's published scheduler shift


def tiny_t5_tokenizer():
    """A ``T5TokenizerFast`` (a Unigram model over single characters with and without the word-start
    mark, no sentencepiece file): ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    from transformers import T5TokenizerFast

    chars = CHARS.strip()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5_encoder(seed: int, vocab_size: int, d_model: int = 32):
    """``T5EncoderModel`` from a tiny ``T5Config`` (2 layers, 4 heads)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_flow_vae(seed: int = 1, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """The two-level ``AutoencoderKL`` of :func:`tiny_vae` with an SD3/FLUX-style ``shift_factor``
    (SD3's scaling 1.5305; the shift is SD3's 0.0609)."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * LATENT_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def flow_scheduler(shift: float = SD3_SHIFT, dynamic: bool = False):
    """``FlowMatchEulerDiscreteScheduler`` with SD3's ``shift`` or FLUX-dev's dynamic shifting."""
    if dynamic:
        return diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=shift,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _scale(module: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        module.weight.mul_(factor)
        module.bias.mul_(factor)


def _sharpen(transformer: torch.nn.Module) -> None:
    """Random init leaves the output projection small and the time and text inputs weak: make the
    velocity O(1) and its dependence on the timestep, the prompt (and FLUX's guidance) O(1) too, so
    that a wrong timestep scale or CFG formula shows."""
    _scale(transformer.proj_out, 8.0)
    _scale(transformer.context_embedder, 4.0)
    embed = transformer.time_text_embed
    for name in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        if hasattr(embed, name):
            _scale(getattr(embed, name).linear_1, 4.0)


def sd3_pipeline(folder: Path, shift: float = SD3_SHIFT, dynamic: bool = False, t5: bool = True):
    """A tiny ``StableDiffusion3Pipeline``: CLIP-L (8 wide) and CLIP-G (16 wide) with projections 8,
    T5 (32 wide, or none), ``SD3Transformer2DModel`` on 8x8x4 latents (patch 2)."""
    tokenizer = tiny_tokenizer(folder / "_vocab")
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(7)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    ).eval()
    _sharpen(transformer)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift, dynamic),
        vae=tiny_flow_vae(),
        text_encoder=tiny_text_encoder(2, len(tokenizer), hidden=8, projection=8),
        tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(4, len(tokenizer), hidden=16, projection=8),
        tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5_encoder(6, len(t5_tokenizer)) if t5 else None,
        tokenizer_3=t5_tokenizer if t5 else None,
    )


def flux_pipeline(folder: Path, guidance_embeds: bool = True, shift: float = SD3_SHIFT, dynamic: bool = True):
    """A tiny ``FluxPipeline``: CLIP (pooled, 8 wide), T5 (32 wide), ``FluxTransformer2DModel`` on
    8x8x4 latents packed 2x2 into 16 tokens of 16 channels, with or without the guidance embedding."""
    tokenizer = tiny_tokenizer(folder / "_vocab")
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(8)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    _sharpen(transformer)
    return diffusers.FluxPipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift, dynamic),
        vae=tiny_flow_vae(),
        text_encoder=tiny_text_encoder(2, len(tokenizer), hidden=8),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(6, len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
    )

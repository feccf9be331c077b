"""Tiny randomly initialised diffusers UNets for offline tests (no hub access)."""

from __future__ import annotations

import diffusers
import torch


def tiny_unet(seed: int = 0, num_class_embeds: int | None = None, attention: bool = True) -> diffusers.UNet2DModel:
    """An 8x8, 1-channel ``UNet2DModel`` (~40k parameters) in eval mode; ``attention``: the
    mid block's attention layer (on by default in diffusers)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
        add_attention=attention,
    ).eval()

"""Latents -> images, only where images are needed (terminal reward, render, ``pred_final`` images).

``image = vae.decode(z / scaling_factor + shift_factor).sample`` with both factors from the VAE
config (``shift_factor`` is ``None``, i.e. 0, for SD/SDXL; SD3/FLUX VAEs have one). Images come out
in ``[-1, 1]`` (up to the VAE's overshoot), the range of
:class:`~diffusiongym.rewards.images.ImageReward`. Decoding is batched (``chunk_size`` latents per
VAE call) and runs without autograd unless the latents require a gradient (a trainer that
differentiates the reward) or ``grad=True`` is asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusiongym.rewards.base import Reward
from diffusiongym.tasks import check_reward
from diffusiongym.utils.validation import check_positive_int

__all__ = ["LatentDecoder", "DecodedReward"]


class LatentDecoder:
    """Decode latents with a diffusers ``AutoencoderKL``.

    Parameters
    ----------
    vae : AutoencoderKL
    chunk_size : int, optional
        At most this many latents per VAE call (memory); default all at once.
    """

    def __init__(self, vae: Any, chunk_size: int | None = None):
        config = getattr(vae, "config", None)
        if config is None or not hasattr(vae, "decode"):
            raise TypeError(f"vae: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
        self.vae = vae
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)

    def __call__(self, z: Tensor, grad: bool | None = None) -> Tensor:
        """Images ``(n, 3, H, W)`` in ``z``'s dtype for latents ``z`` ``(n, C, h, w)``.

        ``grad``: keep the autograd graph (default: when ``z`` requires a gradient)."""
        if not isinstance(z, Tensor) or z.ndim != 4:
            raise ValueError(f"z: expected latents of shape (n, C, h, w), got {getattr(z, 'shape', type(z).__name__)}")
        grad = z.requires_grad if grad is None else bool(grad)
        vae_dtype = getattr(self.vae, "dtype", z.dtype)
        size = self.chunk_size or max(z.shape[0], 1)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            images = [
                self.vae.decode((chunk / self.scaling_factor + self.shift_factor).to(vae_dtype)).sample
                for chunk in z.split(size)
            ]
        return torch.cat(images).to(z.dtype) if images else z.new_zeros((0, 3, *z.shape[2:]))


class DecodedReward(Reward):
    """An image reward on latents: ``reward(decoder(z), **cond)``.

    Differentiable when the image reward is (the VAE is differentiable); the conditioning
    (e.g. ``prompt``) is passed through. With ``prompt_texts`` (a
    :class:`~diffusiongym.text_to_image.prompts.PromptSet`) and ``text_keyword``, the prompt texts
    of the batch are passed as ``text_keyword=[...]`` too (for rewards that score image-text
    agreement).
    """

    def __init__(
        self, reward: Reward, decoder: LatentDecoder, prompt_texts: Any = None, text_keyword: str | None = None
    ):
        self.reward = check_reward(reward)
        if not isinstance(decoder, LatentDecoder):
            raise TypeError(f"decoder: expected a LatentDecoder, got {type(decoder).__name__}")
        if text_keyword is not None and prompt_texts is None:
            raise ValueError("text_keyword: needs prompt_texts (the prompt set)")
        self.decoder = decoder
        self.prompt_texts = prompt_texts
        self.text_keyword = text_keyword
        self.differentiable = self.reward.differentiable
        self.range = self.reward.range

    def _images_and_cond(self, z: Tensor, cond: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        images = self.decoder(z)
        if self.text_keyword is not None and "prompt" in cond:
            idx = torch.as_tensor(cond["prompt"]).reshape(-1).tolist()
            cond = {**cond, self.text_keyword: [self.prompt_texts[i] for i in idx]}
        return images, cond

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        images, cond = self._images_and_cond(x, cond)
        return self.reward.evaluate(images, **cond)

    def __call__(self, x: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        """``(values, valid)``: one decode, the image reward's own validity; invalid latents
        (NaN/inf) are flagged too."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"x: expected latents of shape (n, C, h, w), got {getattr(x, 'shape', type(x).__name__)}")
        images, cond = self._images_and_cond(x, cond)
        values, valid = self.reward(images, **cond)
        return values, valid & torch.isfinite(x.detach().flatten(1)).all(1)

    def __repr__(self) -> str:
        return f"DecodedReward({self.reward!r})"

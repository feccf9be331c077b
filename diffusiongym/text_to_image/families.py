"""Per-family adapters: how a text-to-image family encodes prompts and calls its denoiser.

A :class:`FamilyAdapter` knows, for one family of diffusers pipelines,

- which components it needs (``component_keys``: the denoiser, ``vae``, text encoders, tokenizers,
  ``scheduler``) and which classes each may be;
- :meth:`~FamilyAdapter.encode`: prompts -> a dict of per-prompt tensors (``"embeds"``
  ``(n, L, D)``, and ``"pooled"`` ``(n, P)`` where the family has one), exactly as the stock
  pipeline's ``encode_prompt`` computes them (no LoRA scale, no ``clip_skip``);
- :meth:`~FamilyAdapter.negative`: the unconditional branch of classifier-free guidance (one row);
- :meth:`~FamilyAdapter.denoiser_kwargs`: the keyword arguments of one denoiser call for a batch
  of latents ``x`` and its gathered conditioning.

Families now: ``"sd"`` (``StableDiffusionPipeline``: SD 1.x / 2.x ``UNet2DConditionModel``,
epsilon or v prediction) and ``"sdxl"`` (``StableDiffusionXLPipeline``: two CLIP encoders whose
penultimate hidden states are concatenated, the pooled projection of the second, and
``add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; the negative branch
is zeros when no negative prompt is given and the pipeline config has
``force_zeros_for_empty_prompt``).

Slot for the flow transformers (:data:`PLANNED_FAMILIES`): an SD3 adapter adds the T5 encoder
(``text_encoder_3``) and calls ``SD3Transformer2DModel(hidden_states, timestep=sigma * 1000,
encoder_hidden_states, pooled_projections)``; a FLUX adapter packs latents 2x2 into tokens
(``img_ids``/``txt_ids``), passes ``timestep = sigma`` and the ``guidance`` embedding. Both use
``FlowMatchEulerDiscreteScheduler`` (``kind == "flow"`` in the bridge, velocity ``-output``), whose
step is exactly our Euler step, and may override :meth:`FamilyAdapter.timestep`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusiongym.models.diffusers_bridge import DiffusersModel
from diffusiongym.utils.validation import unknown_name_error

__all__ = [
    "FamilyAdapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "FAMILIES",
    "PIPELINE_FAMILIES",
    "PLANNED_FAMILIES",
    "family_adapter",
]

CLIP_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Tensor:
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


class FamilyAdapter:
    """Base class; see the module docstring. ``components`` is a
    :class:`~diffusiongym.text_to_image.components.PipelineComponents`."""

    name: ClassVar[str] = ""
    denoiser_key: ClassVar[str] = "unet"
    component_classes: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, components: Any):
        self.components = components

    def __deepcopy__(self, memo: dict) -> FamilyAdapter:
        return self  # configuration and references only: a model copy shares it

    @property
    def text_encoders(self) -> list[Any]:
        return [self.components.parts[k] for k in self.component_classes if k.startswith("text_encoder")]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.components.parts[k] for k in self.component_classes if k.startswith("tokenizer")]

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def negative(self, text: str | None) -> dict[str, Tensor]:
        """The unconditional branch: ``text`` (``None`` = the pipeline's default) encoded, one row."""
        return self.encode(["" if text is None else text])

    def denoiser_kwargs(self, cond: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def timestep(self, model: Any, t: Tensor) -> Tensor:
        """The denoiser's timestep for our ``t`` (default: the bridge's, ``(1 - t)(T - 1)`` or ``(1 - t) T``)."""
        return DiffusersModel.timestep(model, t)


class StableDiffusionAdapter(FamilyAdapter):
    """SD 1.x / 2.x: ``encoder_hidden_states`` = the CLIP encoder's last hidden state."""

    name = "sd"
    component_classes = {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": CLIP_ENCODERS,
        "tokenizer": CLIP_TOKENIZERS,
    }

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        (encoder,), (tokenizer,) = self.text_encoders, self.tokenizers
        ids = _tokenize(tokenizer, texts, tokenizer.model_max_length).to(encoder.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).attention_mask.to(encoder.device)
        return {"embeds": encoder(ids, attention_mask=mask)[0]}

    def denoiser_kwargs(self, cond: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["embeds"]}


class StableDiffusionXLAdapter(FamilyAdapter):
    """SDXL: concatenated penultimate hidden states, pooled projection, ``add_time_ids``.

    Parameters
    ----------
    components : PipelineComponents
    original_size, target_size : (int, int), optional
        SDXL's size conditioning (default the image size ``latent size * vae_scale_factor``).
    crops_coords_top_left : (int, int)
    """

    name = "sdxl"
    component_classes = {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": CLIP_ENCODERS,
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "tokenizer": CLIP_TOKENIZERS,
        "tokenizer_2": CLIP_TOKENIZERS,
    }

    def __init__(
        self,
        components: Any,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ):
        super().__init__(components)
        image = tuple(s * components.vae_scale_factor for s in components.latent_shape[1:])
        self.time_ids = [*(original_size or image), *crops_coords_top_left, *(target_size or image)]
        unet = components.denoiser
        expected = unet.add_embedding.linear_1.in_features
        passed = (
            unet.config.addition_time_embed_dim * len(self.time_ids)
            + components.parts["text_encoder_2"].config.projection_dim
        )
        if expected != passed:
            raise ValueError(
                f"components: the SDXL UNet expects added embeddings of width {expected}, the text encoder "
                f"projection and time ids give {passed}; the pipeline's configs do not match"
            )

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = _tokenize(tokenizer, texts, tokenizer.model_max_length).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the pooled projection (the pipeline's rule)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        device = hidden[-1].device
        return {"embeds": torch.cat([h.to(device) for h in hidden], dim=-1), "pooled": pooled.to(device)}

    def negative(self, text: str | None) -> dict[str, Tensor]:
        if text is None and self.components.options.get("force_zeros_for_empty_prompt", True):
            return {k: torch.zeros_like(v) for k, v in self.encode([""]).items()}
        return self.encode(["" if text is None else text])

    def denoiser_kwargs(self, cond: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
        time_ids = torch.tensor(self.time_ids, dtype=cond["pooled"].dtype, device=x.device)
        return {
            "encoder_hidden_states": cond["embeds"],
            "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": time_ids.expand(x.shape[0], -1)},
        }


FAMILIES: dict[str, type[FamilyAdapter]] = {"sd": StableDiffusionAdapter, "sdxl": StableDiffusionXLAdapter}
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
"""diffusers pipeline class (``model_index.json``'s ``_class_name``) -> family."""
PLANNED_FAMILIES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
"""Families with a slot but no adapter yet (see the module docstring)."""


def family_adapter(family: str, components: Any, **options: Any) -> FamilyAdapter:
    """The adapter of ``family`` bound to ``components``; ``NotImplementedError`` for a planned family."""
    if family in PLANNED_FAMILIES:
        raise NotImplementedError(
            f"family: {family!r} ({PLANNED_FAMILIES[family]}) is planned but has no adapter yet; "
            f"supported now: {list(FAMILIES)}"
        )
    if family not in FAMILIES:
        raise unknown_name_error("family", family, FAMILIES)
    return FAMILIES[family](components, **options)

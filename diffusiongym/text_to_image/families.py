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

The flow transformers ``"sd3"`` (``StableDiffusion3Pipeline``) and ``"flux"`` (``FluxPipeline``) live in
:mod:`~diffusiongym.text_to_image.flow_families`, which adds them here with :func:`register_family`
(:data:`PLANNED_FAMILIES` is the slot for a family that is named but has no adapter). An adapter may
also override :meth:`FamilyAdapter.timestep` (the denoiser's time input), :meth:`FamilyAdapter.call`
(how the denoiser is called: keyword inputs, packed tokens), :meth:`FamilyAdapter.grid_options`
(the scheduler's ``set_timesteps`` arguments, e.g. a dynamic shift ``mu``), ``latent_shape`` and
``default_guidance_scale``; ``optional_components`` may be absent (``None``) from a pipeline.
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
    "register_family",
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
    optional_components: ClassVar[tuple[str, ...]] = ()
    """Components a pipeline may leave out (``None``), e.g. SD3's T5 encoder."""
    default_guidance_scale: ClassVar[float] = 7.5
    """The environment's classifier-free guidance scale when none is given."""

    def __init__(self, components: Any):
        self.components = components

    @classmethod
    def default_latent_shape(cls, components: Any) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent from the denoiser config: ``in_channels`` and ``sample_size``."""
        cfg = components.denoiser.config
        size = cfg.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(hw[0]), int(hw[1]))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the environment's state (default :meth:`default_latent_shape`)."""
        return self.components.latent_shape

    def grid_options(self, steps: int) -> dict[str, Any]:
        """Keyword arguments of the scheduler's ``set_timesteps(steps, ...)`` as the pipeline passes them."""
        return {}

    def call(self, model: DiffusersModel, x: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """One denoiser evaluation ``(n, C, H, W) -> (n, C, H, W)`` (default: the bridge's
        ``denoiser(x, timestep, **kwargs)``)."""
        return DiffusersModel._unet(model, x, timestep, None, kwargs)

    def __deepcopy__(self, memo: dict) -> FamilyAdapter:
        return self  # configuration and references only: a model copy shares it

    @property
    def text_encoders(self) -> list[Any]:
        parts = self.components.parts
        return [parts[k] for k in self.component_classes if k.startswith("text_encoder") and parts.get(k) is not None]

    @property
    def tokenizers(self) -> list[Any]:
        parts = self.components.parts
        return [parts[k] for k in self.component_classes if k.startswith("tokenizer") and parts.get(k) is not None]

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
"""Families with a slot but no adapter yet (see the module docstring); :func:`register_family` fills it."""


def register_family(adapter: type[FamilyAdapter], pipeline_class: str) -> None:
    """Add ``adapter`` (a :class:`FamilyAdapter` subclass with a ``name``) for ``pipeline_class``."""
    if not (isinstance(adapter, type) and issubclass(adapter, FamilyAdapter)) or not adapter.name:
        raise TypeError(f"adapter: expected a named FamilyAdapter subclass, got {adapter!r}")
    FAMILIES[adapter.name] = adapter
    PIPELINE_FAMILIES[pipeline_class] = adapter.name
    PLANNED_FAMILIES.pop(adapter.name, None)


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

"""The flow-transformer families: SD3 / SD3.5 (``"sd3"``) and FLUX (``"flux"``).

Both use ``FlowMatchEulerDiscreteScheduler``: ``x_sigma = (1 - sigma) x_data + sigma noise``, model
output ``noise - x_data``. Ours (the bridge's ``kind == "flow"``): ``t = 1 - sigma``, ``alpha = t``,
``beta = 1 - t``, velocity ``v = -output``; the scheduler's step ``x + (sigma' - sigma) output`` is
our Euler step in ``t`` on its (shifted) grid, so ``integrator="scheduler"`` reproduces the pipelines
to float tolerance. The shift (``shift`` or, with ``use_dynamic_shifting``, ``mu`` from the image
token count, :func:`calculate_shift`) only re-spaces the grid: :meth:`FlowTransformerAdapter.grid_options`
passes ``set_timesteps`` what the pipeline passes.

- :class:`StableDiffusion3Adapter` (``StableDiffusion3Pipeline``): CLIP-L and CLIP-G
  (``CLIPTextModelWithProjection``) penultimate hidden states concatenated and zero-padded to the T5
  width, then the T5 states appended along the sequence (zeros of ``joint_attention_dim`` when the
  pipeline has no T5, ``text_encoder_3 = None``); ``pooled`` = the two projections concatenated.
  ``SD3Transformer2DModel(hidden_states, timestep=sigma * 1000, encoder_hidden_states,
  pooled_projections)``; CFG on the flow output with the negative prompt (default ``""``).
- :class:`FluxAdapter` (``FluxPipeline``): CLIP's ``pooler_output`` and the T5 states;
  ``FluxTransformer2DModel`` takes ``timestep = sigma``, the latents packed 2x2 into tokens
  (``img_ids`` = the token's (0, row, column), ``txt_ids`` = zeros) and, for guidance-distilled
  models (``guidance_embeds``), ``guidance`` (the pipeline's ``guidance_scale``, default 3.5; here
  the family option ``guidance``). The environment's ``guidance_scale`` is the pipeline's
  ``true_cfg_scale`` (default 1: off); with ``g != 1`` and no negative prompt the unconditional
  branch is the empty prompt (``FluxPipeline`` then skips true CFG). The grid is FLUX's:
  ``sigmas = linspace(1, 1 / n, n)`` then the (dynamic) shift.

The environment's state is the *unpacked* latent ``(C, H, W)`` for every family (FLUX is packed
and unpacked inside :meth:`FluxAdapter.call`), so rewards, decoding and trainers see one shape.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusiongym.models.diffusers_bridge import DiffusersModel
from diffusiongym.text_to_image.families import CLIP_TOKENIZERS, FamilyAdapter, _tokenize, register_family
from diffusiongym.utils.validation import check_positive_int, check_real

__all__ = [
    "FlowTransformerAdapter",
    "StableDiffusion3Adapter",
    "FluxAdapter",
    "calculate_shift",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
]

T5_ENCODERS = ("T5EncoderModel",)
T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The dynamic shift ``mu``: linear in the image token count through ``(base_seq_len, base_shift)``
    and ``(max_seq_len, max_shift)`` (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def pack_latents(x: Tensor) -> Tensor:
    """``(n, C, H, W) -> (n, (H / 2)(W / 2), 4 C)``: 2x2 patches as tokens, row-major (FLUX's ``_pack_latents``)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height x width``."""
    n, _, d = tokens.shape
    x = tokens.view(n, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """FLUX's position ids of the packed tokens ``((H / 2)(W / 2), 3)``: ``(0, row, column)``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTransformerAdapter(FamilyAdapter):
    """Shared by SD3 and FLUX: keyword calls of the transformer, the image size, the T5 encoder.

    Parameters
    ----------
    components : PipelineComponents
    height, width : int, optional
        Image size in pixels (default the pipeline's); the latent is ``height / vae_scale_factor``.
    max_sequence_length : int, optional
        T5 tokens per prompt (default the pipeline's: 256 SD3, 512 FLUX).
    """

    denoiser_key = "transformer"
    default_max_sequence_length: ClassVar[int] = 256
    default_max_shift: ClassVar[float] = 1.15
    spatial_multiple: ClassVar[int] = 1  # latent sides are multiples of this

    def __init__(
        self,
        components: Any,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
    ):
        super().__init__(components)
        c, h, w = components.latent_shape
        vsf = components.vae_scale_factor
        step = vsf * self.spatial_multiple
        sizes = []
        for name, value, default in (("height", height, h), ("width", width, w)):
            if value is None:
                sizes.append(default)
                continue
            value = check_positive_int(name, value)
            if value % step:
                raise ValueError(
                    f"{name}: expected a multiple of {step} pixels (the latent scale and patch), got {value}"
                )
            sizes.append(value // vsf)
        self._latent_shape = (c, *sizes)
        seq = self.default_max_sequence_length if max_sequence_length is None else max_sequence_length
        self.max_sequence_length = check_positive_int("max_sequence_length", seq)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape

    @property
    def image_seq_len(self) -> int:
        """Image tokens seen by the transformer (the dynamic shift's input)."""
        _, h, w = self._latent_shape
        p = int(getattr(self.components.denoiser.config, "patch_size", 1) or 1)
        return (h // (p * self.spatial_multiple)) * (w // (p * self.spatial_multiple))

    def _mu(self) -> float:
        cfg = self.components.scheduler.config
        return calculate_shift(
            self.image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", self.default_max_shift),
        )

    def _t5(self, encoder: Any, tokenizer: Any, texts: list[str]) -> Tensor:
        ids = _tokenize(tokenizer, texts, self.max_sequence_length).to(encoder.device)
        return encoder(ids)[0]

    def _transformer(self, model: DiffusersModel, hidden: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        denoiser = model.unet
        dtype = getattr(denoiser, "dtype", hidden.dtype)
        out = denoiser(hidden_states=hidden.to(dtype), timestep=timestep.to(dtype), return_dict=False, **kwargs)
        return out[0]


class StableDiffusion3Adapter(FlowTransformerAdapter):
    """SD3 / SD3.5 (see the module docstring); T5 optional."""

    name = "sd3"
    component_classes = {
        "transformer": ("SD3Transformer2DModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModelWithProjection",),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "text_encoder_3": T5_ENCODERS,
        "tokenizer": CLIP_TOKENIZERS,
        "tokenizer_2": CLIP_TOKENIZERS,
        "tokenizer_3": T5_TOKENIZERS,
    }
    optional_components = ("text_encoder_3", "tokenizer_3")
    default_guidance_scale = 7.0
    default_max_sequence_length = 256
    default_max_shift = 1.16  # StableDiffusion3Pipeline's default (FLUX's is 1.15)

    def __init__(self, components: Any, **options: Any):
        super().__init__(components, **options)
        p = int(components.denoiser.config.patch_size)
        if any(s % p for s in self._latent_shape[1:]):
            raise ValueError(f"height, width: the latent {self._latent_shape[1:]} must be a multiple of the patch {p}")

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        parts = self.components.parts
        length = parts["tokenizer"].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        hidden, pooled = [], []
        for key in ("", "_2"):
            encoder = parts[f"text_encoder{key}"]
            out = encoder(
                _tokenize(parts[f"tokenizer{key}"], texts, length).to(encoder.device), output_hidden_states=True
            )
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        device = hidden[0].device
        clip = torch.cat([h.to(device) for h in hidden], dim=-1)
        if parts.get("text_encoder_3") is not None:
            t5 = self._t5(parts["text_encoder_3"], parts["tokenizer_3"], texts).to(device=device, dtype=clip.dtype)
        else:
            width = self.components.denoiser.config.joint_attention_dim
            t5 = clip.new_zeros(len(texts), self.max_sequence_length, width)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"embeds": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([p.to(device) for p in pooled], dim=-1)}

    def denoiser_kwargs(self, cond: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["embeds"], "pooled_projections": cond["pooled"]}

    def grid_options(self, steps: int) -> dict[str, Any]:
        if self.components.scheduler.config.get("use_dynamic_shifting", False):
            return {"mu": self._mu()}
        return {}

    def call(self, model: DiffusersModel, x: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return self._transformer(model, x, timestep, kwargs).to(x.dtype)


class FluxAdapter(FlowTransformerAdapter):
    """FLUX (see the module docstring).

    Parameters
    ----------
    components : PipelineComponents
    guidance : float, optional
        The embedded guidance of a guidance-distilled transformer (``guidance_embeds``; default 3.5,
        the pipeline's ``guidance_scale``); refused for a transformer without the embedding.
    height, width, max_sequence_length
        As :class:`FlowTransformerAdapter` (defaults 1024 px for the 8x VAE, 512 tokens).
    """

    name = "flux"
    component_classes = {
        "transformer": ("FluxTransformer2DModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModel",),
        "text_encoder_2": T5_ENCODERS,
        "tokenizer": CLIP_TOKENIZERS,
        "tokenizer_2": T5_TOKENIZERS,
    }
    default_guidance_scale = 1.0  # the pipeline's true_cfg_scale
    default_max_sequence_length = 512
    default_guidance = 3.5
    spatial_multiple = 2

    def __init__(self, components: Any, guidance: float | None = None, **options: Any):
        super().__init__(components, **options)
        embeds = bool(getattr(components.denoiser.config, "guidance_embeds", False))
        if guidance is not None and not embeds:
            raise ValueError("guidance: this FLUX transformer has no guidance embedding (guidance_embeds=False)")
        self._img_ids: dict[tuple, Tensor] = {}
        self.guidance = None
        if embeds:
            self.guidance = check_real("guidance", self.default_guidance if guidance is None else guidance)

    @classmethod
    def default_latent_shape(cls, components: Any) -> tuple[int, int, int]:
        """``(in_channels / 4, 128, 128)``: FluxPipeline's default 1024 px with the 8x VAE (128 latent pixels
        for any VAE: ``default_sample_size = 128``)."""
        c = int(components.denoiser.config.in_channels) // 4
        return (c, FLUX_DEFAULT_SAMPLE_SIZE, FLUX_DEFAULT_SAMPLE_SIZE)

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        parts = self.components.parts
        clip, tokenizer = parts["text_encoder"], parts["tokenizer"]
        pooled = clip(_tokenize(tokenizer, texts, tokenizer.model_max_length).to(clip.device)).pooler_output
        embeds = self._t5(parts["text_encoder_2"], parts["tokenizer_2"], texts)
        return {"embeds": embeds, "pooled": pooled.to(embeds.device)}

    def denoiser_kwargs(self, cond: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
        embeds = cond["embeds"]
        kwargs = {
            "encoder_hidden_states": embeds,
            "pooled_projections": cond["pooled"],
            "txt_ids": embeds.new_zeros(embeds.shape[1], 3),
            "img_ids": self.image_ids(x.shape[-2], x.shape[-1], x.device, embeds.dtype),
        }
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        return kwargs

    def image_ids(self, height: int, width: int, device: Any, dtype: torch.dtype) -> Tensor:
        """:func:`latent_image_ids`, built once per size, device and dtype."""
        key = (height, width, str(device), dtype)
        if key not in self._img_ids:
            self._img_ids[key] = latent_image_ids(height, width, device, dtype)
        return self._img_ids[key]

    def timestep(self, model: Any, t: Tensor) -> Tensor:
        """``sigma = 1 - t`` (the pipeline passes ``timestep / 1000``)."""
        return 1.0 - t

    def grid_options(self, steps: int) -> dict[str, Any]:
        options: dict[str, Any] = {"mu": self._mu()}
        if not self.components.scheduler.config.get("use_flow_sigmas", False):
            options["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        return options

    def call(self, model: DiffusersModel, x: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        h, w = x.shape[-2:]
        return unpack_latents(self._transformer(model, pack_latents(x), timestep, kwargs), h, w).to(x.dtype)


register_family(StableDiffusion3Adapter, "StableDiffusion3Pipeline")
register_family(FluxAdapter, "FluxPipeline")

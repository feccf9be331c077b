"""The components of a text-to-image pipeline, from a folder saved by ``DiffusionPipeline.save_pretrained``
or from objects in memory.

:func:`load_components` reads ``model_index.json`` (its ``_class_name`` names the family, see
:data:`~diffusiongym.text_to_image.families.PIPELINE_FAMILIES`), then each component the family needs
from its subfolder: the denoiser, the VAE (``AutoencoderKL``), the CLIP text encoders and tokenizers,
the scheduler. Never downloads: a hub id is looked up in the local Hugging Face cache only, as
:func:`~diffusiongym.models.diffusers_loader.load_diffusers_environment` does (fetch a pipeline
first with ``huggingface-cli download``), and every ``from_pretrained`` call is made with
``local_files_only=True``. Weights: safetensors only
(``use_safetensors=True``; a folder with only pickles is refused). Every missing piece raises
``FileNotFoundError`` naming the component and the path; a component of an unexpected class
raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusiongym.models.diffusers_bridge import VP_SCHEDULERS, _import_diffusers
from diffusiongym.models.diffusers_loader import _check_model_config, _check_safetensors, _resolve_source
from diffusiongym.text_to_image import flow_families  # noqa: F401  (registers the "sd3" and "flux" families)
from diffusiongym.text_to_image.families import FAMILIES, PIPELINE_FAMILIES, PLANNED_FAMILIES
from diffusiongym.utils.validation import check_device, read_json_config, unknown_name_error

__all__ = ["PipelineComponents", "load_components", "components_from_pipeline", "SCHEDULER_CLASSES"]

SCHEDULER_CLASSES = (*VP_SCHEDULERS, "FlowMatchEulerDiscreteScheduler")
"""Scheduler classes a pipeline folder may name."""


@dataclass
class PipelineComponents:
    """The pieces of one text-to-image pipeline.

    Attributes
    ----------
    family : str
        ``"sd"`` or ``"sdxl"`` (:data:`~diffusiongym.text_to_image.families.FAMILIES`).
    parts : dict
        Component name (as in ``model_index.json``: ``"unet"``, ``"vae"``, ``"text_encoder"``,
        ``"tokenizer"``, ``"scheduler"``, ...) -> object.
    options : dict
        The pipeline's own config entries (e.g. SDXL's ``force_zeros_for_empty_prompt``).
    source : str, optional
        Where they were loaded from.
    """

    family: str
    parts: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        if self.family in PLANNED_FAMILIES:
            raise NotImplementedError(
                f"family: {self.family!r} ({PLANNED_FAMILIES[self.family]}) is planned but not supported yet; "
                f"supported now: {list(FAMILIES)}"
            )
        if self.family not in FAMILIES:
            raise unknown_name_error("family", self.family, FAMILIES)
        adapter = FAMILIES[self.family]
        needed = [*(k for k in adapter.component_classes if k not in adapter.optional_components), "scheduler"]
        missing = [k for k in needed if self.parts.get(k) is None]
        if missing:
            raise ValueError(
                f"components: the {self.family!r} family needs {missing} (missing); got {sorted(self.parts)}"
            )
        scheduler = type(self.parts["scheduler"]).__name__
        if scheduler not in SCHEDULER_CLASSES:
            raise ValueError(
                f"components: unsupported scheduler {scheduler!r}; expected one of {list(SCHEDULER_CLASSES)}"
            )

    @property
    def denoiser(self) -> Any:
        return self.parts[FAMILIES[self.family].denoiser_key]

    @property
    def vae(self) -> Any:
        return self.parts["vae"]

    @property
    def scheduler(self) -> Any:
        return self.parts["scheduler"]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: ``2 ** (len(vae.config.block_out_channels) - 1)``."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent at the pipeline's default size (the denoiser config's
        ``in_channels`` and ``sample_size``; FLUX: unpacked channels, 128 x 128)."""
        return FAMILIES[self.family].default_latent_shape(self)


def components_from_pipeline(pipe: Any) -> PipelineComponents:
    """The components of a diffusers pipeline object in memory (no copy)."""
    name = type(pipe).__name__
    family = PIPELINE_FAMILIES.get(name)
    if family is None:
        raise ValueError(f"pipe: unsupported pipeline class {name!r}; expected one of {list(PIPELINE_FAMILIES)}")
    config = dict(getattr(pipe, "config", {}))
    options = {k: v for k, v in config.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
    return PipelineComponents(family, dict(pipe.components), options, None)


def _check_transformers_weights(folder: Path, variant: str | None) -> None:
    stem = f"model.{variant}" if variant else "model"
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise ValueError(f"pipeline: {folder} holds only pickle weights {pickles[:3]}; safetensors only")
    raise FileNotFoundError(f"pipeline: no {stem}.safetensors weights in {folder}")


def load_components(
    pipeline: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> PipelineComponents:
    """Load the components of a pipeline folder (or a cached hub id).

    Parameters
    ----------
    pipeline : str or Path
        A folder written by ``DiffusionPipeline.save_pretrained`` (``model_index.json`` plus one
        subfolder per component), or a hub id already in the local Hugging Face cache.
    device, dtype
        Where the networks go and their precision (e.g. ``torch.float16``; default as stored).
    vae_dtype : torch.dtype, optional
        The VAE's precision; default ``dtype``, but float32 when the VAE config has
        ``force_upcast`` (SDXL's VAE overflows in float16) and ``dtype`` is float16.
    variant : str, optional
        Weights variant (``"fp16"`` reads ``*.fp16.safetensors``).
    cache_dir, revision
        Hugging Face cache folder and revision for a hub id.
    """
    if not isinstance(pipeline, (str, Path)):
        raise TypeError(f"pipeline: expected a folder path (str or Path), got {type(pipeline).__name__}")
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
            raise TypeError(f"{name}: expected a floating-point torch.dtype or None, got {value!r}")
    device = check_device(device)
    src = str(pipeline)
    root = _resolve_source(src, cache_dir, revision, ["unet", "transformer"])
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"pipeline: no model_index.json in {root}; expected a folder saved by DiffusionPipeline.save_pretrained"
        )
    model_index = read_json_config("pipeline", index)
    pipe_class = model_index.get("_class_name")
    family = PIPELINE_FAMILIES.get(pipe_class)
    if family is None:
        raise ValueError(
            f"pipeline: unsupported pipeline class {pipe_class!r} in {index}; expected one of {list(PIPELINE_FAMILIES)}"
        )
    if family in PLANNED_FAMILIES:
        raise NotImplementedError(
            f"pipeline: {pipe_class} ({family!r}) is planned but not supported yet; supported now: {list(FAMILIES)}"
        )
    wanted = {**FAMILIES[family].component_classes, "scheduler": SCHEDULER_CLASSES}
    optional = FAMILIES[family].optional_components
    diffusers = _import_diffusers()
    parts: dict[str, Any] = {}
    for key, classes in wanted.items():
        entry = model_index.get(key)
        if key in optional and (entry is None or (isinstance(entry, (list, tuple)) and entry[-1] is None)):
            parts[key] = None  # e.g. SD3 without its T5 encoder
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
            raise FileNotFoundError(f"pipeline: component {key!r} is missing from {index} (a {pipe_class} needs it)")
        library, cls_name = entry
        if cls_name not in classes:
            raise ValueError(f"pipeline: component {key!r} is a {cls_name}; expected one of {list(classes)}")
        folder = root / key
        if not folder.is_dir():
            raise FileNotFoundError(f"pipeline: missing component folder {folder} ({key}: {cls_name})")
        parts[key] = _load_part(diffusers, root, key, library, cls_name, variant)
    denoiser_dtype = dtype
    vae = parts["vae"]
    if vae_dtype is None:
        vae_dtype = dtype
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae_dtype = torch.float32
    for key, part in parts.items():
        if isinstance(part, torch.nn.Module):
            part_dtype = vae_dtype if key == "vae" else denoiser_dtype
            part.to(device=device, dtype=part_dtype) if part_dtype is not None else part.to(device)
            part.eval().requires_grad_(False)
    options = {k: v for k, v in model_index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
    return PipelineComponents(family, parts, options, src)


def _load_part(diffusers: Any, root: Path, key: str, library: str, cls_name: str, variant: str | None) -> Any:
    folder = root / key
    if key == "scheduler":
        config = read_json_config(f"pipeline ({key})", folder / "scheduler_config.json")
        return getattr(diffusers, cls_name).from_config(config)
    if library == "diffusers":
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"pipeline: no config.json for component {key!r} in {folder}")
        _check_model_config(read_json_config(f"pipeline ({key})", cfg_file), f"{key}/config.json")
        _check_safetensors(folder, variant)
        return getattr(diffusers, cls_name).from_pretrained(
            str(root), subfolder=key, local_files_only=True, use_safetensors=True, variant=variant
        )
    import transformers

    cls = getattr(transformers, cls_name)
    if key.startswith("tokenizer"):
        return cls.from_pretrained(str(folder), local_files_only=True)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pipeline: no config.json for component {key!r} in {folder}")
    _check_transformers_weights(folder, variant)
    kwargs = {"variant": variant} if variant else {}
    return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **kwargs)

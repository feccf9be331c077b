"""Load a diffusers UNet and its scheduler from a folder or the local Hugging Face cache.

:func:`load_diffusers_environment` reads a pipeline folder (``unet/`` and ``scheduler/``), a model
folder (``config.json`` and ``scheduler_config.json`` / ``scheduler/``) or a hub id that is already
in the local Hugging Face cache: it is resolved from the cache folders alone. Nothing here touches
the network (download a model yourself first with the Hugging Face tools,
and pass its folder or ``cache_dir``). Model classes are those of
:data:`~diffusiongym.models.diffusers_bridge.SUPPORTED_MODELS`; config sizes are checked before
diffusers builds the network; pickled ``.bin`` weights are refused. The conversion to an
environment is :func:`~diffusiongym.models.diffusers_bridge.diffusers_environment`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.models.diffusers_bridge import SUPPORTED_MODELS, _import_diffusers, diffusers_environment
from diffusiongym.utils.validation import check_keywords, check_real, read_json_config

__all__ = ["load_diffusers_environment"]

MAX_CONFIG_INT = 1_000_000
# Sizes of a model config checked before diffusers builds the network.
_MODEL_SIZE_BOUNDS = {
    "sample_size": 16384,
    "in_channels": 4096,
    "out_channels": 4096,
    "block_out_channels": 65536,
    "layers_per_block": 256,
}
_LOADER_OPTIONS = (
    "source",
    "subfolder",
    "scheduler_subfolder",
    "noise",
    "prediction_type",
    "null_class",
    "guidance_scale",
    "device",
    "dtype",
    "cache_dir",
    "revision",
    "variant",
)
_WEIGHTS = "diffusion_pytorch_model"


def _check_model_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse absurd sizes before anything is allocated (every integer of the config, nested
    lists included, at most 1,000,000; the main sizes tighter)."""

    def ints(value: Any) -> list[Any]:
        if isinstance(value, (list, tuple)):
            return [v for item in value for v in ints(item)]
        return [value] if isinstance(value, int) and not isinstance(value, bool) else []

    for key, value in cfg.items():
        bound = _MODEL_SIZE_BOUNDS.get(key, MAX_CONFIG_INT)
        for v in ints(value):
            if not -MAX_CONFIG_INT <= v <= bound:
                raise ValueError(f"source: {where}: {key} = {value!r} is outside the accepted sizes (at most {bound})")


def _is_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source) is not None and ".." not in source


def _cached_snapshot(repo_id: str, cache_dir: Any, revision: str | None, files: list[str]) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache holding one of
    ``files``, or ``None``; reads the cache folders only (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in files:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return Path(found).parents[len(Path(name).parts) - 1]
    return None


def _resolve_source(source: str, cache_dir: Any, revision: str | None, subfolders: list[str | None]) -> Path:
    """A local folder holding the configs and weights: ``source`` itself, or its snapshot in the
    local Hugging Face cache (the cache folders only: never the network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"source: expected a folder or a hub id, got the file {source!r}")
    if not _is_hub_id(source):
        raise FileNotFoundError(
            f"source: no folder {source!r} (and it is not a hub id such as 'google/ddpm-cifar10-32')"
        )
    wanted = [f"{sub}/config.json" if sub else "config.json" for sub in subfolders]
    snapshot = _cached_snapshot(source, cache_dir, revision, wanted)
    if snapshot is None:
        from huggingface_hub import constants

        where = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"source: {source!r} is not a local folder and is not in the local Hugging Face cache ({where}); "
            "diffusiongym never downloads: fetch it first with the Hugging Face tools and pass its "
            "folder, or cache_dir= where it is cached"
        )
    return snapshot


def _check_safetensors(folder: Path, variant: str | None) -> None:
    """Refuse pickle (``.bin``) weights: the model folder must hold safetensors weights."""
    stem = f"{_WEIGHTS}.{variant}" if variant else _WEIGHTS
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise ValueError(
            f"source: {folder} holds only pickle weights {pickles[:3]}; diffusiongym loads safetensors only "
            f"(convert with diffusers: model.save_pretrained(folder, safe_serialization=True))"
        )
    raise FileNotFoundError(f"source: no {stem}.safetensors weights in {folder}")


def load_diffusers_environment(
    source: str | Path,
    *,
    subfolder: str | None = None,
    scheduler_subfolder: str | None = None,
    noise: Any = "memoryless",
    prediction_type: str | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **unknown: Any,
) -> DiffusionEnvironment:
    """Load a diffusers model and its scheduler from a folder or a (cached) hub id.

    Parameters
    ----------
    source : str or Path
        A local folder or a hub id (``"google/ddpm-cifar10-32"``).
    subfolder, scheduler_subfolder : str, optional
        Where the model's ``config.json`` and the ``scheduler_config.json`` live; by default
        ``unet/`` and ``scheduler/`` (pipeline layout), else the root.
    noise, prediction_type, null_class, guidance_scale
        See :func:`diffusers_environment`.
    device, dtype
        Where to put the model (and its precision).
    cache_dir, revision, variant
        Hugging Face cache folder and revision (branch, tag or commit) a hub id is looked up in
        (``huggingface_hub.try_to_load_from_cache``: folders only, no network; an uncached id fails
        at once with ``FileNotFoundError``), and the weights variant (``"fp16"`` reads
        ``diffusion_pytorch_model.fp16.safetensors``).

    Notes
    -----
    Safety: only safetensors weights are read (a folder with only ``.bin`` pickles raises
    ``ValueError``); the config's ``_class_name`` must be one of :data:`SUPPORTED_MODELS`; sizes
    in the configs are checked before anything is allocated. Unknown keywords raise ``TypeError``.
    """
    check_keywords("load_diffusers_environment", unknown, _LOADER_OPTIONS)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source: expected a folder path or a hub id (str), got {type(source).__name__}")
    for name, value in (
        ("subfolder", subfolder),
        ("scheduler_subfolder", scheduler_subfolder),
        ("revision", revision),
        ("variant", variant),
    ):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: expected a str or None, got {type(value).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    guidance_scale = check_real("guidance_scale", guidance_scale)
    src = str(source)
    candidates = [subfolder] if subfolder is not None else ["unet", None]
    sched_candidates = [scheduler_subfolder] if scheduler_subfolder is not None else ["scheduler", None]
    root = _resolve_source(src, cache_dir, revision, candidates)

    model_sub, model_cfg = None, None
    for sub in candidates:
        file = root / sub / "config.json" if sub else root / "config.json"
        if file.is_file():
            cfg = read_json_config("source", file)
            if "_class_name" in cfg:
                model_sub, model_cfg = sub, cfg
                break
    if model_cfg is None:
        raise FileNotFoundError(
            f"source: no diffusers model config.json found in {src!r} ({root}); looked in subfolders {candidates}"
        )
    sched_cfg = None
    for sub in sched_candidates:
        file = root / sub / "scheduler_config.json" if sub else root / "scheduler_config.json"
        if file.is_file():
            sched_cfg = read_json_config("source", file)
            break
    if sched_cfg is None:
        raise FileNotFoundError(
            f"source: no scheduler_config.json found in {src!r} (tried {sched_candidates}, None = the root)"
        )
    name = model_cfg["_class_name"]
    if name not in SUPPORTED_MODELS:
        raise ValueError(
            f"source: unsupported diffusers model class {name!r} in config.json; expected one of {list(SUPPORTED_MODELS)}"
        )
    _check_model_config(model_cfg, "config.json")
    model_dir = root / model_sub if model_sub else root
    _check_safetensors(model_dir, variant)

    diffusers = _import_diffusers()
    model_cls = getattr(diffusers, name)
    unet = model_cls.from_pretrained(
        str(root), subfolder=model_sub, local_files_only=True, use_safetensors=True, variant=variant
    )
    unet = unet.to(device=device, dtype=dtype) if dtype is not None else unet.to(device)
    unet.eval().requires_grad_(False)
    return diffusers_environment(
        unet,
        sched_cfg,
        noise=noise,
        prediction_type=prediction_type,
        null_class=null_class,
        guidance_scale=guidance_scale,
    )

"""LoRA adapters in diffusers' format: what a stock pipeline's ``load_lora_weights`` reads.

:func:`save_lora_diffusers` writes the adapters of an :func:`~diffusiongym.models.lora.add_lora`
model as peft keys (``"<unet|transformer>.<module>.lora_A.weight"`` / ``lora_B``) in a safetensors
file, through the pipeline class's own ``save_lora_weights``, with the ``LoraConfig`` (``r``,
``lora_alpha``, the exact target names) as ``lora_adapter_metadata``, so rank, alpha and targets
round-trip exactly::

    save_lora_diffusers(trainer.model, "my_lora")                 # my_lora/pytorch_lora_weights.safetensors
    pipe = StableDiffusionPipeline.from_pretrained(base_folder)
    pipe.load_lora_weights("my_lora")                            # same denoiser output as trainer.model

:func:`load_lora_diffusers` reads such a file (or one from diffusers' training scripts) back into
a diffusiongym model.

The denoiser is the diffusers model (``ModelMixin``) inside ``model`` that holds every LoRA layer:
``model`` itself, or e.g. ``model.unet`` of a
:class:`~diffusiongym.models.diffusers_bridge.DiffusersModel` (the model of a diffusers or
text-to-image environment). Family -> ``save_lora_weights`` argument: ``UNet2DConditionModel``
(SD 1.x/2.x, SDXL) -> ``unet_lora_layers``; ``SD3Transformer2DModel``, ``FluxTransformer2DModel``
-> ``transformer_lora_layers``. Pixel-space ``UNet2DModel`` has no diffusers LoRA loader: use
:func:`~diffusiongym.models.lora.save_lora`, or merge and export the full model
(:mod:`diffusiongym.models.export`). diffusers is imported lazily.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusiongym.models.lora import (
    ADAPTER_NAME,
    add_lora,
    has_lora_layers,
    is_lora_layer,
    lora_settings,
    lora_state_dict,
)

__all__ = [
    "save_lora_diffusers",
    "load_lora_diffusers",
    "find_denoiser",
    "DEFAULT_PIPELINES",
    "LORA_WEIGHT_NAME",
    "DENOISER_KEYS",
]

DEFAULT_PIPELINES = {
    "UNet2DConditionModel": "StableDiffusionPipeline",
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxTransformer2DModel": "FluxPipeline",
}
"""Denoiser class -> the pipeline class whose ``save_lora_weights`` is used by default (SDXL
pipelines read the same ``unet.``-prefixed format as SD ones)."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DENOISER_KEYS = ("unet", "transformer")
"""Pipeline component names of the denoiser (``model_index.json`` keys, LoRA key prefixes)."""


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a dev dependency
        raise ImportError("exporting to diffusers needs diffusers: pip install diffusers") from err
    return diffusers


def find_denoiser(model: nn.Module, class_name: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the diffusers model inside ``model`` (``""`` for ``model`` itself).

    With LoRA layers: the innermost diffusers model holding all of them; else the outermost
    diffusers model (of class ``class_name`` when given).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    mixin = _import_diffusers().ModelMixin
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, mixin) and (class_name is None or type(m).__name__ == class_name)
    ]
    lora = [n for n, m in model.named_modules() if is_lora_layer(m)]
    if lora:
        found = [(n, m) for n, m in found if all(not n or x.startswith(n + ".") for x in lora)]
        found = found[-1:]  # named_modules lists parents first: the last one is the innermost
    else:
        top = [(n, m) for n, m in found if not any(p != n and (not p or n.startswith(p + ".")) for p, _ in found)]
        if len(top) > 1:
            raise ValueError(f"model: holds several diffusers models {[n for n, _ in top]}; pass the denoiser itself")
        found = top
    if not found:
        what = f"a diffusers {class_name}" if class_name else "a diffusers model (ModelMixin)"
        where = " holding all its LoRA layers" if lora else ""
        raise ValueError(
            f"model: expected {what}{where} (the model itself or a submodule), found none in {type(model).__name__}"
        )
    return found[0]


def _pipeline_class(pipeline_class: Any, denoiser: nn.Module) -> Any:
    diffusers = _import_diffusers()
    kind = type(denoiser).__name__
    if pipeline_class is None:
        if kind not in DEFAULT_PIPELINES:
            raise ValueError(
                f"pipeline_class: no default pipeline for a {kind} denoiser (defaults: {DEFAULT_PIPELINES}); "
                "pass the diffusers pipeline class whose load_lora_weights should read the adapter"
            )
        pipeline_class = DEFAULT_PIPELINES[kind]
    if isinstance(pipeline_class, str):
        if not hasattr(diffusers, pipeline_class):
            raise ValueError(f"pipeline_class: diffusers has no class named {pipeline_class!r}")
        pipeline_class = getattr(diffusers, pipeline_class)
    elif not isinstance(pipeline_class, type):
        pipeline_class = type(pipeline_class)  # a pipeline object
    if not callable(getattr(pipeline_class, "save_lora_weights", None)):
        raise ValueError(f"pipeline_class: {pipeline_class.__name__} cannot load LoRA weights (no save_lora_weights)")
    return pipeline_class


def _component(pipeline_class: Any, denoiser: nn.Module) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline's name for the denoiser (the LoRA key prefix)."""
    names = [n for n in getattr(pipeline_class, "_lora_loadable_modules", []) if n in DENOISER_KEYS]
    if len(names) != 1:
        raise ValueError(
            f"pipeline_class: {pipeline_class.__name__} loads LoRA into {names}; expected a unet or a transformer"
        )
    expected = "unet" if "UNet" in type(denoiser).__name__ else "transformer"
    if names[0] != expected:
        raise ValueError(
            f"pipeline_class: {pipeline_class.__name__} loads LoRA into a {names[0]}, but the denoiser is a "
            f"{type(denoiser).__name__}"
        )
    return names[0]


def _check_peft_loadable(denoiser: nn.Module) -> None:
    from diffusers.loaders.peft import PeftAdapterMixin

    if not isinstance(denoiser, PeftAdapterMixin):
        raise ValueError(
            f"model: diffusers cannot load LoRA adapters into a {type(denoiser).__name__} (no PeftAdapterMixin); "
            "use save_lora for diffusiongym's own format, or merge_lora / export_pipeline for a full model"
        )


def save_lora_diffusers(
    model: nn.Module, folder: str | Path, pipeline_class: Any = None, *, weight_name: str = LORA_WEIGHT_NAME
) -> Path:
    """Write the adapters of an :func:`add_lora` model for a stock pipeline's ``load_lora_weights``.

    The tensors are ``peft.get_peft_model_state_dict`` of the denoiser (keys
    ``"<unet|transformer>.<module>.lora_A.weight"`` / ``lora_B``), written by the pipeline
    class's ``save_lora_weights`` with the ``LoraConfig`` (``r``, ``lora_alpha``, exact target
    names) as ``lora_adapter_metadata``, so ``alpha != rank`` loads with the same scaling.

    Parameters
    ----------
    model : nn.Module
        A model from :func:`add_lora` whose LoRA layers all lie in one diffusers denoiser with
        diffusers' LoRA support (``UNet2DConditionModel``, ``SD3Transformer2DModel``,
        ``FluxTransformer2DModel``, ...).
    folder : str or Path
        Output folder (created); the file is replaced atomically.
    pipeline_class : diffusers pipeline class, its name, a pipeline object or None
        Default from the denoiser class (:data:`DEFAULT_PIPELINES`).
    weight_name : str
        File name (diffusers' default ``pytorch_lora_weights.safetensors``).

    Returns
    -------
    Path
        The safetensors file.
    """
    import peft

    settings = lora_settings(model)
    name, denoiser = find_denoiser(model)
    _check_peft_loadable(denoiser)
    pipeline_class = _pipeline_class(pipeline_class, denoiser)
    component = _component(pipeline_class, denoiser)
    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors") or "/" in weight_name:
        raise ValueError(f"weight_name: expected a file name ending in .safetensors, got {weight_name!r}")
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    cut = len(name) + 1 if name else 0
    state = {k[cut:]: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": [n[cut:] for n in settings["target_modules"]],
        "bias": "none",
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".lora-"))
    try:
        pipeline_class.save_lora_weights(
            str(tmp),
            weight_name=weight_name,
            safe_serialization=True,
            **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata},
        )
        os.replace(tmp / weight_name, folder / weight_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / weight_name


def _read_diffusers_lora(path: Path, weight_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.is_dir():
        path = path / (weight_name or LORA_WEIGHT_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"path: expected a diffusers LoRA folder or .safetensors file, got {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return load_file(str(path)), (json.loads(raw) if raw else {})


def load_lora_diffusers(model: nn.Module, path: str | Path, *, weight_name: str | None = None) -> nn.Module:
    """Load a diffusers-format LoRA (peft keys, e.g. from :func:`save_lora_diffusers` or diffusers'
    training scripts) into a diffusiongym model.

    Parameters
    ----------
    model : nn.Module
        The plain base model (then ``add_lora`` with the file's rank, alpha and targets is built
        first; ``model`` is left untouched) or an :func:`add_lora` model with those settings.
    path : str or Path
        A folder (with ``weight_name``, default :data:`LORA_WEIGHT_NAME`) or the file.

    Returns
    -------
    nn.Module
        The model with the adapter; its denoiser equals ``pipe.<denoiser>`` after
        ``pipe.load_lora_weights(path)``.
    """
    tensors, meta = _read_diffusers_lora(Path(path), weight_name)
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if len(prefixes) != 1 or prefixes[0] not in DENOISER_KEYS or not all(".lora_" in k for k in tensors):
        raise ValueError(
            f"path: expected peft LoRA keys of one denoiser ('unet.' or 'transformer.' + '...lora_A/B.weight'), "
            f"got prefixes {prefixes}"
        )
    prefix = prefixes[0]
    meta = {k[len(prefix) + 1 :]: v for k, v in meta.items() if k.startswith(prefix + ".")}
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise ValueError(
            "path: per-module ranks or alphas (rank_pattern / alpha_pattern) are not supported by add_lora"
        )
    tensors = {k[len(prefix) + 1 :]: v for k, v in tensors.items()}
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    if "r" in meta:
        rank = int(meta["r"])
    elif len(ranks) == 1:
        rank = ranks.pop()
    else:
        raise ValueError(f"path: adapters of several ranks {sorted(ranks)} are not supported by add_lora")
    alpha = float(meta.get("lora_alpha", rank))  # no metadata: diffusers' convention alpha = rank
    targets = sorted({k.split(".lora_")[0] for k in tensors})
    name, _ = find_denoiser(model)
    lora_model = model
    if not has_lora_layers(model):
        full = [f"{name}.{t}" if name else t for t in targets]
        exact = "^(?:" + "|".join(re.escape(n) for n in full) + ")$"
        lora_model = add_lora(model, rank=rank, alpha=alpha, target_modules=exact)
    settings = lora_settings(lora_model)
    if (settings["rank"], settings["alpha"]) != (rank, alpha):
        raise ValueError(
            f"path: rank {rank} and alpha {alpha} in the file vs {settings['rank']} and {settings['alpha']} in the model"
        )
    own = lora_state_dict(lora_model)
    cut = len(name) + 1 if name else 0
    mine = {k[cut:].replace(f".{ADAPTER_NAME}.", "."): k for k in own}
    missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
    if missing or unexpected:
        raise ValueError(
            f"path: adapter tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            target = own[mine[key]]
            if target.shape != value.shape:
                raise ValueError(f"path: {key}: expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)
    return lora_model

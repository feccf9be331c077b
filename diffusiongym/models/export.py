"""Fine-tuned denoisers as stock diffusers pipeline folders.

:func:`merge_lora` folds the adapters of an :func:`~diffusiongym.models.lora.add_lora` model into
its base weights (``W + (alpha / rank) B A``); :func:`export_pipeline` writes a fine-tuned (or
LoRA-merged) denoiser into a copy of a pipeline folder that ``DiffusionPipeline.from_pretrained``
loads::

    export_pipeline("path/to/sd15", trainer.model, "sd15-finetuned")
    pipe = DiffusionPipeline.from_pretrained("sd15-finetuned")

For the adapters alone in diffusers' format see :mod:`diffusiongym.models.lora_diffusers`.
"""

from __future__ import annotations

import copy as _copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusiongym.models.lora import ADAPTER_NAME, has_lora_layers, is_lora_layer, lora_settings
from diffusiongym.models.lora_diffusers import DENOISER_KEYS, find_denoiser

__all__ = ["merge_lora", "export_pipeline"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of an :func:`add_lora` model with every adapter folded into its base layer
    (``W <- W + (alpha / rank) B A``, peft's ``merge``) and the LoRA layers removed.

    The copy computes the LoRA model's output up to float rounding of the merge and has the
    plain architecture of the base (its parameters stay frozen: ``requires_grad_(True)`` to
    train it fully). ``model`` is left untouched.
    """
    lora_settings(model)  # raises for a model not made by add_lora
    return _merged_copy(model)


def _merged_copy(module: nn.Module) -> nn.Module:
    merged = _copy.deepcopy(module)
    for name, layer in list(merged.named_modules()):
        if is_lora_layer(layer):
            layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, layer.get_base_layer())
    for attr in ("peft_config", "diffusiongym_lora"):
        if attr in vars(merged):
            delattr(merged, attr)
    return merged


def _plain(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(dict(cfg), default=str)).items() if not k.startswith("_")}


def _copy_folder(src: Path, dst: Path, skip: str, link: bool) -> None:
    """Copy (or hard-link) ``src`` into the new folder ``dst`` except the subfolder ``skip``; pickled
    weights are left out where a safetensors file sits next to them, else refused (checked first)."""
    refused = []
    for path in src.rglob("*"):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES and path.relative_to(src).parts[0] != skip:
            if not any(path.parent.glob("*.safetensors")):
                refused.append(str(path.relative_to(src)))
    if refused:
        raise ValueError(
            f"pipeline: pickled weights {refused[:5]} have no safetensors copy; only safetensors are exported"
        )
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] == skip or rel.parts[0].startswith(".") or path.suffix in PICKLE_SUFFIXES:
            continue
        if path.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if link:
                try:
                    os.link(path, dst / rel)
                    continue
                except OSError:  # another file system, or no hard links: copy
                    pass
            shutil.copy2(path, dst / rel)


def _pipeline_source(pipeline: Any) -> tuple[Path | None, dict[str, Any], Any]:
    """``(folder or None, model_index entries, key -> component config dict)`` of a pipeline
    folder or object."""
    if isinstance(pipeline, (str, Path)):
        src = Path(pipeline)
        index_path = src / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"pipeline: expected a pipeline folder with model_index.json, got {str(src)!r}")

        def config_of(key: str) -> dict[str, Any]:
            return json.loads((src / key / "config.json").read_text())

        return src, json.loads(index_path.read_text()), config_of
    if callable(getattr(pipeline, "save_pretrained", None)) and isinstance(getattr(pipeline, "components", None), dict):
        index = {k: ["diffusers", type(v).__name__] for k, v in pipeline.components.items() if v is not None}

        def config_of(key: str) -> dict[str, Any]:
            return dict(getattr(pipeline, key).config)

        return None, index, config_of
    raise TypeError(f"pipeline: expected a pipeline folder or a diffusers pipeline, got {type(pipeline).__name__}")


def export_pipeline(
    pipeline: Any,
    model: nn.Module,
    out_folder: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    link: bool = False,
) -> Path:
    """Write a pipeline folder whose denoiser is ``model``'s (LoRA adapters merged).

    Parameters
    ----------
    pipeline : str, Path or diffusers pipeline
        The base pipeline: a folder written by ``save_pretrained`` (every other component is
        copied from it; pickled weights are left out) or a pipeline object (saved with
        ``save_pretrained(safe_serialization=True)``).
    model : nn.Module
        The fine-tuned model: an :func:`add_lora` model (merged with :func:`merge_lora`) or a
        fully fine-tuned one; its denoiser (the diffusers model inside, of the pipeline's
        ``unet`` / ``transformer`` class and config) replaces the pipeline's.
    out_folder : str or Path
        Written atomically: built in a temporary sibling folder, then renamed.
    overwrite : bool
        Replace an existing ``out_folder`` (else ``FileExistsError``).
    dtype : torch.dtype, optional
        Cast the denoiser before saving (e.g. ``torch.float16``); default its own dtype.
    link : bool
        Hard-link the other components' files from a pipeline folder instead of copying them
        (no extra disk; falls back to a copy across file systems). Never edit them in place then.

    Returns
    -------
    Path
        ``out_folder``; ``DiffusionPipeline.from_pretrained(out_folder)`` loads it.
    """
    out = Path(out_folder)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_folder: {out} exists; pass overwrite=True to replace it")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    src, index, config_of = _pipeline_source(pipeline)
    keys = [k for k in DENOISER_KEYS if isinstance(index.get(k), list)]
    if len(keys) != 1:
        raise ValueError(f"pipeline: expected one denoiser entry ('unet' or 'transformer') in model_index, got {keys}")
    key, class_name = keys[0], index[keys[0]][1]
    _, denoiser = find_denoiser(model, class_name)
    want, have = _plain(config_of(key)), _plain(denoiser.config)
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        raise ValueError(f"model: its {class_name} config differs from the pipeline's {key}/config.json in {diff[:8]}")
    copied = has_lora_layers(denoiser)
    if copied:
        denoiser = _merged_copy(denoiser)  # only the denoiser is copied
    if dtype is not None and dtype != denoiser.dtype:
        denoiser = (denoiser if copied else _copy.deepcopy(denoiser)).to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if src is not None:
            _copy_folder(src, tmp, key, link)
        else:
            pipeline.save_pretrained(str(tmp), safe_serialization=True)
            shutil.rmtree(tmp / key)
        denoiser.save_pretrained(str(tmp / key), safe_serialization=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

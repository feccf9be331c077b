"""Saving and loading trained modules: safetensors weights + a small JSON config (no pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | Path, modules: dict[str, nn.Module], config: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``modules``' state dicts (and extra ``tensors``) to ``path/weights.safetensors``
    and ``config`` to ``path/config.json``. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            flat[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for key, value in (tensors or {}).items():
        flat[f"extra.{key}"] = value.detach().cpu().contiguous()
    save_file(flat, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {}, indent=2, sort_keys=True))
    return folder


def load_checkpoint(path: str | Path, modules: dict[str, nn.Module] | None = None, device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a folder written by :func:`save_checkpoint` into ``modules`` (strict).

    Returns ``(config, extra_tensors)``.
    """
    folder = Path(path)
    if not (folder / "weights.safetensors").exists():
        raise FileNotFoundError(f"path: expected a checkpoint folder with weights.safetensors, got {folder}")
    flat = load_file(str(folder / "weights.safetensors"), device=str(device))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    for name, module in (modules or {}).items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    extra = {k[len("extra."):]: v for k, v in flat.items() if k.startswith("extra.")}
    return config, extra

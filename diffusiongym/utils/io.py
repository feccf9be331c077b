"""Saving and loading trained modules: safetensors weights + a small JSON config (no pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "save_module", "load_module", "optimizer_tensors", "load_optimizer_tensors"]


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


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser's state dict into tensors (for safetensors, keys ``prefix.<param>.<key>``)
    and JSON metadata (param groups and non-tensor entries)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "optimizer") -> None:
    """Inverse of :func:`optimizer_tensors`: restore ``optimizer`` from ``tensors`` and ``meta``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_module(module: nn.Module, stem: str | Path, config: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (state dict) and ``<stem>.json`` (``config``)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights, cfg = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(state, str(weights))
    cfg.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights, cfg


def load_module(factory: Callable[..., nn.Module], stem: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build ``factory(**config["architecture"])`` and load ``<stem>.safetensors`` (strict)."""
    stem = Path(stem)
    weights, cfg = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.exists() or not cfg.exists():
        raise FileNotFoundError(
            f"weights: expected {weights.name} and {cfg.name} in {stem.parent}; regenerate them with the training script "
            "that wrote them (e.g. `python -m diffusiongym.train.digits` for the shipped digits weights)"
        )
    config = json.loads(cfg.read_text())
    module = factory(**config.get("architecture", {}))
    module.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    return module.to(device).eval(), config

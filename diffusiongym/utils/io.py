"""Saving and loading trained modules: safetensors weights + a small JSON config (no pickles)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Collection
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "frozen_parameter_names",
    "save_module",
    "load_module",
    "optimizer_tensors",
    "load_optimizer_tensors",
]


def save_checkpoint(
    path: str | Path,
    modules: dict[str, nn.Module],
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    exclude: dict[str, Collection[str]] | None = None,
) -> Path:
    """Save ``modules``' state dicts (and extra ``tensors``) to ``path/weights.safetensors``
    and ``config`` to ``path/config.json``. Returns the folder.

    ``exclude`` maps a module name to state-dict keys left out (e.g. the frozen base
    weights of a LoRA or residual fine-tune, which the user already has); pass the same
    mapping as ``allow_missing`` to :func:`load_checkpoint`.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        skip = set((exclude or {}).get(name, ()))
        for key, value in module.state_dict().items():
            if key not in skip:
                flat[f"{name}.{key}"] = value.detach().cpu().contiguous()
    for key, value in (tensors or {}).items():
        flat[f"extra.{key}"] = value.detach().cpu().contiguous()
    save_file(flat, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {}, indent=2, sort_keys=True))
    return folder


def frozen_parameter_names(module: nn.Module) -> set[str]:
    """State-dict keys of ``module``'s parameters with ``requires_grad=False``."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def load_checkpoint(
    path: str | Path,
    modules: dict[str, nn.Module] | None = None,
    device: str | torch.device = "cpu",
    allow_missing: dict[str, Collection[str]] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a folder written by :func:`save_checkpoint` into ``modules``.

    Strict, except that the keys in ``allow_missing[name]`` may be absent from the file
    (they keep the module's current values). Returns ``(config, extra_tensors)``.
    """
    folder = Path(path)
    if not (folder / "weights.safetensors").exists():
        raise FileNotFoundError(f"path: expected a checkpoint folder with weights.safetensors, got {folder}")
    flat = load_file(str(folder / "weights.safetensors"), device=str(device))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    for name, module in (modules or {}).items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        optional = set((allow_missing or {}).get(name, ()))
        if not optional:
            module.load_state_dict(state, strict=True)
            continue
        result = module.load_state_dict(state, strict=False)
        missing = sorted(set(result.missing_keys) - optional)
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"path: checkpoint does not match module {name!r}: missing keys {missing[:5]}, "
                f"unexpected keys {sorted(result.unexpected_keys)[:5]}"
            )
    extra = {k[len("extra.") :]: v for k, v in flat.items() if k.startswith("extra.")}
    return config, extra


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "optimizer"
) -> None:
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


def load_module(
    factory: Callable[..., nn.Module], stem: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
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

"""LoRA adapters (via ``peft``) for fine-tuning a base model with a few trainable weights.

:func:`add_lora` returns a copy of a base model (a diffusers model from
:mod:`~diffusiongym.models.diffusers_bridge`, the shipped :class:`~diffusiongym.models.digits.DigitsUNet`,
or any ``nn.Module``) in which every base weight is frozen and low-rank adapters
``W x + (alpha / rank) B A x`` are added to chosen layers. ``B`` starts at zero, so the copy
starts *exactly* equal to the base (same output bits). Use it as the fine-tuned model of a
trainer that optimises the parameters with ``requires_grad=True``::

    trainer = AdjointMatching(env, reward, reward_scale, model=add_lora(env.model, rank=4))
    trainer.train(100)
    save_lora(trainer.model, "adapter.safetensors")            # adapter weights only (small)
    model = load_lora(add_lora(env.model, rank=4), "adapter.safetensors")

Default target layers (``target_modules=None``):

1. the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (diffusers' ``Attention``)
   and ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear`` layers with those names),
   the usual choice for diffusers UNets (the diffusers LoRA training scripts use the first four);
2. if the model has none of them (e.g. the digits UNet, or a UNet without attention blocks):
   every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` layer.

Embeddings are never chosen by default, and layers inside ``nn.MultiheadAttention`` are
never adapted (it does not call its ``out_proj`` as a module, so LoRA there would do nothing).
Pass ``target_modules`` to choose: a list of module names (a name matches a module whose full
name equals it or ends with ``"." + name``, as in peft) or a regular expression that must match
the full module name (``re.fullmatch``). Targets are resolved to full module names at once; those
names, the rank and alpha are stored with the saved adapter and checked when it is loaded.

diffusers' own LoRA format (for a stock pipeline's ``load_lora_weights``):
:mod:`diffusiongym.models.lora_diffusers`; merged models as pipeline folders:
:mod:`diffusiongym.models.export`.

``peft`` is an optional dependency (``pip install diffusiongym[lora]``), imported only when
:func:`add_lora` (or :func:`load_lora` on a plain base model) runs.
"""

from __future__ import annotations

import copy as _copy
import hashlib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.utils.runtime import seeded

__all__ = [
    "add_lora",
    "lora_state_dict",
    "save_lora",
    "load_lora",
    "lora_settings",
    "lora_targets",
    "has_lora_layers",
    "is_lora_layer",
    "ATTENTION_PROJECTIONS",
]

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
"""Name suffixes of the attention projections adapted by default (``nn.Linear`` layers only)."""

FALLBACK_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
FORMAT = "diffusiongym-lora"
FORMAT_VERSION = "1"
ADAPTER_NAME = "default"
_SETTINGS_ATTR = "diffusiongym_lora"


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft, an optional dependency: pip install diffusiongym[lora]") from err
    return peft


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (a base layer with ``lora_A`` / ``lora_B``)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def has_lora_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers (e.g. it came from :func:`add_lora`)."""
    return any(is_lora_layer(m) for m in model.modules())


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Submodules by full name, minus the root and anything inside ``nn.MultiheadAttention``."""
    inside_mha: set[str] = set()
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_mha):
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside_mha.add(name)
        out[name] = module
    return out


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def lora_targets(model: nn.Module, target_modules: str | Iterable[str] | None = None) -> list[str]:
    """Full names of the layers :func:`add_lora` would adapt (in module order).

    Parameters
    ----------
    model : nn.Module
        The base model (without LoRA layers).
    target_modules : None, str or iterable of str
        ``None``: the default (module docstring); a string: a regular expression matched
        against full module names with ``re.fullmatch``; an iterable: module names, each matching
        the modules whose full name equals it or ends with ``"." + name``.

    Returns
    -------
    list of str
        Full module names, each an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = _candidates(model)
    kind = type(model).__name__
    if target_modules is None:
        names = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.Linear) and any(_suffix_match(n, k) for k in ATTENTION_PROJECTIONS)
        ]
        if not names:
            names = [n for n, m in modules.items() if isinstance(m, FALLBACK_TYPES)]
        if not names:
            raise ValueError(
                f"target_modules: {kind} has no attention projections ({', '.join(ATTENTION_PROJECTIONS)}) and no "
                "nn.Linear / nn.Conv layers to adapt by default; pass target_modules=[...] naming nn.Linear, "
                "nn.Conv1d/2d/3d or nn.Embedding layers"
            )
        return names
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({err})") from err
        names = [n for n in modules if pattern.fullmatch(n)]
        if not names:
            raise ValueError(
                f"target_modules: the regular expression {target_modules!r} matches no module name of {kind} "
                f"(re.fullmatch on full names such as {list(modules)[:5]}); pass a list of names to match by suffix instead"
            )
    else:
        keys = list(target_modules)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(
                f"target_modules: expected None, a regular expression or a non-empty list of module names, got {target_modules!r}"
            )
        import difflib

        chosen: set[str] = set()
        for key in keys:
            found = [n for n in modules if _suffix_match(n, key)]
            if not found:
                known = sorted(set(modules) | {n.rsplit(".", 1)[-1] for n in modules})
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"target_modules: no module of {kind} is named {key!r} (or ends with '.{key}').{hint}")
            chosen.update(found)
        names = [n for n in modules if n in chosen]
    bad = [(n, type(modules[n]).__name__) for n in names if not isinstance(modules[n], LORA_TYPES)]
    if bad:
        shown = ", ".join(f"{n!r} ({t})" for n, t in bad[:5])
        raise ValueError(
            f"target_modules: LoRA adapts nn.Linear, nn.Conv1d/2d/3d and nn.Embedding layers, but the selection includes "
            f"{shown}{' ...' if len(bad) > 5 else ''}; name the layers inside them instead"
        )
    return names


def add_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    copy: bool | str = True,
    *,
    seed: int = 0,
) -> nn.Module:
    """A fine-tunable LoRA copy of a base model: base weights frozen, adapters trainable.

    Each target layer ``W`` becomes ``W x + (alpha / rank) B A dropout(x)`` with ``A``
    Kaiming-uniform (seeded by ``seed``, global RNG untouched) and ``B = 0``, so the result
    computes exactly the base model's output until ``B`` is trained. The copy has the same
    call signature (``model(x, t, **cond)``) and attributes (``parameterization``,
    ``sample_shape``, ...) as ``model``.

    Parameters
    ----------
    model : nn.Module
        The base model, e.g. ``env.model`` of a diffusers environment (a
        :class:`~diffusiongym.models.diffusers_bridge.DiffusersModel`) or the digits UNet.
    rank : int
        LoRA rank ``r > 0``.
    alpha : float, optional
        Scale numerator; the adapter is multiplied by ``alpha / rank``. Default ``rank`` (scale 1).
    target_modules : None, str or iterable of str
        Which layers to adapt; see :func:`lora_targets` and the module docstring (default:
        attention projections, else every Linear / Conv layer).
    dropout : float
        Dropout on the adapter input in ``[0, 1)`` (active in ``train()`` mode only).
    copy : bool or "share"
        ``True`` (default): adapt a deep copy, ``model`` is left untouched. ``"share"``: a copy
        whose frozen base weights are *the same tensors* as ``model``'s (no extra memory for the
        base; their ``requires_grad`` is set to False in ``model`` too). ``False``: adapt
        ``model`` in place (then it is no longer the base: keep another copy of the base for
        the environment).
    seed : int
        Seed of the ``A`` initialisation.

    Returns
    -------
    nn.Module
        The adapted model; only its LoRA parameters have ``requires_grad=True``. Its settings
        are in :func:`lora_settings`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if alpha is None:
        alpha = float(rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: expected a positive finite number or None (= rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if copy not in (True, False, "share") or not isinstance(copy, (bool, str)):
        raise ValueError(f"copy: expected True, False or 'share', got {copy!r}")
    if has_lora_layers(model):
        raise ValueError(
            "model: already has LoRA layers; pass the base model (add_lora copies it) or use load_lora to restore an adapter"
        )
    peft = _import_peft()
    targets = lora_targets(model, target_modules)
    if copy is True:
        model = _copy.deepcopy(model)
    elif copy == "share":
        memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = _copy.deepcopy(model, memo)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules="^(?:" + "|".join(re.escape(n) for n in targets) + ")$",
        bias="none",
        init_lora_weights=True,
    )
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    with seeded(seed, device):  # peft's initialisers draw from the global RNG: fork and restore it
        model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.requires_grad_(False)
    trainable = 0
    for name, p in model.named_parameters():
        if _is_lora_name(name):
            p.requires_grad_(True)
            trainable += 1
    if trainable == 0:  # pragma: no cover - peft adapted none of the resolved layers
        raise RuntimeError(f"peft added no LoRA weights to the layers {targets}")
    setattr(
        model,
        _SETTINGS_ATTR,
        {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "target_modules": targets},
    )
    return model


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """The settings :func:`add_lora` used: ``rank``, ``alpha``, ``dropout``, ``target_modules``
    (full module names). Raises if ``model`` was not made by :func:`add_lora`."""
    settings = getattr(model, _SETTINGS_ATTR, None)
    if not isinstance(settings, dict):
        raise ValueError(
            f"model: expected a model returned by add_lora, got a {type(model).__name__} without LoRA settings"
        )
    return {**settings, "target_modules": list(settings["target_modules"])}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights only: ``{parameter name: tensor}`` for every LoRA parameter.

    Names are the full parameter names in ``model`` (e.g.
    ``unet.mid_block.attentions.0.to_q.lora_A.default.weight``); tensors are detached and share
    storage with the model (as ``state_dict`` does). ``lora_A`` weights have shape
    ``(rank, in_features)`` (``(rank, in_channels, *kernel)`` for convolutions), ``lora_B``
    weights ``(out_features, rank)`` (``(out_channels, rank, 1, ...)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    out = {name: p.detach() for name, p in model.named_parameters() if _is_lora_name(name)}
    if not out:
        raise ValueError(f"model: {type(model).__name__} has no LoRA weights; build it with add_lora")
    return out


def _base_fingerprint(model: nn.Module) -> str:
    """sha256 of the frozen base parameters (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if _is_lora_name(name):
            continue
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter weights of a :func:`add_lora` model to a safetensors file.

    Only the LoRA tensors are stored (a small file, no pickle); the metadata holds the settings
    (``rank``, ``alpha``, ``dropout``, ``target_modules``) as JSON and a sha256 fingerprint of
    the base weights, both checked by :func:`load_lora`.

    Parameters
    ----------
    model : nn.Module
        A model returned by :func:`add_lora` (e.g. ``trainer.model`` after training).
    path : str or Path
        The file to write (conventionally ``*.safetensors``); parent folders are created.

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    settings = lora_settings(model)
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": json.dumps(settings, sort_keys=True),
        "base_sha256": _base_fingerprint(model),
        "model_class": type(model).__name__,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read_lora_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"path: expected a LoRA adapter file written by save_lora, got {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"path: {str(path)!r} is not a diffusiongym LoRA adapter (metadata format={metadata.get('format')!r}); "
            "write it with save_lora"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"path: adapter format version {metadata.get('format_version')!r}, this diffusiongym reads {FORMAT_VERSION!r}"
        )
    return json.loads(metadata["settings"]), metadata


def load_lora(model: nn.Module, path: str | Path, *, check_base: bool = True) -> nn.Module:
    """Load adapter weights written by :func:`save_lora`.

    Parameters
    ----------
    model : nn.Module
        Either a model from :func:`add_lora` with the same settings as the saved one (loaded in
        place), or the plain base model (then ``add_lora(model, **saved settings)`` is built
        first; ``model`` itself is left untouched).
    path : str or Path
        The safetensors file.
    check_base : bool
        Check that the frozen base weights are bit-identical to those the adapter was saved
        with (sha256 over names, dtypes and bytes; a cast to another dtype counts as another base).

    Returns
    -------
    nn.Module
        The model with the adapter loaded; its outputs equal the saved model's bit for bit
        (same device and dtype).
    """
    path = Path(path)
    saved, metadata = _read_lora_file(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not has_lora_layers(model):
        exact = "^(?:" + "|".join(re.escape(n) for n in saved["target_modules"]) + ")$"
        dropout = float(saved.get("dropout", 0.0))
        model = add_lora(
            model, rank=int(saved["rank"]), alpha=float(saved["alpha"]), target_modules=exact, dropout=dropout
        )
    current = lora_settings(model)
    diffs = [
        f"{key} {saved.get(key)!r} in the file vs {current.get(key)!r} in the model"
        for key in ("rank", "alpha", "target_modules")
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"path: the adapter in {str(path)!r} was saved with other LoRA settings: {'; '.join(diffs)}. "
            f"Build the model with add_lora(base, rank={saved.get('rank')}, alpha={saved.get('alpha')}, "
            "target_modules=<the saved list>) or pass the plain base model to load_lora"
        )
    if check_base and metadata.get("base_sha256") != _base_fingerprint(model):
        raise ValueError(
            f"model: its frozen base weights differ from those the adapter in {str(path)!r} was trained on "
            "(sha256 fingerprint mismatch: another checkpoint, dtype or modified weights); pass check_base=False to load anyway"
        )
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"path: adapter tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise ValueError(f"path: {key}: expected shape {tuple(own[key].shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model

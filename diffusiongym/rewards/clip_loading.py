"""CLIP models for rewards: offline loading, differentiable preprocessing, cached text features.

:func:`load_clip` reads a transformers ``CLIPModel`` (``config.json`` and ``model.safetensors``),
its tokenizer and its image-processor config (``preprocessor_config.json``) from a local folder or
from the local Hugging Face cache. Nothing is ever downloaded (fetch a model first with
``huggingface-cli download``): transformers is called on local folders with ``local_files_only=True``
and never touches the network. Weights
are read from safetensors only (``use_safetensors=True``): pickled ``.bin`` weights are refused.

:class:`CLIPImagePreprocess` repeats ``CLIPImageProcessor`` in torch, so gradients flow back to
the image: resize the shortest side to ``size`` (bicubic with antialiasing: PIL's kernel, equal to
PIL's float resize; clipped to ``[0, 1]`` as PIL clips), crop the centre to ``crop_size``, normalise with the processor's mean and standard deviation.
transformers is an optional dependency, imported when a model is loaded.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusiongym.utils.validation import check_positive_int, read_json_config

__all__ = ["CLIPImagePreprocess", "CLIPBackbone", "load_clip", "import_transformers"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes in preprocessor_config.json


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("CLIP-based rewards need transformers: pip install transformers") from err
    return transformers


@dataclass(frozen=True)
class CLIPImagePreprocess:
    """``CLIPImageProcessor`` in torch: images ``(n, 3, H, W)`` in ``[0, 1]`` to ``pixel_values``.

    Attributes
    ----------
    size : int, (int, int) or None
        Shortest side after resizing, or the exact ``(height, width)`` (``None``: no resize).
    crop_size : (int, int) or None
        ``(height, width)`` of the centre crop (``None``: no crop).
    mean, std : 3 floats or None
        Normalisation (``None``: none).
    mode : {"bicubic", "bilinear"}
        Interpolation, with antialiasing (PIL's kernels).
    """

    size: int | tuple[int, int] | None = 224
    crop_size: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = OPENAI_CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CLIPImagePreprocess:
        """From the dict of a ``preprocessor_config.json`` (transformers' defaults where keys are absent)."""

        def side(value: Any, key: str) -> Any:
            if isinstance(value, dict):
                if "shortest_edge" in value:
                    return value["shortest_edge"]
                return (value["height"], value["width"])
            return value if key == "size" else (value, value)

        size = side(cfg.get("size", {"shortest_edge": 224}), "size") if cfg.get("do_resize", True) else None
        if isinstance(size, tuple):  # {"height", "width"}: the processor resizes to exactly that
            size = tuple(check_positive_int("preprocessor_config.json: size", s, maximum=16384) for s in size)
        elif size is not None:
            size = check_positive_int("preprocessor_config.json: size", size, maximum=16384)
        crop = side(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
        normalize = cfg.get("do_normalize", True)
        return cls(
            size=size,
            crop_size=None
            if crop is None
            else tuple(check_positive_int("preprocessor_config.json: crop_size", c, maximum=16384) for c in crop),
            mean=tuple(float(m) for m in cfg.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
            std=tuple(float(s) for s in cfg.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
            mode=_MODES.get(cfg.get("resample", 3), "bicubic"),
        )

    def __call__(self, images: Tensor) -> Tensor:
        x = images
        if self.size is not None:
            h, w = x.shape[-2:]
            if isinstance(self.size, tuple):
                new = self.size
            else:
                short, long = min(h, w), max(h, w)
                new_short, new_long = self.size, int(self.size * long / short)  # transformers truncates too
                new = (new_short, new_long) if h <= w else (new_long, new_short)
            if new != (h, w):
                # PIL clips the bicubic overshoot to the pixel range; so does the processor
                x = F.interpolate(x, size=new, mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            h, w = x.shape[-2:]
            if h < ch or w < cw:  # the processor pads with zeros around a too small image
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
            x = (x - mean) / std
        return x


def _pooled(out: Any) -> Tensor:
    """Projected features from ``get_image_features`` / ``get_text_features`` (a tensor in
    transformers 4, a model output whose ``pooler_output`` holds them in transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPBackbone:
    """A CLIP model with its tokenizer and preprocessing: unit-norm image and text features.

    Parameters
    ----------
    model : transformers ``CLIPModel`` (or any module with ``get_image_features`` /
        ``get_text_features`` and a ``config``)
        Used as given (the loader puts it in eval mode and freezes it).
    tokenizer : callable, optional
        A transformers tokenizer; needed for text features only.
    preprocess : CLIPImagePreprocess, optional
        Default: OpenAI CLIP's (224 pixels, its mean and std).
    batch_size : int, optional
        Images per forward pass (``None``: the whole batch at once).
    max_cache : int
        Prompts whose text features are kept (oldest dropped first). Call :meth:`clear_cache`
        after changing the model's weights.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        preprocess: CLIPImagePreprocess | None = None,
        batch_size: int | None = None,
        max_cache: int = 4096,
    ):
        for name in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model: expected a transformers CLIPModel (with {name}), got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess if preprocess is not None else CLIPImagePreprocess()
        self.batch_size = None if batch_size is None else check_positive_int("batch_size", batch_size)
        self.max_cache = check_positive_int("max_cache", max_cache)
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def parameter(self) -> Tensor:
        return next(self.model.parameters())

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(n, d)`` of images ``(n, 3, H, W)`` in ``[0, 1]``, differentiable,
        in the model's dtype and on its device."""
        p = self.parameter
        pixels = self.preprocess(images.to(device=p.device, dtype=p.dtype))
        step = self.batch_size or max(pixels.shape[0], 1)
        feats = torch.cat([_pooled(self.model.get_image_features(pixel_values=c)) for c in pixels.split(step)])
        return F.normalize(feats, dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``(n, d)`` (no autograd; cached per prompt)."""
        if self.tokenizer is None:
            raise ValueError("tokenizer: this CLIP backbone has no tokenizer; it cannot embed prompts")
        rows = {p: self._text_cache[p] for p in prompts if p in self._text_cache}
        missing = list(dict.fromkeys(p for p in prompts if p not in rows))
        if missing:
            p = self.parameter
            max_length = int(self.model.config.text_config.max_position_embeddings)
            tokens = self.tokenizer(
                missing, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(p.device), attention_mask=tokens["attention_mask"].to(p.device)
                )
            for prompt, f in zip(missing, F.normalize(_pooled(out), dim=-1)):
                rows[prompt] = self._text_cache[prompt] = f
                if len(self._text_cache) > self.max_cache:
                    self._text_cache.popitem(last=False)
        return torch.stack([rows[p] for p in prompts])

    def clear_cache(self) -> None:
        self._text_cache.clear()


# ------------------------------------------------------------------------------ loading
def _is_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source) is not None and ".." not in source


def _check_folder(folder: Path, need_model: bool, need_processor: bool) -> None:
    """Name what a local folder lacks before transformers reads it."""
    if need_model:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"source: {folder} has no config.json (the CLIPModel config)")
        if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
            if pickles:
                raise ValueError(
                    f"source: {folder} holds only pickle weights {pickles[:3]}; rewards load safetensors only "
                    "(convert with transformers: model.save_pretrained(folder, safe_serialization=True))"
                )
            raise FileNotFoundError(f"source: {folder} has no model.safetensors (the CLIPModel weights)")
    if need_processor:
        has_tok = (folder / "tokenizer.json").is_file() or all(
            (folder / n).is_file() for n in ("vocab.json", "merges.txt")
        )
        if not has_tok:
            raise FileNotFoundError(
                f"processor_source: {folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
            )
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"processor_source: {folder} has no preprocessor_config.json (the CLIP image processor's "
                "size, crop and mean/std)"
            )


def _cached_snapshot(repo_id: str, filename: str, cache_dir: Any, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache holding ``filename``, or
    ``None``: reads the cache folders only. (transformers' own lookup with ``local_files_only=True``
    still builds hub request headers, which in recent huggingface_hub versions fetch a registry
    over the network; resolving the folder first keeps every call local.)"""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _resolve(source: Any, argument: str, filename: str, cache_dir: Any, revision: str | None) -> Path:
    """The local folder of ``source``: itself, or a hub id's snapshot in the local Hugging Face
    cache; errors for a file, a missing path or an id that is not cached."""
    if not isinstance(source, (str, Path)):
        raise TypeError(f"{argument}: expected a folder or a hub id, got {type(source).__name__}")
    if not str(source).strip():
        raise ValueError(f"{argument}: expected a folder or a hub id, got an empty string")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{argument}: expected a folder or a hub id, got the file {str(source)!r}")
    if not _is_hub_id(str(source)):
        raise FileNotFoundError(f"{argument}: no folder {str(source)!r} (and it is not a hub id)")
    snapshot = _cached_snapshot(str(source), filename, cache_dir, revision)
    if snapshot is None:
        from huggingface_hub import constants

        where = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{argument}: {str(source)!r} is not a local folder and is not in the local Hugging Face cache "
            f"({where}); diffusiongym never downloads: fetch it first (huggingface-cli download {source}) "
            "or pass a folder"
        )
    return snapshot


def load_clip(
    source: str | Path,
    *,
    processor_source: str | Path | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    need_tokenizer: bool = True,
    batch_size: int | None = None,
) -> CLIPBackbone:
    """Load a CLIP model, tokenizer and preprocessing (frozen, in eval mode).

    Parameters
    ----------
    source : folder or hub id
        Holds ``config.json`` and ``model.safetensors`` (and, unless ``processor_source`` is
        given, the tokenizer and ``preprocessor_config.json``). A hub id is read from the local
        Hugging Face cache only (never downloaded).
    processor_source : folder or hub id, optional
        Where the tokenizer and ``preprocessor_config.json`` are (PickScore's are those of the
        CLIP model it was fine-tuned from); default ``source``.
    cache_dir, revision
        Where a hub id's snapshot is looked up.
    device, dtype
        Where and in which precision the model runs.
    need_tokenizer : bool
        Load the tokenizer (image-only rewards such as the aesthetic predictor do not need it).
    batch_size : int, optional
        Images per forward pass.
    """
    transformers = import_transformers()
    src = _resolve(source, "source", "config.json", cache_dir, revision)
    proc = _resolve(
        processor_source if processor_source is not None else source,
        "processor_source",
        "preprocessor_config.json",
        cache_dir,
        revision,
    )
    _check_folder(src, need_model=True, need_processor=False)
    if need_tokenizer:
        _check_folder(proc, need_model=False, need_processor=True)
    elif not (proc / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"processor_source: {proc} has no preprocessor_config.json")
    model = transformers.CLIPModel.from_pretrained(str(src), use_safetensors=True, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(proc), local_files_only=True) if need_tokenizer else None
    cfg_file = proc / "preprocessor_config.json"
    preprocess = CLIPImagePreprocess.from_config(read_json_config("processor_source", cfg_file))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return CLIPBackbone(model, tokenizer, preprocess, batch_size=batch_size)

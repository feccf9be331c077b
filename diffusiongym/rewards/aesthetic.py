"""The LAION aesthetic predictor: an MLP head on CLIP ViT-L/14 image embeddings (differentiable).

``r = head(f / |f|)`` with ``f`` the projected CLIP image embedding (``get_image_features``,
768 numbers for ViT-L/14), normalised to unit length as in the published inference code. The
published head, "improved aesthetic predictor" v2 (``sac+logos+ava1-l14-linearMSE.pth``), is a
stack of linear layers without activations (its dropouts are inactive at inference); its
state dict, and the safetensors file this module reads, hold

==================  ============  ==================
key                 shape         layer
==================  ============  ==================
``layers.0.weight`` (1024, 768)   Linear 768 -> 1024
``layers.0.bias``   (1024,)
``layers.2.weight`` (128, 1024)   Linear 1024 -> 128
``layers.2.bias``   (128,)
``layers.4.weight`` (64, 128)     Linear 128 -> 64
``layers.4.bias``   (64,)
``layers.6.weight`` (16, 64)      Linear 64 -> 16
``layers.6.bias``   (16,)
``layers.7.weight`` (1, 16)       Linear 16 -> 1
``layers.7.bias``   (1,)
==================  ============  ==================

(the odd indices 1, 3, 5 are the dropouts). The v1 linear predictor (``weight`` (1, 768) and
``bias`` (1,)) is read too. Any ``layers.<i>.weight/bias`` chain is accepted, applied in the order
of ``i`` with ``activation`` between layers (default none, as published). Only safetensors files
are read: convert the published ``.pth`` with ``scripts/convert_aesthetic_head.py``, which reads
the checkpoint's zip archive without unpickling it (no code in the file can run).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.rewards.clip_loading import CLIPBackbone, load_clip
from diffusiongym.rewards.model_base import ModelImageReward

__all__ = ["AestheticHead", "load_aesthetic_head", "AestheticReward"]


class AestheticHead(nn.Module):
    """Linear layers applied in order, ``activation`` between them (none by default)."""

    def __init__(self, layers: list[nn.Linear], activation: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not layers:
            raise ValueError("layers: expected at least one linear layer")
        for a, b in zip(layers, layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"layers: a layer of {a.out_features} outputs feeds one of {b.in_features} inputs")
        if layers[-1].out_features != 1:
            raise ValueError(f"layers: the last layer must give one score, it gives {layers[-1].out_features}")
        self.layers = nn.ModuleList(layers)
        self.activation = activation

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], activation: Any = None) -> AestheticHead:
        """From the published state dict layout (see the module docstring)."""
        if set(state) == {"weight", "bias"}:
            indexed = {0: (state["weight"], state["bias"])}
        else:
            indexed = {}
            for key in state:
                m = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", key)
                if m is None:
                    raise ValueError(
                        f"state: unexpected key {key!r}; expected layers.<i>.weight / layers.<i>.bias "
                        "(the LAION aesthetic MLP) or weight / bias (the linear predictor)"
                    )
                i = int(m.group(1))
                if f"layers.{i}.weight" not in state or f"layers.{i}.bias" not in state:
                    raise ValueError(f"state: layer {i} needs both layers.{i}.weight and layers.{i}.bias")
                indexed[i] = (state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
        layers = []
        for i in sorted(indexed):
            w, b = indexed[i]
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"state: layer {i}: weight {tuple(w.shape)} and bias {tuple(b.shape)} do not fit")
            layer = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            layers.append(layer)
        return cls(layers, activation)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores ``(n,)`` of unit-norm embeddings ``(n, in_features)``."""
        h = embeddings
        for i, layer in enumerate(self.layers):
            if i and self.activation is not None:
                h = self.activation(h)
            h = layer(h)
        return h[:, 0]


def load_aesthetic_head(path: str | Path, activation: Any = None) -> AestheticHead:
    """Read an :class:`AestheticHead` from a safetensors file (keys in the module docstring)."""
    file = Path(path).expanduser()
    if file.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise ValueError(
            f"head: {file.name} is a pickle checkpoint; only safetensors is read. Convert it with "
            f"python scripts/convert_aesthetic_head.py {file} head.safetensors"
        )
    if not file.is_file():
        raise FileNotFoundError(f"head: no aesthetic head file {file} (a .safetensors with layers.<i>.weight/bias)")
    from safetensors.torch import load_file

    head = AestheticHead.from_state_dict(load_file(str(file)), activation)
    return head.eval().requires_grad_(False)


class AestheticReward(ModelImageReward):
    """LAION aesthetic score ``head(f / |f|)`` of CLIP image embeddings ``f`` (roughly 1 to 10).

    Parameters
    ----------
    backbone : CLIPBackbone
        CLIP ViT-L/14 for the published head (:func:`load_clip` with ``need_tokenizer=False``).
    head : AestheticHead
        :func:`load_aesthetic_head`; its input size must be the CLIP embedding size.
    image_range, tolerance
        See :class:`~diffusiongym.rewards.model_base.ModelImageReward`. No conditioning is read.
    """

    differentiable = True

    def __init__(
        self,
        backbone: CLIPBackbone,
        head: AestheticHead,
        *,
        image_range: tuple[float, float] = (-1.0, 1.0),
        tolerance: float = 0.5,
    ):
        super().__init__(image_range=image_range, tolerance=tolerance)
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"backbone: expected a CLIPBackbone (see load_clip), got {type(backbone).__name__}")
        if not isinstance(head, AestheticHead):
            raise TypeError(f"head: expected an AestheticHead (see load_aesthetic_head), got {type(head).__name__}")
        dim = getattr(backbone.model.config, "projection_dim", head.in_features)
        if head.in_features != dim:
            raise ValueError(f"head: takes {head.in_features} features but the CLIP model embeds images in {dim}")
        p = backbone.parameter
        self.backbone = backbone
        self.head = head.to(device=p.device, dtype=p.dtype)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        head: str | Path,
        *,
        processor_source: str | Path | None = None,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        activation: Any = None,
        **kwargs: Any,
    ) -> AestheticReward:
        """CLIP from ``source`` (folder or cached hub id, e.g. ``openai/clip-vit-large-patch14``) and the
        head from the safetensors file ``head``; ``kwargs`` go to the constructor."""
        backbone = load_clip(
            source,
            processor_source=processor_source,
            cache_dir=cache_dir,
            revision=revision,
            device=device,
            dtype=dtype,
            need_tokenizer=False,
            batch_size=batch_size,
        )
        return cls(backbone, load_aesthetic_head(head, activation), **kwargs)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        scores = self.head(self.backbone.image_features(self.to_unit(x)))
        return scores.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        sizes = [self.head.in_features] + [layer.out_features for layer in self.head.layers]
        return f"AestheticReward(head={'-'.join(map(str, sizes))})"

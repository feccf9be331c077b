"""Text-image rewards on CLIP models: CLIP score and PickScore (differentiable in the image).

Both score an image against its prompt (the ``prompt`` / ``prompt_index`` conditioning of
:mod:`diffusiongym.rewards.model_base`) by the cosine similarity of CLIP's unit-norm image and
text embeddings, ``cos = <f_img / |f_img|, f_txt / |f_txt|>``:

- :class:`CLIPScore`: ``r = scale * cos`` (default ``scale = 1``, range ``[-1, 1]``). The
  "CLIPScore" of Hessel et al. and torchmetrics is ``100 * max(cos, 0)``: ``scale=100`` gives it
  without the clipping at 0, which would zero the gradient of a poorly matching image.
- :class:`PickScore`: ``r = exp(logit_scale) * cos``, the logit of the PickScore model
  (``yuvalkirstain/PickScore_v1``, a CLIP-H/14 fine-tuned on human preferences; its tokenizer and
  image processor are those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: pass that folder as
  ``processor_source``). Typical values are around 20.

Images are preprocessed in torch (:class:`~diffusiongym.rewards.clip_loading.CLIPImagePreprocess`),
so ``r`` is differentiable with respect to the pixels; text embeddings are computed once per
prompt without autograd and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusiongym.rewards.clip_loading import CLIPBackbone, load_clip
from diffusiongym.rewards.model_base import ModelImageReward
from diffusiongym.utils.validation import check_real

__all__ = ["CLIPScore", "PickScore"]


class CLIPScore(ModelImageReward):
    """``r = scale * cos(image embedding, prompt embedding)`` of a CLIP model.

    Parameters
    ----------
    backbone : CLIPBackbone
        The CLIP model with its tokenizer and preprocessing (:func:`load_clip`); or build the
        reward with :meth:`from_pretrained`.
    scale : float
        Multiplies the cosine.
    prompts : sequence of str or text file, optional
        Prompt table for the ``prompt_index`` conditioning.
    image_range, tolerance
        See :class:`~diffusiongym.rewards.model_base.ModelImageReward`.
    """

    differentiable = True

    def __init__(
        self,
        backbone: CLIPBackbone,
        *,
        scale: float = 1.0,
        prompts: Sequence[str] | str | Path | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
        tolerance: float = 0.5,
    ):
        super().__init__(image_range=image_range, tolerance=tolerance, prompts=prompts)
        if not isinstance(backbone, CLIPBackbone):
            raise TypeError(f"backbone: expected a CLIPBackbone (see load_clip), got {type(backbone).__name__}")
        if backbone.tokenizer is None:
            raise ValueError("backbone: a text-image reward needs the CLIP tokenizer; load it with need_tokenizer=True")
        self.backbone = backbone
        self.scale = check_real("scale", scale, positive=True)
        self.range = (-self.scale, self.scale)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        processor_source: str | Path | None = None,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> CLIPScore:
        """Load the CLIP model from ``source`` (a local folder or a cached hub id; see
        :func:`~diffusiongym.rewards.clip_loading.load_clip`); ``kwargs`` go to the constructor."""
        backbone = load_clip(
            source,
            processor_source=processor_source,
            cache_dir=cache_dir,
            revision=revision,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
        return cls(backbone, **kwargs)

    def cosine(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """Cosine similarity ``(n,)`` of images ``x`` (in ``image_range``) to ``prompts``, in the model's dtype."""
        image = self.backbone.image_features(self.to_unit(x))
        text = self.backbone.text_features(prompts).to(image)
        return (image * text).sum(-1)

    def logit_scale(self) -> float:
        """The multiplier of the cosine."""
        return self.scale

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        cos = self.cosine(x, self.prompts_for(x.shape[0], cond))
        return (self.logit_scale() * cos).to(device=x.device, dtype=x.dtype)

    def check_cond(self, n: int, device: torch.device, cond: dict[str, Any]) -> None:
        self.prompts_for(n, cond)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.logit_scale():g})"


class PickScore(CLIPScore):
    """PickScore: ``r = exp(logit_scale) * cos(image embedding, prompt embedding)``.

    ``logit_scale`` is the CLIP model's own learned temperature (``model.logit_scale``, read at
    each call). Parameters are those of :class:`CLIPScore` but ``scale``; load the published
    model with ``PickScore.from_pretrained(pickscore_folder, processor_source=clip_h14_folder)``.
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        *,
        prompts: Sequence[str] | str | Path | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
        tolerance: float = 0.5,
    ):
        super().__init__(backbone, prompts=prompts, image_range=image_range, tolerance=tolerance)
        if not isinstance(getattr(backbone.model, "logit_scale", None), Tensor):
            raise TypeError("backbone: PickScore needs a CLIP model with a logit_scale parameter")
        self.range = (-self.logit_scale(), self.logit_scale())

    def logit_scale(self) -> float:
        return float(self.backbone.model.logit_scale.detach().exp())

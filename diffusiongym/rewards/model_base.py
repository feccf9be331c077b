"""Shared parts of rewards on pretrained models: the image range and the prompt convention.

Images
    Rewards take images ``(n, C, H, W)`` with ``C`` 1 (grey, repeated to RGB) or 3 (RGB) in
    ``image_range`` (default ``(-1, 1)``, what the diffusion models and VAEs of this package
    produce; ``(0, 1)`` for images already mapped to ``img / 2 + 0.5``). They are mapped to
    ``[0, 1]`` and clamped there before the model sees them (the gradient is zero for a pixel
    outside the range). Validity is that of :class:`~diffusiongym.rewards.ImageReward`, measured on
    the image mapped to ``[-1, 1]``: finite, and every pixel within ``tolerance`` of the range.

Prompts (conditioning keywords, read per call)
    ``prompt``
        A ``str`` (the same prompt for the whole batch) or a sequence of ``n`` strings, one per sample.
    ``prompt_index``
        Integers of shape ``(n,)`` (or a scalar, broadcast), indices into a prompt table: the ``prompts``
        keyword of the same call when given, else the table given to the reward's constructor.
    ``prompt`` wins when both are given. Other keywords (``label``, embeddings, ...) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusiongym.rewards.images import ImageReward
from diffusiongym.utils.validation import ArgumentTypeError

__all__ = ["ModelImageReward", "prompts_from_cond", "read_prompt_table"]


def read_prompt_table(prompts: Any, argument: str = "prompts") -> list[str] | None:
    """A prompt table as a list of strings: a sequence of strings, or a text file (one prompt per
    non-empty line); ``None`` stays ``None``."""
    if prompts is None:
        return None
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: expected a list of prompts or a text file, {path} does not exist")
        table = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        table = list(prompts)
    else:
        raise ArgumentTypeError(
            f"{argument}: expected a sequence of strings or a text file, got {type(prompts).__name__}"
        )
    if not table:
        raise ValueError(f"{argument}: expected at least one prompt, got none")
    return table


def prompts_from_cond(n: int, cond: dict[str, Any], table: list[str] | None = None) -> list[str]:
    """The ``n`` prompts of a batch from the conditioning keywords (see the module docstring).

    Raises ``ValueError`` naming the keyword when no prompt is given, a length does not match
    ``n`` or an index is out of the table.
    """
    prompt = cond.get("prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt] * n
        if isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != n:
                raise ValueError(f"prompt: expected a string or {n} strings (one per sample), got {len(prompt)}")
            return list(prompt)
        raise ArgumentTypeError(f"prompt: expected a string or a sequence of strings, got {type(prompt).__name__}")
    index = cond.get("prompt_index")
    if index is None:
        raise ValueError(
            "prompt: this reward scores images against a prompt; pass prompt= (a string or one per sample) "
            "or prompt_index= with a prompt table (prompts= in the call or at construction)"
        )
    if cond.get("prompts") is not None:
        table = read_prompt_table(cond["prompts"])
    if table is None:
        raise ValueError("prompt_index: given, but no prompt table: pass prompts= in the call or to the reward")
    idx = torch.as_tensor(index)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ArgumentTypeError(f"prompt_index: expected integer indices, got {idx.dtype}")
    idx = idx.long().cpu()
    idx = idx.expand(n) if idx.ndim == 0 else idx
    if idx.shape != (n,):
        raise ValueError(f"prompt_index: expected shape ({n},), got {tuple(idx.shape)}")
    bad = (idx < 0) | (idx >= len(table))
    if bool(bad.any()):
        raise ValueError(
            f"prompt_index: expected indices in 0..{len(table) - 1} (the prompt table), got {idx[bad][:3].tolist()}"
        )
    return [table[i] for i in idx.tolist()]


class ModelImageReward(ImageReward):
    """Base class of image rewards on pretrained models (see the module docstring).

    Parameters
    ----------
    image_range : (float, float)
        Range of the input pixels, ``(-1, 1)`` or ``(0, 1)`` typically.
    tolerance : float
        Pixels within ``tolerance`` of the range (measured on the image mapped to ``[-1, 1]``) are valid.
    prompts : sequence of str or path, optional
        Prompt table that ``prompt_index`` refers to.
    """

    def __init__(
        self,
        image_range: tuple[float, float] = (-1.0, 1.0),
        tolerance: float = 0.5,
        prompts: Sequence[str] | str | Path | None = None,
    ):
        super().__init__(tolerance)
        try:
            low, high = (float(v) for v in image_range)
        except (TypeError, ValueError) as err:
            raise ArgumentTypeError(f"image_range: expected a pair (low, high), got {image_range!r}") from err
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"image_range: expected finite low < high, got {image_range!r}")
        self.image_range = (low, high)
        self.prompts = read_prompt_table(prompts)

    @staticmethod
    def _check(x: Tensor) -> None:
        ImageReward._check(x)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"x: expected grey or RGB images of shape (n, 1 or 3, H, W), got {tuple(x.shape)}")

    def to_unit(self, x: Tensor) -> Tensor:
        """Images mapped from ``image_range`` to ``[0, 1]``, clamped, grey repeated to 3 channels."""
        low, high = self.image_range
        x = ((x - low) / (high - low)).clamp(0.0, 1.0)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        low, high = self.image_range
        return super().is_valid(2 * (x.detach() - low) / (high - low) - 1, **cond)

    def prompts_for(self, n: int, cond: dict[str, Any]) -> list[str]:
        """The ``n`` prompts of a batch (see :func:`prompts_from_cond`)."""
        return prompts_from_cond(n, cond, self.prompts)

"""OCR reward: how closely the text read in an image matches a target string (not differentiable).

Text is read by RapidOCR (``pip install rapidocr-onnxruntime``: its detection, direction and
recognition ONNX models ship inside the wheel, so nothing is downloaded). The reward of an image
whose recognised text is ``s`` for the target ``t`` is

    ``r = 1 - min(lev(s, t), |t|) / |t|``  in ``[0, 1]``,

with ``lev`` the Levenshtein (edit) distance, after normalising both strings: lower case (unless
``case_sensitive``) and whitespace removed (the convention of flow_grpo's OCR reward). ``s``
joins the text of every detected box whose confidence is at least ``min_confidence``, in the
order RapidOCR returns them. An image in which nothing is read gets ``r = 0`` and stays *valid*:
a blank image is a legitimate sample that deserves a low reward (an invalid flag would hide it
from training). Invalid means what it means for every image reward: NaN/inf pixels or pixels
beyond the range's tolerance.

Targets: a fixed ``target`` string, or (``target=None``) per sample from the prompt conditioning
(``prompt`` / ``prompt_index``, see :mod:`diffusiongym.rewards.model_base`) through ``extract``,
which by default takes the text between the first pair of double quotes (``'a sign that says
"OPEN"'`` -> ``OPEN``) and otherwise the whole prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusiongym.rewards.model_base import ModelImageReward
from diffusiongym.utils.validation import ArgumentTypeError, check_real

__all__ = ["OCRReward", "levenshtein", "quoted_text"]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str:
    """The text between the first pair of double quotes of ``prompt``, else ``prompt`` itself."""
    m = re.search(r'"([^"]*)"', prompt)
    return m.group(1) if m else prompt


def _import_rapidocr() -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "OCRReward needs rapidocr-onnxruntime (its OCR models ship in the wheel): "
            "pip install 'diffusiongym[ocr]' (or pip install rapidocr-onnxruntime)"
        ) from err
    return RapidOCR


class OCRReward(ModelImageReward):
    """Similarity ``1 - normalised edit distance`` of the text read in the image to a target.

    Parameters
    ----------
    target : str, optional
        The text to write; ``None`` reads it per sample from the prompt through ``extract``.
    extract : callable
        ``prompt -> target`` when ``target`` is ``None`` (default :func:`quoted_text`).
    min_confidence : float
        Recognised boxes below this confidence (in ``[0, 1]``) are dropped.
    case_sensitive : bool
        Compare case too (default: both strings lower-cased).
    engine : callable, optional
        An OCR engine called as ``engine(bgr_uint8_array) -> (results, timings)`` with results a list
        of ``[box, text, confidence]`` or ``None`` (RapidOCR's convention); default a ``RapidOCR``
        built on first use with ``engine_kwargs`` (e.g. ``{"intra_op_num_threads": 1}``).
    prompts, image_range, tolerance
        See :class:`~diffusiongym.rewards.model_base.ModelImageReward`.
    """

    differentiable = False
    range = (0.0, 1.0)

    def __init__(
        self,
        target: str | None = None,
        *,
        extract: Callable[[str], str] = quoted_text,
        min_confidence: float = 0.0,
        case_sensitive: bool = False,
        engine: Callable[..., Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        prompts: Sequence[str] | str | Path | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
        tolerance: float = 0.5,
    ):
        super().__init__(image_range=image_range, tolerance=tolerance, prompts=prompts)
        self.case_sensitive = bool(case_sensitive)
        if target is not None:
            if not isinstance(target, str):
                raise ArgumentTypeError(f"target: expected a string or None (read from the prompt), got {target!r}")
            self._check_target(target, "target")
        if not callable(extract):
            raise TypeError(f"extract: expected a callable prompt -> target text, got {type(extract).__name__}")
        if engine is not None and not callable(engine):
            raise TypeError(f"engine: expected a callable OCR engine, got {type(engine).__name__}")
        self.target = target
        self.extract = extract
        self.min_confidence = check_real("min_confidence", min_confidence, low=0.0, high=1.0)
        self.engine_kwargs = dict(engine_kwargs or {})
        if engine is None:
            _import_rapidocr()  # fail at construction, not at the first reward
        self._engine = engine

    def normalize(self, text: str) -> str:
        """``text`` without whitespace, lower-cased unless ``case_sensitive``."""
        text = re.sub(r"\s+", "", text)
        return text if self.case_sensitive else text.lower()

    def _check_target(self, target: str, argument: str) -> str:
        norm = self.normalize(target)
        if not norm:
            raise ValueError(
                f"{argument}: expected a target text with at least one non-space character, got {target!r}"
            )
        return norm

    def targets(self, n: int, cond: dict[str, Any]) -> list[str]:
        """The ``n`` target strings of a batch (not normalised)."""
        if self.target is not None:
            return [self.target] * n
        return [self.extract(p) for p in self.prompts_for(n, cond)]

    def check_cond(self, n: int, device: torch.device, cond: dict[str, Any]) -> None:
        self.targets(n, cond)

    @property
    def engine(self) -> Callable[..., Any]:
        if self._engine is None:
            self._engine = _import_rapidocr()(**self.engine_kwargs)
        return self._engine

    def read(self, x: Tensor) -> list[str]:
        """The text read in each image of ``x`` (in ``image_range``), boxes joined by spaces."""
        unit = torch.nan_to_num(self.to_unit(x.detach().float().cpu()), nan=0.0)
        arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        texts = []
        for rgb in arrays:
            results, *_ = self.engine(np.ascontiguousarray(rgb[..., ::-1]))  # RapidOCR reads arrays as BGR
            words = [str(text) for _box, text, conf in results or () if float(conf) >= self.min_confidence]
            texts.append(" ".join(words))
        return texts

    def similarity(self, read: str, target: str) -> float:
        """``1 - min(lev, |t|) / |t|`` of the normalised strings."""
        t = self._check_target(target, "target")
        s = self.normalize(read)
        return 1.0 - min(levenshtein(s, t), len(t)) / len(t)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        targets = self.targets(x.shape[0], cond)
        values = [self.similarity(s, t) for s, t in zip(self.read(x), targets)]
        return torch.tensor(values, dtype=x.dtype, device=x.device)

    def __repr__(self) -> str:
        target = "prompt" if self.target is None else repr(self.target)
        return f"OCRReward(target={target})"

"""Rewards on images in ``[-1, 1]`` of shape ``(n, C, H, W)`` (the digits model's scaling).

=================================  ===============  ================  ==========================
reward                             differentiable   range             notes
=================================  ===============  ================  ==========================
``DigitClassifierReward`` prob     yes              [0, 1]            p(class k | x), shipped CNN
``DigitClassifierReward`` log_prob yes              (-inf, 0]         log p(class k | x)
``DigitClassifierReward`` is_class no               {0, 1}            argmax == k
``JPEGCompressibility``            no               (-inf, 0]         minus JPEG bits per pixel
``JPEGIncompressibility``          no               [0, inf)          JPEG bits per pixel
``BrightnessReward``               yes              [0, 1]            mean intensity (x + 1) / 2
``ContrastReward``                 yes              [0, 0.5]          its standard deviation
=================================  ===============  ================  ==========================

The class ``k`` is fixed (``target=3``) or, with ``target=None``, read per sample from the
conditioning keyword ``label`` (LongTensor ``(n,)``) that the sampler passes to rewards, so
"the class that was asked for" is a reward too. Any Python function becomes a reward with
:class:`diffusiongym.rewards.CallableReward`.

Validity: a sample is invalid when it has NaN/inf entries or any pixel outside
``[-1 - tolerance, 1 + tolerance]`` (default ``tolerance = 0.5``: samplers overshoot the data
range slightly, but a pixel at 1.5 is no longer an image). Invalid samples are flagged in
``valid`` and never raise; JPEG rewards clamp to ``[-1, 1]`` before encoding.

JPEG sizes are those of the whole file (header included) encoded by Pillow at the given
quality; for an 8x8 image the header dominates, which shifts the reward by a constant and
leaves the tilted target ``p* ∝ p exp(lambda r)`` unchanged. Pillow is an optional extra.
"""

from __future__ import annotations

import io
import numbers
from typing import Any

import torch
from torch import Tensor

from diffusiongym.models.digit_classifier import load_digit_classifier
from diffusiongym.rewards.base import Reward
from diffusiongym.utils.validation import ArgumentTypeError, check_real, unknown_name_error

__all__ = [
    "ImageReward",
    "DigitClassifierReward",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "BrightnessReward",
    "ContrastReward",
    "jpeg_bits_per_pixel",
    "to_uint8",
]


class ImageReward(Reward):
    """Base class: checks ``x`` is a batch of images ``(n, C, H, W)`` and flags out-of-range ones.

    Parameters
    ----------
    tolerance : float
        Pixels in ``[-1 - tolerance, 1 + tolerance]`` count as valid.
    """

    def __init__(self, tolerance: float = 0.5):
        self.tolerance = check_real(
            "tolerance", tolerance, nonnegative=True, allow_inf=True
        )  # inf: every finite image is valid

    @staticmethod
    def _check(x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor of images, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x: expected images of shape (n, C, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected floating-point images in [-1, 1], got {x.dtype}")

    def is_valid(self, x: Tensor, **cond: Any) -> Tensor:
        flat = x.detach().flatten(1)
        finite = torch.isfinite(flat).all(1)
        bound = 1.0 + self.tolerance
        in_range = (flat.abs() <= bound).all(1)  # NaN compares False: already flagged
        return finite & in_range

    def __call__(self, x: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        """``(values, valid)`` of shape ``(n,)``; an empty batch (``n = 0``) gives empty tensors."""
        self._check(x)
        if x.shape[0] == 0:
            self.check_cond(0, x.device, cond)
            return x.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=x.device)
        return super().__call__(x, **cond)

    def check_cond(self, n: int, device: torch.device, cond: dict[str, Any]) -> None:
        """Check the conditioning this reward reads (nothing by default)."""


class DigitClassifierReward(ImageReward):
    """Classifier reward for 8x8 digits: probability, log-probability or indicator of class ``k``.

    Parameters
    ----------
    target : int, optional
        The class ``k`` in 0..9; ``None`` reads it from the ``label`` keyword (per sample).
    mode : {"log_prob", "prob", "is_class"}
    classifier : nn.Module, optional
        ``logits = classifier(x)``; default the shipped :class:`DigitClassifier`.
    device : torch device
        Where to load the shipped classifier.
    tolerance : float
        See :class:`ImageReward`.
    """

    MODES = ("log_prob", "prob", "is_class")

    def __init__(
        self,
        target: int | None = None,
        mode: str = "log_prob",
        classifier: Any = None,
        device: Any = "cpu",
        tolerance: float = 0.5,
    ):
        super().__init__(tolerance)
        if mode not in self.MODES:
            raise unknown_name_error("mode", mode, self.MODES)
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, numbers.Integral):
                raise ArgumentTypeError(f"target: expected a class in 0..9 or None (read from label=), got {target!r}")
            if not 0 <= target <= 9:
                raise ValueError(f"target: expected a class in 0..9 or None (read from label=), got {target!r}")
            target = int(target)
        if classifier is None:
            classifier = load_digit_classifier(device)
        if not callable(classifier):
            raise TypeError(f"classifier: expected a callable x -> logits, got {type(classifier).__name__}")
        self.classifier = classifier
        self.target = target
        self.mode = mode
        self.differentiable = mode != "is_class"
        self.range = {"log_prob": (float("-inf"), 0.0), "prob": (0.0, 1.0), "is_class": (0.0, 1.0)}[mode]

    def _targets(self, n: int, device: torch.device, cond: dict[str, Any]) -> Tensor:
        if self.target is not None:
            return torch.full((n,), self.target, dtype=torch.long, device=device)
        if cond.get("label") is None:
            raise ValueError("label: this reward has target=None and reads the class from label=, but none was given")
        label = torch.as_tensor(cond["label"], device=device)
        if label.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"label: expected integer class labels, got {label.dtype}")
        label = label.long()
        label = label.expand(n) if label.ndim == 0 else label
        if label.shape != (n,):
            raise ValueError(f"label: expected shape ({n},), got {tuple(label.shape)}")
        out = (label < 0) | (label > 9)
        if bool(out.any()):
            raise ValueError(
                f"label: expected classes in 0..9 to score, got {label[out][:3].tolist()} "
                "(the null label 10 asks for no class: give this reward a fixed target= instead)"
            )
        return label

    def check_cond(self, n: int, device: torch.device, cond: dict[str, Any]) -> None:
        self._targets(n, device, cond)

    def log_probs(self, x: Tensor) -> Tensor:
        """Class log-probabilities, shape ``(n, 10)`` (NaN inputs give NaN rows, never raise)."""
        logits = self.classifier(x)
        if not isinstance(logits, Tensor) or logits.shape != (x.shape[0], 10):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"classifier: expected logits of shape ({x.shape[0]}, 10), got {got}")
        return torch.log_softmax(logits.to(x.dtype), dim=1)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        target = self._targets(x.shape[0], x.device, cond)
        logp = self.log_probs(x)
        if self.mode == "is_class":
            return (logp.argmax(1) == target).to(x.dtype)
        chosen = logp.gather(1, target[:, None])[:, 0]
        return chosen if self.mode == "log_prob" else chosen.exp()

    def __repr__(self) -> str:
        target = "label" if self.target is None else self.target
        return f"DigitClassifierReward(target={target}, mode={self.mode!r})"


def to_uint8(x: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` to uint8 ``0..255`` (clamped, rounded), same shape, on the CPU.
    Non-finite pixels become 0."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=-1.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def jpeg_bits_per_pixel(x: Tensor, quality: int = 75) -> Tensor:
    """JPEG file size in bits per pixel of each image, shape ``(n,)`` float64.

    ``x`` (n, C, H, W) in ``[-1, 1]`` with ``C`` 1 (grey) or 3 (RGB); encoded by Pillow.
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "JPEG rewards need Pillow: pip install 'diffusiongym[images]' (or pip install pillow)"
        ) from err
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected images of shape (n, 1 or 3, H, W), got {tuple(x.shape)}")
    arr = to_uint8(x).permute(0, 2, 3, 1).numpy()
    pixels = x.shape[2] * x.shape[3]
    bits = []
    for img in arr:
        buf = io.BytesIO()
        # uint8 (H, W) is mode "L" and (H, W, 3) is "RGB" by inference (the mode= argument is deprecated in Pillow 11.3)
        pil = Image.fromarray(img[..., 0]) if img.shape[-1] == 1 else Image.fromarray(img)
        pil.save(buf, format="JPEG", quality=int(quality))
        bits.append(8.0 * buf.tell() / pixels)
    return torch.tensor(bits, dtype=torch.float64)


class JPEGCompressibility(ImageReward):
    """``r = -(JPEG bits per pixel)``: rewards images that compress well (not differentiable)."""

    differentiable = False
    sign = -1.0

    def __init__(self, quality: int = 75, tolerance: float = 0.5):
        super().__init__(tolerance)
        if isinstance(quality, bool) or not isinstance(quality, numbers.Integral):
            raise ArgumentTypeError(f"quality: expected an integer in 1..95, got {quality!r}")
        if not 1 <= quality <= 95:
            raise ValueError(f"quality: expected an integer in 1..95, got {quality!r}")
        self.quality = int(quality)
        self.range = (float("-inf"), 0.0) if self.sign < 0 else (0.0, float("inf"))

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        bpp = jpeg_bits_per_pixel(x, self.quality)
        return (self.sign * bpp).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quality={self.quality})"


class JPEGIncompressibility(JPEGCompressibility):
    """``r = JPEG bits per pixel``: rewards detailed, hard-to-compress images."""

    sign = 1.0


class BrightnessReward(ImageReward):
    """Mean intensity ``mean((x + 1) / 2)`` over all pixels and channels (differentiable)."""

    differentiable = True
    range = (0.0, 1.0)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        return ((x + 1) / 2).flatten(1).mean(1)


class ContrastReward(ImageReward):
    """Standard deviation of the intensities ``(x + 1) / 2`` of each image (differentiable).

    Population standard deviation with a small floor inside the square root so its gradient
    stays finite on a constant image.
    """

    differentiable = True
    range = (0.0, 0.5)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        v = ((x + 1) / 2).flatten(1)
        return torch.sqrt(v.var(1, unbiased=False) + 1e-12)

"""A small CNN classifier for 8x8 digits in ``[-1, 1]`` (the image rewards' judge).

Trained by ``python -m diffusiongym.train.digits`` on the training split of
:func:`diffusiongym.models.digits_data.digits_dataset` (1,437 images), with small Gaussian pixel
noise as augmentation so that it stays calibrated on slightly noisy samples. Weights:
``diffusiongym/weights/digit_classifier.safetensors`` + ``.json`` (test accuracy inside).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusiongym.models.digits_data import IMAGE_SHAPE, NUM_CLASSES, WEIGHTS_DIR
from diffusiongym.utils.io import load_module

__all__ = ["DigitClassifier", "load_digit_classifier"]


class DigitClassifier(nn.Module):
    """``forward(x) -> logits``: ``x`` (n, 1, 8, 8) in [-1, 1], logits (n, 10)."""

    def __init__(self, channels: int = 32, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.config = {"channels": channels, "hidden": hidden, "dropout": dropout}
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * c * 16, hidden), nn.SiLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x: expected shape (n, 1, 8, 8), got {tuple(x.shape)}")
        return self.head(self.features(x))


def load_digit_classifier(device: torch.device | str = "cpu", path: str | Path | None = None) -> DigitClassifier:
    """The shipped :class:`DigitClassifier` (eval mode, parameters frozen)."""
    model, config = load_module(DigitClassifier, path if path is not None else WEIGHTS_DIR / "digit_classifier", device)
    assert isinstance(model, DigitClassifier)
    model.training_config = config  # type: ignore[attr-defined]
    model.requires_grad_(False)
    return model

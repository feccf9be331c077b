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
from diffusiongym.utils.validation import check_architecture, read_json_config

# Sizes accepted from the weights' JSON before the network is built (shipped: 32, 128, 0.2).
ARCHITECTURE_BOUNDS = {"channels": (1, 1024, int), "hidden": (1, 16384, int), "dropout": (0.0, 1.0, float)}

__all__ = ["DigitClassifier", "load_digit_classifier"]


class DigitClassifier(nn.Module):
    """``forward(x) -> logits``: ``x`` (n, 1, 8, 8) in [-1, 1], logits (n, 10) in ``x``'s dtype
    (computed in the parameters' dtype: ``x`` is cast to it and the logits back)."""

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
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * c * 16, hidden), nn.SiLU(), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (n, 1, 8, 8), got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x: expected shape (n, 1, 8, 8), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        weight_dtype = self.head[-1].weight.dtype
        return self.head(self.features(x.to(weight_dtype))).to(x.dtype)


def load_digit_classifier(device: torch.device | str = "cpu", path: str | Path | None = None) -> DigitClassifier:
    """The shipped :class:`DigitClassifier` (eval mode, parameters frozen, float32 as stored).

    ``path``: a weights stem (without suffix); the architecture sizes of its JSON are checked
    before the network is built.
    """
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path weights stem, got {type(path).__name__}")
    stem = Path(path) if path is not None else WEIGHTS_DIR / "digit_classifier"
    if stem.with_suffix(".json").is_file():
        arch = read_json_config("path", stem.with_suffix(".json")).get("architecture", {})
        check_architecture(f"path ({stem.with_suffix('.json').name})", arch, ARCHITECTURE_BOUNDS)
    model, config = load_module(DigitClassifier, stem, device)
    assert isinstance(model, DigitClassifier)
    model.float()  # the stored precision, whatever the global default dtype
    model.training_config = config  # type: ignore[attr-defined]
    model.requires_grad_(False)
    return model

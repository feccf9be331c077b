"""The 8x8 digits data and the constants shared by the digits model, its classifier and rewards.

Data: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, 1,797 images of
8x8 pixels with integer intensities 0..16, shipped inside scikit-learn, nothing is
downloaded). Split: ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``
-> 1,437 training and 360 test images (:func:`digits_dataset`).

Data scaling: an image is a tensor of shape ``(1, 8, 8)`` with ``x = intensity / 8 - 1``,
so the data lie in ``[-1, 1]`` (-1 is the white background, 1 full ink).

This module imports nothing from the rest of the package, so the network
(:mod:`diffusiongym.models.digits`), the classifier
(:mod:`diffusiongym.models.digit_classifier`) and the image rewards can all depend on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NUM_CLASSES", "NULL_LABEL", "IMAGE_SHAPE", "WEIGHTS_DIR", "DIGITS_SPLIT", "digits_dataset", "sample_labels"]

NUM_CLASSES = 10
NULL_LABEL = 10  # the "no label" class of classifier-free guidance
IMAGE_SHAPE = (1, 8, 8)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DIGITS_SPLIT = {"test_size": 0.2, "random_state": 0, "stratify": True}


def digits_dataset(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits, scaled to ``[-1, 1]``.

    Parameters
    ----------
    split : {"train", "test", "all"}
        ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``: 1,437 / 360.

    Returns
    -------
    images : Tensor, (n, 1, 8, 8) float32 in [-1, 1]
    labels : Tensor, (n,) int64 in 0..9
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("digits_dataset needs scikit-learn: pip install 'diffusiongym[train]'") from err
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE) / 8.0 - 1.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_SPLIT["test_size"],
        random_state=DIGITS_SPLIT["random_state"],
        stratify=labels.numpy(),
    )
    idx = torch.as_tensor(idx_train if split == "train" else idx_test)
    return images[idx], labels[idx]


def sample_labels(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Uniform class labels, LongTensor ``(n,)`` in 0..9 (the task's conditioning sampler)."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    labels = torch.randint(0, NUM_CLASSES, (int(n),), generator=generator, device=gen_device)
    return labels.to(device) if device is not None else labels

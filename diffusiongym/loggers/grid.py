"""Sample grids for image loggers (numpy and torch only), and a dependency-free PNG writer.

Images follow the package convention: ``(N, C, H, W)`` with values in ``[-1, 1]`` (``C`` 1 or 3).
A grid is a float32 numpy array ``(C, H', W')`` with values in ``[0, 1]``.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusiongym.loggers.atomic import write_atomic
from diffusiongym.utils.validation import check_int, check_positive_int

__all__ = ["make_grid", "to_grid", "grid_to_uint8", "write_png"]


def _as_array(argument: str, images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float32).numpy()
    if isinstance(images, np.ndarray):
        if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
            raise TypeError(f"{argument}: expected a real-valued array, got dtype {images.dtype}")
        return images.astype(np.float32)
    raise TypeError(f"{argument}: expected a torch.Tensor or numpy array, got {type(images).__name__}")


def _scale(array: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map ``value_range`` (``None``: the finite min and max) to ``[0, 1]``; clip; NaN -> 0."""
    if value_range is None:
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        if not (isinstance(value_range, (tuple, list)) and len(value_range) == 2):
            raise TypeError(f"value_range: expected a (low, high) pair or None, got {value_range!r}")
        low, high = float(value_range[0]), float(value_range[1])
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise ValueError(f"value_range: expected finite low < high, got {value_range!r}")
    span = high - low if high > low else 1.0
    out = (array - low) / span
    return np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)


def make_grid(
    images: Any,
    nrow: int | None = None,
    padding: int = 1,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    pad_value: float = 1.0,
) -> np.ndarray:
    """Tile a batch of images into one picture.

    Parameters
    ----------
    images : Tensor or ndarray, ``(N, C, H, W)`` (``C`` 1 or 3) or ``(N, H, W)``
    nrow : int, optional
        Images per row (default ``ceil(sqrt(N))``: a near-square grid).
    padding : int
        Pixels between images and around the grid.
    value_range : (low, high) or None
        Values mapped to black and white (default ``(-1, 1)``, the package's image range;
        ``None``: the batch's finite min and max). Values outside are clipped; NaN is black.
    pad_value : float
        Padding colour in ``[0, 1]`` (default white).

    Returns
    -------
    ndarray
        float32 ``(C, H', W')`` in ``[0, 1]``.
    """
    array = _as_array("images", images)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty batch (N, C, H, W) with C 1 or 3, got shape {array.shape}")
    n, c, h, w = array.shape
    cols = check_positive_int("nrow", nrow) if nrow is not None else math.ceil(math.sqrt(n))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = check_int("padding", padding, low=0)
    if not 0.0 <= float(pad_value) <= 1.0:
        raise ValueError(f"pad_value: expected a value in [0, 1], got {pad_value!r}")
    scaled = _scale(array, value_range)
    grid = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), float(pad_value), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top : top + h, left : left + w] = scaled[i]
    return grid


def to_grid(images: Any, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray:
    """What an image logger draws: a batch ``(N, C, H, W)`` is tiled (:func:`make_grid`); a
    single image or ready grid ``(C, H, W)`` / ``(H, W)`` is scaled by ``value_range``.
    Returns float32 ``(C, H, W)`` in ``[0, 1]``, ``C`` 1 or 3."""
    array = _as_array("images", images)
    if array.ndim == 4:
        return make_grid(array, value_range=value_range)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape[1:]) == 0:
        raise ValueError(
            f"images: expected a batch (N, C, H, W) or an image (C, H, W) / (H, W) with C 1 or 3, got shape {array.shape}"
        )
    return _scale(array, value_range)


def grid_to_uint8(grid: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` -> uint8 ``(H, W, C)`` (what PNG writers and wandb take)."""
    return np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


def write_png(path: str | Path, grid: np.ndarray) -> Path:
    """Write a ``(C, H, W)`` grid in ``[0, 1]`` (``C`` 1 or 3) as an 8-bit PNG, atomically.

    Plain zlib + the PNG chunk format: no imaging library needed.
    """
    pixels = grid_to_uint8(np.asarray(grid, dtype=np.float32))
    h, w, c = pixels.shape
    if c not in (1, 3):
        raise ValueError(f"grid: expected 1 or 3 channels, got {c}")
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return write_atomic(path, data)

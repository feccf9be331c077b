"""Argument checks that produce Gymnasium-style messages ("expected X, got Y")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["unknown_name_error", "check_tensor", "check_positive_int"]


def unknown_name_error(argument: str, name: object, known: Iterable[str]) -> ValueError:
    """A ``ValueError`` for an unknown name, listing what exists and close matches."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"{argument}: unknown value {name!r}; expected one of {known}.{hint}")


def check_positive_int(argument: str, value: object) -> int:
    """Return ``value`` as an int, or raise naming ``argument`` if it is not an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    return value


def check_tensor(
    argument: str,
    value: object,
    shape: Sequence[int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    finite: bool = False,
) -> Tensor:
    """Check a tensor's type, shape, dtype, device and (optionally) finiteness.

    ``shape`` entries of ``-1`` match any size. Raises ``ValueError`` (``TypeError``
    for a non-tensor) whose message names ``argument`` and what was expected.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor, got {type(value).__name__}")
    if shape is not None:
        ok = value.ndim == len(shape) and all(s == -1 or s == v for s, v in zip(shape, value.shape))
        if not ok:
            want = tuple("*" if s == -1 else s for s in shape)
            raise ValueError(f"{argument}: expected shape {want}, got {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{argument}: expected dtype {dtype}, got {value.dtype}")
    if device is not None and value.device.type != torch.device(device).type:
        raise ValueError(f"{argument}: expected a tensor on device {torch.device(device)}, got {value.device}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{argument}: expected finite values, got NaN or inf")
    return value

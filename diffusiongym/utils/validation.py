"""Argument checks that produce Gymnasium-style messages ("argument: expected X, got Y").

Conventions: a value of the wrong *type* raises :class:`ArgumentTypeError` (a ``TypeError``;
also a ``ValueError`` so that callers written against the older ``ValueError`` keep working),
a value of the right type but out of range raises ``ValueError``; an unknown keyword raises
``TypeError`` in Python's own wording. Integers are any :class:`numbers.Integral` except
``bool`` (numpy integers included); reals any :class:`numbers.Real` except ``bool``.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "check_device",
    "as_float64_vector",
    "ArgumentTypeError",
    "MAX_STEPS",
    "unknown_name_error",
    "unexpected_keyword_error",
    "check_keywords",
    "check_tensor",
    "check_positive_int",
    "check_int",
    "check_real",
    "read_json_config",
    "check_architecture",
]

MAX_STEPS = 100_000
"""Largest number of time steps accepted anywhere (grids of more would only exhaust memory)."""


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError``; also a ``ValueError`` for callers that
    caught the ``ValueError`` raised for every bad argument before."""


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ without importing numpy


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def unknown_name_error(argument: str, name: object, known: Iterable[str]) -> ValueError:
    """A ``ValueError`` for an unknown name, listing what exists and close matches."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"{argument}: unknown value {name!r}; expected one of {known}.{hint}")


def unexpected_keyword_error(where: str, key: str, known: Iterable[str], context: str = "") -> TypeError:
    """``TypeError`` for an unknown keyword argument in Python's wording (clients such as TorchRL's
    ``GymEnv`` match ``"unexpected keyword argument 'frameskip'"``), with the valid names and close
    matches: ``"load_x() got an unexpected keyword argument 'devce'; expected ... Did you mean 'device'?"``.
    ``context`` (e.g. an env id) is added in parentheses after the key."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(key), known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    context = f" ({context})" if context else ""
    return TypeError(f"{where}() got an unexpected keyword argument {key!r}{context}; expected one of {known}.{hint}")


def check_keywords(where: str, kwargs: Mapping[str, object], known: Iterable[str]) -> None:
    """Raise :func:`unexpected_keyword_error` for the first key of ``kwargs`` not in ``known``."""
    known = set(known)
    for key in kwargs:
        if key not in known:
            raise unexpected_keyword_error(where, key, known)


def check_int(argument: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]`` (numpy integers accepted; bools and floats
    raise :class:`ArgumentTypeError`, out-of-range values ``ValueError``)."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{argument}: expected an integer, got {_describe(value)}")
    value = operator.index(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{argument}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_positive_int(argument: str, value: object, *, maximum: int | None = None) -> int:
    """Return ``value`` as an int ``> 0`` (and ``<= maximum``), or raise naming ``argument``.

    Any :class:`numbers.Integral` but ``bool`` is accepted (``np.int64(5)`` too); another type
    raises :class:`ArgumentTypeError`, a value ``<= 0`` or above ``maximum`` ``ValueError``.
    """
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{argument}: expected a positive integer, got {_describe(value)}")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{argument}: expected a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{argument}: expected a positive integer <= {maximum}, got {value!r}")
    return value


def check_real(
    argument: str,
    value: object,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    low: float | None = None,
    high: float | None = None,
    allow_inf: bool = False,
) -> float:
    """``value`` as a finite Python float (numpy scalars and 0-d tensors of a real number
    accepted; bools, strings, NaN and inf refused; ``+inf`` accepted with ``allow_inf``),
    optionally ``> 0``, ``>= 0`` or in ``[low, high]``."""
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{argument}: expected a finite real number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value) and not (allow_inf and value == math.inf):
        raise ValueError(f"{argument}: expected a finite number{' or inf' if allow_inf else ''}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{argument}: expected a positive finite number, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{argument}: expected a non-negative finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{argument}: expected a number in [{low}, {high}], got {value!r}")
    return value


def as_float64_vector(argument: str, value: object, what: str, min_length: int = 2) -> Tensor:
    """``value`` (a tensor or sequence of numbers) as a flat float64 tensor of at least
    ``min_length`` entries; ``TypeError`` / ``ValueError`` name ``argument`` and ``what``."""
    try:
        vector = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentTypeError(
            f"{argument}: expected a 1-D tensor or sequence of {what}, got {type(value).__name__}"
        ) from err
    if vector.numel() < min_length:
        raise ValueError(f"{argument}: expected at least {min_length} {what}, got {vector.numel()}")
    return vector


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


MAX_CONFIG_BYTES = 1 << 20
"""Largest JSON config read from disk (a model config is a few kilobytes)."""


def read_json_config(argument: str, path: object, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """Read a JSON object from ``path`` after checking that the file exists and is at most
    ``max_bytes`` long; ``ValueError`` naming ``argument`` for a too large or malformed file."""
    file = Path(path)  # type: ignore[arg-type]
    if not file.is_file():
        raise FileNotFoundError(f"{argument}: expected a JSON config file, {file} does not exist")
    size = file.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{argument}: {file.name} is {size} bytes; a config is expected to be at most {max_bytes} bytes"
        )
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{argument}: {file} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: {file} must hold a JSON object, got {type(data).__name__}")
    return data


def check_architecture(argument: str, config: object, bounds: Mapping[str, tuple[float, float, type]]) -> dict:
    """Check an architecture dict read from a file *before* any allocation: only the keys of
    ``bounds`` (``name -> (low, high, int or float)``), each of that type and in ``[low, high]``.
    Returns the dict; ``ValueError`` naming ``argument`` and the key otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"{argument}: expected an architecture object, got {type(config).__name__}")
    for key, value in config.items():
        if key not in bounds:
            raise ValueError(f"{argument}: unknown architecture key {key!r}; expected some of {sorted(bounds)}")
        low, high, kind = bounds[key]
        ok_type = isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)
        if _is_bool(value) or not ok_type or not low <= value <= high:
            raise ValueError(
                f"{argument}: {key} must be {'an integer' if kind is int else 'a number'} in [{low}, {high}], got {value!r}"
            )
    return config


def check_device(device: object) -> torch.device:
    """A usable ``torch.device``; a device this machine lacks (e.g. ``"cuda"`` without a GPU) raises ``ValueError``."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda', got {device!r}") from err
    if dev.type in ("cpu", "meta"):
        return dev
    try:
        torch.empty(0, device=dev)
    except (AssertionError, RuntimeError) as err:  # CPU-only builds raise AssertionError
        raise ValueError(f"device: {str(dev)!r} is not available on this machine ({err})") from err
    return dev

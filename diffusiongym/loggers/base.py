"""The logger interface every back-end follows, and :class:`MultiLogger` (fan-out).

A logger receives scalar metrics and images keyed by an integer ``step`` (a trainer's
iteration). :meth:`Trainer.train <diffusiongym.trainers.base.Trainer.train>` takes one as
``logger=``; it never closes it (the caller owns it: use it as a context manager).
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch

from diffusiongym.utils.validation import check_int

__all__ = ["Logger", "MultiLogger", "check_metrics", "check_name"]


def check_metrics(metrics: Any, step: Any) -> tuple[dict[str, float], int]:
    """Validate ``log_metrics`` arguments: ``metrics`` a mapping of str keys to real numbers
    (or 0-d tensors) and ``step`` an int >= 0. Returns ``(plain floats, step)``."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping of names to numbers, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metrics: expected non-empty str keys, got {key!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metrics[{key!r}]: expected a real number, got {type(value).__name__}")
        out[key] = float(value)
    return out, check_int("step", step, low=0)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    return name


class Logger(abc.ABC):
    """Where training metrics and sample grids go.

    Subclasses implement :meth:`log_metrics` and :meth:`log_images`, and :meth:`close` /
    :meth:`flush` where they hold resources. Loggers are context managers (``close`` on exit).
    """

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (name -> number; NaN allowed) at ``step`` (int >= 0)."""

    @abc.abstractmethod
    def log_images(
        self, name: str, images: Any, step: int, value_range: tuple[float, float] | None = (-1.0, 1.0)
    ) -> None:
        """Record a picture under ``name`` at ``step``.

        ``images``: a batch ``(N, C, H, W)`` (tiled with
        :func:`~diffusiongym.loggers.grid.make_grid`) or one image / ready grid ``(C, H, W)`` or
        ``(H, W)``; ``C`` 1 or 3; a torch tensor or numpy array. ``value_range`` maps to black
        and white (default ``(-1, 1)``, the package's image range; ``None``: min and max).
        """

    def flush(self) -> None:  # noqa: B027 (optional hook: buffered back-ends override it)
        """Push buffered records to storage (no-op by default)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Flush and release resources; the logger is not used afterwards."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MultiLogger(Logger):
    """Send everything to several loggers, in order (e.g. CSV and TensorBoard at once).

    ``close`` closes every logger even if one fails, then re-raises the first error.
    """

    def __init__(self, *loggers: Logger):
        for i, logger in enumerate(loggers):
            if not isinstance(logger, Logger):
                raise TypeError(f"loggers[{i}]: expected a diffusiongym Logger, got {type(logger).__name__}")
        self.loggers: tuple[Logger, ...] = loggers

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_images(
        self, name: str, images: Any, step: int, value_range: tuple[float, float] | None = (-1.0, 1.0)
    ) -> None:
        for logger in self.loggers:
            logger.log_images(name, images, step, value_range=value_range)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # close the others first
                errors.append(err)
        if errors:
            raise errors[0]

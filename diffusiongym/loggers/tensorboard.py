"""TensorBoard back-end through :class:`torch.utils.tensorboard.SummaryWriter`.

Needs the ``tensorboard`` package (``pip install "diffusiongym[logging]"``); it is imported when
a :class:`TensorBoardLogger` is made, not when this module is. View with
``tensorboard --logdir <log_dir>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusiongym.loggers.base import Logger, check_metrics, check_name
from diffusiongym.loggers.grid import grid_to_uint8, to_grid

__all__ = ["TensorBoardLogger"]


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when tensorboard is missing
        raise ImportError(
            "TensorBoardLogger needs the tensorboard package: pip install 'diffusiongym[logging]' "
            f"(or pip install tensorboard); the import failed with: {err}"
        ) from err
    return SummaryWriter


class TensorBoardLogger(Logger):
    """Scalars (``add_scalar`` per metric) and images (``add_image`` of the uint8 grid; needs
    pillow) in a TensorBoard run.

    Parameters
    ----------
    log_dir : str or Path
        The run's folder (event files are written there).
    **writer_options
        Passed to ``SummaryWriter`` (e.g. ``flush_secs``, ``max_queue``).
    """

    def __init__(self, log_dir: str | Path, **writer_options: Any):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir: expected a str or Path, got {type(log_dir).__name__}")
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer()(log_dir=str(self.log_dir), **writer_options)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values, step = check_metrics(metrics, step)
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_images(
        self, name: str, images: Any, step: int, value_range: tuple[float, float] | None = (-1.0, 1.0)
    ) -> None:
        name = check_name(name)
        _, step = check_metrics({}, step)
        pixels = grid_to_uint8(to_grid(images, value_range))  # rounded here, as every back-end does
        self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.log_dir)!r})"

"""CSV back-end: one row per :meth:`log_metrics` call, images as PNG files next to it.

The file starts ``step,<metric>,...``; columns appear in the order metrics are first seen.
A metric that appears later adds a column: the file is rewritten (atomically) with the wider
header and empty cells in the earlier rows, so no key is ever dropped. Otherwise each call
appends one line in one write and flushes, so a crash loses at most the line being written.
Values are written with ``repr`` (exact round trip; ``nan``, ``inf``); a metric missing from
a row is an empty cell, read back as NaN by :func:`read_metrics`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusiongym.loggers.atomic import write_atomic
from diffusiongym.loggers.base import Logger, check_metrics, check_name
from diffusiongym.loggers.grid import to_grid, write_png

__all__ = ["CSVLogger", "read_metrics"]

STEP = "step"


def _line(values: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or rows[0][0] != STEP:
        raise ValueError(f"path: {path} is not a metrics CSV (its header must start with {STEP!r})")
    return rows[0], rows[1:]


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Read a :class:`CSVLogger` file: column name -> values (``step`` included), with NaN
    for empty cells."""
    header, rows = _read_rows(Path(path))
    out: dict[str, list[float]] = {name: [] for name in header}
    for row in rows:
        cells = row + [""] * (len(header) - len(row))
        for name, cell in zip(header, cells):
            out[name].append(float(cell) if cell != "" else math.nan)
    return out


class CSVLogger(Logger):
    """Metrics to a CSV file, images to PNGs (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The CSV file (parent folders are created).
    append : bool
        Continue an existing file (its columns are kept) instead of starting afresh, e.g. when
        resuming a checkpointed trainer.
    image_dir : str or Path, optional
        Where :meth:`log_images` writes ``<name>_<step:06d>.png`` (default: the CSV path
        without its suffix plus ``_images``).
    """

    def __init__(self, path: str | Path, append: bool = False, image_dir: str | Path | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
        if not isinstance(append, bool):
            raise TypeError(f"append: expected a bool, got {type(append).__name__}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"path: expected a file, got the folder {self.path}")
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.with_name(self.path.stem + "_images")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists():
            self.columns, _ = _read_rows(self.path)
        else:
            self.columns = [STEP]
            write_atomic(self.path, _line(self.columns))
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"CSVLogger({self.path}): the logger is closed")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._check_open()
        values, step = check_metrics(metrics, step)
        if STEP in values:
            raise ValueError(f"metrics: {STEP!r} is the step column; pass it as step=")
        new = [key for key in values if key not in self.columns]
        if new:
            self._widen(new)
        cells = [str(step)] + [repr(values[name]) if name in values else "" for name in self.columns[1:]]
        with open(self.path, "a", newline="") as handle:
            handle.write(_line(cells))
            handle.flush()

    def _widen(self, new: list[str]) -> None:
        """Rewrite the file with ``new`` columns appended (earlier rows get empty cells)."""
        _, rows = _read_rows(self.path)
        self.columns = self.columns + new
        width = len(self.columns)
        text = _line(self.columns) + "".join(_line(row + [""] * (width - len(row))) for row in rows)
        write_atomic(self.path, text)

    def log_images(
        self, name: str, images: Any, step: int, value_range: tuple[float, float] | None = (-1.0, 1.0)
    ) -> None:
        self._check_open()
        name = check_name(name)
        _, step = check_metrics({}, step)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        write_png(self.image_dir / f"{safe}_{step:06d}.png", to_grid(images, value_range))

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r}, columns={self.columns})"

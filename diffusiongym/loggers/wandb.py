"""Weights & Biases back-end (optional: ``pip install "diffusiongym[wandb]"``).

``mode="offline"`` writes the run under ``dir`` (or ``$WANDB_DIR``) without any network access;
upload it later with ``wandb sync``. wandb's background service writes the run file: it is
complete when that service stops (at process exit, or after ``wandb.teardown()``), which may be
after :meth:`WandbLogger.close` returns. ``wandb`` is imported when a :class:`WandbLogger` is made,
not when this module is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusiongym.loggers.base import Logger, check_metrics, check_name
from diffusiongym.loggers.grid import grid_to_uint8, to_grid

__all__ = ["WandbLogger", "WANDB_MODES"]

WANDB_MODES = ("online", "offline", "disabled")


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "WandbLogger needs the wandb package: pip install 'diffusiongym[wandb]' (or pip install wandb); "
            f"the import failed with: {err}"
        ) from err
    return wandb


class WandbLogger(Logger):
    """Metrics (``run.log(metrics, step=step)``) and images (``wandb.Image`` of the grid) in a wandb run.

    Parameters
    ----------
    project : str, optional
        The wandb project (default ``"diffusiongym"``).
    name : str, optional
        The run's display name.
    mode : {"online", "offline", "disabled"}, optional
        Default: wandb's own (``$WANDB_MODE``, else online, which needs ``wandb login``).
    dir : str or Path, optional
        Where the run folder ``wandb/`` is written (default ``$WANDB_DIR`` or the working folder).
    config : dict, optional
        Hyper-parameters stored with the run (e.g. ``trainer.config.to_dict()``).
    **init_options
        Other ``wandb.init`` keywords (``entity``, ``tags``, ``group``, ``reinit``, ...).

    Attributes
    ----------
    run : wandb Run
    """

    def __init__(
        self,
        project: str | None = "diffusiongym",
        name: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        **init_options: Any,
    ):
        if mode is not None and mode not in WANDB_MODES:
            raise ValueError(f"mode: expected one of {list(WANDB_MODES)} or None, got {mode!r}")
        if dir is not None and not isinstance(dir, (str, os.PathLike)):
            raise TypeError(f"dir: expected a str or Path, got {type(dir).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(config).__name__}")
        self._wandb = _wandb()
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = self._wandb.init(
            project=project,
            name=name,
            mode=mode,
            dir=str(dir) if dir is not None else None,
            config=dict(config) if config is not None else None,
            **init_options,
        )
        self.closed = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values, step = check_metrics(metrics, step)
        self.run.log(values, step=step)

    def log_images(
        self, name: str, images: Any, step: int, value_range: tuple[float, float] | None = (-1.0, 1.0)
    ) -> None:
        name = check_name(name)
        _, step = check_metrics({}, step)
        pixels = grid_to_uint8(to_grid(images, value_range))
        self.run.log({name: self._wandb.Image(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)}, step=step)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.finish()

    def __repr__(self) -> str:
        return f"WandbLogger(run={getattr(self.run, 'name', None)!r})"

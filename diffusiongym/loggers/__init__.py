"""Training logs: one :class:`Logger` interface, back-ends for CSV, TensorBoard and Weights & Biases.

``trainer.train(logger=CSVLogger("run/metrics.csv"))`` sends every iteration's metrics (the
records of ``trainer.history``) to the logger; ``log_samples_every=k`` adds a grid of fresh
samples every ``k`` iterations on image tasks. TensorBoard and wandb are optional
dependencies, imported only when their logger is made.
"""

from diffusiongym.loggers.base import Logger, MultiLogger
from diffusiongym.loggers.csv import CSVLogger, read_metrics
from diffusiongym.loggers.grid import make_grid, write_png
from diffusiongym.loggers.tensorboard import TensorBoardLogger
from diffusiongym.loggers.wandb import WandbLogger

__all__ = [
    "Logger",
    "MultiLogger",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_grid",
    "read_metrics",
    "write_png",
]

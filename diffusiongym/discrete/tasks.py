"""Discrete reward-adaptation tasks.

``DiscreteGrid-v0``
    The 2-D ring mixture of ``GMM2D-v0`` (8 modes of std 0.25 on a circle of radius 2, the 8th with
    1/7 of the others' weight) discretised on a 32 x 32 grid of cell centres in [-3, 3]^2: ``D = 2``
    tokens with ``K = 32`` values, mask source, ``kappa = t``. Reward ``-1/2 |pos(x) - mu_8|^2``,
    ``reward_scale = 2``. Exact posterior by enumeration (:class:`ExactPosterior`) and exact oracle
    (:class:`DiscreteTiltOracle`).
``DiscreteDigits-v0``
    sklearn's 8 x 8 digits binarised (pixel > 7) to ``D = 64`` bits, mask source, learned
    :class:`MLPPosterior` shipped in ``diffusiongym/weights/discrete_digits.*`` (trained by
    ``python -m diffusiongym.discrete.train_digits``), with the shipped logistic digit classifier's
    log-probability of a class as reward (default class 0, ``reward_scale = 1``). No oracle.

Both are registered with :func:`diffusiongym.tasks.register_task` (``discrete=True``), so
``diffusiongym.make_task("DiscreteGrid-v0")`` builds them as well as :func:`make_discrete_task`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusiongym.discrete.models import ExactPosterior, MLPPosterior, PosteriorModel
from diffusiongym.discrete.oracle import DiscreteTiltOracle
from diffusiongym.discrete.path import MixturePath
from diffusiongym.discrete.rewards import LogisticClassReward, TableReward
from diffusiongym.models.gmm import gmm_preset
from diffusiongym.rewards.base import Reward
from diffusiongym.tasks import DISCRETE_TASKS, BaseTask, make_task, register_task
from diffusiongym.utils.validation import unknown_name_error

__all__ = [
    "DiscreteTask",
    "make_discrete_task",
    "DISCRETE_TASKS",
    "grid_task",
    "grid_positions",
    "load_digits_model",
    "DIGITS_WEIGHTS",
]

DIGITS_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "discrete_digits"


@dataclass
class DiscreteTask(BaseTask):
    """A discrete reward-adaptation problem (a :class:`~diffusiongym.tasks.BaseTask`).

    Attributes
    ----------
    name : str
    model : PosteriorModel
        The base posterior model (carries its :class:`MixturePath`).
    reward : Reward
        On tokens ``(n, D)``.
    reward_scale : float
    steps : int
        Default number of Euler jump steps on the uniform grid of [0, 1].
    action_scale : float
        Gymnasium action ``a`` in [-1, 1] maps to control logits ``c = action_scale * a``.
    oracle : DiscreteTiltOracle or None

    Notes
    -----
    Fields are checked on construction (and by ``dataclasses.replace``) as
    :class:`~diffusiongym.tasks.BaseTask` does, plus ``model`` (a :class:`PosteriorModel`).
    """

    name: str
    model: PosteriorModel
    reward: Reward
    reward_scale: float = 1.0
    steps: int = 50
    action_scale: float = 5.0
    oracle: DiscreteTiltOracle | None = None

    def _check_base_model(self) -> None:
        if not isinstance(self.model, PosteriorModel):
            raise TypeError(f"model: expected a PosteriorModel (the base posterior), got {type(self.model).__name__}")

    @property
    def path(self) -> MixturePath:
        return self.model.path


def grid_positions(size: int = 32, low: float = -3.0, high: float = 3.0) -> Tensor:
    """Cell centres of the 1-D grid, shape ``(size,)`` float64."""
    return low + (high - low) * (torch.arange(size, dtype=torch.float64) + 0.5) / size


def grid_task(
    size: int = 32,
    reward_scale: float = 2.0,
    source: str = "mask",
    scheduler: Any = "linear",
    steps: int = 50,
    action_scale: float = 5.0,
) -> DiscreteTask:
    """``DiscreteGrid-v0`` (see module docstring) on a ``size x size`` grid."""
    mixture = gmm_preset("2d")
    pos = grid_positions(size)
    pts = torch.stack(torch.meshgrid(pos, pos, indexing="ij"), -1).reshape(-1, 2)
    logp = mixture.log_prob(pts.to(mixture.means.dtype)).double()
    probs = torch.exp(logp - logp.max()).reshape(size, size)
    target = mixture.means[-1].double()
    r = (-0.5 * ((pts - target) ** 2).sum(-1)).reshape(size, size)
    path = MixturePath(size, 2, source=source, scheduler=scheduler)  # type: ignore[arg-type]
    model = ExactPosterior(probs, path)
    oracle = DiscreteTiltOracle(probs, r, reward_scale, path)
    return DiscreteTask("DiscreteGrid-v0", model, TableReward(r), reward_scale, steps, action_scale, oracle)


def load_digits_model(path: str | Path = DIGITS_WEIGHTS) -> tuple[MLPPosterior, dict[str, Tensor], dict]:
    """Load the shipped digits posterior model. Returns ``(model, extra_tensors, config)``;
    ``extra_tensors`` holds the logistic classifier (``classifier.weight`` (10, 64), ``classifier.bias`` (10,))."""
    from safetensors.torch import load_file

    path = Path(path)
    weights, cfg_file = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights.exists():
        raise FileNotFoundError(
            f"path: expected {weights} (train it with `python -m diffusiongym.discrete.train_digits`)"
        )
    config = json.loads(cfg_file.read_text())
    p = config["model"]["path"]
    mp = MixturePath(p["vocab_size"], p["length"], source=p["source"], scheduler=p["scheduler"])
    model = MLPPosterior(
        mp,
        hidden=config["model"]["hidden"],
        layers=config["model"]["layers"],
        num_frequencies=config["model"]["num_frequencies"],
    )
    flat = load_file(str(weights))
    state = {k[len("model.") :]: v.float() for k, v in flat.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model.eval()
    extra = {k: v.float() for k, v in flat.items() if not k.startswith("model.")}
    return model, extra, config


def digits_task(label: int = 0, reward_scale: float = 1.0, steps: int = 32, action_scale: float = 5.0) -> DiscreteTask:
    """``DiscreteDigits-v0``: shipped digits model, reward ``log p_classifier(label | x)``."""
    model, extra, _ = load_digits_model()
    reward = LogisticClassReward(extra["classifier.weight"], extra["classifier.bias"], label)
    return DiscreteTask("DiscreteDigits-v0", model, reward, reward_scale, steps, action_scale, None)


register_task("DiscreteGrid-v0", grid_task, discrete=True)
register_task("DiscreteDigits-v0", digits_task, discrete=True)


def make_discrete_task(name: str | DiscreteTask, **kwargs: Any) -> DiscreteTask:
    """Build a discrete task by id (``"DiscreteGrid-v0"``, ``"DiscreteDigits-v0"``, any namespace
    prefix dropped) through :func:`~diffusiongym.tasks.make_task`; keyword arguments go to its
    factory. An instance is returned as is (then no keyword arguments)."""
    if isinstance(name, DiscreteTask):
        if kwargs:
            raise ValueError(f"kwargs: expected none with a DiscreteTask instance, got {sorted(kwargs)}")
        return name
    if not isinstance(name, str):
        raise TypeError(f"task: expected a discrete task name or a DiscreteTask, got {type(name).__name__}")
    key = name.split("/")[-1]
    if key not in DISCRETE_TASKS:
        raise unknown_name_error("task", name, DISCRETE_TASKS)
    task = make_task(key, **kwargs)
    assert isinstance(task, DiscreteTask)
    return task

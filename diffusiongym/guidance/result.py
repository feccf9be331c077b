"""What the guidance samplers return, and how they count base-model evaluations.

Cost is counted in *model evaluations*: one evaluation is one sample (one row of a batch)
through the base network. :class:`CountingModel` wraps ``env.model`` and counts the rows of
every forward call; a gradient through the model (gradient guidance) adds one evaluation per
row for the backward pass (:meth:`CountingModel.add_backward`). It can also remember the last
output computed for a twist at ``(x, t)`` so that the next Euler–Maruyama step at the same
states reuses it (:meth:`CountingModel.remember`): the ``pred_final`` twist of SMC then costs
no evaluation beyond the sampling itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment

__all__ = ["GuidanceResult", "CountingModel", "counting_environment"]


class CountingModel:
    """``model(x, t, **cond)`` that counts evaluated rows and can reuse one remembered output.

    Other attributes are the wrapped model's (so a trainer that calls e.g. ``trainable_copy()``
    works on a counted environment; the copy itself is not counted).

    Attributes
    ----------
    forward_evals : int
        Rows evaluated by forward calls (a reused output counts nothing).
    backward_evals : int
        Rows differentiated through (added by callers with :meth:`add_backward`).
    """

    def __init__(self, model: Callable[..., Tensor]):
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **cond), got {type(model).__name__}")
        self.model = model
        self.sample_shape = getattr(model, "sample_shape", None)
        self.forward_evals = 0
        self.backward_evals = 0
        self._remember = False
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None

    def __getattr__(self, name: str) -> Any:
        # anything else (e.g. ``trainable_copy``, ``mixture``) is the wrapped model's
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    @property
    def evals(self) -> int:
        """``forward_evals + backward_evals``."""
        return self.forward_evals + self.backward_evals

    def add_backward(self, rows: int) -> None:
        self.backward_evals += int(rows)

    @contextlib.contextmanager
    def remember(self) -> Iterator[None]:
        """Inside the block, keep the last gradient-free output for one later identical call."""
        self._remember = True
        try:
            yield
        finally:
            self._remember = False

    def reindex(self, index: Tensor) -> None:
        """Follow a resampling of the batch: the remembered rows become ``rows[index]``."""
        if self._cache is not None:
            x, t, out = self._cache
            self._cache = (x[index], t[index], out[index])

    def forget(self) -> None:
        self._cache = None

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        cache, self._cache = self._cache, None
        if (
            cache is not None
            and not x.requires_grad
            and cache[0].shape == x.shape
            and torch.equal(cache[1], t)
            and torch.equal(cache[0], x)
        ):
            return cache[2]
        out = self.model(x, t, **cond)
        self.forward_evals += int(x.shape[0])
        if self._remember and not (x.requires_grad or out.requires_grad):
            self._cache = (x.clone(), t.clone(), out)
        return out


def counting_environment(env: DiffusionEnvironment) -> tuple[DiffusionEnvironment, CountingModel]:
    """A shallow copy of ``env`` whose model is a :class:`CountingModel` of ``env.model``."""
    if not isinstance(env, DiffusionEnvironment):
        raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
    counter = CountingModel(env.model)
    return env.with_model(counter), counter


@dataclass
class GuidanceResult:
    """Samples of a guidance method and what they cost.

    Attributes
    ----------
    x1 : Tensor, (n_out, *sample_shape)
        Equally weighted output samples (after the final resampling where there is one; may
        contain repeats).
    reward : Tensor, (n_out,)
        ``r(x1)`` (unscaled).
    model_evals : int
        Base-model evaluations spent (rows through the network; a backward pass through it
        counts one per row).
    cond : dict
        The conditioning of ``x1`` (batched tensors follow the resampling).
    log_normalizer, log_normalizer_se : float
        Estimate of ``log E_base[exp(lambda r(X1))]`` (over the base *chain* on the grid used)
        and its standard error; NaN where the method gives none.
    objective, kl : Tensor or None, (n_out,)
        Per-sample ``lambda r - KL`` and path KL where the samples come from a controlled chain
        (gradient guidance); ``None`` for resampled laws, whose KL is not a per-path quantity.
    info : dict
        Method-specific extras.
    """

    x1: Tensor
    reward: Tensor
    model_evals: int
    cond: dict[str, Any] = field(default_factory=dict)
    log_normalizer: float = math.nan
    log_normalizer_se: float = math.nan
    objective: Tensor | None = None
    kl: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

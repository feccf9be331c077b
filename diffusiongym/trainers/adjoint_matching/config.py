"""Hyper-parameters of Adjoint Matching (:class:`AdjointMatchingConfig`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from diffusiongym.trainers.base import TrainerConfig
from diffusiongym.utils.validation import check_positive_int

__all__ = ["RESIDUALS", "TIME_WEIGHTS", "AdjointMatchingConfig", "multimodal_recipe"]

RESIDUALS = ("auto", "copy", "control", "plain")
TIME_WEIGHTS = ("uniform", "clip", "inverse")


@dataclasses.dataclass
class AdjointMatchingConfig(TrainerConfig):
    """Settings of :class:`~diffusiongym.trainers.adjoint_matching.AdjointMatching`.

    The shared fields are those of :class:`~diffusiongym.trainers.base.TrainerConfig`; here
    ``iterations = 400``, ``lr = 3e-3``, ``optimizer = "adamw"`` and ``max_grad_norm = 10``
    by default. ``lr_schedule="cosine"`` decays to ``lr * lr_final_factor`` (0 by default)
    over ``iterations``.

    Attributes
    ----------
    loss_times : int or None
        Grid times the loss uses per iteration (``None``: all ``m``).
    always_last : int
        How many of them are always the last grid times (the rest are drawn at random
        without replacement), as in the paper (the end of the path matters most).
    updates_per_iteration : int
        Gradient steps per sampled batch, each on a fresh subset of loss times. The lean
        adjoint depends on the base model only, so the targets stay exact regression data
        for the sampled states (they are only slightly off-policy).
    minibatch_size : int or None
        Each gradient step uses this many random ``(k, i)`` pairs from the loss times of the
        iteration's pairs (``None``: all of them).
    hidden, layers, num_frequencies : int
        Width, depth and time features of the default residual
        :class:`~diffusiongym.policies.networks.TimeMLP`.
    residual : {"auto", "copy", "control", "plain"}
        Default fine-tuned model (see :func:`make_finetune_model`): the base model's own
        ``trainable_copy()`` (``"copy"``), a residual network that outputs the control
        (``"control"``), a plain residual (``"plain"``), or ``"copy"`` where the base has one
        and ``"control"`` otherwise (``"auto"``).
    time_weight : {"uniform", "clip", "inverse"}
        Per-time loss weight, see :func:`time_weights`.
    restarts : float
        Extra paths per iteration, as a fraction of ``batch_size``, restarted from mixup
        states late in the path (:mod:`~diffusiongym.trainers.adjoint_matching.restarts`).
        ``0``: off.
    restart_after : float
        Earliest restart time, in ``[0, 1)``.
    likelihood_ratio : float or None
        ``theta`` of the likelihood-ratio steps
        (:mod:`~diffusiongym.trainers.adjoint_matching.likelihood_ratio`): where the base
        drift stretches a random direction by more than ``1 + theta``, the propagated adjoint
        is replaced by the likelihood-ratio estimate of the same conditional mean. ``None``:
        the paper's lean adjoint.
    """

    iterations: int = 400
    lr: float = 3e-3
    optimizer: str = "adamw"
    max_grad_norm: float | None = 10.0
    loss_times: int | None = 20
    always_last: int = 5
    updates_per_iteration: int = 1
    minibatch_size: int | None = None
    hidden: int = 64
    layers: int = 2
    num_frequencies: int = 4
    residual: str = "auto"
    time_weight: str = "clip"
    restarts: float = 0.0
    restart_after: float = 0.5
    likelihood_ratio: float | None = None

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"residual": RESIDUALS, "time_weight": TIME_WEIGHTS}

    def validate(self) -> None:
        super().validate()
        for name in ("updates_per_iteration", "hidden", "layers", "num_frequencies"):
            check_positive_int(name, getattr(self, name))
        for name in ("loss_times", "minibatch_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.always_last < 0:
            raise ValueError(f"always_last: expected a non-negative integer, got {self.always_last!r}")
        if self.restarts < 0:
            raise ValueError(f"restarts: expected a non-negative fraction of batch_size, got {self.restarts!r}")
        if not 0.0 <= self.restart_after < 1.0:
            raise ValueError(f"restart_after: expected a time in [0, 1), got {self.restart_after!r}")
        if self.likelihood_ratio is not None and self.likelihood_ratio < 0:
            raise ValueError(
                f"likelihood_ratio: expected a non-negative expansion threshold or None, got {self.likelihood_ratio!r}"
            )


def multimodal_recipe(**overrides: object) -> AdjointMatchingConfig:
    """The settings measured on the Gaussian-mixture tasks (low-dimensional, multimodal bases).

    The base's trainable copy (``residual="copy"``), likelihood-ratio steps (``theta = 0.1``),
    4 x batch restarted paths from ``t >= 0.7``, batches of 1024 with 8 updates of 8192 pairs
    over all grid times, ``1 / sigma^2`` time weights, a cosine schedule and no clipping:
    GMM1D-v0 and GMM2D-v0 then pass a two-sample test against ``p*`` with their mode weights
    within 0.016 (``benchmarks/adjoint_matching_gmm.py``). ``overrides`` replace any field
    (e.g. ``iterations``, ``lr``, ``seed``).
    """
    options: dict[str, object] = dict(
        batch_size=1024,
        loss_times=None,
        minibatch_size=8192,
        updates_per_iteration=8,
        lr=3e-2,
        lr_schedule="cosine",
        max_grad_norm=None,
        time_weight="inverse",
        restarts=4.0,
        restart_after=0.7,
        residual="copy",
        likelihood_ratio=0.1,
    )
    options.update(overrides)
    return AdjointMatchingConfig(**options)  # type: ignore[arg-type]

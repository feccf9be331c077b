"""Factorised mixture probability path on token sequences ``x in {0..K-1}^D``.

``p_t(x_i | x0, x1) = kappa(t) delta(x1_i) + (1 - kappa(t)) delta(x0_i)`` independently per
coordinate, with a source ``x0`` that is either uniform on the ``K`` data tokens or an extra
*mask* token (index ``K``). States therefore take ``num_states = K`` (uniform) or ``K + 1``
(mask) values, while data and posteriors live on the ``K`` data tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusiongym.discrete.schedulers import KappaScheduler, make_kappa_scheduler
from diffusiongym.utils.validation import check_positive_int, unknown_name_error

__all__ = ["MixturePath", "SOURCES"]

SOURCES = ("uniform", "mask")


class MixturePath:
    """The mixture path ``x_t,i = x1_i`` w.p. ``kappa(t)``, else ``x0_i``.

    Parameters
    ----------
    vocab_size : int
        ``K``, the number of data tokens.
    length : int
        ``D``, the number of coordinates.
    source : {"uniform", "mask"}
        Source distribution of ``x0``; ``"mask"`` adds the token ``K``.
    scheduler : str, dict or KappaScheduler
        The ``kappa`` schedule (default ``kappa = t``).
    """

    def __init__(
        self,
        vocab_size: int,
        length: int,
        source: Literal["uniform", "mask"] = "mask",
        scheduler: str | dict | KappaScheduler = "linear",
    ):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.length = check_positive_int("length", length)
        if source not in SOURCES:
            raise unknown_name_error("source", source, SOURCES)
        self.source = source
        self.scheduler = make_kappa_scheduler(scheduler)

    @property
    def num_states(self) -> int:
        """``K + 1`` with a mask source, else ``K``."""
        return self.vocab_size + (1 if self.source == "mask" else 0)

    @property
    def mask_token(self) -> int | None:
        return self.vocab_size if self.source == "mask" else None

    def config(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "length": self.length,
            "source": self.source,
            "scheduler": self.scheduler.config(),
        }

    def source_log_probs(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """``log p0(s)`` over the ``num_states`` states, shape ``(num_states,)``."""
        if self.source == "mask":
            out = torch.full((self.num_states,), -torch.inf, dtype=dtype, device=device)
            out[-1] = 0.0
            return out
        return torch.full(
            (self.num_states,), -torch.log(torch.tensor(float(self.vocab_size))).item(), dtype=dtype, device=device
        )

    def sample_source(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``x0``, shape ``(n, D)``, dtype long."""
        if self.source == "mask":
            return torch.full((n, self.length), self.vocab_size, dtype=torch.long, device=device)
        return torch.randint(self.vocab_size, (n, self.length), generator=generator, device=device)

    def sample_xt(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_t ~ p_t(. | x0, x1)`` with a fresh ``x0``; ``x1`` (n, D) long, ``t`` (n,)."""
        if x1.ndim != 2 or x1.shape[1] != self.length:
            raise ValueError(f"x1: expected shape (n, {self.length}), got {tuple(x1.shape)}")
        x0 = self.sample_source(x1.shape[0], generator=generator, device=x1.device)
        keep = torch.rand(x1.shape, generator=generator, device=x1.device) < self.scheduler.kappa(
            t.to(torch.float32)
        ).reshape(-1, 1)
        return torch.where(keep, x1, x0)

    def likelihood(self, t: Tensor) -> Tensor:
        """``L[s, b] = p_t(x_t,i = s | x1_i = b)``, shape ``(*t.shape, num_states, K)``."""
        k = self.scheduler.kappa(t)[..., None, None]
        p0 = self.source_log_probs(dtype=t.dtype, device=t.device).exp()[:, None]
        eye = torch.eye(self.num_states, self.vocab_size, dtype=t.dtype, device=t.device)
        return k * eye + (1 - k) * p0

    def posterior_likelihood(self, t: Tensor) -> Tensor:
        """``L`` of :meth:`likelihood` up to a positive factor per row ``s`` (all that posteriors need),
        non-degenerate on all of [0, 1]: with the mask source it is ``delta_{sb}`` for tokens and 1 for
        the mask (the posterior does not depend on ``t``); shape ``(*t.shape, num_states, K)``."""
        if self.source == "mask":
            eye = torch.eye(self.num_states, self.vocab_size, dtype=t.dtype, device=t.device)
            eye[-1] = 1.0
            return eye.expand(*t.shape, *eye.shape)
        return self.likelihood(t)

    def __repr__(self) -> str:
        return f"MixturePath(vocab_size={self.vocab_size}, length={self.length}, source={self.source!r}, scheduler={self.scheduler!r})"

"""Posterior-logit models ``model(x, t) -> logits`` of ``p(x1_i | x_t)``.

Shapes: ``x`` (n, D) long in ``{0..num_states-1}``, ``t`` (n,) float in [0, 1], output logits
``(n, D, K)`` over the ``K`` data tokens. Every model carries its :class:`MixturePath`.

- :class:`ExactPosterior`: a distribution given as a full probability table on ``{0..K-1}^D``
  (small ``K^D``); the posterior is computed exactly by enumeration, no training.
- :class:`MLPPosterior`: a learned model (one-hot tokens + Fourier time features -> MLP).
- :class:`ResidualPosterior`: a trainable copy ``base + net`` with a zero-initialised ``net``,
  so that fine-tuning starts from the base model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusiongym.discrete.path import MixturePath
from diffusiongym.policies.networks import TimeMLP

__all__ = ["PosteriorModel", "ExactPosterior", "MLPPosterior", "ResidualPosterior", "check_tokens"]


def check_tokens(x: object, length: int, num_states: int, argument: str = "x") -> Tensor:
    """Check a token batch: a long tensor of shape ``(n, length)`` with values in ``[0, num_states)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor of tokens, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != length:
        raise ValueError(f"{argument}: expected shape (n, {length}), got {tuple(x.shape)}")
    if x.dtype != torch.long:
        raise ValueError(f"{argument}: expected dtype torch.int64, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_states):
        raise ValueError(
            f"{argument}: expected tokens in [0, {num_states}), got range [{int(x.min())}, {int(x.max())}]"
        )
    return x


class PosteriorModel(nn.Module):
    """Base class: subclasses implement ``logits(x, t, **cond) -> (n, D, K)``."""

    path: MixturePath

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.logits(x, t, **cond)

    def logits(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ExactPosterior(PosteriorModel):
    """Exact posterior of a tabulated distribution under the mixture path.

    ``p(x1 | x_t) ∝ p(x1) prod_i L_t(x_t,i | x1_i)`` with ``L_t(s | b) = kappa delta_{sb} + (1 - kappa) p0(s)``,
    enumerated over all ``K^D`` values of ``x1`` and marginalised per coordinate.

    Parameters
    ----------
    probs : Tensor, shape (K,) * D
        The data distribution (normalised here).
    path : MixturePath
    """

    def __init__(self, probs: Tensor, path: MixturePath):
        super().__init__()
        shape = (path.vocab_size,) * path.length
        if tuple(probs.shape) != shape:
            raise ValueError(f"probs: expected shape {shape}, got {tuple(probs.shape)}")
        if not bool((probs >= 0).all()) or not float(probs.sum()) > 0:
            raise ValueError("probs: expected non-negative entries with a positive sum")
        self.path = path
        self.register_buffer("log_probs", (probs / probs.sum()).double().log())

    def logits(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        # p(x1_i = b | x) ∝ L(x_i | b) * T_i[x_{-i}, b] with T_i = p contracted with L on every axis j != i;
        # tables depend on t only (not at all with the mask source), so the cost is O(D K^D S) per distinct t, independent of n.
        D, K, S = self.path.length, self.path.vocab_size, self.path.num_states
        probs = self.log_probs.exp()
        out = torch.empty(x.shape[0], D, K, dtype=torch.float64, device=x.device)
        # with the mask source the posterior does not depend on t: one group
        groups = [t[:1]] if self.path.source == "mask" else t.unique()
        for tv in groups:
            rows = (
                torch.arange(x.shape[0], device=x.device)
                if self.path.source == "mask"
                else (t == tv).nonzero().flatten()
            )
            xr = x[rows]
            L = self.path.posterior_likelihood(tv.double().reshape(()))  # (S, K)
            for i in range(D):
                table = probs
                for j in range(D):
                    if j != i:
                        table = torch.movedim(torch.tensordot(L, table, dims=([1], [j])), 0, j)
                table = torch.movedim(table, i, -1).reshape(-1, K)  # (S^(D-1), K)
                flat = torch.zeros(len(rows), dtype=torch.long, device=x.device)
                for j in range(D):
                    if j != i:
                        flat = flat * S + xr[:, j]
                out[rows, i] = (L[xr[:, i]] * table[flat]).clamp_min(1e-300).log()
        return out.float()


class MLPPosterior(PosteriorModel):
    """Learned posterior: ``MLP([one_hot(x), fourier(t)]) -> (n, D, K)`` logits.

    Parameters
    ----------
    path : MixturePath
    hidden, layers, num_frequencies : int
        Sizes of the :class:`~diffusiongym.policies.networks.TimeMLP`.
    """

    def __init__(self, path: MixturePath, hidden: int = 256, layers: int = 3, num_frequencies: int = 8):
        super().__init__()
        self.path = path
        D, S, K = path.length, path.num_states, path.vocab_size
        self.net = TimeMLP(D * S, D * K, hidden=hidden, layers=layers, num_frequencies=num_frequencies)
        self.config = {"path": path.config(), "hidden": hidden, "layers": layers, "num_frequencies": num_frequencies}

    def logits(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        h = F.one_hot(x, self.path.num_states).float().reshape(x.shape[0], -1)
        return self.net(h, t).reshape(x.shape[0], self.path.length, self.path.vocab_size)


class ResidualPosterior(PosteriorModel):
    """Trainable ``base(x, t) + net(x, t)`` logits; ``net`` zero-initialised, base frozen."""

    def __init__(self, base: PosteriorModel, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.path = base.path
        D, S, K = self.path.length, self.path.num_states, self.path.vocab_size
        self.net = TimeMLP(D * S, D * K, hidden=hidden, layers=layers, zero_init=True)

    def logits(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        h = F.one_hot(x, self.path.num_states).float().reshape(x.shape[0], -1)
        res = self.net(h, t).reshape(x.shape[0], self.path.length, self.path.vocab_size)
        return self.base(x, t, **cond) + res

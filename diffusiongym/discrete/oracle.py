"""Exact reward tilt of a tabulated discrete distribution under the mixture-path chain.

For ``lambda = reward_scale`` and ``f = exp(lambda r)``:

- target ``p*(x1) ∝ p(x1) f(x1)``; optimal objective ``log E_p[f]``; base objective ``lambda E_p[r]``;
- ``h(x, t) = E[f(X1) | X_t = x] = sum_x1 p(x1 | x_t) f(x1)`` and ``V = -log h``;
- optimal control (additive rate logits, see :mod:`diffusiongym.discrete.chain`):
  ``c*_i(b) = log h(x^{i <- b}, t) - log h(x, t)``.

Exactness. With the *mask* source each coordinate jumps once, straight to its ``x1_i``, so the law of
``X1`` given ``X_t`` is the path posterior and the formulas above are exact (and ``X0`` is deterministic).
With the *uniform* source a coordinate can jump several times, ``X1`` keeps some dependence on ``X0``, and
``h`` above is only the path-posterior approximation: ``log E_p[f]`` is then an upper bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.discrete.path import MixturePath

__all__ = ["DiscreteTiltOracle", "total_variation", "empirical_probs"]


def empirical_probs(x: Tensor, vocab_size: int) -> Tensor:
    """Histogram of token rows ``x`` (n, D) on ``{0..K-1}^D``, shape ``(K,) * D`` (float64)."""
    D = x.shape[1]
    flat = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(D):
        flat = flat * vocab_size + x[:, i]
    counts = torch.bincount(flat, minlength=vocab_size**D).double()
    return (counts / counts.sum()).reshape((vocab_size,) * D)


def total_variation(p: Tensor, q: Tensor) -> float:
    """``1/2 sum |p - q|`` of two probability tables of the same shape."""
    if p.shape != q.shape:
        raise ValueError(f"q: expected shape {tuple(p.shape)}, got {tuple(q.shape)}")
    return 0.5 * float((p.double() - q.double()).abs().sum())


def _contract(table: Tensor, L: Tensor) -> Tensor:
    """Apply ``L`` (S, K) along every axis of ``table`` (K,)*D -> (S,)*D."""
    out = table
    for i in range(table.ndim):
        out = torch.movedim(torch.tensordot(L, out, dims=([1], [i])), 0, i)
    return out


class DiscreteTiltOracle:
    """Exact optimum of ``max E[lambda r(X1)] - KL`` for a tabulated base (see module docstring).

    Parameters
    ----------
    probs : Tensor, (K,) * D
        Base distribution of ``x1``.
    reward_table : Tensor, (K,) * D
        ``r`` on every ``x1``.
    reward_scale : float
    path : MixturePath
    """

    def __init__(self, probs: Tensor, reward_table: Tensor, reward_scale: float, path: MixturePath):
        shape = (path.vocab_size,) * path.length
        for name, v in (("probs", probs), ("reward_table", reward_table)):
            if tuple(v.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(v.shape)}")
        self.path = path
        self.reward_scale = float(reward_scale)
        self.probs = (probs / probs.sum()).double()
        self.reward_table = reward_table.double()
        self.log_f = self.reward_scale * self.reward_table
        logw = self.probs.log() + self.log_f
        self.optimal_objective = float(torch.logsumexp(logw.flatten(), 0))
        self.target_probs = torch.exp(logw - self.optimal_objective)
        self.base_objective = float(self.reward_scale * (self.probs * self.reward_table).sum())
        self.target_reward = float((self.target_probs * self.reward_table).sum())
        self.base_reward = float((self.probs * self.reward_table).sum())

    def gap_closed(self, objective: float) -> float:
        """``(objective - base) / (optimal - base)``."""
        return (objective - self.base_objective) / (self.optimal_objective - self.base_objective)

    def log_h_table(self, t: float) -> Tensor:
        """``log h(x, t)`` for every state ``x``, shape ``(num_states,) * D`` (float64)."""
        L = self.path.posterior_likelihood(torch.tensor(float(t), dtype=torch.float64))
        shift = float(self.log_f.max())
        num = _contract(self.probs * torch.exp(self.log_f - shift), L)
        den = _contract(self.probs, L)
        return (num.clamp_min(1e-300).log() - den.clamp_min(1e-300).log()) + shift

    def _flat(self, x: Tensor) -> Tensor:
        S = self.path.num_states
        flat = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for i in range(x.shape[1]):
            flat = flat * S + x[:, i]
        return flat

    def value(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``V*(x, t) = -log h(x, t)``, shape ``(n,)``; ``x`` (n, D) long, ``t`` scalar or (n,)."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        out = torch.empty(x.shape[0], dtype=torch.float64)
        for tv in t.unique():
            rows = t == tv
            out[rows] = -self.log_h_table(float(tv)).flatten()[self._flat(x[rows].cpu())]
        return out.to(x.device)

    def control(self) -> Callable[..., Tensor]:
        """The optimal control ``c*(x, t) -> (n, D, K)`` (additive rate logits)."""
        S, K, D = self.path.num_states, self.path.vocab_size, self.path.length
        strides = torch.tensor([S ** (D - 1 - i) for i in range(D)], dtype=torch.long)

        def control(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
            xc = x.cpu()
            out = torch.empty(x.shape[0], D, K, dtype=torch.float64)
            for tv in t.cpu().unique():
                rows = (t.cpu() == tv).nonzero().flatten()
                table = self.log_h_table(float(tv)).flatten()
                flat = self._flat(xc[rows])  # (r,)
                nb = flat[:, None, None] + strides[None, :, None] * (
                    torch.arange(K)[None, None, :] - xc[rows][:, :, None]
                )
                out[rows] = table[nb] - table[flat][:, None, None]
            return out.to(device=x.device, dtype=torch.float32)

        return control

    def __repr__(self) -> str:
        return f"DiscreteTiltOracle(optimal_objective={self.optimal_objective:.4f}, base_objective={self.base_objective:.4f})"

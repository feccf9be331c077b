"""Offline transition data for Reversal Q-Learning, from Gymnasium Box envs or diffusion tasks.

- :class:`OfflineDataset`: transitions ``(s, a, r, s', done)``.
- :class:`OfflineTask`: the problem an offline dataset defines on its own (no environment,
  no reward function); what :class:`~diffusiongym.trainers.rql.RQL` trains on outside the
  diffusion gym.
- :func:`collect_dataset` / :func:`evaluate_policy`: roll a behaviour (or a flow policy) out
  in a Gymnasium env with Box spaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusiongym.trainers.checkpoint import tensor_digest
from diffusiongym.utils.validation import check_positive_int, check_tensor

__all__ = ["OfflineDataset", "OfflineTask", "collect_dataset", "evaluate_policy"]

FIELDS = ("states", "actions", "rewards", "next_states", "dones")


@dataclass
class OfflineDataset:
    """Offline transitions ``(s, a, r, s', done)`` (stored as float tensors).

    Attributes
    ----------
    states : Tensor, (N, ds)
        ``ds = 0`` for unconditional diffusion models.
    actions : Tensor, (N, da)
    rewards : Tensor, (N,)
    next_states : Tensor, (N, ds)
    dones : Tensor, (N,)
        1.0 where the episode terminated at ``s'`` (no bootstrap), else 0.0. Time-limit
        truncations are *not* terminations.
    """

    states: Tensor
    actions: Tensor
    rewards: Tensor
    next_states: Tensor
    dones: Tensor

    def __post_init__(self) -> None:
        n = self.actions.shape[0] if isinstance(self.actions, Tensor) else -1
        check_tensor("actions", self.actions, (-1, -1))
        if n == 0:
            raise ValueError("actions: expected at least one transition, got 0")
        check_tensor("states", self.states, (n, -1))
        check_tensor("next_states", self.next_states, tuple(self.states.shape))
        check_tensor("rewards", self.rewards, (n,))
        check_tensor("dones", self.dones, (n,))
        for name in FIELDS:
            value = getattr(self, name)
            setattr(self, name, value if value.is_floating_point() else value.float())

    def __len__(self) -> int:
        return self.actions.shape[0]

    @property
    def state_dim(self) -> int:
        return self.states.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OfflineDataset:
        """A copy on ``device`` in ``dtype`` (or this dataset when nothing changes)."""
        moved = {k: getattr(self, k).to(device=device, dtype=dtype) for k in FIELDS}
        if all(moved[k] is getattr(self, k) for k in FIELDS):
            return self
        return OfflineDataset(**moved)

    def batch(self, size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``size`` transitions drawn uniformly with replacement: keys ``idx``, ``s``, ``a``, ``r``, ``s2``, ``done``."""
        idx = torch.randint(len(self), (size,), generator=generator, device=self.actions.device)
        return {
            "idx": idx,
            "s": self.states[idx],
            "a": self.actions[idx],
            "r": self.rewards[idx],
            "s2": self.next_states[idx],
            "done": self.dones[idx],
        }

    def fingerprint(self) -> dict[str, Any]:
        """Size, dimensions and a SHA-256 of the contents (what a checkpoint must agree on)."""
        return {
            "size": len(self),
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "sha256": tensor_digest(*(getattr(self, name) for name in FIELDS))[:16],
        }


@dataclass
class OfflineTask:
    """An offline RL problem defined by its dataset alone (no environment, no reward function).

    What :class:`~diffusiongym.trainers.rql.RQL` builds for ``task=None``; the
    :class:`~diffusiongym.trainers.base.Trainer` machinery reads ``name``, ``reward``,
    ``reward_scale`` and ``steps`` from it. ``reward_scale`` is 1: scale the dataset's
    rewards instead.
    """

    dataset: OfflineDataset
    name: str = "offline"
    steps: int = 1
    reward: None = None
    reward_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, OfflineDataset):
            raise TypeError(f"dataset: expected an OfflineDataset, got {type(self.dataset).__name__}")
        check_positive_int("steps", self.steps)


def collect_dataset(
    env: Any, behaviour: Callable[[np.ndarray, np.random.Generator], np.ndarray], episodes: int, seed: int = 0
) -> OfflineDataset:
    """Roll out ``behaviour(obs, rng) -> action`` in a Gymnasium env with Box spaces.

    Actions are stored normalised to ``[-1, 1]`` (``a = (2 action - low - high) / (high - low)``);
    ``done`` marks terminations only (time-limit truncation bootstraps). Episode ``e`` is
    reset with seed ``seed * 100003 + e``; ``rng`` is ``numpy.random.default_rng(seed)``.
    """
    check_positive_int("episodes", episodes)
    low, high = env.action_space.low, env.action_space.high
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {k: [] for k in ("s", "a", "r", "s2", "d")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 100_003 + ep)
        done = False
        while not done:
            action = np.clip(np.asarray(behaviour(obs, rng), dtype=np.float32), low, high)
            nxt, r, term, trunc, _ = env.step(action)
            cols["s"].append(obs)
            cols["a"].append((2 * action - low - high) / (high - low))
            cols["r"].append(r)
            cols["s2"].append(nxt)
            cols["d"].append(float(term))
            obs, done = nxt, term or trunc
    t = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in cols.items()}
    return OfflineDataset(t["s"], t["a"], t["r"], t["s2"], t["d"])


def evaluate_policy(env: Any, policy: Any, episodes: int, seed: int = 0) -> list[float]:
    """Undiscounted returns of a :class:`~diffusiongym.trainers.flow_policy.FlowPolicy` in a Box env.

    Normalised actions are clipped to ``[-1, 1]`` and mapped to ``[low, high]``; episode ``e``
    is reset with seed ``10000 + 1000 seed + e``; the policy's noise comes from a generator
    seeded with ``seed``.
    """
    check_positive_int("episodes", episodes)
    low, high = env.action_space.low, env.action_space.high
    ref = policy.times
    gen = torch.Generator(device=ref.device).manual_seed(seed)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=10_000 + seed * 1000 + ep)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                s = torch.as_tensor(np.asarray(obs), dtype=ref.dtype, device=ref.device)[None]
                a = policy.sample(s, generator=gen)[0].clamp(-1, 1).cpu().numpy()
            obs, r, term, trunc, _ = env.step(low + (a + 1) * (high - low) / 2)
            total += float(r)
            done = term or trunc
        returns.append(total)
    return returns

"""Transitions and rollouts in Gymnasium envs with Box observations and actions.

Datasets are the package's :class:`~diffusiongym.trainers.offline_data.OfflineDataset`
(``collect_dataset`` rolls a numpy behaviour out; actions are stored normalised to ``[-1, 1]``).
Here:

- :func:`transitions`: a dataset from tensors ``(s, a, s')`` (offline data of any source);
- :func:`torch_behaviour`: a torch policy (normalised actions) with optional exploration noise
  as a ``collect_dataset`` behaviour;
- :func:`collect_transitions`: transitions of several behaviours, concatenated;
- :func:`rollouts`: episodes of a torch policy in lockstep over several env copies (one batched
  policy call per step), with rewards and discounted returns-to-go (Monte-Carlo ``Q``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusiongym.trainers.offline_data import FIELDS, OfflineDataset, collect_dataset
from diffusiongym.utils.validation import check_positive_int, check_real, check_tensor

__all__ = ["transitions", "torch_behaviour", "collect_transitions", "rollouts", "Rollouts", "to_env_action"]

Policy = Callable[[Tensor], Tensor]


def transitions(s: Tensor, a: Tensor, s2: Tensor, dones: Tensor | None = None) -> OfflineDataset:
    """A transitions dataset ``(s, a, s', done)`` with zero rewards (a successor measure needs none)."""
    n = check_tensor("s", s, (-1, -1)).shape[0]
    check_tensor("a", a, (n, -1))
    check_tensor("s2", s2, tuple(s.shape))
    dones = torch.zeros(n, dtype=s.dtype) if dones is None else check_tensor("dones", dones, (n,)).to(s.dtype)
    return OfflineDataset(s, a, torch.zeros(n, dtype=s.dtype), s2, dones)


def to_env_action(a: np.ndarray, space: Any) -> np.ndarray:
    """Normalised ``a`` in ``[-1, 1]`` (clipped) to the Box ``space``'s ``[low, high]``."""
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    return (space.low + (a + 1.0) * (space.high - space.low) / 2.0).astype(space.dtype)


def torch_behaviour(
    pi: Policy | None, action_dim: int, noise_std: float = 0.0, random_prob: float = 0.0
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A numpy behaviour ``(obs, rng) -> normalised action (action_dim,)`` from a torch policy.

    The action is ``pi(obs) + noise_std * N(0, 1)``, replaced with probability ``random_prob``
    (always when ``pi`` is ``None``) by a uniform draw in ``[-1, 1]``. For
    :func:`collect_transitions`, which maps it to the env's box.
    """
    action_dim = check_positive_int("action_dim", action_dim)
    noise_std, random_prob = check_real("noise_std", noise_std), check_real("random_prob", random_prob)

    def normalised(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if pi is None or (random_prob > 0 and rng.random() < random_prob):
            return rng.uniform(-1.0, 1.0, size=action_dim)
        with torch.no_grad():
            a = pi(torch.as_tensor(np.asarray(obs), dtype=torch.float32)[None])[0].numpy().astype(np.float64)
        return a + noise_std * rng.standard_normal(a.shape)

    return normalised


def collect_transitions(
    env: Any,
    behaviours: Sequence[Callable[[np.ndarray, np.random.Generator], np.ndarray]],
    episodes: int,
    seed: int = 0,
) -> OfflineDataset:
    """``episodes`` episodes of each normalised-action behaviour (see :func:`torch_behaviour`),
    concatenated; behaviour ``i`` uses seed ``seed + i``. Actions are stored normalised."""
    parts = []
    for i, behave in enumerate(behaviours):

        def in_env_units(obs: np.ndarray, rng: np.random.Generator, behave: Any = behave) -> np.ndarray:
            return to_env_action(behave(obs, rng), env.action_space)

        parts.append(collect_dataset(env, in_env_units, episodes, seed=seed + i))
    return OfflineDataset(*(torch.cat([getattr(p, k) for p in parts]) for k in FIELDS))


@dataclass
class Rollouts:
    """Episodes run in lockstep (all of length ``T`` unless an episode ended early: then ``alive`` is False after).

    Attributes
    ----------
    observations : Tensor, (E, T, ds)
        ``s_t`` (before the step).
    actions : Tensor, (E, T, da)
        Normalised actions taken.
    rewards : Tensor, (E, T)
        ``r_t`` (zero after the end).
    alive : Tensor, (E, T) bool
    returns_to_go : Tensor, (E, T)
        ``sum_{k >= 0} gamma^k r_{t+k}`` within the episode (float64).
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    alive: Tensor
    returns_to_go: Tensor

    @property
    def returns(self) -> Tensor:
        """Undiscounted episode returns ``(E,)``."""
        return self.rewards.sum(1)


def rollouts(
    make_env: Callable[[], Any],
    pi: Policy,
    episodes: int,
    *,
    gamma: float = 1.0,
    seed: int = 0,
    max_steps: int | None = None,
) -> Rollouts:
    """Run ``episodes`` episodes of ``pi`` (normalised actions, clipped to ``[-1, 1]``), one env
    copy each, in lockstep; episode ``e`` is reset with seed ``seed + e``. Ends at termination,
    truncation or ``max_steps``."""
    episodes = check_positive_int("episodes", episodes)
    envs = [make_env() for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + e)[0] for e, env in enumerate(envs)])
    alive = np.ones(episodes, dtype=bool)
    cols: dict[str, list[np.ndarray]] = {"o": [], "a": [], "r": [], "alive": []}
    step = 0
    while alive.any() and (max_steps is None or step < max_steps):
        with torch.no_grad():
            act = pi(torch.as_tensor(obs, dtype=torch.float32)).clamp(-1, 1).numpy()
        rew = np.zeros(episodes)
        nxt = obs.copy()
        was_alive = alive.copy()
        for e, env in enumerate(envs):
            if not alive[e]:
                continue
            o2, r, term, trunc, _ = env.step(to_env_action(act[e], env.action_space))
            nxt[e], rew[e] = o2, r
            alive[e] = not (term or trunc)
        cols["o"].append(obs)
        cols["a"].append(act)
        cols["r"].append(rew)
        cols["alive"].append(was_alive)
        obs, step = nxt, step + 1
    for env in envs:
        env.close()
    r = torch.as_tensor(np.stack(cols["r"], 1), dtype=torch.float64)
    rtg = torch.zeros_like(r)
    acc = torch.zeros(episodes, dtype=torch.float64)
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        rtg[:, t] = acc
    return Rollouts(
        observations=torch.as_tensor(np.stack(cols["o"], 1), dtype=torch.float32),
        actions=torch.as_tensor(np.stack(cols["a"], 1), dtype=torch.float32),
        rewards=r,
        alive=torch.as_tensor(np.stack(cols["alive"], 1)),
        returns_to_go=rtg,
    )

"""``python -m diffusiongym.demo``: the embedded defaults, sampled through the Gymnasium API.

1. ``diffusiongym/Digits-v0``: the shipped class-conditional digits model; prints the
   classifier reward statistics and how often the requested class is recognised.
2. ``diffusiongym/GMM2D-v0``: the exact 2-D mixture task; the base model (zero action) against
   the exact optimal control, with the oracle's optimal objective for reference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch

from diffusiongym.policies.agent import ControlAgent
from diffusiongym.utils.runtime import flush_denormals


def rollout(env: gym.vector.VectorEnv, policy: Callable[[Any], torch.Tensor], seed: int) -> tuple[torch.Tensor, dict]:
    """Run one batched episode of a vector env; returns (returns, final info)."""
    obs, _ = env.reset(seed=seed)
    total = torch.zeros(env.num_envs)
    terminated = torch.zeros(env.num_envs, dtype=torch.bool)
    while not terminated.all():
        obs, reward, terminated, _, info = env.step(policy(obs))
        total += reward
    return total, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with flush_denormals():
        _run(args.num_samples, args.seed)


def _run(n: int, seed: int) -> None:
    """Both demos with ``n`` (digits) and ``4 n`` (mixture) samples."""
    env = gym.make_vec("diffusiongym/Digits-v0", num_envs=n, vectorization_mode="vector_entry_point")
    zero = lambda obs: torch.zeros_like(obs["x"])  # noqa: E731 - the base model: no control
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    labels = obs["label"].clone()
    env.reset(seed=seed)
    returns, info = rollout(env, zero, seed)
    secs = time.perf_counter() - start
    reward = env.unwrapped.task.reward
    with torch.no_grad():
        recognised = reward.log_probs(info["final_x"]).argmax(1) == labels
    r = info["reward"][info["valid"]]
    print(f"Digits-v0: {n} samples, {env.unwrapped.sim.steps} steps, {secs:.1f}s")
    print(
        f"  reward (classifier log p(requested class)): mean={r.mean():.3f} min={r.min():.3f} max={r.max():.3f}  valid={int(info['valid'].sum())}/{n}"
    )
    print(f"  requested class recognised by the classifier: {recognised.float().mean():.1%}")

    env = gym.make_vec("diffusiongym/GMM2D-v0", num_envs=4 * n, vectorization_mode="vector_entry_point")
    oracle = env.unwrapped.oracle
    print(f"GMM2D-v0: {4 * n} samples, {env.unwrapped.sim.steps} steps, reward_scale={env.unwrapped.task.reward_scale}")
    for name, policy in (("base model", zero), ("optimal control u*", ControlAgent(oracle.control(), env))):
        returns, info = rollout(env, policy, seed)
        print(f"  {name:>18}: reward mean={info['reward'].mean():.3f}  return (objective) mean={returns.mean():.3f}")
    print(f"  exact: base objective={oracle.base_objective:.3f}  optimal objective={oracle.optimal_objective:.3f}")


if __name__ == "__main__":
    main()

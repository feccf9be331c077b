"""Overhead of the Gymnasium vector env over the engine's own sampling loop.

Same task (GMM2D-v0: exact 8-mode mixture, velocity, memoryless), same batch, 100 steps,
actions = the oracle-free zero control in both (the env still validates every action and
computes the KL reward). Prints env / engine time per batch size (target: < 1.10 at batch
>= 1024)::

    python benchmarks/gym_overhead.py [--batches 1 16 256 1024 4096 16384 65536]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import torch
from _timing import best_times

import diffusiongym as dg


def run_env(env, n: int, steps: int) -> None:
    env.reset(seed=0)
    action = torch.zeros(n, 2)
    for _ in range(steps):
        env.step(action)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 256, 1024, 4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"threads={torch.get_num_threads()} steps={args.steps} task=GMM2D-v0 (memoryless)")
    print(f"{'batch':>7} {'engine [s]':>11} {'env [s]':>9} {'ratio':>7} {'env steps/s':>12}")
    for n in args.batches:
        env = gym.make_vec(
            "diffusiongym/GMM2D-v0", num_envs=n, vectorization_mode="vector_entry_point", steps=args.steps
        )
        task = env.unwrapped.task
        zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - same per-step control work as the env
        t = best_times(
            {
                "engine": lambda task=task, n=n, zero=zero: dg.sample(
                    task.environment, n, steps=args.steps, control=zero, reward=task.reward, seed=0
                ),
                "env": lambda env=env, n=n: run_env(env, n, args.steps),
            },
            args.repeats if n < 65536 else 2,
        )
        print(
            f"{n:>7} {t['engine']:>11.4f} {t['env']:>9.4f} {t['env'] / t['engine']:>7.3f} {n * args.steps / t['env']:>12.0f}"
        )


if __name__ == "__main__":
    main()

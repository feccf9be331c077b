"""Offline Pendulum-v1: Reversal Q-Learning vs behaviour cloning of the same dataset.

    python benchmarks/rql_pendulum.py                 # full run: 5 seeds
    python benchmarks/rql_pendulum.py --seeds 0 --updates 2000 --episodes 30   # smaller

Dataset: a mediocre behaviour policy (:func:`noisy_energy_controller`: energy-shaping swing-up
plus a PD balancer, but half of its actions are uniformly random and the rest carry Gaussian
noise). Both agents use the same flow policy (``F`` Euler steps): behaviour cloning is conditional
flow matching on the dataset; RQL starts from that BC flow and trains with flow reversal, the
shared value ``V(s, x^f, f)`` and the stepwise pathwise loss + BC towards the initial flow's
reversal of the data. Prints one line per seed and the mean returns (undiscounted, 200 steps).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from diffusiongym.policies.rql import RQL, FlowPolicy, OfflineDataset, RQLConfig, collect_dataset, evaluate_policy, flow_matching_bc


def energy_controller(obs: np.ndarray) -> float:
    """Swing-up by energy shaping, PD balance near the top (Pendulum-v1 dynamics
    ``theta'' = 15 sin(theta) + 3 u``; energy ``E = theta'^2 / 2 + 15 cos(theta)``, upright ``E = 15``)."""
    cos, sin, dtheta = (float(v) for v in obs)
    theta = float(np.arctan2(sin, cos))
    if cos > 0.9:
        return float(np.clip(-(10.0 * theta + 2.0 * dtheta), -2.0, 2.0))
    energy = 0.5 * dtheta**2 + 15.0 * cos
    return float(np.clip(0.5 * dtheta * (15.0 - energy), -2.0, 2.0)) if abs(dtheta) > 1e-3 else 1.0


def noisy_energy_controller(random_prob: float = 0.5, noise_std: float = 0.5):
    """A mediocre behaviour policy ``(obs, rng) -> action (1,)``: random with ``random_prob``, else noisy."""

    def act(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < random_prob:
            return rng.uniform(-2.0, 2.0, size=1)
        return np.array([energy_controller(obs) + noise_std * rng.standard_normal()])

    return act


@dataclass
class PendulumConfig:
    episodes: int = 50  # dataset size: episodes x 200 transitions
    flow_steps: int = 5
    hidden: int = 128
    layers: int = 2
    bc_updates: int = 1500
    rql_updates: int = 5000
    reward_scale: float = 0.1  # rewards scaled for the Huber loss; returns reported unscaled
    eval_episodes: int = 10
    rql: RQLConfig | None = None


def default_rql_config(seed: int) -> RQLConfig:
    return RQLConfig(gamma=0.97, alpha=0.3, bc_reversal="initial", reversal_iters=1, batch_size=128, value_hidden=128, value_layers=2, policy_lr=3e-4, value_lr=1e-3, flow_samples=2, warmup_updates=500, tau=0.01, seed=seed)


def run_seed(seed: int, cfg: PendulumConfig) -> dict[str, float]:
    """Dataset, BC and RQL for one seed; returns the mean returns and the dataset's."""
    torch.manual_seed(seed)
    env = gym.make("Pendulum-v1")
    data = collect_dataset(env, noisy_energy_controller(), cfg.episodes, seed=seed)
    behaviour_return = float(data.rewards.sum()) / cfg.episodes
    data = OfflineDataset(data.states, data.actions, cfg.reward_scale * data.rewards, data.next_states, data.dones)
    policy = FlowPolicy(1, 3, cfg.flow_steps, hidden=cfg.hidden, layers=cfg.layers)
    flow_matching_bc(policy, data, cfg.bc_updates, lr=1e-3, seed=seed)
    bc_policy = copy.deepcopy(policy)
    agent = RQL(policy, cfg.rql or default_rql_config(seed))
    agent.train(data, cfg.rql_updates)
    return {
        "behaviour": behaviour_return,
        "bc": float(np.mean(evaluate_policy(env, bc_policy, cfg.eval_episodes, seed=seed))),
        "rql": float(np.mean(evaluate_policy(env, agent.policy, cfg.eval_episodes, seed=seed))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--updates", type=int, default=PendulumConfig.rql_updates)
    parser.add_argument("--episodes", type=int, default=PendulumConfig.episodes)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = PendulumConfig(episodes=args.episodes, rql_updates=args.updates)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        res = run_seed(seed, cfg)
        rows.append(res)
        print(f"seed={seed} behaviour={res['behaviour']:.1f} bc={res['bc']:.1f} rql={res['rql']:.1f} seconds={time.perf_counter() - start:.1f}", flush=True)
    for key in ("behaviour", "bc", "rql"):
        vals = np.array([r[key] for r in rows])
        print(f"mean {key}={vals.mean():.1f} +- {vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0:.1f} (s.e.)")
    wins = sum(r["rql"] > r["bc"] for r in rows)
    print(f"rql beats bc on {wins}/{len(rows)} seeds")


if __name__ == "__main__":
    main()

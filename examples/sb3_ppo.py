"""Stable-Baselines3 PPO fine-tunes the GMM1D-v0 base model (KL-regularised reward adaptation).

    python examples/sb3_ppo.py           # 200k env steps, several CPU-minutes
    python examples/sb3_ppo.py --quick   # a smoke run (a few seconds)

The env's return is the KL-regularised objective ``lambda r(x1) - KL``: each step pays
``-1/2 |u|^2 h`` for the control ``u = action_scale * a`` and the last step adds ``lambda r(x1)``.
PPO learns a Gaussian policy over ``a`` given the observation ``{"x", "t"}``. Its exploration noise is
a control too, so the policy starts with a small standard deviation (``log_std_init``), and the
trained policy is evaluated deterministically (its mean action) on 4096 episodes of the torch vector
env, against the zero control (the base model) and the exact optimum from the task's oracle.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import diffusiongym as dg

ENV_ID = "diffusiongym/GMM1D-v0"
STEPS = 20  # denoising steps per episode: the env's grid (the task's default is 100)


def mean_return(act, num_envs: int = 4096, seed: int = 1) -> float:
    """Mean episode return of ``act(obs) -> actions`` on ``num_envs`` lockstep episodes (numpy boundary)."""
    envs = dg.NumpyVectorEnv(
        gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", steps=STEPS)
    )
    obs, _ = envs.reset(seed=seed)
    total = np.zeros(num_envs)
    for _ in range(STEPS):  # every episode ends at t = 1, all together
        obs, reward, terminated, _, _ = envs.step(act(obs))
        total += reward
    assert terminated.all()
    envs.close()
    return float(total.mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 PPO rollouts, 256 evaluation episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    timesteps = 2 * 8 * 4 * STEPS if args.quick else 200_000
    num_eval = 256 if args.quick else 4096

    # SB3's own vector env of single Gymnasium envs; the Dict observation needs MultiInputPolicy
    envs = make_vec_env(ENV_ID, n_envs=8, seed=args.seed, env_kwargs={"steps": STEPS})
    model = PPO(
        "MultiInputPolicy",
        envs,
        n_steps=4 * STEPS,  # 4 whole episodes per env and rollout
        batch_size=320,
        gamma=1.0,  # the return is the objective: no discounting
        learning_rate=3e-4,
        seed=args.seed,
        device="cpu",
        policy_kwargs={"net_arch": [64, 64], "log_std_init": -2.0},
    )
    model.learn(timesteps)

    oracle = gym.make(ENV_ID).unwrapped.task.oracle
    base = mean_return(lambda obs: np.zeros((len(obs["x"]), 1), np.float32), num_eval)
    ppo = mean_return(lambda obs: model.predict(obs, deterministic=True)[0], num_eval)
    optimum = oracle.optimal_objective
    result = {"objective": ppo, "base": base, "optimum": optimum, "gap_closed": (ppo - base) / (optimum - base)}
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

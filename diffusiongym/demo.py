"""``python -m diffusiongym.demo``: sample the embedded default task and print reward statistics."""

from __future__ import annotations

import argparse
import time

import torch

import diffusiongym as dg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mixture = dg.gmm_preset("2d")
    reward = dg.QuadraticReward(center=mixture.means[-1], precision=4.0)
    reward_scale = 2.0
    env = dg.VelocityEnvironment(dg.GaussianMixtureModel(mixture, "linear", "velocity"), scheduler="linear", noise="memoryless")
    oracle = dg.TiltOracle(mixture, reward, reward_scale, scheduler="linear")

    start = time.perf_counter()
    base = dg.sample(env, args.num_samples, steps=args.steps, reward=reward, reward_scale=reward_scale, seed=args.seed)
    base_s = time.perf_counter() - start
    start = time.perf_counter()
    opt = dg.sample(env, args.num_samples, steps=args.steps, reward=reward, reward_scale=reward_scale, seed=args.seed, control=oracle.control())
    opt_s = time.perf_counter() - start

    print(f"task: 2-D Gaussian mixture (8 modes), quadratic reward on the low-weight mode, reward_scale={reward_scale}")
    print(f"samples={args.num_samples} steps={args.steps} noise=memoryless")
    for name, traj, secs in (("base model", base, base_s), ("oracle control u*", opt, opt_s)):
        r = traj.reward[traj.valid]
        print(
            f"{name:>18}: reward mean={r.mean():.4f} std={r.std():.4f} min={r.min():.4f} max={r.max():.4f} "
            f"KL={traj.kl.mean():.4f} objective={traj.objective.mean():.4f} valid={int(traj.valid.sum())}/{len(traj.valid)} "
            f"({secs:.2f}s)"
        )
    print(f"exact: base objective={oracle.base_objective:.4f} optimal objective={oracle.optimal_objective:.4f}")
    exact = oracle.target.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"energy distance(oracle-controlled x1, exact p*) = {dg.energy_distance(opt.x1, exact):.5f}")


if __name__ == "__main__":
    main()

"""Reversal Q-Learning rows: offline, from a base-model dataset (probability-flow ODE samples).

The policy is a deterministic flow (F Euler steps of ``base velocity + residual``), so the
path-space KL of the SDE engine does not exist. Reported ``kl`` is ``KL(q || p_base)`` of the
terminal laws: ``log q`` exactly through the Euler map's change of variables, ``log p_base``
the exact mixture density. This is the KL in ``max_q E_q[lambda r] - KL(q || p_base) =
log E_base[exp(lambda r)]`` (the oracle's optimal objective), so ``gap_closed`` is comparable
with the SDE methods' (whose path KL upper-bounds this terminal KL). It includes the small
Euler discretisation KL of the initial flow (about 0.09 nats for F = 10 on GMM2D).

Run directly for the alpha sweep on GMM2D-v0 (reward, KL, gap closed, mean base log-density
of the samples)::

    python benchmarks/adaptation_methods/rql.py --alphas 0.003 0.01 0.03 0.1 0.3 --updates 800
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptation import Result  # noqa: E402

from diffusiongym.trainers.rql import RQL, RQLConfig, diffusion_dataset, diffusion_policy, flow_kl_to_density  # noqa: E402
from diffusiongym.tasks import make_task  # noqa: E402

TASKS = ["GMM1D-v0", "GMM2D-v0"]
# BC weight per task (normalised Q). GMM1D sweep (same budget): alpha 0.03 runs away (KL 1e7),
# 0.1 gap 0.20 (KL 0.23), 0.3 gap 0.10.
ALPHA = {"GMM1D-v0": 0.1, "GMM2D-v0": 0.03}


def config(seed: int, alpha: float = 0.03) -> RQLConfig:
    """The benchmark's RQL settings: BC towards the frozen base flow's reversal of the data, Q
    normalised for the actor, 200 value-only warm-up updates.

    GMM2D sweep, one seed (800 updates, 4096 samples, policy lr 1e-3), normalize_q: alpha 0.003
    diverges, 0.01 gap 0.52 (KL 3.7), 0.03 gap 0.57 (KL 1.0), 0.1 gap 0.26, 0.3 gap 0.13:
    monotone in alpha. Without normalisation (warm-up 100): 0.03 diverges, 0.1 gap 0.68 (KL 1.4),
    0.3 gap -0.37 (KL 4.1, log-density -6.0), 1 gap 0.23: not monotone, so normalised it is."""
    return RQLConfig(alpha=alpha, bc_reversal="initial", reversal_iters=1, gamma=1.0, normalize_q=True, batch_size=128, value_hidden=128, value_layers=2, policy_lr=1e-3, value_lr=1e-3, flow_samples=2, warmup_updates=200, seed=seed)


def train_and_measure(task_id: str, cfg: RQLConfig, dataset_size: int, updates: int, eval_size: int, seed: int) -> tuple[Result, float]:
    """Train RQL on a base-model dataset; returns the :class:`Result` and the samples' mean base log-density."""
    task = make_task(task_id)
    data = diffusion_dataset(task, dataset_size, seed=seed + 1)
    policy = diffusion_policy(task, flow_steps=10, hidden=64, layers=2)
    RQL(policy, cfg).train(data, updates)
    kl, x = flow_kl_to_density(policy, task.mixture.log_prob, n=eval_size, seed=seed + 2)
    reward = float(task.reward(x.float())[0].mean())
    objective = task.reward_scale * reward - kl
    log_density = float(task.mixture.log_prob(x.double()).mean())
    return Result(objective, kl, reward, task.oracle.base_objective, task.oracle.optimal_objective), log_density


def run(task_id: str, quick: bool, seed: int) -> Result:
    return train_and_measure(task_id, config(seed, ALPHA.get(task_id, 0.1)), 4096 if quick else 16384, 800 if quick else 4000, 4096 if quick else 16384, seed)[0]


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description="RQL alpha sweep on a GMM task")
    parser.add_argument("--task", default="GMM2D-v0")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--updates", type=int, default=800)
    parser.add_argument("--bc-reversal", default="initial", choices=["initial", "current"])
    parser.add_argument("--no-normalize-q", dest="normalize_q", action="store_false")
    parser.add_argument("--policy-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = make_task(args.task)
    data = diffusion_dataset(task, 4096, seed=args.seed + 1)
    print(f"{args.task} base: reward={float(data.rewards.mean()) / task.reward_scale:.3f} log_density={float(task.mixture.log_prob(data.actions.double()).mean()):.3f} "
          f"objective={task.oracle.base_objective:.3f} optimal={task.oracle.optimal_objective:.3f}", flush=True)
    for alpha in args.alphas:
        start = time.perf_counter()
        cfg = replace(config(args.seed, alpha), bc_reversal=args.bc_reversal, normalize_q=args.normalize_q, policy_lr=args.policy_lr, warmup_updates=args.warmup)
        try:
            res, logp = train_and_measure(args.task, cfg, 4096, args.updates, 4096, args.seed)
        except FloatingPointError as err:
            print(f"alpha={alpha:g} bc_reversal={args.bc_reversal} normalize_q={args.normalize_q} diverged: {err}", flush=True)
            continue
        print(f"alpha={alpha:g} bc_reversal={args.bc_reversal} normalize_q={args.normalize_q} reward={res.reward:.3f} kl={res.kl:.3f} "
              f"gap_closed={res.gap_closed:.3f} log_density={logp:.3f} seconds={time.perf_counter() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()

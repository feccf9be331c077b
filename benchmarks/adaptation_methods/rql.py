"""Reversal Q-Learning rows: offline, from a base-model dataset (probability-flow ODE samples).

The policy is a deterministic flow (F = 10 Euler steps of ``base velocity + residual``), so the
path-space KL of the SDE engine does not exist. ``RQL.evaluate`` reports ``kl = KL(q || p_base)``
of the terminal laws: ``log q`` exactly through the Euler map's change of variables, ``log p_base``
the exact mixture density. This is the KL in ``max_q E_q[lambda r] - KL(q || p_base) =
log E_base[exp(lambda r)]`` (the oracle's optimal objective), so ``gap_closed`` is comparable
with the SDE methods' (whose path KL upper-bounds this terminal KL). It includes the small
Euler discretisation KL of the initial flow (about 0.09 nats for F = 10 on GMM2D).

Run directly for the alpha sweep (reward, KL, gap closed, mean base log-density of the samples)::

    python benchmarks/adaptation_methods/rql.py --task GMM2D-v0 --alphas 0.01 0.03 0.1 0.3 --iterations 800
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from diffusiongym.tasks import make_task
from diffusiongym.trainers.rql import RQL, RQLConfig
from diffusiongym.trainers.rql_config import diffusion_recipe

TASKS = ["GMM1D-v0", "GMM2D-v0"]
FLOW_STEPS = 10
# BC weight per task (normalised Q), quick budget, seed 0 unless said:
# GMM1D alpha 0.05 gap 0.28 (seeds 1, 2: 0.25, 0.15), 0.07 0.18, 0.1 0.18 (seeds 1, 2: 0.19, 0.16),
# 0.15 0.17, 0.2 0.14 (the previous implementation: 0.03 ran away, KL 1e7).
# GMM2D, mean (min-max) of the gap over 10 evaluation seeds of 4096 samples, training seeds 0 / 1: alpha 0.03
# -0.21 (-2.09-0.37: a few samples far from the base's modes make the exact terminal KL heavy-tailed), 0.05
# 0.347 (0.33-0.37) / 0.332 (0.31-0.36), 0.1 0.248 / 0.248, 0.2 0.153 / 0.156. The previous implementation's
# policy (alpha 0.03) scored 0.140 (-0.15-0.21) on the same 10 seeds; GMM1D 0.201 then, 0.257 now.
ALPHA = {"GMM1D-v0": 0.05, "GMM2D-v0": 0.05}


def config(seed: int, alpha: float = 0.03, quick: bool = True) -> RQLConfig:
    """The benchmark's RQL settings: BC towards the frozen base flow's reversal of the data, Q
    normalised for the actor, 200 value-only warm-up iterations; the data are 100-step ODE
    samples of the base (4096 quick, 16384 full)."""
    return diffusion_recipe(
        alpha=alpha,
        value_warmup=200,
        iterations=800 if quick else 4000,
        dataset_size=4096 if quick else 16384,
        seed=seed,
    )


def make(task_id: str, quick: bool, seed: int, cfg: RQLConfig | None = None) -> RQL:
    cfg = config(seed, ALPHA.get(task_id, 0.1), quick) if cfg is None else cfg
    return RQL(make_task(task_id), config=cfg, steps=FLOW_STEPS)


def train_and_measure(task_id: str, cfg: RQLConfig, eval_size: int, seed: int) -> tuple[dict[str, float], float]:
    """Train RQL; returns its evaluation and the mean base log-density of the evaluated draws."""
    trainer = make(task_id, True, seed, cfg)
    trainer.train(progress=False)
    metrics = trainer.evaluate(eval_size, seed=seed + 2)
    x = trainer.sample(eval_size, seed=seed + 2).x1
    log_density = float(trainer.task.environment.model.mixture.log_prob(x.double()).mean())
    return metrics, log_density


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="RQL alpha sweep on a GMM task")
    parser.add_argument("--task", default="GMM2D-v0")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--bc-reversal", default="initial", choices=["initial", "current"])
    parser.add_argument("--no-normalize-q", dest="normalize_q", action="store_false")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = make_task(args.task)
    print(
        f"{args.task} base objective={task.oracle.base_objective:.3f} optimal={task.oracle.optimal_objective:.3f}",
        flush=True,
    )
    for alpha in args.alphas:
        start = time.perf_counter()
        cfg = replace(
            config(args.seed, alpha),
            bc_reversal=args.bc_reversal,
            normalize_q=args.normalize_q,
            lr=args.lr,
            value_warmup=args.warmup,
            iterations=args.iterations,
        )
        try:
            res, logp = train_and_measure(args.task, cfg, 4096, args.seed)
        except FloatingPointError as err:
            print(f"alpha={alpha:g} diverged: {err}", flush=True)
            continue
        print(
            f"alpha={alpha:g} bc_reversal={args.bc_reversal} normalize_q={args.normalize_q} reward={res['reward']:.3f} kl={res['kl']:.3f} "
            f"gap_closed={res['gap_closed']:.3f} log_density={logp:.3f} seconds={time.perf_counter() - start:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

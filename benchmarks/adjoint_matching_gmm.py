"""Adjoint Matching on the Gaussian-mixture tasks: full figures, against the exact oracle.

    python benchmarks/adjoint_matching_gmm.py --quick --seeds 0 1 2     # the --quick rows' budget
    python benchmarks/adjoint_matching_gmm.py --tasks GMM1D-v0 --seeds 0 1 2 3 4
    python benchmarks/adjoint_matching_gmm.py --tasks GMM1D-v0 --plain   # the paper's estimator

Trains with the settings of ``benchmarks/adaptation_methods/adjoint_matching.py`` (the
trainable mixture copy, lean adjoint with likelihood-ratio steps, restarts; ``--plain``:
the Monte-Carlo lean adjoint alone) and prints per task and seed:

- gap closed, KL and mean reward on fresh samples on the task's 100-step grid, and the
  same for the exact ``u*`` on that grid (the ceiling set by Euler's bias);
- a two-sample test of ``x1`` against exact draws of the tilted ``p*``: energy distance at
  ``n = 2048`` against 1.5 x the largest of 10 exact-vs-exact distances (the test used for
  Value Matching in ``benchmarks/value_matching.py``);
- the learnt mixture weights next to ``p*``'s (the copy's parameters have exact targets).
"""

from __future__ import annotations

import argparse
import time

import torch

import diffusiongym as dg
from diffusiongym.tasks import make_task
from adaptation_methods.adjoint_matching import GMM_TASKS, make

N_EVAL = 16384
N_TEST = 2048


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the --quick budget of benchmarks/adaptation.py")
    parser.add_argument("--tasks", nargs="*", default=GMM_TASKS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument(
        "--plain", action="store_true", help="no likelihood-ratio steps (the paper's Monte-Carlo lean adjoint)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for task_id in args.tasks:
        for seed in args.seeds:
            start = time.perf_counter()
            trainer = make(task_id, args.quick, seed, **({"likelihood_ratio": None} if args.plain else {}))
            trainer.train(progress=False)
            task = make_task(task_id)  # the task's own 100-step grid (training used a coarser one)
            secs = time.perf_counter() - start
            common = dict(
                steps=task.steps,
                t_start=task.t_start,
                reward=task.reward,
                reward_scale=task.reward_scale,
                seed=seed + 10_000,
            )
            traj = dg.sample(task.environment, N_EVAL, control=trainer.policy, **common)
            opt = dg.sample(task.environment, N_EVAL, control=task.oracle.control(), **common)
            obj, obj_opt = float(traj.objective.mean()), float(opt.objective.mean())
            se = float(traj.objective.std()) / N_EVAL**0.5
            target = task.oracle.target.sample(
                N_TEST, generator=torch.Generator().manual_seed(seed + 77), dtype=torch.float32
            )
            thr = dg.null_energy_threshold(task.oracle.target, N_TEST, seed=1000)
            ed, ed_opt = dg.energy_distance(traj.x1[:N_TEST], target), dg.energy_distance(opt.x1[:N_TEST], target)
            weights = trainer.model.mixture().weights
            print(f"{task_id} seed {seed}: {trainer.iteration} iterations in {secs:.0f} s")
            print(
                f"  gap_closed {task.oracle.gap_closed(obj):.4f} (objective {obj:.4f} +- {se:.4f})  kl {float(traj.kl.mean()):.4f}  reward {float(traj.reward.mean()):.4f}"
            )
            print(f"  u* on this grid: gap_closed {task.oracle.gap_closed(obj_opt):.4f}  kl {float(opt.kl.mean()):.4f}")
            print(
                f"  energy distance to p* (n={N_TEST}): learnt {ed:.5f}  u* {ed_opt:.5f}  threshold {thr:.5f}  pass={ed < thr}"
            )
            print(f"  weights learnt {[round(w, 4) for w in weights.tolist()]}")
            print(f"  weights p*     {[round(w, 4) for w in task.oracle.target.weights.tolist()]}", flush=True)


if __name__ == "__main__":
    main()

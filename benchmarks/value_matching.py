"""Value Matching on the GMM tasks, judged against the exact optimum (full figures).

    python benchmarks/value_matching.py                 # full budgets, both tasks
    python benchmarks/value_matching.py --quick --tasks GMM1D-v0 --plot out/

For each task: trains with the recipe of ``benchmarks/adaptation_methods/value_matching.py``,
then on fresh samples prints

- the objective ``E[lambda r(x1)] - KL`` (KL from the running cost), its gap closed between
  the base model and the exact optimum, and the same numbers for the exact optimal control
  ``u*`` on the same grid (its shortfall is the Euler error of the grid, not of the method);
- the energy distance of ``x1`` to exact draws of the tilted ``p*``, against the threshold
  ``1.5 x`` the largest of 10 exact-vs-exact draws of the same size (the core tests' test);
- the learned ``V`` against ``V*``: mean squared error at several ``t`` on the learned
  policy's own states, next to the variance of ``V*`` there (the scale of "knowing nothing").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adaptation_methods.value_matching import GMM_TASKS, make

import diffusiongym as dg

N_EVAL = 4096


def value_mse(trainer, task, traj, ks) -> list[tuple[float, float, float]]:
    """``(t_k, mean (V - V*)^2, Var V*)`` on the stored states at grid indices ``ks``."""
    rows = []
    with torch.no_grad():
        for k in ks:
            t = float(traj.times[k])
            x = traj.states[k]
            v = trainer.policy.value(x, torch.full((x.shape[0],), t)).double()
            v_star = task.oracle.value(x.double(), t)
            rows.append((t, float(((v - v_star) ** 2).mean()), float(v_star.var())))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", nargs="*", default=GMM_TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="folder for training-curve and V-vs-V* figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for task_id in args.tasks:
        start = time.perf_counter()
        trainer = make(task_id, args.quick, args.seed)
        trainer.train(progress=False)
        task = trainer.task
        secs = time.perf_counter() - start
        common = dict(
            steps=task.steps,
            t_start=task.t_start,
            reward=task.reward,
            reward_scale=task.reward_scale,
            seed=args.seed + 10_000,
        )
        traj = dg.sample(task.environment, N_EVAL, control=trainer.policy, store="states", **common)
        opt = dg.sample(task.environment, N_EVAL, control=task.oracle.control(), **common)
        obj, obj_opt = float(traj.objective.mean()), float(opt.objective.mean())
        se = float(traj.objective.std()) / N_EVAL**0.5
        print(f"{task_id}: trained {trainer.iteration} iterations in {secs:.1f} s")
        print(
            f"  objective {obj:.4f} +- {se:.4f}  gap_closed {task.oracle.gap_closed(obj):.4f}  kl {float(traj.kl.mean()):.4f}  reward {float(traj.reward.mean()):.4f}"
        )
        print(
            f"  u* on the same grid: objective {obj_opt:.4f}  gap_closed {task.oracle.gap_closed(obj_opt):.4f}  kl {float(opt.kl.mean()):.4f}  reward {float(opt.reward.mean()):.4f}"
        )
        print(f"  exact: optimal {task.oracle.optimal_objective:.4f}  base {task.oracle.base_objective:.4f}")
        n = 2048
        target = task.oracle.target.sample(
            n, generator=torch.Generator().manual_seed(args.seed + 77), dtype=torch.float32
        )
        thr = dg.null_energy_threshold(task.oracle.target, n)
        ed, ed_opt = dg.energy_distance(traj.x1[:n], target), dg.energy_distance(opt.x1[:n], target)
        base = task.mixture.sample(n, generator=torch.Generator().manual_seed(args.seed + 78), dtype=torch.float32)
        print(
            f"  energy distance to p* (n={n}): learned {ed:.5f}  u* {ed_opt:.5f}  base {dg.energy_distance(base, target):.5f}  threshold {thr:.5f}  pass={ed < thr}"
        )
        ks = [0, 10, 25, 50, 75, 90, 99, task.steps]
        rows = value_mse(trainer, task, traj, ks)
        print("  V vs V*: " + "  ".join(f"t={t:.3f}: mse {m:.4f} (var V* {v:.3f})" for t, m, v in rows))
        all_rows = value_mse(trainer, task, traj, range(task.steps + 1))
        print(f"  V vs V* mse averaged over the grid: {sum(r[1] for r in all_rows) / len(all_rows):.4f}")
        if args.plot is not None:
            _plot(args.plot, task_id, trainer.history, all_rows, task)


def _plot(folder: Path, task_id: str, history, rows, task) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(history["objective"], label="learned")
    axes[0].axhline(task.oracle.optimal_objective, color="k", ls="--", label="optimal")
    axes[0].axhline(task.oracle.base_objective, color="gray", ls=":", label="base")
    axes[0].set(xlabel="iteration", ylabel="objective", title=task_id)
    axes[0].legend()
    axes[1].plot(history["kl"], label="KL")
    axes[1].plot(history["reward"], label="mean r(x1)")
    axes[1].set(xlabel="iteration")
    axes[1].legend()
    t = [r[0] for r in rows]
    axes[2].semilogy(t, [r[1] for r in rows], label="mse(V, V*)")
    axes[2].semilogy(t, [r[2] for r in rows], label="var V*")
    axes[2].set(xlabel="t")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(folder / f"value_matching_{task_id}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

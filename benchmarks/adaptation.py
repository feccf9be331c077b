"""One table for every adaptation method in the package, judged against the exact oracle.

    python benchmarks/adaptation.py --quick            # all methods, a few CPU minutes
    python benchmarks/adaptation.py --methods value_matching --tasks GMM1D-v0

Prints one line per method and task::

    METHOD TASK gap_closed=<fraction> kl=<nats> reward=<mean terminal reward> seconds=<wall>

Every method runs through the same adapter, the Trainer contract: its module in
``benchmarks/adaptation_methods/<name>.py`` defines ``TASKS`` (the task ids it runs on) and
``make(task_id, quick, seed) -> Trainer`` (its settings, with the measurements behind them);
this script trains it (``train(progress=False)``) and reports ``trainer.evaluate`` on fresh
samples (4096 quick, 16384 full; seed ``seed + 10_000``), on the task's grid or, where the module
sets ``EVAL_STEPS`` (a method trained on a coarser grid), on that many steps. The ``oracle``
row samples the exact optimal control ``u*`` (gap ~1 up to the Euler error).
"""

from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import time
from types import ModuleType


import adaptation_methods
from diffusiongym.sampling import sample
from diffusiongym.tasks import make_task
from diffusiongym.trainers.base import Trainer, trajectory_metrics
from diffusiongym.utils.runtime import flush_denormals

EVAL_SEED_OFFSET = 10_000
ORACLE_TASKS = ["GMM1D-v0", "GMM2D-v0"]


def discover() -> dict[str, ModuleType]:
    """The method modules of ``benchmarks/adaptation_methods`` by name."""
    return {
        info.name: importlib.import_module(f"adaptation_methods.{info.name}")
        for info in pkgutil.iter_modules(adaptation_methods.__path__)
        if not info.name.startswith("_")
    }


def train(module: ModuleType, task_id: str, quick: bool, seed: int) -> Trainer:
    """The method's trainer for ``task_id``, trained with its budget."""
    trainer = module.make(task_id, quick, seed)
    trainer.train(progress=False)
    return trainer


def evaluate(module: ModuleType, trainer: Trainer, quick: bool, seed: int) -> dict[str, float]:
    """``trainer.evaluate`` on fresh samples; on a grid of ``module.EVAL_STEPS`` steps where the
    method trains on a grid other than the task's own."""
    steps = getattr(module, "EVAL_STEPS", None)
    kwargs = {} if steps is None else {"steps": steps}
    return trainer.evaluate(4096 if quick else 16384, seed=seed + EVAL_SEED_OFFSET, **kwargs)


def oracle_row(task_id: str, quick: bool, seed: int) -> dict[str, float]:
    """The exact optimal control ``u*`` on the task's grid."""
    task = make_task(task_id)
    traj = sample(
        task.environment,
        4096 if quick else 16384,
        steps=task.steps,
        t_start=task.t_start,
        control=task.oracle.control(),
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=seed + EVAL_SEED_OFFSET,
    )
    return trajectory_metrics(traj, task)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets (a few CPU minutes in all)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = discover()
    known = sorted([*methods, "oracle"])
    for name in args.methods or known:
        if name not in known:
            raise SystemExit(f"--methods: unknown method {name!r}; expected one of {known}")
        for task_id in ORACLE_TASKS if name == "oracle" else methods[name].TASKS:
            if args.tasks and task_id not in args.tasks:
                continue
            start = time.perf_counter()
            with flush_denormals():
                if name == "oracle":
                    res = oracle_row(task_id, args.quick, args.seed)
                else:
                    module = methods[name]
                    res = evaluate(module, train(module, task_id, args.quick, args.seed), args.quick, args.seed)
            secs = time.perf_counter() - start
            kl = "nan" if math.isnan(res["kl"]) else f"{res['kl']:.4f}"
            print(
                f"{name} {task_id} gap_closed={res['gap_closed']:.4f} kl={kl} reward={res['reward']:.4f} seconds={secs:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

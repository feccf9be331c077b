"""One table for every adaptation method in the package, judged against the exact oracle.

    python benchmarks/adaptation.py --quick            # all methods, a few CPU minutes
    python benchmarks/adaptation.py --methods value_matching --tasks GMM1D-v0

Prints one line per method and task::

    METHOD TASK gap_closed=<fraction> kl=<nats> reward=<mean terminal reward> seconds=<wall>

Each method lives in ``benchmarks/adaptation_methods/<name>.py`` and defines
``TASKS`` (the task ids it runs on) and ``run(task_id, quick, seed) -> Result``; the
numbers are computed on fresh samples after training.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Result:
    """What a method reports (means over fresh samples after training)."""

    objective: float  # E[lambda r(x1)] - KL
    kl: float  # nats; nan where the method defines none (e.g. a deterministic flow)
    reward: float  # mean terminal reward r(x1) (unscaled)
    base_objective: float
    optimal_objective: float

    @property
    def gap_closed(self) -> float:
        return (self.objective - self.base_objective) / (self.optimal_objective - self.base_objective)


def discover() -> dict[str, object]:
    import adaptation_methods

    found = {}
    for info in pkgutil.iter_modules(adaptation_methods.__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"adaptation_methods.{info.name}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets (a few CPU minutes in all)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    methods = discover()
    for name in args.methods or sorted(methods):
        if name not in methods:
            raise SystemExit(f"--methods: unknown method {name!r}; expected one of {sorted(methods)}")
        module = methods[name]
        for task in module.TASKS:
            if args.tasks and task not in args.tasks:
                continue
            start = time.perf_counter()
            res: Result = module.run(task, quick=args.quick, seed=args.seed)
            secs = time.perf_counter() - start
            kl = "nan" if math.isnan(res.kl) else f"{res.kl:.4f}"
            print(f"{name} {task} gap_closed={res.gap_closed:.4f} kl={kl} reward={res.reward:.4f} seconds={secs:.1f}", flush=True)


if __name__ == "__main__":
    main()

"""One table for every adaptation method in the package, judged against the task's optimum.

    python benchmarks/adaptation.py --quick                  # every row, seed 0, small budgets
    python benchmarks/adaptation.py --full --jobs 12         # full budgets, seeds 0 1 2, 12 processes
    python benchmarks/adaptation.py --methods value_matching --tasks GMM1D-v0 --seeds 0 1

Each run (method, task, seed) happens in a fresh process (``--jobs`` of them at a time, one
torch thread each), so its wall time and peak memory are its own. It prints one line per run::

    METHOD TASK seed=S gap_closed=<fraction> kl=<nats> reward=<mean terminal reward> [class_fraction=<f>] seconds=<wall> peak_mb=<MB>

and, at the end, a markdown table per task with the mean ± standard error over the seeds (the
README's table is this output of ``--full``).

Every method runs through the same adapter, the Trainer contract: its module in
``benchmarks/adaptation_methods/<name>.py`` defines ``TASKS`` (the task ids it runs on) and
``make(task_id, quick, seed) -> Trainer`` (its settings, with the measurements behind them)
and optionally ``finish(trainer, task_id, quick, seed)``, a post-training step (EFM's control-scale
search); this script trains it (``train(progress=False)``, then ``finish``) and reports ``trainer.evaluate`` on fresh
samples (4096 quick, 16384 full; seed ``seed + 10_000``), on the task's grid or, where the module
sets ``EVAL_STEPS`` (a method trained on a coarser grid), on that many steps. ``seconds`` covers
building, training and evaluating; ``peak_mb`` is the process's peak resident memory
(``ru_maxrss``; on CUDA the peak allocated device memory is added as ``cuda_peak_mb``). ``--device
cuda`` runs the digits rows there (the GMM and discrete rows are CPU-sized and stay on the CPU).

Optima: on the GMM tasks the exact oracle (the ``oracle`` row samples its control ``u*``: gap ~1
up to the Euler error); on the digits row (``adaptation_methods/_digits.py``) an importance-sampling
estimate from >= 100 000 base samples (``benchmarks/digits_optimum.py``), whose standard error is
printed with the ``optimum`` row; its ``class_fraction`` is the share of samples the classifier
calls a 3.
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing
import pkgutil
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType

import torch

import adaptation_methods
from adaptation_methods import _digits
from diffusiongym.sampling import sample
from diffusiongym.tasks import make_task
from diffusiongym.trainers.base import Trainer, trajectory_metrics
from diffusiongym.utils.runtime import flush_denormals

EVAL_SEED_OFFSET = 10_000
ORACLE_TASKS = ["GMM1D-v0", "GMM2D-v0"]
COLUMNS = ("gap_closed", "kl", "reward", "class_fraction", "seconds", "peak_mb", "cuda_peak_mb")


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
    finish = getattr(module, "finish", None)  # an optional post-training step of the recipe
    if finish is not None:
        finish(trainer, task_id, quick, seed)
    return trainer


def eval_size(quick: bool) -> int:
    return 4096 if quick else 16384


def evaluate(module: ModuleType, trainer: Trainer, quick: bool, seed: int, task_id: str = "") -> dict[str, float]:
    """``trainer.evaluate`` on fresh samples; on a grid of ``module.EVAL_STEPS`` steps where the
    method trains on a grid other than the task's own; on digits, with the class fraction of
    the same samples."""
    steps = getattr(module, "EVAL_STEPS", None)
    kwargs = {} if steps is None else {"steps": steps}
    if task_id != _digits.DIGITS:
        return trainer.evaluate(eval_size(quick), seed=seed + EVAL_SEED_OFFSET, **kwargs)
    traj = trainer.sample(eval_size(quick), seed + EVAL_SEED_OFFSET, **kwargs)  # what evaluate() samples
    out = trajectory_metrics(traj, trainer.task)
    out["class_fraction"] = _digits.class_fraction(traj.x1, trainer.task.reward)
    return out


def oracle_row(task_id: str, quick: bool, seed: int) -> dict[str, float]:
    """The exact optimal control ``u*`` on the task's grid (GMM tasks); on digits, the estimate."""
    if task_id == _digits.DIGITS:
        est = _digits.ESTIMATE
        return {
            "gap_closed": 1.0,
            "kl": est.optimal_kl,
            "reward": est.optimal_reward,
            "class_fraction": est.optimal_statistics.get("class_fraction", math.nan),
            "objective": est.optimal_objective,
        }
    task = make_task(task_id)
    traj = sample(
        task.environment,
        eval_size(quick),
        steps=task.steps,
        t_start=task.t_start,
        control=task.oracle.control(),
        reward=task.reward,
        reward_scale=task.reward_scale,
        seed=seed + EVAL_SEED_OFFSET,
    )
    return trajectory_metrics(traj, task)


def run(name: str, task_id: str, quick: bool, seed: int, device: str = "cpu") -> dict[str, float]:
    """One row in this process: train and evaluate (or the oracle), with wall time and peak memory."""
    torch.set_num_threads(1)  # a benchmark process of its own: one thread, as the budgets were measured
    _digits.DEVICE = device
    start = time.perf_counter()
    with flush_denormals():
        if name == "oracle":
            res = oracle_row(task_id, quick, seed)
        else:
            module = discover()[name]
            res = evaluate(module, train(module, task_id, quick, seed), quick, seed, task_id)
    res["seconds"] = time.perf_counter() - start
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def _fmt(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def line(name: str, task_id: str, seed: int, res: dict[str, float]) -> str:
    extra = f" class_fraction={res['class_fraction']:.4f}" if "class_fraction" in res else ""
    return (
        f"{name} {task_id} seed={seed} gap_closed={_fmt(res['gap_closed'])} kl={_fmt(res['kl'])} "
        f"reward={_fmt(res['reward'])}{extra} seconds={res['seconds']:.1f} peak_mb={res['peak_mb']:.0f}"
        + (f" cuda_peak_mb={res['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in res else "")
    )


def mean_se(values: list[float], digits: int = 4) -> str:
    """``mean ± s.e.`` over seeds (the mean alone for one seed)."""
    k = len(values)
    mean = sum(values) / k
    if k == 1:
        return f"{mean:.{digits}f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(results: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    """Markdown table, one row per (task, method), mean ± s.e. over the seeds run."""
    out = [
        "| task | method | seeds | gap closed | KL | reward | class fraction | seconds | peak MB | GPU peak MB |",
        "|" + "---|" * 10,
    ]
    for (task_id, name), runs in sorted(results.items()):
        cells = []
        for key in COLUMNS:
            values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
            cells.append(mean_se(values, 0 if key in ("seconds", "peak_mb", "cuda_peak_mb") else 4) if values else "")
        out.append(f"| {task_id} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="small budgets (a few CPU minutes per row)")
    budget.add_argument("--full", action="store_true", help="full budgets over seeds 0 1 2 (the README table)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 with --full, else 0")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process")
    parser.add_argument("--device", default="cpu", help="where the digits rows run (e.g. cuda); the others use the CPU")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs: expected a positive integer, got {args.jobs}")
    seeds = args.seeds if args.seeds else ([0, 1, 2] if args.full else [0])
    methods = discover()
    known = sorted([*methods, "oracle"])
    runs = []
    for name in args.methods or known:
        if name not in known:
            raise SystemExit(f"--methods: unknown method {name!r}; expected one of {known}")
        tasks = [*ORACLE_TASKS, _digits.DIGITS] if name == "oracle" else methods[name].TASKS
        for task_id in tasks:
            if args.tasks and task_id not in args.tasks:
                continue
            # the oracle row is deterministic up to its evaluation seed: one seed is enough
            for seed in seeds[:1] if name == "oracle" else seeds:
                runs.append((name, task_id, seed))
    runs.sort(key=lambda run: run[1] != _digits.DIGITS)  # the longest rows first, for --jobs > 1
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(run, name, task_id, args.quick, seed, args.device): (name, task_id, seed)
            for name, task_id, seed in runs
        }
        for future in as_completed(futures):
            name, task_id, seed = futures[future]
            try:
                res = future.result()
            except Exception as err:  # one broken row must not lose the others' results
                print(f"{name} {task_id} seed={seed} failed: {type(err).__name__}: {err}", flush=True)
                continue
            print(line(name, task_id, seed, res), flush=True)
            results.setdefault((task_id, name), []).append(res)
    if _digits.DIGITS in {task for task, _ in results}:
        print(f"\n{_digits.DIGITS} optimum (importance sampling): {_digits.ESTIMATE}")
    print()
    print(table(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

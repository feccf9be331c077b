"""Adjoint Matching vs Value Matching: time per training iteration and peak memory.

    python benchmarks/adjoint_vs_value.py                       # GMM1D-v0 and GMM2D-v0, CPU
    python benchmarks/adjoint_vs_value.py --tasks GMM2D-v0 --batch 512 --steps 100 --device cuda

Both trainers use the same batch of trajectories and the same grid; each keeps the
per-iteration settings of its benchmark row (``benchmarks/adaptation_methods/``): Adjoint
Matching samples, solves the lean adjoint with likelihood-ratio steps (3 VJPs of the base
drift per step: the adjoint, a probe and the likelihood-ratio vector), runs its restart
paths (4 x batch, from ``t >= 0.7``, with their adjoints) and takes ``updates_per_iteration``
gradient steps on minibatches of 8192 ``(k, i)`` pairs (float64: the trainable mixture copy);
``adjoint_matching_mlp`` is the paper's plain lean adjoint (1 VJP per step) with a residual
MLP (float32, no restarts, 4096 pairs); Value Matching samples and takes its regression steps. Each measurement runs in a fresh process. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during training; on the CPU the growth of the
process's peak resident set size (``ru_maxrss``) from before the trainer is built to after training
(coarse: it includes allocator caching). Prints one line per method and task::

    METHOD TASK batch=<n> steps=<m> sec_per_iter=<median> peak_mem_mb=<MB>

Value Matching is skipped (with a note) if ``diffusiongym.trainers.value_matching`` is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import statistics
import sys
import time


def _measure(method: str, task_id: str, batch: int, steps: int, iterations: int, device: str, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from diffusiongym.tasks import make_task

    task = make_task(task_id)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method.startswith("adjoint_matching"):
        from adaptation_methods.adjoint_matching import config as am_config

        from diffusiongym.trainers.adjoint_matching import AdjointMatching

        # the benchmark row's settings at this batch: the trainable mixture copy with restarts
        # (4 x batch extra paths from t >= 0.7) and likelihood-ratio steps; "_mlp": a residual
        # MLP, the plain lean adjoint, no restarts
        if method == "adjoint_matching":
            cfg = am_config(task_id, True, 0, batch_size=batch)
            dtype = torch.float64
        else:
            cfg = am_config(
                task_id,
                True,
                0,
                batch_size=batch,
                residual="control",
                restarts=0.0,
                lr=3e-3,
                minibatch_size=4096,
                likelihood_ratio=None,
            )
            dtype = torch.float32
        trainer = AdjointMatching(task, config=cfg, steps=steps, device=device, dtype=dtype)
    else:
        from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig

        cfg = ValueMatchingConfig(batch_size=batch, updates_per_iteration=32, minibatch_size=2048, replay=3, lr=1e-3)
        trainer = ValueMatching(task, config=cfg, steps=steps, device=device)
    trainer.train(1, progress=False)  # warm-up (allocations, lazy init)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        trainer.train(1, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss is in KiB on Linux
    queue.put((statistics.median(times), peak_mb))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=["GMM1D-v0", "GMM2D-v0"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    methods = ["adjoint_matching", "adjoint_matching_mlp"]
    if importlib.util.find_spec("diffusiongym.trainers.value_matching") is not None:
        methods.append("value_matching")
    else:
        print("note: diffusiongym.trainers.value_matching not found; Value Matching skipped", file=sys.stderr)
    ctx = mp.get_context("spawn")
    for task_id in args.tasks:
        for method in methods:
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_measure, args=(method, task_id, args.batch, args.steps, args.iterations, args.device, queue)
            )
            proc.start()
            sec, mem = queue.get()
            proc.join()
            print(
                f"{method} {task_id} batch={args.batch} steps={args.steps} sec_per_iter={sec:.4f} peak_mem_mb={mem:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

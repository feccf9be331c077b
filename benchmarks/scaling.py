"""Data-parallel scaling: throughput of 1 process vs W processes (torch.distributed).

Two workloads, each timed after a warm-up:

- ``train``: Adjoint Matching on GMM2D-v0 (``batch`` paths of ``steps`` steps per iteration,
  ``rollout_shards = W``): trajectories per second, rollout + lean adjoint + updates;
- ``sample``: :func:`diffusiongym.distributed.sample_sharded` of ``batch`` samples: samples
  per second.

The 1-process run draws all ``W`` shards itself, so both runs compute the same numbers. On a CPU
every process gets one thread (gloo); with CUDA one process per GPU (nccl), and the script
reports per-GPU throughput and the scaling efficiency ``throughput(W) / (W * throughput(1))``::

    python benchmarks/scaling.py [--procs 2] [--batch 2048] [--steps 50] [--iterations 5]

Processes are launched the way ``torchrun`` launches them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); on a shared machine the numbers move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

import diffusiongym.distributed as dgd
from diffusiongym.tasks import make_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig


def worker(args: argparse.Namespace) -> None:
    """One process of a run (``WORLD_SIZE`` of them, or a plain single process)."""
    dgd.init_process_group()
    world = dgd.world_size()
    device = dgd.default_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    shards = args.shards
    cfg = AdjointMatchingConfig(
        iterations=args.iterations + 1, batch_size=args.batch, rollout_shards=shards, hidden=64, layers=2, seed=0
    )
    trainer = AdjointMatching("GMM2D-v0", config=cfg, steps=args.steps, device=device)
    env = make_task("GMM2D-v0", steps=args.steps).environment
    trainer.train(1, progress=False)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dgd.barrier()
    sync()
    start = time.perf_counter()
    trainer.train(args.iterations, progress=False)
    sync()
    dgd.barrier()
    train_s = time.perf_counter() - start
    dgd.sample_sharded(env, args.batch, seed=1, shards=shards, steps=args.steps, device=device)  # warm-up
    dgd.barrier()
    sync()
    start = time.perf_counter()
    for r in range(args.iterations):
        dgd.sample_sharded(env, args.batch, seed=r, shards=shards, steps=args.steps, device=device)
    sync()
    dgd.barrier()
    sample_s = time.perf_counter() - start
    if dgd.is_main_process():
        print(
            json.dumps(
                {
                    "world": world,
                    "device": device.type,
                    "train_per_s": args.iterations * args.batch / train_s,
                    "sample_per_s": args.iterations * args.batch / sample_s,
                    "loss": trainer.history["loss"][-1],
                }
            )
        )
    dgd.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` in ``world`` processes (torchrun's environment) and return rank 0's numbers."""
    cmd = [sys.executable, __file__, "--worker", *(f"--{k}={v}" for k, v in _forward(args).items())]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            )
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(err[-3000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _forward(args: argparse.Namespace) -> dict:
    return {"batch": args.batch, "steps": args.steps, "iterations": args.iterations, "shards": args.shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=None, help="processes (default: GPUs, else 2)")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--shards", type=int, default=None, help="rollout shards (default: --procs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    world = args.procs or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    args.shards = args.shards or world
    one = launch(1, args)
    many = launch(world, args)
    kind = "GPU" if one["device"] == "cuda" else "CPU process (1 thread)"
    print(f"batch {args.batch}, {args.steps} steps, {args.iterations} timed iterations, rollout_shards {args.shards}")
    print(
        f"{'workload':<10}{'1 proc /s':>14}{f'{world} procs /s':>14}{'per ' + kind.split()[0]:>14}{'speed-up':>10}{'efficiency':>12}"
    )
    for key, label in (("train_per_s", "train"), ("sample_per_s", "sample")):
        a, b = one[key], many[key]
        print(f"{label:<10}{a:>14.0f}{b:>14.0f}{b / world:>14.0f}{b / a:>9.2f}x{b / (world * a):>11.0%}")
    print(f"same last loss in both runs: {one['loss']:.6g} vs {many['loss']:.6g}")


if __name__ == "__main__":
    main()

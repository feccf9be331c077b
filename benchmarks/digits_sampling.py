"""Sampling 256 digits with 50 steps on the CPU: diffusiongym's sampler vs diffusers' scheduler loop.

Same model (the shipped :class:`~diffusiongym.models.digits.DigitsUNet`, one class label per
sample), same initial noise, same 50-step Euler grid: ``FlowMatchEulerDiscreteScheduler``
stepping the model wrapped as a diffusers flow model (output ``noise - data = -velocity``,
timestep ``sigma * 1000``), against ``diffusiongym.sample`` on the grid ``t = 1 - sigma`` with
``noise="ode"`` (the same recursion: the final images agree to float32 rounding, printed), and
with the memoryless SDE (its default, 50 steps from ``t_start = 0.01``); each of the two also with
``compile=True`` (:mod:`diffusiongym.compiled`: one ``torch.compile``d graph per step), whose
compile time (first full run minus the best one) is printed separately.

Each variant runs in a fresh subprocess: a 2-sample warm-up (imports, one-off initialisation),
then one full run whose growth of the process's peak resident set size (``ru_maxrss``) is the
reported peak memory (torch's CPU allocations are invisible to ``tracemalloc``), then
``--repeats`` timed runs (best reported). Run with one thread:

    OMP_NUM_THREADS=1 python benchmarks/digits_sampling.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _setup(n: int, seed: int):
    from diffusiongym.models.digits import load_digits_model, sample_labels

    model = load_digits_model()
    gen = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, gen)
    x0 = torch.randn(n, 1, 8, 8, generator=gen)
    return model, labels, x0


def _diffusers_loop(model, labels, x0, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = x0.clone()
    with torch.no_grad():
        for tau in scheduler.timesteps:
            t = 1.0 - tau.expand(len(x)) / 1000.0
            flow = -model(x, t, label=labels)  # diffusers' flow-matching output: noise - data
            x = scheduler.step(flow, tau, x).prev_sample
    return x


def _ours(model, labels, x0, steps, noise, compile=False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusiongym import sample
    from diffusiongym.models.digits import digits_environment

    env = digits_environment(noise=noise, model=model)
    if noise == "ode":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        grid = (1.0 - scheduler.sigmas.double()).clamp(0, 1)
        return sample(env, x=x0, grid=grid, cond={"label": labels}, compile=compile).x1
    return sample(env, len(x0), steps=steps, t_start=1e-2, cond={"label": labels}, seed=0, compile=compile).x1


VARIANTS = ("diffusers", "ours_ode", "ours_memoryless", "ours_ode_compiled", "ours_memoryless_compiled")


def run_variant(variant: str, n: int, steps: int, repeats: int, seed: int) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model, labels, x0 = _setup(n, seed)

    def fn(labels=labels, x0=x0, steps=steps):
        if variant == "diffusers":
            return _diffusers_loop(model, labels, x0, steps)
        noise = "ode" if variant.startswith("ours_ode") else "memoryless"
        return _ours(model, labels, x0, steps, noise, compile=variant.endswith("_compiled"))

    fn(labels[:2], x0[:2], 2)  # warm-up on 2 samples: imports and one-off kernel initialisation
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    x = fn()  # first run: peak memory growth (and compilation for the compiled variants), then timing runs
    first = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = fn()
        times.append(time.perf_counter() - start)
    if variant in ("diffusers", "ours_ode", "ours_ode_compiled"):  # kept for the agreement check in main()
        torch.save(x, f"/tmp/digits_benchmark_{variant}_{os.getpid()}.pt")
    return {
        "variant": variant,
        "seconds": min(times),
        "compile_seconds": first - min(times),
        "peak_rss_growth_mib": (rss_after - rss_before) / 1024,
        "peak_rss_mib": rss_after / 1024,
        "pid": os.getpid(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args.variant, args.num_samples, args.steps, args.repeats, args.seed)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--num-samples",
            str(args.num_samples),
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
            "--seed",
            str(args.seed),
        ]
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    kept = {
        v: f"/tmp/digits_benchmark_{v}_{results[v]['pid']}.pt" for v in ("diffusers", "ours_ode", "ours_ode_compiled")
    }
    x_d, x_o, x_c = (torch.load(kept[v]) for v in ("diffusers", "ours_ode", "ours_ode_compiled"))
    for path in kept.values():
        os.remove(path)
    print(f"{args.num_samples} digits, {args.steps} steps, CPU, 1 thread, best of {args.repeats}")
    print(f"{'variant':<26}{'seconds':>10}{'peak RSS growth (MiB)':>24}{'compile (s)':>13}")
    for variant, r in results.items():
        comp = f"{r['compile_seconds']:>13.1f}" if variant.endswith("_compiled") else ""
        print(f"{variant:<26}{r['seconds']:>10.3f}{r['peak_rss_growth_mib']:>24.1f}{comp}")
    base = results["diffusers"]
    for variant in VARIANTS[1:]:
        print(f"time ratio {variant} / diffusers = {results[variant]['seconds'] / base['seconds']:.3f}")
    print(f"max |x_ours_ode - x_diffusers| = {float((x_o - x_d).abs().max()):.2e}")
    print(f"max |x_ours_ode_compiled - x_ours_ode| = {float((x_c - x_o).abs().max()):.2e}")


if __name__ == "__main__":
    main()

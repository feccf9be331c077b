"""Overhead of the engine's sampling loop over a hand-written Euler–Maruyama loop.

Same model (exact 8-Gaussian 2-D mixture, velocity, linear scheduler), memoryless noise,
100 steps, storage off, CPU. Prints the ratio engine / hand-written per batch size
(target: <= 1.05 at batch >= 1024)::

    python benchmarks/engine_overhead.py [--batches 256 1024 4096 16384] [--repeats 7]
"""

from __future__ import annotations

import argparse
import math

import torch
from _timing import best_times

import diffusiongym as dg


def hand_written(model, n: int, steps: int, seed: int) -> torch.Tensor:
    """Plain memoryless EM for a linear-path velocity model: b = 2 v - x / t, sigma^2 = 2 (1 - t) / t."""
    gen = torch.Generator().manual_seed(seed)
    t_start = 1e-3
    times = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64)
    x = (1 - t_start) * torch.randn(n, 2, generator=gen)
    tt = times.to(torch.float32)
    with torch.no_grad():
        for k in range(steps):
            t, h = float(times[k]), float(times[k + 1] - times[k])
            v = model(x, tt[k].expand(n))
            sigma = math.sqrt(2 * (1 - t) / t)
            x = x + h * (2 * v - x / t) + math.sqrt(h) * sigma * torch.randn(n, 2, generator=gen)
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[256, 1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    model = dg.GaussianMixtureModel(dg.gmm_preset("8gaussians"), "linear", "velocity")
    env = dg.VelocityEnvironment(model, scheduler="linear", noise="memoryless")
    # the two loops agree (same maths, same random stream)
    a = hand_written(model, 64, args.steps, 0)
    b = dg.sample(env, 64, steps=args.steps, seed=0).x1
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), float((a - b).abs().max())
    print(f"threads={torch.get_num_threads()} steps={args.steps} noise=memoryless model=8-Gaussian exact velocity")
    print(f"{'batch':>7} {'hand [s]':>10} {'engine [s]':>11} {'ratio':>7}")
    for n in args.batches:
        t = best_times(
            {
                "hand": lambda n=n: hand_written(model, n, args.steps, 1),
                "engine": lambda n=n: dg.sample(env, n, steps=args.steps, seed=1),
            },
            args.repeats,
        )
        print(f"{n:>7} {t['hand']:>10.4f} {t['engine']:>11.4f} {t['engine'] / t['hand']:>7.3f}")


if __name__ == "__main__":
    main()

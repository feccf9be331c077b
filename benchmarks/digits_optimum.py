"""The digits row's base and optimal objectives, estimated from base samples.

    python benchmarks/digits_optimum.py                        # 100 000 samples, CPU (~25 min on one core)
    python benchmarks/digits_optimum.py --num-samples 1000000 --device cuda

Task: ``benchmarks/adaptation_methods/_digits.py`` (unconditional digits model, 50 memoryless
Euler steps, ``r = log p(3 | x)``, ``lambda = 1``). Prints the
:class:`~diffusiongym.optimum.OptimumEstimate` (base objective ``lambda E_p r``, optimal objective
``log E_p[exp(lambda r)]`` with standard errors, ``KL(p* || p)``, the effective sample size) and
the class-3 fraction under the base and under ``p*``, then the literal that ``_digits.ESTIMATE``
records.
"""

from __future__ import annotations

import argparse
import time

import adaptation_methods._digits as digits
from diffusiongym.optimum import estimate_optimum
from diffusiongym.utils.runtime import flush_denormals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    task = digits.task(estimate=None, device=args.device)
    is_class = digits.is_class_reward(task.reward)
    start = time.perf_counter()
    with flush_denormals():
        est = estimate_optimum(
            task,
            args.num_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            statistics={"class_fraction": lambda x1: is_class(x1)[0]},
            progress=args.progress,
        )
    print(est)
    print(
        f"class-{digits.TARGET} fraction: base {est.base_statistics['class_fraction']:.4f}, "
        f"p* {est.optimal_statistics['class_fraction']:.4f}; gap {est.gap:.4f} ± {est.gap_se:.4f}; "
        f"seed {args.seed}, batch {args.batch_size}, {args.device}, {time.perf_counter() - start:.0f} s"
    )
    print(repr(est))


if __name__ == "__main__":
    main()

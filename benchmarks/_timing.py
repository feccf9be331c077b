"""Timing helper for the benchmark scripts: interleaved repeats, best (minimum) wall time."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_times(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Run each function ``repeats`` times, interleaved (so load changes hit all alike), and
    return the minimum wall time of each in seconds."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best

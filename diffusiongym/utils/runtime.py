"""Scoped process state for training loops: denormal flushing and seeded global RNG.

Library code never leaves process-wide torch state changed. Two things still have to be
set process-wide for a while:

- flushing denormals (subnormal floats slow CPU training about tenfold); torch has no
  getter, so :func:`flush_denormals` probes the current mode and restores it on exit;
- the global RNG, which ``nn.Module`` initialisers and dropout draw from and which takes
  no generator; :func:`seeded` forks it, seeds it and restores it on exit.

:func:`derive_seed` turns one run seed and a few names into independent 63-bit seeds, so
that each consumer of randomness (network init, dropout of iteration ``k``, rank ``r``)
gets its own stream from the config's single ``seed``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

__all__ = ["flush_denormals", "denormals_flushed", "seeded", "derive_seed"]

_TINY = 1e-310  # a float64 subnormal


def denormals_flushed() -> bool:
    """Whether the CPU currently flushes denormals to zero (probed: torch has no getter)."""
    return bool((torch.tensor([_TINY], dtype=torch.float64) * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormals to zero inside the block and restore the previous mode on exit."""
    previous = denormals_flushed()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``names`` (stable across runs and platforms)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    text = "/".join([str(seed), *(str(n) for n in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the global torch RNG seeded to ``seed``; restore it on exit.

    For code that takes no generator (``nn.Module`` initialisers, dropout). ``device``: a
    CUDA device whose RNG is forked too.
    """
    dev = torch.device(device) if device is not None else None
    devices = [dev] if dev is not None and dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

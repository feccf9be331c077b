"""Every row of ``benchmarks/adaptation.py`` builds its trainer through the contract (a smoke test:
the numbers themselves are the benchmark's to print, never asserted here)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

from diffusiongym.trainers.base import Trainer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _rows() -> list[tuple[str, str]]:
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their folder's modules
    try:
        import adaptation_methods

        modules = [
            info.name for info in pkgutil.iter_modules(adaptation_methods.__path__) if not info.name.startswith("_")
        ]
        return [(m, t) for m in modules for t in importlib.import_module(f"adaptation_methods.{m}").TASKS]
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(("method", "task_id"), _rows())
def test_every_row_makes_a_trainer(method, task_id):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module(f"adaptation_methods.{method}")
        quick, full = module.make(task_id, True, 0), module.make(task_id, False, 0)
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert isinstance(quick, Trainer) and isinstance(full, Trainer)
    assert quick.config.seed == 0 and full.config.iterations >= quick.config.iterations


def test_guidance_benchmark_smoke():
    """``benchmarks/guidance.py`` runs end to end on a tiny budget (numbers not asserted: the benchmark's to print)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        guidance = importlib.import_module("guidance")
        rows = guidance.gmm_rows("GMM1D-v0", True, 0, n=64, train_iterations=1)
        digits = guidance.digits_rows(True, 0, big=8)
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert len(rows) == 12 and all(r["sample"] > 0 for r in rows[1:])
    assert [r["evals"] for r in digits] == [8 * 50] * 4 + [2 * 3 * 50]

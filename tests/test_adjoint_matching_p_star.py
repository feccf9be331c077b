"""Adjoint Matching on the Gaussian-mixture tasks reaches p* (slow; its own file so that
pytest-xdist's ``--dist loadfile`` runs it beside the rest of the suite)."""

from __future__ import annotations

import pytest
import torch

from diffusiongym import energy_distance, null_energy_threshold
from diffusiongym.tasks import make_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching, multimodal_recipe

# The full budget of benchmarks/adaptation_methods/adjoint_matching.py: (iterations, learning rate).
BUDGETS = {"GMM1D-v0": (100, 5e-2), "GMM2D-v0": (300, 5e-2)}
N_TEST = 2048


@pytest.mark.slow
@pytest.mark.parametrize("task_id", ["GMM1D-v0", "GMM2D-v0"])
def test_mixture_copy_closes_the_gap_and_samples_p_star(task_id):
    # The trainable mixture copy, lean adjoint with likelihood-ratio steps and restarts, judged on
    # fresh samples on the task's 100-step grid (training uses 50 steps), and through its
    # parameters, which have exact targets: p* is again a mixture of the same components.
    # Two-sample test: energy distance at n = 2048 against 1.5 x the largest of 10 exact-vs-exact
    # distances (the exact p* copy on this grid scores 0.0001-0.0017 / 0.0005-0.0016). Measured
    # with this seed (benchmarks/adjoint_matching_gmm.py, 16384 samples): gap 0.979 / 0.999, energy
    # distance 0.0004 / 0.0006 against thresholds 0.0020 / 0.0028, largest weight error 0.008 /
    # 0.005 (GMM1D / GMM2D); seeds 1-4 / 1-2 pass too. With the paper's Monte-Carlo lean adjoint
    # alone the gap passes but the weights do not (GMM1D light mode 0.66-0.76 against 0.827) and
    # neither does the two-sample test. GMM2D needs its 300 iterations: with 200, seed 1 missed.
    iterations, lr = BUDGETS[task_id]
    task = make_task(task_id)
    cfg = multimodal_recipe(iterations=iterations, lr=lr, seed=0)  # the benchmark rows' settings
    trainer = AdjointMatching(task, config=cfg, steps=50)
    trainer.train(progress=False)
    judge = AdjointMatching(task, model=trainer.model)  # the task's own 100-step grid
    assert judge.evaluate(8192, seed=10_000)["gap_closed"] > 0.95
    traj = judge.sample(8192, seed=10_000)  # the same samples as evaluate's
    target = task.oracle.target
    exact = target.sample(N_TEST, generator=torch.Generator().manual_seed(77), dtype=torch.float32)
    assert energy_distance(traj.x1[:N_TEST], exact) < null_energy_threshold(target, N_TEST, seed=1000)
    learnt = trainer.model.mixture()
    assert float((learnt.weights - target.weights).abs().max()) < 0.03, learnt.weights
    heavy = target.weights > 0.05
    assert float((learnt.means - target.means)[heavy].abs().max()) < 0.05
    # covariances to 10% of the component variance (0.04-0.06 here), off-diagonal terms included
    scale = float(target.covs[heavy].diagonal(dim1=-2, dim2=-1).max())
    torch.testing.assert_close(learnt.covs[heavy], target.covs[heavy], rtol=0.0, atol=0.10 * scale)

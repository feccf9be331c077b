"""Monte-Carlo optimum estimates (``diffusiongym.optimum``) against closed forms."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from diffusiongym.optimum import OptimumEstimate, estimate_optimum, optimum_from_rewards
from diffusiongym.tasks import make_task
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig


def test_gaussian_rewards_match_the_closed_form():
    # r ~ N(m, s^2): log E exp(lam r) = lam m + lam^2 s^2 / 2, E_p* r = m + lam s^2,
    # KL(p* || p) = lam^2 s^2 / 2, ESS / n = exp(-lam^2 s^2).
    m, s, lam, n = -1.0, 0.8, 1.5, 200_000
    r = m + s * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = optimum_from_rewards(r, lam, statistics={"above_mean": (r > m).double()})
    assert abs(est.optimal_objective - (lam * m + lam**2 * s**2 / 2)) < 4 * est.optimal_objective_se
    assert abs(est.base_objective - lam * m) < 4 * est.base_objective_se
    # the self-normalised figures carry O(1/sqrt(ESS)) error: ESS ~ 47 000 here, 1% is > 10 s.e.
    assert est.optimal_reward == pytest.approx(m + lam * s**2, abs=0.01)
    assert est.optimal_kl == pytest.approx(lam**2 * s**2 / 2, abs=0.02)
    assert est.effective_sample_size / n == pytest.approx(math.exp(-(lam**2) * s**2), rel=0.05)
    # P(r > m) is 1/2 under p and Phi(lam s) under the tilt N(m + lam s^2, s^2)
    assert est.base_statistics["above_mean"] == pytest.approx(0.5, abs=0.005)
    phi = 0.5 * (1 + math.erf(lam * s / math.sqrt(2)))
    assert est.optimal_statistics["above_mean"] == pytest.approx(phi, abs=0.01)


def test_standard_error_is_calibrated():
    # 300 replicate estimates from 2000 rewards r = -Exp(1): the spread of the estimates and
    # the mean reported s.e. agree (the s.e. of a sample std over 300 draws is ~4%; 15% is > 3 s.e.)
    gen = torch.Generator().manual_seed(1)
    estimates, ses = [], []
    for _ in range(300):
        r = -torch.empty(2000, dtype=torch.float64).exponential_(generator=gen)
        est = optimum_from_rewards(r, 0.7)
        estimates.append(est.optimal_objective)
        ses.append(est.optimal_objective_se)
    spread = torch.tensor(estimates).std().item()
    assert spread == pytest.approx(sum(ses) / len(ses), rel=0.15)


def test_gmm_chain_estimate_matches_the_exact_oracle():
    # GMM1D's 100-step chain: the estimate is of the chain's optimum, whose Euler bias against the
    # exact continuous-time value was measured at +0.007 to +0.015 (3 seeds of 100k samples; the
    # oracle's u* closes 0.98 of the gap on this grid); 4 s.e. plus 0.02 covers both.
    task = make_task("GMM1D-v0")
    est = estimate_optimum(task, 20_000, seed=0, batch_size=5000, progress=False)
    oracle = task.oracle
    assert abs(est.optimal_objective - oracle.optimal_objective) < 4 * est.optimal_objective_se + 0.02
    assert abs(est.base_objective - oracle.base_objective) < 4 * est.base_objective_se + 0.02
    assert est.gap_closed(oracle.optimal_objective) == pytest.approx(1.0, abs=0.03)
    # the same seed and batch size reproduce the estimate exactly
    again = estimate_optimum(task, 20_000, seed=0, batch_size=5000, progress=False)
    assert again == est


def test_estimate_serves_as_a_task_oracle():
    task = make_task("GMM1D-v0")
    est = estimate_optimum(task, 4000, seed=0, batch_size=4000, progress=False)
    trainer = ValueMatching(replace(task, oracle=est), config=ValueMatchingConfig(iterations=1, seed=0))
    metrics = trainer.evaluate(512, seed=1)
    assert metrics["gap_closed"] == pytest.approx(est.gap_closed(metrics["objective"]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="rewards: expected at least 2"):
        optimum_from_rewards(torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match="rewards: expected finite"):
        optimum_from_rewards(torch.tensor([0.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match=r"statistics\['f'\]: expected shape"):
        optimum_from_rewards(torch.zeros(3), 1.0, statistics={"f": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"statistics\['f'\]: expected a callable"):
        estimate_optimum(make_task("GMM1D-v0"), 10, statistics={"f": 1.0})
    with pytest.raises(TypeError, match="task"):
        estimate_optimum(object(), 10)
    with pytest.raises(ValueError, match="num_samples"):
        estimate_optimum(make_task("GMM1D-v0"), 1)
    flat = OptimumEstimate(100, 1.0, 0.0, 0.1, 0.05, 0.1, 0.0, 0.0, 100.0)
    with pytest.raises(ValueError, match="within its standard error"):
        flat.gap_closed(0.0)

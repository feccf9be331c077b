"""The worked example of docs/adding_a_method.md reaches the GMM oracle's optimum."""

from __future__ import annotations

import pytest

from test_trainer_contract import _example


@pytest.mark.slow
def test_reward_weighted_regression_closes_the_gap_on_gmm1d():
    rwr = _example()
    trainer = rwr.RewardWeightedRegression("GMM1D-v0", config=rwr.RWRConfig(seed=0))
    trainer.train(progress=False)
    metrics = trainer.evaluate(num_samples=16384, seed=1)
    # measured with these settings: 0.961 (seed 0; seeds 1, 2: 0.970, 0.964); the gap's Monte-Carlo
    # standard error at 16384 samples is ~0.005: 0.94 leaves 4 of them below the lowest seed
    assert metrics["gap_closed"] > 0.94
    assert metrics["valid_fraction"] == 1.0
    # ESS / batch of softmax(lambda r) on the base, the analytic E[w]^2 / E[w^2] for GMM1D with
    # lambda = 1: measured 0.27-0.32 over every iteration of seeds 0-2 (the batch of 2048 moves it by ~0.02)
    assert 0.22 < trainer.history["ess"][-1] / trainer.config.batch_size < 0.37

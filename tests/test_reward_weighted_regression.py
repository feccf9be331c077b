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
    # measured 0.951 (seed 0, 4096 samples); the gap's Monte-Carlo error at 16384 samples is ~0.01
    assert metrics["gap_closed"] > 0.93
    assert metrics["valid_fraction"] == 1.0
    # ESS of the weights: lambda = 1 keeps roughly a fifth of the base samples effective
    assert 0.05 < trainer.history["ess"][-1] / trainer.config.batch_size < 0.6

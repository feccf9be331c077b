"""The discrete reward-weighted cross-entropy fine-tune under the Trainer contract: the exact
oracle on DiscreteGrid-v0, bit-identical repeat and resume, evaluation keys, errors."""

from __future__ import annotations

import pytest
import torch

from diffusiongym.discrete import ResidualPosterior, empirical_probs, sample_chain, total_variation
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.rewards.base import CallableReward
from diffusiongym.tasks import make_task
from diffusiongym.trainers.base import EVALUATION_KEYS
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer


@pytest.fixture(scope="module")
def task():
    return grid_task(steps=20)


def _model(task, seed, hidden=16):
    torch.manual_seed(seed)
    return ResidualPosterior(task.model, hidden=hidden, layers=2)


def _small(**kw):
    return RewardWeightedConfig(**{"iterations": 8, "batch_size": 32, "num_samples": 400, "seed": 5, **kw})


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]


def _assert_same(a, b):
    for x, y in zip(_params(a), _params(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sorted(a.history) == sorted(b.history)
    for key in a.history:
        if key != "seconds":
            assert a.history[key] == b.history[key], key


def test_gap_closed_against_the_exact_oracle(task):
    # the benchmark's quick budget on a 20-step chain: 12000 base samples weighted softmax(2 r)
    trainer = RewardWeightedTrainer(
        task, model=_model(task, 0, hidden=64), config=RewardWeightedConfig(iterations=300, lr=3e-3, seed=0)
    )
    trainer.train(progress=False)
    assert trainer.history["ess"][0] > 500  # softmax(2 r) on 12000 base draws (measured ~1000)
    metrics = trainer.evaluate(6000, seed=2)
    # objective sd ~2 -> standard error ~0.03 of a gap of 6.07 (0.005 in gap_closed); measured ~0.99:
    # 0.96 leaves 6 standard errors
    assert metrics["gap_closed"] >= 0.96, metrics
    assert metrics["valid_fraction"] == 1.0  # the mask chain's last step is exact
    ev = trainer.sample(6000, seed=2)
    tv = total_variation(empirical_probs(ev.x1, 32), task.oracle.target_probs)
    assert tv < 0.15, tv  # sampling noise alone gives ~0.05 at n = 6000; the rest is the finite weighted data set
    # the same figures straight from the oracle's formulas
    o = task.oracle
    assert metrics["gap_closed"] == pytest.approx(o.gap_closed(float(ev.objective.mean())), rel=1e-12)


def test_untrained_policy_is_the_base(task):
    trainer = RewardWeightedTrainer(task, model=_model(task, 0), config=_small())
    metrics = trainer.evaluate(3000, seed=0)
    assert sorted(metrics) == sorted(EVALUATION_KEYS)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-9)  # zero-initialised residual: c = 0
    # objective = lambda E_p[r] up to Monte Carlo (sd of 2 r ~ 2.4 -> se 0.045; 5 se)
    assert metrics["objective"] == pytest.approx(task.oracle.base_objective, abs=0.25)
    assert abs(metrics["gap_closed"]) < 0.05


@pytest.mark.parametrize("stop", [1, 5])
def test_repeat_and_resume_are_bit_identical(tmp_path, task, stop):
    cfg = _small()
    straight = RewardWeightedTrainer(task, model=_model(task, 0), config=cfg)
    straight.train(progress=False)
    again = RewardWeightedTrainer(task, model=_model(task, 0), config=cfg)
    again.train(progress=False)
    _assert_same(straight, again)
    first = RewardWeightedTrainer(task, model=_model(task, 0), config=cfg)
    first.train(stop, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = RewardWeightedTrainer(task, model=_model(task, 1), config=cfg).load(tmp_path / "ckpt")
    assert resumed.iteration == stop
    resumed.train(progress=False)
    _assert_same(straight, resumed)


def test_default_model_and_given_data_resume(tmp_path, task):
    data = sample_chain(task.model, 300, 20, reward=task.reward, seed=3)
    cfg = _small(iterations=6)
    straight = RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, data=(data.x1, data.reward), steps=20)
    assert isinstance(straight.model, ResidualPosterior)
    straight.train(progress=False)
    first = RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, data=(data.x1, data.reward), steps=20)
    first.train(3, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, data=(data.x1, data.reward), steps=20).load(
        tmp_path / "ckpt"
    )
    resumed.train(progress=False)
    _assert_same(straight, resumed)
    # other data, no data, another task or method: refused before anything changes
    other = RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, data=(data.x1.flip(0), data.reward), steps=20)
    before = _params(other)
    with pytest.raises(CheckpointError, match="data_digest"):
        other.load(tmp_path / "ckpt")
    assert other.iteration == 0 and all(torch.equal(a, b) for a, b in zip(before, _params(other)))
    with pytest.raises(CheckpointError, match="data_digest"):
        RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, steps=20).load(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="steps"):
        RewardWeightedTrainer("DiscreteGrid-v0", config=cfg, data=(data.x1, data.reward), steps=10).load(
            tmp_path / "ckpt"
        )


def test_errors(task):
    with pytest.raises(TypeError, match="task"):
        RewardWeightedTrainer(make_task("GMM1D-v0"))
    with pytest.raises(ValueError, match="task"):
        RewardWeightedTrainer("NoSuchTask-v0")
    with pytest.raises(TypeError, match="model"):
        RewardWeightedTrainer(task, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="path"):
        RewardWeightedTrainer(task, model=ResidualPosterior(grid_task(size=8).model))
    with pytest.raises(ValueError, match="x1"):
        RewardWeightedTrainer(task, data=(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4)))
    with pytest.raises(ValueError, match="rewards"):
        RewardWeightedTrainer(task, data=(torch.zeros(4, 2, dtype=torch.long), torch.zeros(3)))
    with pytest.raises(ValueError, match="num_samples"):
        RewardWeightedConfig(num_samples=0)
    # another reward: the oracle of the original problem no longer applies
    other = RewardWeightedTrainer(task, CallableReward(lambda x: x[:, 0].double()), config=_small())
    assert other.task.oracle is None and task.oracle is not None
    assert RewardWeightedTrainer(task, reward_scale=2.0, config=_small()).task.oracle is task.oracle

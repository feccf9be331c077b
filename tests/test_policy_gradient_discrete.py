"""GRPO/PPO on the jump steps of a discrete chain (DiscretePolicyGradient).

Resume, repeat and checkpoint behaviour are checked by tests/test_trainer_contract.py
(entry ``policy_gradient_discrete``)."""

from __future__ import annotations

import pytest
import torch

import diffusiongym as dg
from diffusiongym.discrete.chain import base_rates, controlled_step, draw_step, sample_chain
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.trainers import DiscretePolicyGradient
from diffusiongym.trainers.base import EVALUATION_KEYS
from diffusiongym.trainers.policy_gradient import PolicyGradientConfig
from diffusiongym.trainers.policy_gradient_discrete import step_log_prob


@pytest.fixture(autouse=True)
def _rng_guard():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _small(**overrides) -> DiscretePolicyGradient:
    options = {"iterations": 2, "batch_size": 16, "group_size": 8, "num_minibatches": 2, "hidden": 16, "layers": 2}
    options.update(overrides)
    return DiscretePolicyGradient(grid_task(size=8, steps=10), config=PolicyGradientConfig(**options))


def _perturb(trainer: DiscretePolicyGradient, scale: float = 0.3) -> None:
    """A non-trivial policy: random weights in the zero-initialised head of the residual."""
    with torch.no_grad():
        trainer.model.net.head.weight.normal_(0, scale, generator=torch.Generator().manual_seed(0))


def test_step_log_prob_is_exact_and_differentiable():
    task = grid_task(size=8, steps=10)
    base, path = task.model, task.model.path
    gen = torch.Generator().manual_seed(0)
    n = 64
    # states half-way: each coordinate unmasked with probability 1/2 (both cases occur)
    x = torch.where(torch.rand(n, 2, generator=gen) < 0.5, torch.randint(0, 8, (n, 2), generator=gen), path.mask_token)
    t, h = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 0.1, dtype=torch.float64)
    rates = base_rates(base, x, t, h, False)
    c = 0.5 * torch.randn(n, 2, 8, generator=gen, dtype=torch.float64)
    probs, _ = controlled_step(rates, h, x, path.num_states, c)
    x_next = draw_step(probs, torch.rand(n, 2, generator=gen, dtype=torch.float64))
    logp = step_log_prob(probs, x_next)
    expected = torch.log(probs[torch.arange(n)[:, None], torch.arange(2), x_next].prod(-1))
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-12)  # float64 rounding of a log of a product
    assert bool((x_next != x).any()) and bool((logp < 0).any())

    # autograd through controlled_step -> step_log_prob against central differences (float64):
    # h * sum rates * e^c < 1 here (no rescaling kink), so the map is smooth
    def f(control):
        return step_log_prob(controlled_step(rates[:8], h[:8], x[:8], path.num_states, control)[0], x_next[:8])

    assert torch.autograd.gradcheck(f, (c[:8].clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_rollout_matches_sample_chain_and_zero_control_is_the_base():
    # A fresh trainer is the base: the control is exactly 0, so the running cost is 0 and the
    # first update's ratios are exactly 1 (nothing clipped, approx_kl 0).
    trainer = _small(update_epochs=1, num_minibatches=1)
    x = trainer.env.path.sample_source(4)
    assert torch.equal(trainer.control(x, torch.zeros(4)), torch.zeros(4, 2, 8))
    record = trainer.step()
    assert record["kl"] == 0.0 and record["clip_fraction"] == 0.0 and record["approx_kl"] == 0.0

    # With a non-trivial policy the rollout is the chain of sample_chain(control=policy) drawn
    # from the same generator state: the same states and running costs, to the bit.
    _perturb(trainer)
    gen = torch.Generator().set_state(trainer.generator.get_state())
    batch = trainer.rollout()
    ref = sample_chain(trainer.env, 16, times=trainer.times, control=trainer.policy, generator=gen, store=True)
    assert torch.equal(batch.states, ref.states)
    torch.testing.assert_close(-batch.step_rewards[:-1], ref.running_cost[:-1], rtol=0, atol=0)
    assert float(ref.kl.min()) > 0
    reward, _ = trainer.task.reward(ref.x1)
    torch.testing.assert_close(batch.returns, trainer.task.reward_scale * reward.double() - ref.kl)


def test_ratio_is_one_at_the_first_update_of_a_nontrivial_policy():
    # One epoch of one minibatch: the ratios are computed at the sampling policy; only the
    # batch-size dependence of float32 matmuls separates them from 1 (~1e-7)
    trainer = _small(update_epochs=1, num_minibatches=1)
    _perturb(trainer)
    record = trainer.step()
    assert record["kl"] > 0
    assert record["clip_fraction"] == 0.0 and abs(record["approx_kl"]) < 1e-9


def test_short_run_closes_most_of_the_small_grid_gap():
    task = grid_task(size=8, steps=10)
    config = PolicyGradientConfig(iterations=15, batch_size=128, group_size=16, hidden=32, layers=2, seed=0)
    trainer = DiscretePolicyGradient(task, config=config)
    before = trainer.evaluate(2048, seed=1)
    history = trainer.train(progress=False)
    after = trainer.evaluate(2048, seed=1)
    assert tuple(after) == EVALUATION_KEYS
    # base objective -8.56, optimum -2.82 (exact oracle); the zero-initialised model is the base
    assert before["kl"] == 0.0 and abs(before["gap_closed"]) < 0.1
    assert after["objective"] > before["objective"] + 3.0
    # measured 0.929 (seeds 1, 2: 0.897, 0.874); the Monte Carlo error of 2048 samples is
    # ~0.01 of the gap; 0.75 leaves room for other platforms' rounding changing the run
    assert after["gap_closed"] > 0.75, after
    assert after["valid_fraction"] == 1.0 and 0 < after["kl"] < 2.0  # the optimum's KL is 1.56 (oracle)
    assert history["objective"][-1] > history["objective"][0] + 3.0


def test_task_id_and_errors():
    trainer = DiscretePolicyGradient("DiscreteGrid-v0", config=PolicyGradientConfig(iterations=1), steps=5)
    assert trainer.task.steps == 5 and trainer.times.shape == (6,)
    assert isinstance(dg.make_task("DiscreteGrid-v0"), type(trainer.task))
    with pytest.raises(TypeError, match="task: expected a DiscreteTask"):
        DiscretePolicyGradient("GMM1D-v0")
    with pytest.raises(TypeError, match="model: expected a PosteriorModel"):
        DiscretePolicyGradient(grid_task(size=8), model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model: expected the base's path"):
        DiscretePolicyGradient(grid_task(size=8), model=grid_task(size=4).model)
    with pytest.raises(ValueError, match="batch_size"):
        DiscretePolicyGradient(grid_task(size=8), config=PolicyGradientConfig(batch_size=10, group_size=4))

"""Reversal Q-Learning: flow reversal, f-free TD targets, the chain-discount ablation,
agreement with the engine, the Trainer contract (repeat, resume, evaluation), and small
learning runs (a two-step chain, GMM2D)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import gymnasium as gym
import pytest
import torch

import diffusiongym as dg
from diffusiongym.policies.agent import ControlAgent
from diffusiongym.tasks import make_task
from diffusiongym.trainers.base import EVALUATION_KEYS
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.flow_diffusion import diffusion_dataset, diffusion_policy, drift_agent, flow_kl_to_density
from diffusiongym.trainers.flow_policy import flow_matching_bc, FlowPolicy, reversal_error
from diffusiongym.trainers.offline_data import OfflineDataset, OfflineTask
from diffusiongym.trainers.rql import RQL, RQLConfig
from diffusiongym.trainers.rql_config import diffusion_recipe
from diffusiongym.utils.runtime import seeded


@pytest.fixture(scope="module")
def gmm2d():
    return make_task("GMM2D-v0")


def _linear_policy(flow_steps: int) -> FlowPolicy:
    """Policy with the exact linear field v(x, t) = -x + 0 (a base, zero residual)."""
    return FlowPolicy(2, 0, flow_steps, base=lambda x, t: -x, hidden=8, layers=1)


def _without_seconds(history: dict[str, list[float]]) -> str:
    """The history but its timings, as exact text (NaN, where the policy did not update, equals NaN)."""
    return json.dumps({k: v for k, v in history.items() if k != "seconds"}, sort_keys=True)


def _state(trainer: RQL) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.{k}": v.clone()
        for name, m in {**trainer.checkpoint_modules(), "target": trainer.value_target}.items()
        for k, v in m.state_dict().items()
    }
    out["generator"] = trainer.generator.get_state().clone()
    for name, opt in trainer.optimizers().items():
        for pid, state in opt.state_dict()["state"].items():
            out.update({f"opt.{name}.{pid}.{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ----------------------------------------------------------------- flow maths
def test_forward_euler_on_linear_field_is_exact_product():
    # v = -x: Euler gives x^F = (1 - h)^F x^0 exactly (up to float32 rounding).
    pol = _linear_policy(8)
    x0 = torch.randn(16, 2)
    with torch.no_grad():
        out = pol.sample(x0=x0)
    torch.testing.assert_close(out, (1 - 1 / 8) ** 8 * x0, rtol=1e-5, atol=1e-6)


def test_reversal_round_trip_errors(gmm2d):
    # Linear field: explicit backward Euler undoes (1 - h) with (1 + h), so the round trip is
    # ((1 - h)(1 + h))^F = (1 - h^2)^F: a first-order global error, checked exactly.
    pol = _linear_policy(10)
    x0 = torch.randn(32, 2)
    with torch.no_grad():
        back = pol.reverse(None, pol.sample(x0=x0))[0]
    torch.testing.assert_close(back, (1 - 0.01) ** 10 * x0, rtol=1e-5, atol=1e-6)
    # Fixed-point iterations contract by h Lip(v) per iteration: 3 iterations leave (h^3)-size steps.
    with torch.no_grad():
        back3 = pol.reverse(None, pol.sample(x0=x0), iters=3)[0]
    assert float((back3 - x0).abs().max()) < 1e-3 * float(x0.abs().max())
    # The GMM2D base flow (stiff near t = 1): the error shrinks with the refinements
    # (measured on 512 draws, F = 10: 1.46, 0.28, 0.12 for 0, 1, 3 iterations).
    base = diffusion_policy(gmm2d, flow_steps=10, hidden=8, layers=1)
    errs = [reversal_error(base, 256, iters=k) for k in (0, 1, 3)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.3


def test_diffusion_policy_starts_at_the_base_ode(gmm2d):
    # The zero-initialised residual makes the policy's F Euler steps the engine's ODE sampler on the same grid.
    pol = diffusion_policy(gmm2d, flow_steps=10, hidden=8, layers=1)
    x0 = pol.noise(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pol.sample(x0=x0)
    traj = dg.sample(gmm2d.environment.with_noise("ode"), x=x0, steps=10, t_start=gmm2d.t_start)
    torch.testing.assert_close(ours, traj.x1, rtol=1e-4, atol=1e-4)


def test_flow_log_density_matches_gaussian_pushforward():
    # Linear field: x^F = c x^0 with c = (1 - h)^F, so q = N(0, c^2 I) exactly.
    pol = _linear_policy(5)
    x, logq = pol.sample_with_log_prob(64, generator=torch.Generator().manual_seed(1))
    c = (1 - 0.2) ** 5
    expected = -0.5 * (x.double() / c).pow(2).sum(1) - 2 * math.log(c) - math.log(2 * math.pi)
    torch.testing.assert_close(logq, expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- RQL pieces
def _toy_dataset(n: int = 64, done: float = 0.0) -> OfflineDataset:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, 3, generator=g)
    return OfflineDataset(
        s,
        torch.randn(n, 2, generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, 3, generator=g),
        torch.full((n,), done),
    )


def test_td_target_is_f_free_and_ablation_discounts_the_chain():
    data = _toy_dataset()
    pol = FlowPolicy(2, 3, flow_steps=4, hidden=16, layers=1)
    batch = data.batch(32, torch.Generator().manual_seed(0))
    right = RQL(OfflineTask(data), model=pol, config=RQLConfig(gamma=0.9, seed=0))
    wrong = RQL(OfflineTask(data), model=pol, config=RQLConfig(gamma=0.9, seed=0, chain_discount=True))
    wrong.value_target.load_state_dict(right.value_target.state_dict())
    y_right, y_wrong = right.td_targets(batch), wrong.td_targets(batch)
    assert y_right.shape == (5, 32)
    torch.testing.assert_close(y_right, y_right[:1].expand(5, -1))  # every f: r + gamma V(s', x'^0, 0)
    powers = torch.tensor([0.9**4, 0.9**3, 0.9**2, 0.9, 1.0])[:, None]
    torch.testing.assert_close(y_wrong, powers * y_right[-1:])
    # Terminal transitions: the target is exactly r (no bootstrap), e.g. the one-step diffusion task.
    term = _toy_dataset(done=1.0).batch(32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(right.td_targets(term), term["r"].expand(5, -1))


def test_chain_discount_ablation_changes_learned_values():
    # Constant reward 1 on terminal transitions: the right V is 1 at every f; the ablation
    # learns gamma^(F - f), so V(., 0) ~ 0.5^3 = 0.125. 200 Adam steps fit both to < 0.1
    # (they are 0.875 apart, so the test fails if the switch does nothing). The policy never moves.
    n = 256
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, 1, generator=g)
    data = OfflineDataset(s, torch.randn(n, 1, generator=g), torch.ones(n), s, torch.ones(n))
    values = {}
    for chain in (False, True):
        pol = FlowPolicy(1, 1, flow_steps=3, hidden=16, layers=1)
        cfg = RQLConfig(
            gamma=0.5,
            chain_discount=chain,
            value_warmup=10_000,
            lr=1e-2,
            value_hidden=32,
            value_layers=1,
            batch_size=64,
            iterations=200,
            seed=0,
        )
        agent = RQL(OfflineTask(data), model=pol, config=cfg)
        agent.train(progress=False)
        assert "policy_loss" not in agent.history
        with torch.no_grad():
            x0 = pol.noise(256, torch.Generator().manual_seed(1))
            values[chain] = float(agent.value(torch.randn(256, 1), x0, 0).mean())
    assert abs(values[False] - 1.0) < 0.1
    assert abs(values[True] - 0.5**3) < 0.1


def test_bc_towards_the_current_reversal_is_only_an_integrator_error():
    # The paper's BC target, the current flow's own reversal step, differs from v(x^f) only by the
    # reversal's error: with converged fixed-point reversal (h Lip(v) = 0.1 here, 30 iterations ->
    # 1e-30 contraction) the term is ~0 however far the policy is from the data, while the
    # "initial" target (the frozen initial flow's reversal) measures that distance.
    g = torch.Generator().manual_seed(0)
    data = OfflineDataset(
        torch.zeros(64, 0), torch.randn(64, 2, generator=g), torch.zeros(64), torch.zeros(64, 0), torch.ones(64)
    )
    bcs = {}
    for mode in ("current", "initial"):
        policy = FlowPolicy(2, 0, 10, base=lambda x, t: -x, hidden=8, layers=1)
        agent = RQL(
            OfflineTask(data),
            model=policy,
            config=RQLConfig(
                bc_reversal=mode, reversal_iters=30, batch_size=64, value_hidden=8, value_layers=1, seed=0
            ),
        )
        with torch.no_grad():
            policy.net[-1].bias.fill_(1.0)  # the policy now drifts by +1 per unit time: 1 away from the data's flow
        bcs[mode] = agent.update(data.batch(64, torch.Generator().manual_seed(1)))["bc"]
    assert bcs["current"] < 1e-8
    assert abs(bcs["initial"] - 2.0) < 0.1  # |v - v_initial|^2 = |(1, 1)|^2 = 2 at the same x^f


def test_bc_weighting_is_the_memoryless_kl_rate(gmm2d):
    # linear path: eta(t) = (1 - t) / t, so 1 / sigma^2 = t / (2 (1 - t)) at each step's midpoint; the
    # weights are its power p, normalised to mean 1 (float32 rounding: rtol 1e-6)
    cfg = diffusion_recipe(iterations=1, dataset_size=64, seed=0)
    assert (cfg.bc_weighting, cfg.bc_weight_power) == ("memoryless", 2.0)
    for power in (2.0, 1.0):
        trainer = RQL(gmm2d, config=dataclasses.replace(cfg, bc_weight_power=power), steps=10)
        times = trainer.model.times.double()
        mid = 0.5 * (times[1:] + times[:-1])
        expected = (mid / (1 - mid)) ** power
        torch.testing.assert_close(trainer.bc_weights.double(), expected / expected.mean(), rtol=1e-6, atol=0)
        assert bool((trainer.bc_weights.diff() > 0).all())
    uniform = RQL(gmm2d, config=diffusion_recipe(bc_weighting="uniform", iterations=1, dataset_size=64), steps=10)
    assert torch.equal(uniform.bc_weights, torch.ones(10, dtype=uniform.bc_weights.dtype))
    with pytest.raises(ValueError, match="bc_weighting"):
        RQLConfig(bc_weighting="late")
    with pytest.raises(ValueError, match="bc_weight_power"):
        RQLConfig(bc_weight_power=-1.0)
    with pytest.raises(ValueError, match="bc_weighting: 'memoryless' needs a diffusion task"):
        RQL(OfflineTask(_toy_dataset()), model=FlowPolicy(2, 3, 3, hidden=8, layers=1), config=cfg)


def test_recipe_lands_near_the_exact_reward_kl_frontier():
    # The diffusion recipe (squared memoryless BC weights, F = 20) on GMM1D-v0, 400 iterations: the
    # reward gain reaches 0.894, 0.870, 0.915 of the exact frontier's gain at the flow's own terminal
    # KL (0.164, 0.151, 0.308; seeds 0, 1, 2); uniform weights (alpha 0.1) reach 0.48 (KL 0.05). The
    # 0.8 bar is the issue's; the KL range asserts the flow moved well past its Euler KL (~0.013).
    task = make_task("GMM1D-v0")
    cfg = diffusion_recipe(alpha=15.0, value_warmup=100, iterations=400, dataset_size=2048, seed=0)
    trainer = RQL(task, config=cfg, steps=20)
    trainer.train(progress=False)
    metrics = trainer.evaluate(8192, seed=1)
    base = float(task.oracle.frontier([0.0])[1][0])
    best = float(task.oracle.frontier_at_kl(metrics["kl"])[1][0])
    assert 0.08 < metrics["kl"] < 0.6
    assert (metrics["reward"] - base) / (best - base) > 0.8


def test_bad_inputs_raise(gmm2d):
    with pytest.raises(ValueError, match="bc_reversal"):
        RQLConfig(bc_reversal="data")
    with pytest.raises(ValueError, match="gamma"):
        RQLConfig(gamma=1.5)
    with pytest.raises(ValueError, match="tau"):
        RQLConfig(tau=0.0)
    with pytest.raises(ValueError, match="flow_samples"):
        RQLConfig(flow_samples=-1)
    with pytest.raises(ValueError, match="dataset_noise"):
        RQLConfig(dataset_noise="sde")
    data = _toy_dataset()
    pol = FlowPolicy(2, 3, 3, hidden=8, layers=1)
    with pytest.raises(TypeError, match="model"):
        RQL(OfflineTask(data), model=torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model: required"):
        RQL(OfflineTask(data))
    with pytest.raises(TypeError, match="dataset: an OfflineTask carries its own"):
        RQL(OfflineTask(data), model=pol, dataset=data)
    with pytest.raises(TypeError, match="dataset: expected an OfflineDataset"):
        RQL(gmm2d, dataset=data.states, steps=10)
    with pytest.raises(ValueError, match="dataset: expected states of dim 3"):
        RQL(
            OfflineTask(
                OfflineDataset(torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(4), torch.zeros(4, 1), torch.zeros(4))
            ),
            model=pol,
        )
    with pytest.raises(ValueError, match="dataset: expected states of dim 0"):
        RQL(gmm2d, dataset=data, steps=10)
    with pytest.raises(ValueError, match="model: expected an unconditional FlowPolicy on the task's grid"):
        RQL(
            gmm2d,
            model=diffusion_policy(gmm2d, flow_steps=5, hidden=8, layers=1),
            config=RQLConfig(dataset_size=8),
            steps=10,
        )
    with pytest.raises(ValueError, match="x: expected shape"):
        pol(torch.zeros(4, 3), torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match="s: expected shape"):
        pol(torch.zeros(4, 2), torch.zeros(4, 2), 0.5)
    with pytest.raises(ValueError, match="rewards"):
        OfflineDataset(torch.zeros(4, 1), torch.zeros(4, 2), torch.zeros(5), torch.zeros(4, 1), torch.zeros(4))
    nan_data = OfflineDataset(
        torch.zeros(8, 3), torch.zeros(8, 2), torch.full((8,), float("nan")), torch.zeros(8, 3), torch.ones(8)
    )
    with pytest.raises(FloatingPointError, match="value_loss"):
        RQL(OfflineTask(nan_data), model=pol, config=RQLConfig(batch_size=4, value_hidden=8, value_layers=1)).train(
            2, progress=False
        )
    offline = RQL(OfflineTask(data), model=pol)
    with pytest.raises(TypeError, match="evaluate: an offline task"):
        offline.evaluate(8)
    with pytest.raises(TypeError, match="sample: an offline task"):
        offline.sample(8)


# ------------------------------------------------------------ the contract
def _offline_trainer(seed: int = 3) -> RQL:
    cfg = RQLConfig(
        batch_size=32,
        value_hidden=16,
        value_layers=1,
        flow_samples=2,
        value_warmup=2,
        policy_delay=2,
        iterations=9,
        lr_schedule="cosine",
        seed=seed,
    )
    with seeded(0):
        policy = FlowPolicy(2, 3, 3, hidden=16, layers=1)
    return RQL(OfflineTask(_toy_dataset(128)), model=policy, config=cfg)


def _gmm_trainer(seed: int = 0, task: str = "GMM2D-v0") -> RQL:
    cfg = RQLConfig(
        batch_size=32,
        dataset_size=128,
        value_hidden=16,
        value_layers=1,
        policy_hidden=16,
        policy_layers=1,
        flow_samples=2,
        reversal_iters=1,
        iterations=6,
        seed=seed,
    )
    return RQL(task, config=cfg, steps=5)


@pytest.mark.parametrize("make", [_offline_trainer, _gmm_trainer], ids=["offline", "gmm2d"])
def test_repeat_and_resume_are_bit_identical(make, tmp_path):
    a = make()
    a.train(4, progress=False)
    a.save(tmp_path / "ckpt")
    torch.manual_seed(123)  # the global RNG plays no part
    b = make().load(tmp_path / "ckpt")
    assert b.iteration == 4
    a.train(progress=False)
    b.train(progress=False)
    _assert_same(_state(a), _state(b))
    assert _without_seconds(a.history) == _without_seconds(b.history)
    c = make()  # an uninterrupted run with the same seed
    c.train(progress=False)
    _assert_same(_state(a), _state(c))
    assert _without_seconds(a.history) == _without_seconds(c.history)
    assert a.iteration == a.config.iterations
    # the policy moved, the frozen initial flow did not
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), a.initial_model.parameters()))


def test_lr_schedules_span_each_networks_updates():
    # value_warmup 2, policy_delay 2, 9 iterations: the policy updates at 2, 4, 6, 8 (4 updates),
    # the value at every iteration; cosine to 0 over each network's own updates.
    trainer = _offline_trainer()
    assert trainer.policy_updates(9) == 4
    trainer.train(progress=False)
    assert all(math.isnan(v) for v in trainer.history["policy_loss"][:2])
    assert sum(not math.isnan(v) for v in trainer.history["policy_loss"]) == 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert trainer.value_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_load_refuses_other_data_or_config_and_restores_the_initial_flow(tmp_path):
    a = _offline_trainer()
    a.train(3, progress=False)
    folder = a.save(tmp_path / "ckpt")
    other_data = _toy_dataset(128, done=1.0)
    other = RQL(OfflineTask(other_data), model=FlowPolicy(2, 3, 3, hidden=16, layers=1), config=a.config)
    with pytest.raises(CheckpointError, match="extra: dataset"):
        other.load(folder)
    with pytest.raises(CheckpointError, match="config"):
        _offline_trainer(seed=4).load(folder)
    index = json.loads((folder / "trainer.json").read_text())
    index["task"]["flow_policy"]["hidden"] = 32
    (folder / "trainer.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="flow_policy"):
        _offline_trainer().load(folder)
    # a trainer built around another initial flow gets the checkpoint's (the BC reference) back
    index["task"]["flow_policy"]["hidden"] = 16
    (folder / "trainer.json").write_text(json.dumps(index))
    with seeded(99):
        fresh = RQL(OfflineTask(_toy_dataset(128)), model=FlowPolicy(2, 3, 3, hidden=16, layers=1), config=a.config)
    fresh.load(folder)
    for p, q in zip(fresh.initial_model.parameters(), a.initial_model.parameters()):
        assert torch.equal(p, q)


def test_evaluate_is_the_exact_terminal_kl(gmm2d):
    # At construction the policy is the base ODE (F = 10 Euler steps): its KL to the exact mixture is
    # the Euler discretisation's, small but positive (about 0.09 nats); evaluate must agree exactly with
    # flow_kl_to_density on the same draws, and objective = lambda reward - KL (all samples valid).
    trainer = RQL(
        gmm2d,
        config=RQLConfig(dataset_size=64, value_hidden=8, value_layers=1, policy_hidden=8, policy_layers=1),
        steps=10,
    )
    metrics = trainer.evaluate(num_samples=512, seed=4)
    assert tuple(metrics) == EVALUATION_KEYS and all(isinstance(v, float) for v in metrics.values())
    kl, x = flow_kl_to_density(trainer.model, gmm2d.mixture.log_prob, n=512, seed=4)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-12)
    assert 0.0 < metrics["kl"] < 0.3
    assert metrics["valid_fraction"] == 1.0
    assert metrics["reward"] == pytest.approx(float(gmm2d.reward(x)[0].double().mean()), rel=1e-6)
    assert metrics["objective"] == pytest.approx(gmm2d.reward_scale * metrics["reward"] - metrics["kl"], rel=1e-9)
    assert metrics["gap_closed"] == pytest.approx(gmm2d.oracle.gap_closed(metrics["objective"]), rel=1e-9)
    traj = trainer.sample(512, seed=4)
    torch.testing.assert_close(traj.x1, x)  # the same draws
    assert traj.kl is None  # a deterministic flow has no path KL


# -------------------------------------------------------- learning runs
def _chain_dataset(n: int, seed: int) -> OfflineDataset:
    """Two-step chain, Box actions in [-1, 1], uniform random behaviour (n episodes, 2n transitions).

    s0 = (0, 0) -> a0 -> s1 = (a0, 1), reward 0; s1 -> a1 -> end, reward -(a0 - 1/2)^2 - (a1 + 1/2)^2.
    Optimal return 0 (a0 = 1/2, a1 = -1/2); the behaviour's (and a perfect clone's) is
    -2 E[(a - 1/2)^2] = -2 (1/3 + 1/4) = -7/6. Step 0 is only learnable through gamma V(s1, x'^0, 0).
    """
    g = torch.Generator().manual_seed(seed)
    a0, a1 = 2 * torch.rand(n, 1, generator=g) - 1, 2 * torch.rand(n, 1, generator=g) - 1
    s0, s1 = torch.zeros(n, 2), torch.cat([a0, torch.ones(n, 1)], 1)
    r1 = -((a0[:, 0] - 0.5) ** 2) - (a1[:, 0] + 0.5) ** 2
    return OfflineDataset(
        torch.cat([s0, s1]),
        torch.cat([a0, a1]),
        torch.cat([torch.zeros(n), r1]),
        torch.cat([s1, s1]),
        torch.cat([torch.zeros(n), torch.ones(n)]),
    )


def _chain_return(policy: FlowPolicy, n: int = 2048) -> float:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        a0 = policy.sample(torch.zeros(n, 2), generator=g).clamp(-1, 1)
        a1 = policy.sample(torch.cat([a0, torch.ones(n, 1)], 1), generator=g).clamp(-1, 1)
    return float((-((a0[:, 0] - 0.5) ** 2) - (a1[:, 0] + 0.5) ** 2).mean())


@pytest.fixture(scope="module")
def chain_bc():
    """Uniform-behaviour chain data and its flow-matching clone (300 updates)."""
    data = _chain_dataset(256, 0)
    with seeded(0):
        policy = FlowPolicy(1, 2, 4, hidden=32, layers=2)
    flow_matching_bc(policy, data, 300, lr=3e-3, batch_size=64, seed=0)
    return data, policy


@pytest.mark.parametrize("bc_reversal", ["initial", "current"])
def test_rql_beats_behaviour_cloning_on_a_two_step_chain(chain_bc, bc_reversal):
    # Offline from uniform random actions, BC can at best reproduce the behaviour (-7/6); RQL
    # (BC flow + 300 iterations, gamma 0.9 across the real step) must move both steps towards the
    # optimum. Measured: BC -0.99 (the clone is a little narrower than uniform); RQL, seeds 0, 1, 2:
    # "initial" -0.17, -0.19, -0.28, "current" -0.35, -0.11, -0.37. Margins: RQL above BC by 0.4 and
    # above -0.6 (half the behaviour's regret); a no-op RQL (policy frozen) fails both.
    data, bc_policy = chain_bc
    policy = copy.deepcopy(bc_policy)
    bc_return = _chain_return(policy)
    assert abs(bc_return + 7 / 6) < 0.3  # the clone is close to the behaviour
    cfg = RQLConfig(
        gamma=0.9,
        alpha=0.05,
        bc_reversal=bc_reversal,
        batch_size=64,
        value_hidden=32,
        value_layers=2,
        lr=3e-3,
        value_warmup=100,
        tau=0.05,
        normalize_q=True,
        iterations=300,
        seed=0,
    )
    RQL(OfflineTask(data), model=policy, config=cfg).train(progress=False)
    rql_return = _chain_return(policy)
    assert rql_return > bc_return + 0.4
    assert rql_return > -0.6


@pytest.fixture(scope="module")
def trained_gmm2d(gmm2d):
    """RQL trained offline on 2048 base ODE samples of GMM2D-v0, 300 iterations (shared by two tests)."""
    # the benchmark rows' settings with a stronger BC weight, raw Q and a shorter run
    cfg = diffusion_recipe(
        alpha=0.3, bc_weighting="uniform", normalize_q=False, value_warmup=50, iterations=300, dataset_size=2048, seed=0
    )
    trainer = RQL(gmm2d, config=cfg, steps=10)
    trainer.train(progress=False)
    return trainer


def test_rql_gmm2d_raises_reward_within_base_support(gmm2d, trained_gmm2d):
    # The base data's mean reward is -4.53; the margin 0.3 is ~2 standard errors of a 1024-sample
    # mean (reward std ~4.5 -> s.e. 0.14), far below the measured gain (RQL -3.00, -3.01, -3.10 for
    # seeds 0, 1, 2). The base log-density of the samples must stay within 1 nat of the data's own
    # (-2.06): moving mass to the low-density rewarded mode costs 0.37-0.46 nats (seeds 0-2),
    # leaving the support > 10. Measured gap closed 0.40, 0.38, 0.37 (seeds 0-2; asserted > 0.2: the
    # evaluation's heavy-tailed terminal KL moves single 1024-sample estimates by about +-0.05).
    trainer = trained_gmm2d
    data = trainer.dataset
    x = trainer.act(n=1024, generator=torch.Generator().manual_seed(5))
    reward = float(gmm2d.reward(x)[0].mean())
    base_reward = float(data.rewards.mean()) / gmm2d.reward_scale
    assert reward > base_reward + 0.3
    logp, logp_data = gmm2d.mixture.log_prob(x.double()).mean(), gmm2d.mixture.log_prob(data.actions.double()).mean()
    assert float(logp) > float(logp_data) - 1.0
    assert trainer.evaluate(1024, seed=1)["gap_closed"] > 0.2


def test_trained_flow_acts_on_the_gym_env_in_drift_mode(trained_gmm2d):
    # noise="ode", action_mode="drift": the env's Euler step with drift = action_scale * a is the
    # policy's own Euler step, so from the same x0 the episode ends at the policy's sample
    # (float32 rounding of the division/multiplication by action_scale only: 1e-5).
    trainer = trained_gmm2d
    policy = trainer.model
    steps, n = policy.flow_steps, 64
    env = gym.make_vec(
        "diffusiongym/GMM2D-v0",
        num_envs=n,
        vectorization_mode="vector_entry_point",
        noise="ode",
        action_mode="drift",
        steps=steps,
    )
    x0 = policy.noise(n, torch.Generator().manual_seed(3))
    with torch.no_grad():
        own = policy.sample(x0=x0)
    for agent in (drift_agent(trainer.policy, env), ControlAgent(trainer.policy, env)):
        obs, _ = env.reset(seed=0, options={"x": x0.clone()})
        for k in range(steps):
            with torch.no_grad():
                obs, _, terminated, _, info = env.step(agent(obs))
            assert bool(terminated.all()) == (k == steps - 1)
        torch.testing.assert_close(info["final_x"], own, rtol=1e-5, atol=1e-5)
        assert not bool(torch.as_tensor(info["kl_defined"]).any())  # sigma = 0: no Girsanov KL
    with pytest.raises(ValueError, match="time grid"):
        drift_agent(
            policy,
            gym.make_vec(
                "diffusiongym/GMM2D-v0",
                num_envs=2,
                vectorization_mode="vector_entry_point",
                noise="ode",
                action_mode="drift",
                steps=steps + 1,
            ),
        )
    with pytest.raises(ValueError, match="action_mode"):
        drift_agent(
            policy,
            gym.make_vec(
                "diffusiongym/GMM2D-v0",
                num_envs=2,
                vectorization_mode="vector_entry_point",
                action_mode="control",
                steps=steps,
            ),
        )
    env.close()


def test_offline_task_and_diffusion_dataset(gmm2d):
    data = diffusion_dataset(gmm2d, 64, seed=1, steps=20)
    assert data.state_dim == 0 and data.action_dim == 2 and len(data) == 64
    assert bool((data.dones == 1).all())
    task = OfflineTask(data, name="GMM2D-offline")
    trainer = RQL(
        task,
        model=FlowPolicy(2, 0, 4, hidden=8, layers=1),
        config=RQLConfig(batch_size=16, value_hidden=8, value_layers=1, iterations=2),
    )
    trainer.train(progress=False)
    assert trainer.task_fingerprint()["name"] == "GMM2D-offline"
    assert trainer.act(n=5).shape == (5, 2)

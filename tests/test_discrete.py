"""Discrete flow matching: path, exact posterior, chain sampling, KL rate, oracle, adaptation, envs."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from diffusiongym.discrete import (
    DiscreteTiltOracle,
    ExactPosterior,
    MixturePath,
    TableReward,
    base_rates,
    controlled_step,
    draw_step,
    empirical_probs,
    make_kappa_scheduler,
    sample_chain,
    time_grid,
    total_variation,
)
from diffusiongym.discrete.env import DiscreteFlowEnv, DiscreteFlowVectorEnv
from diffusiongym.discrete.registry import DISCRETE_ENV_IDS, register_discrete_envs
from diffusiongym.discrete.simulator import DiscreteSimulator
from diffusiongym.discrete.tasks import DiscreteTask, grid_task
from diffusiongym.envs.registry import register_ids
from diffusiongym.tasks import BaseTask, Task, make_task
from diffusiongym.discrete.train import CrossEntropyConfig, train_posterior


def tiny(source: str = "mask", K: int = 3, D: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand((K,) * D, generator=g, dtype=torch.float64) + 0.05
    r = torch.randn((K,) * D, generator=g, dtype=torch.float64)
    path = MixturePath(K, D, source=source)
    return ExactPosterior(probs, path), DiscreteTiltOracle(probs, r, 1.5, path), TableReward(r)


@pytest.mark.parametrize(
    "name", ["linear", "cosine", {"name": "polynomial", "power": 2.0}], ids=["linear", "cosine", "poly"]
)
def test_kappa_endpoints_and_derivative(name):
    s = make_kappa_scheduler(name)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert float(s.kappa(torch.tensor(0.0))) == pytest.approx(0.0, abs=1e-12)
    assert float(s.kappa(torch.tensor(1.0))) == pytest.approx(1.0, abs=1e-12)
    fd = (s.kappa(t + 1e-6) - s.kappa(t - 1e-6)) / 2e-6  # central difference, error O(1e-12)
    torch.testing.assert_close(s.d_kappa(t), fd, atol=1e-6, rtol=0)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_exact_posterior_matches_bayes_by_hand(source):
    model, _, _ = tiny(source)
    path = model.path
    probs = model.log_probs.exp()
    t = 0.4
    L = path.likelihood(torch.tensor(t, dtype=torch.float64))  # (S, K)
    for x in [(0, 1), (path.num_states - 1, 2), (path.num_states - 1, path.num_states - 1)]:
        joint = probs * L[x[0]][:, None] * L[x[1]][None, :]
        joint = joint / joint.sum()
        logits = model(torch.tensor([x]), torch.tensor([t]))
        torch.testing.assert_close(logits.softmax(-1)[0, 0].double(), joint.sum(1), atol=1e-6, rtol=0)
        torch.testing.assert_close(logits.softmax(-1)[0, 1].double(), joint.sum(0), atol=1e-6, rtol=0)


def test_sample_xt_marginal():
    path = MixturePath(4, 1, source="uniform")
    x1 = torch.zeros(40000, 1, dtype=torch.long)
    xt = path.sample_xt(x1, torch.full((40000,), 0.3), generator=torch.Generator().manual_seed(0))
    # P(x_t = 0) = kappa + (1 - kappa) / K = 0.475; 5 sigma = 5 sqrt(p(1-p)/n) = 0.0125
    assert abs(float((xt == 0).double().mean()) - 0.475) < 0.0125


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_grid_sampling_reproduces_distribution(source):
    task = grid_task(source=source)
    n = 6000
    traj = sample_chain(task.model, n, 25, seed=0)
    assert traj.valid.all()
    tv = total_variation(empirical_probs(traj.x1, 32), task.oracle.probs)
    # reference: TV of an exact i.i.d. sample of the same size (pure sampling noise, ~0.07 here)
    idx = torch.multinomial(
        task.oracle.probs.flatten(), n, replacement=True, generator=torch.Generator().manual_seed(1)
    )
    ref = total_variation(torch.bincount(idx, minlength=1024).double().reshape(32, 32) / n, task.oracle.probs)
    # the factorised Euler step (coordinates jump independently within a step) adds a small bias
    assert tv < ref + 0.03, (tv, ref)


def test_kl_rate_matches_monte_carlo_path_kl():
    """Rate formula vs the exact log-likelihood ratio of the sampled discrete-time chain (tiny case)."""
    model, _, _ = tiny("uniform", K=3, D=2)
    path = model.path

    def control(x, t):  # an arbitrary smooth control
        return 0.8 * torch.sin(3 * t[:, None, None] + torch.arange(3.0)[None, None, :] - x[:, :, None].float())

    n, steps = 20000, 200
    grid = time_grid(steps, 0.0, 0.8)  # stop before t = 1 so every step is a small Euler step
    g = torch.Generator().manual_seed(0)
    x = path.sample_source(n, generator=g)
    rate_kl = torch.zeros(n, dtype=torch.float64)
    loglr = torch.zeros(n, dtype=torch.float64)
    for k in range(steps):
        t = grid[k].expand(n)
        h = (grid[k + 1] - grid[k]).expand(n)
        rates = base_rates(model, x, t, h, False)
        p_ctl, cost = controlled_step(rates, h, x, path.num_states, control(x, t.float()))
        p_base, _ = controlled_step(rates, h, x, path.num_states, None)
        y = draw_step(p_ctl, torch.rand(x.shape, generator=g, dtype=torch.float64))
        loglr += (p_ctl.gather(-1, y[..., None]).log() - p_base.gather(-1, y[..., None]).log()).sum((1, 2))
        rate_kl += cost
        x = y
    mc, se = float(loglr.mean()), float(loglr.std() / math.sqrt(n))
    # the two differ by O(h) (here ~1e-3 relative) plus the Monte-Carlo error: allow 4 standard errors + 2%
    assert abs(float(rate_kl.mean()) - mc) < 4 * se + 0.02 * mc, (float(rate_kl.mean()), mc, se)
    assert mc > 0.05  # the check is not vacuous


def test_oracle_formulas_tiny():
    model, oracle, reward = tiny("mask")
    p, r = oracle.probs, oracle.reward_table
    assert oracle.optimal_objective == pytest.approx(math.log(float((p * torch.exp(1.5 * r)).sum())), abs=1e-12)
    assert oracle.base_objective == pytest.approx(1.5 * float((p * r).sum()), abs=1e-12)
    # all-mask state: h = E_p[f] at any t; a revealed state: h = E[f | x1_i = b]
    x = torch.tensor([[3, 3], [1, 3]])
    v = oracle.value(x, 0.5)
    assert float(v[0]) == pytest.approx(-oracle.optimal_objective, abs=1e-10)
    cond = p[1] * torch.exp(1.5 * r[1])
    assert float(v[1]) == pytest.approx(-math.log(float(cond.sum() / p[1].sum())), abs=1e-10)
    # the optimal control's tilted rates are the posterior of p*: sum_b p_b e^{c_b} = 1 (mask source)
    c = oracle.control()(x, torch.full((2,), 0.5))
    post = model(x, torch.full((2,), 0.5)).softmax(-1)
    torch.testing.assert_close((post[0] * c[0].exp()).sum(-1), torch.ones(2), atol=1e-5, rtol=0)


def test_optimal_control_reaches_p_star_on_grid():
    task = grid_task()
    o = task.oracle
    traj = sample_chain(
        task.model, 6000, 20, control=o.control(), reward=task.reward, reward_scale=task.reward_scale, seed=0
    )
    gap = o.gap_closed(float(traj.objective.mean()))
    # objective sd ~ 2 -> standard error ~0.03 of a gap of 6.07: +-0.02 covers 4 se
    assert abs(gap - 1.0) < 0.02, gap
    tv = total_variation(empirical_probs(traj.x1, 32), o.target_probs)
    assert tv < 0.08, tv  # sampling noise alone gives ~0.05 at n = 6000 (p* is concentrated)


def test_train_posterior_learns_and_resumes(tmp_path):
    torch.manual_seed(0)
    target, _, _ = tiny("mask", K=3, D=2)
    data = torch.multinomial(
        target.log_probs.exp().flatten(), 4000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    data = torch.stack([data // 3, data % 3], 1)
    from diffusiongym.discrete import MLPPosterior

    model = MLPPosterior(target.path, hidden=32, layers=2)
    cfg = CrossEntropyConfig(steps=150, batch_size=128, lr=1e-2)
    train_posterior(model, data, cfg, checkpoint=tmp_path / "ck")
    cfg2 = CrossEntropyConfig(steps=300, batch_size=128, lr=1e-2)
    h2 = train_posterior(model, data, cfg2, checkpoint=tmp_path / "ck", resume=True)
    assert h2["step"][0] > 150  # continued, not restarted
    x = torch.tensor([[3, 3], [0, 3]])
    t = torch.full((2,), 0.5)
    err = (model(x, t).softmax(-1) - target(x, t).softmax(-1)).abs().max()
    assert err < 0.1, err  # 4000 samples: posterior marginals within ~0.03 sd; 0.1 catches a failure to learn


def test_errors():
    with pytest.raises(ValueError, match="source"):
        MixturePath(3, 2, source="masked")
    with pytest.raises(ValueError, match="scheduler"):
        make_kappa_scheduler("linaer")
    model, _, _ = tiny()
    with pytest.raises(ValueError, match="x0"):
        sample_chain(model, 2, 5, x0=torch.zeros(2, 3, dtype=torch.long))
    env = DiscreteFlowEnv(grid_task(), steps=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((2, 31)))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full((2, 32), np.nan))


def test_single_env_check_and_return_is_objective():
    register_discrete_envs()
    env = gym.make("diffusiongym/DiscreteGrid-v0", steps=5).unwrapped
    assert isinstance(env, DiscreteFlowEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    total, kl = 0.0, 0.0
    for k in range(5):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        total += r
        kl += info["kl"]
        assert term == (k == 4) and not trunc
    assert total == pytest.approx(2.0 * info["reward"] - kl, abs=1e-5)


def test_vector_env_next_step_autoreset_and_registry():
    ids = register_discrete_envs()
    assert "diffusiongym/DiscreteGrid-v0" in ids
    venv = gym.make_vec("diffusiongym/DiscreteGrid-v0", num_envs=3, vectorization_mode="vector_entry_point", steps=2)
    assert isinstance(venv.unwrapped, DiscreteFlowVectorEnv)
    assert venv.metadata["autoreset_mode"] is gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=0)
    assert obs["x"].shape == (3, 2) and bool((obs["x"] == 32).all())
    a = torch.zeros(3, 2, 32)
    _, r0, te0, _, info0 = venv.step(a)
    assert set(info0) == {"kl", "_kl"} and info0["_kl"].all()  # no NaN reward placeholder before the end
    obs, r1, te1, _, info = venv.step(a)
    assert not te0.any() and te1.all() and bool((obs["x"] < 32).all())
    assert (
        set(info) == {"kl", "_kl", "reward", "_reward", "valid", "_valid"}
        and info["_reward"].all()
        and info["valid"].all()
    )
    torch.testing.assert_close(r1.double(), 2.0 * info["reward"], atol=1e-5, rtol=0)  # zero action -> zero KL
    obs, r2, te2, _, info2 = venv.step(torch.full((3, 2, 32), 5.0))  # ignored: autoreset step
    assert not te2.any() and bool((r2 == 0).all()) and bool((obs["t"] == 0).all()) and bool((obs["x"] == 32).all())
    assert not info2["_kl"].any() and "reward" not in info2  # no env stepped
    # same seed, same trajectory
    o1, _ = venv.reset(seed=7)
    s1 = venv.step(torch.ones(3, 2, 32))[0]["x"]
    venv.reset(seed=7)
    s2 = venv.step(torch.ones(3, 2, 32))[0]["x"]
    assert torch.equal(s1, s2)
    single = gym.make("diffusiongym/DiscreteGrid-v0")
    assert single.observation_space["x"].nvec.tolist() == [33, 33]


def test_vector_env_takes_task_then_num_envs_like_the_continuous_one():
    venv = DiscreteFlowVectorEnv(grid_task(), 4, steps=3)
    assert venv.num_envs == 4 and venv.steps == 3
    assert isinstance(venv.sim, DiscreteSimulator) and venv.sim.num_envs == 4
    venv = DiscreteFlowVectorEnv("DiscreteGrid-v0", num_envs=2, source="uniform")
    assert venv.task.path.source == "uniform" and venv.observation_space["x"].shape == (2, 2)
    with pytest.raises(TypeError, match="num_envs: expected a positive integer"):
        DiscreteFlowVectorEnv(grid_task(), 2.0)


def test_single_and_vector_env_share_the_simulator():
    """One chain of the vector env and the single env run the same simulator: same seed, same episode."""
    single = DiscreteFlowEnv(grid_task(source="uniform"), steps=4)
    venv = DiscreteFlowVectorEnv(grid_task(source="uniform"), 1, steps=4)
    assert isinstance(single.sim, DiscreteSimulator) and single.sim.num_envs == 1
    obs_s, _ = single.reset(seed=11)
    obs_v, _ = venv.reset(seed=11)
    assert obs_s["x"].tolist() == obs_v["x"][0].tolist()
    a = np.random.default_rng(0).uniform(-1, 1, (4, 2, 32)).astype(np.float32)
    for k in range(4):
        obs_s, r_s, term_s, _, info_s = single.step(a[k])
        obs_v, r_v, term_v, _, info_v = venv.step(a[k][None])
        assert obs_s["x"].tolist() == obs_v["x"][0].tolist() and obs_s["t"][0] == float(obs_v["t"][0, 0])
        assert term_s == bool(term_v[0]) == (k == 3)
        assert r_s == pytest.approx(float(r_v[0]), rel=1e-6)  # the vector env returns float32 rewards
        assert info_s["kl"] == float(info_v["kl"][0])
    assert info_s["reward"] == float(info_v["reward"][0]) and info_s["valid"] == bool(info_v["valid"][0])


def test_simulator_steps_only_active_rows():
    sim = DiscreteSimulator(grid_task(), 3, steps=2)
    sim.seed(0)
    sim.reset()
    active = torch.tensor([True, False, True])
    obs, rewards, done, info = sim.step(torch.zeros(3, 2, 32, dtype=torch.float64), active)
    assert sim.k.tolist() == [1, 0, 1] and obs["t"][:, 0].tolist() == [0.5, 0.0, 0.5]
    assert info["_kl"].tolist() == active.tolist() and float(rewards[1]) == 0.0 and not done.any()
    obs, rewards, done, info = sim.step(torch.zeros(3, 2, 32, dtype=torch.float64), active)
    assert done.tolist() == active.tolist() and info["_reward"].tolist() == active.tolist()
    assert bool((obs["x"][active] < 32).all()) and bool(
        (obs["x"][1] == 32).all()
    )  # last step is exact; row 1 untouched
    with pytest.raises(RuntimeError, match="terminated"):
        sim.step(torch.zeros(3, 2, 32, dtype=torch.float64), active)
    sim.reset(torch.tensor([True, False, False]))
    assert sim.k.tolist() == [0, 0, 2]


def test_one_task_base_and_one_make_task():
    task = make_task("DiscreteGrid-v0", steps=7)
    assert isinstance(task, DiscreteTask) and isinstance(task, BaseTask) and task.steps == 7
    assert isinstance(make_task("diffusiongym/DiscreteGrid-v0"), DiscreteTask)
    assert isinstance(make_task("GMM1D-v0"), Task) and isinstance(make_task("GMM1D-v0"), BaseTask)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'"):
        make_task("DiscreteGrid-v0", stpes=3)
    with pytest.raises(ValueError, match="Did you mean 'DiscreteGrid-v0'"):
        make_task("DiscreteGrd-v0")
    # DiscreteTask checks the shared fields as Task does, and its model
    base = grid_task()
    with pytest.raises(ValueError, match="^steps: "):
        DiscreteTask("x", base.model, base.reward, 1.0, 0)
    with pytest.raises(ValueError, match="^action_scale: "):
        DiscreteTask("x", base.model, base.reward, 1.0, 5, -1.0)
    with pytest.raises(TypeError, match="^reward: "):
        DiscreteTask("x", base.model, lambda x: x, 1.0)
    with pytest.raises(TypeError, match="^model: "):
        DiscreteTask("x", object(), base.reward)
    task = DiscreteTask("x", base.model, base.reward, np.float64(2.0), np.int64(5))
    assert type(task.reward_scale) is float and type(task.steps) is int


def test_register_ids_is_the_one_registration_helper():
    assert register_discrete_envs() == list(DISCRETE_ENV_IDS)
    spec = gym.spec("diffusiongym/DiscreteGrid-v0")
    assert spec.entry_point == "diffusiongym.discrete.env:DiscreteFlowEnv" and spec.kwargs == {
        "task": "DiscreteGrid-v0"
    }
    assert gym.spec("diffusiongym/GMM2D-v0").vector_entry_point == "diffusiongym.envs.vector_env:DiffusionVectorEnv"
    env_id = "diffusiongym-test/DiscreteGridCopy-v0"
    try:
        assert register_ids(
            {env_id: "DiscreteGrid-v0"},
            "diffusiongym.discrete.env:DiscreteFlowEnv",
            "diffusiongym.discrete.env:DiscreteFlowVectorEnv",
        ) == [env_id]
        venv = gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", steps=2)
        assert isinstance(venv.unwrapped, DiscreteFlowVectorEnv) and venv.unwrapped.steps == 2
        register_ids({env_id: "DiscreteDigits-v0"}, "a:B", "a:C")  # already registered: left as it is
        assert gym.spec(env_id).kwargs == {"task": "DiscreteGrid-v0"}
    finally:
        gym.registry.pop(env_id, None)

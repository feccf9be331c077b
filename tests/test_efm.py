"""Energy-weighted flow matching: targets, weights, ESS guard, the Trainer contract (repeat,
resume, errors) and the closed-form optimum."""

from __future__ import annotations

import json
import math

import pytest
import torch

import diffusiongym as dg
from diffusiongym.models.gmm import TrainableGaussianMixtureModel
from diffusiongym.parameterization import convert
from diffusiongym.policies.control import ModelControl
from diffusiongym.policies.networks import ResidualModel, TimeMLP, TimeWindow
from diffusiongym.schedulers import make_scheduler
from diffusiongym.tasks import make_task
from diffusiongym.trainers.base import EVALUATION_KEYS, trajectory_metrics
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.efm import (
    EFMConfig,
    EFMTrainer,
    efm_weights,
    flow_matching_target,
    weighted_flow_matching_loss,
)

CASES = [(p, s) for p in ("velocity", "epsilon", "endpoint", "score") for s in ("linear", "cosine", "vp")]


@pytest.mark.parametrize("parameterization,scheduler", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_conditional_target_encodes_x1_and_x0(parameterization, scheduler):
    # The conditional target is the model output of the point mass at (x1, x0): converting it
    # at x_t back to endpoint / epsilon must return x1 / x0 exactly.
    sched = make_scheduler(scheduler)
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(32, generator=g, dtype=torch.float64)
    x_t, target = flow_matching_target(parameterization, sched, x1, x0, t)
    torch.testing.assert_close(convert(target, x_t, t, sched, parameterization, "endpoint"), x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(convert(target, x_t, t, sched, parameterization, "epsilon"), x0, rtol=1e-9, atol=1e-9)


def test_exact_model_has_zero_loss_gradient_in_expectation():
    # The exact GMM velocity is the minimiser of the unweighted FM loss: the gradient w.r.t. an
    # additive constant c (model + c) at c = 0 is 2 E[v_exact - target] = 0. With 2e5 draws the
    # Monte Carlo std of each component is about 2 * 1.3 / sqrt(2e5) ~ 0.006; 0.03 is 5 sigma.
    task = make_task("GMM2D-v0")
    base = task.environment.model
    c = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    model = lambda x, t: base(x, t) + c
    x1 = task.oracle.mixture.sample(200_000, generator=torch.Generator().manual_seed(1))
    loss = weighted_flow_matching_loss(
        model,
        "velocity",
        task.environment.scheduler,
        x1,
        t_range=(0.01, 0.99),
        generator=torch.Generator().manual_seed(2),
    )
    (grad,) = torch.autograd.grad(loss, c)
    assert grad.abs().max() < 0.03 * 2 / 2  # loss is a mean over the 2 dimensions: gradient halved
    # while a shifted model is not a minimiser
    model2 = lambda x, t: base(x, t) + c + 0.2
    loss2 = weighted_flow_matching_loss(
        model2,
        "velocity",
        task.environment.scheduler,
        x1,
        t_range=(0.01, 0.99),
        generator=torch.Generator().manual_seed(2),
    )
    (grad2,) = torch.autograd.grad(loss2, c)
    torch.testing.assert_close(grad2, torch.full_like(grad2, 0.2), atol=0.03, rtol=0)


def test_weights_and_ess():
    r = torch.tensor([0.0, 1.0, 2.0, float("nan")])
    g, ess = efm_weights(2.0 * r)
    expected = torch.softmax(torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64), 0)
    torch.testing.assert_close(g[:3], expected)
    assert g[3] == 0
    assert ess == pytest.approx(float(1 / (expected**2).sum()))
    g, ess = efm_weights(torch.zeros(10), valid=torch.tensor([True] * 5 + [False] * 5))
    assert ess == pytest.approx(5.0) and float(g[5:].sum()) == 0
    with pytest.raises(ValueError, match="log_weights"):
        efm_weights(torch.full((3,), float("nan")))


def _model(task, hidden=32, seed=None):
    d = task.sample_shape[0]
    if seed is not None:
        torch.manual_seed(seed)
    return ResidualModel(task.environment.model, TimeMLP(d, d, hidden=hidden, layers=3, zero_init=True))


def _two_sample_threshold(task, n=2000, draws=10):
    """2 x the largest energy distance between two independent exact p* samples of size ``n``.

    The max of 10 null draws sits near the null's 90-95th percentile (measured at n = 2000 over
    20 draws: GMM1D median 5e-4, max 2.2e-3; GMM2D median 1.1e-3, max 5.3e-3). The factor 2
    leaves room for the Euler error of the 100-step chain, which even the exact optimal control
    shows (its distance to p* reached 1.5e-3 / 3.1e-3), while a mode-mass error of 0.08 (ED 0.02)
    or the base (ED 1.8 in 1-D) fails it by an order of magnitude or more.
    """

    def ps(seed):
        return task.oracle.target.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)

    return 2 * max(dg.energy_distance(ps(1000 + s), ps(2000 + s)) for s in range(draws))


def test_offline_efm_gmm1d_matches_p_star():
    task = make_task("GMM1D-v0")
    torch.manual_seed(0)
    model = _model(task, hidden=64)
    config = EFMConfig(mode="offline", samples_per_round=16384, iterations=1200, batch_size=256, lr=1e-2, seed=0)
    trainer = EFMTrainer(task, model=model, config=config)
    history = trainer.train(progress=False)
    assert history["ess_fraction"][0] > 0.2  # exp(r) on base samples: ESS ~ 29% of n (measured)
    assert len(history["loss"]) == 1200 and trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    traj = trainer.sample(4000, seed=11)
    metrics = trajectory_metrics(traj, task)
    # the Monte Carlo std of the mean objective on 4000 samples is ~0.02, i.e. ~2% of the gap (1.09)
    assert metrics["gap_closed"] > 0.9, metrics
    # mass of the right mode: p* puts 0.83 there (closed form), the base 0.2; the MC std of the
    # fraction on 4000 samples is 0.006, so 0.03 is 5 sigma
    right = float((traj.x1[:, 0] > 0.25).float().mean())
    target = task.oracle.target
    p_right = float(target.weights[target.means[:, 0] > 0.25].sum())
    assert abs(right - p_right) < 0.03, (right, p_right)
    # two-sample test against exact p* draws (measured: ED ~8e-4, threshold ~3-4e-3)
    ps = task.oracle.target.sample(2000, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    ed, threshold = dg.energy_distance(traj.x1[:2000], ps), _two_sample_threshold(task)
    assert ed < threshold, (ed, threshold)


@pytest.mark.slow
def test_online_importance_efm_gmm2d_matches_p_star():
    task = make_task("GMM2D-v0")
    torch.manual_seed(0)
    model = _model(task, hidden=64)
    config = EFMConfig(mode="online", rounds=2, samples_per_round=8192, iterations=800, batch_size=256, lr=1e-2, seed=0)
    trainer = EFMTrainer(task, model=model, config=config)
    history = trainer.train(progress=False)
    # importance weights lambda r + log dP_base/dP_model flatten as the model approaches p*
    assert history["ess_fraction"][400] > 2 * history["ess_fraction"][0]
    assert history["kl"][0] == 0.0 and history["kl"][400] > 1.0  # round 0 samples the base
    metrics = trainer.evaluate(4000, seed=11)
    assert metrics["gap_closed"] > 0.9, metrics  # MC std of the objective mean ~0.05 = <1% of the gap (6.07)
    traj = trainer.sample(2000, seed=11)
    ps = task.oracle.target.sample(2000, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    ed, threshold = dg.energy_distance(traj.x1, ps), _two_sample_threshold(task)
    assert ed < threshold, (ed, threshold)  # measured: ED ~2e-3, threshold ~6-10e-3


def test_ess_collapse_warns():
    task = make_task("GMM1D-v0")
    x1 = torch.linspace(-2, 2, 100)[:, None]
    r = torch.full((100,), -10.0)
    r[0] = 0.0  # one sample carries weight 1 / (1 + 99 e^-10): ESS ~ 1.01
    trainer = EFMTrainer(task, model=_model(task), config=EFMConfig(iterations=1, batch_size=8), data=(x1, r))
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        trainer.train(progress=False)
    assert trainer.history["ess"][0] == pytest.approx(1.0, abs=0.02)


def _small(seed=3, **kw):
    opts = {"mode": "online", "rounds": 2, "samples_per_round": 128, "iterations": 10, "batch_size": 32, "seed": seed}
    return EFMConfig(**{**opts, **kw})


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def _same_history(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if key != "seconds":
            torch.testing.assert_close(
                torch.tensor(a[key], dtype=torch.float64),
                torch.tensor(b[key], dtype=torch.float64),
                rtol=0,
                atol=0,
                equal_nan=True,
            )


@pytest.mark.parametrize("mode,stop", [("online", 7), ("online", 5), ("offline", 4)])
def test_repeat_and_resume_are_bit_identical(tmp_path, mode, stop):
    # online: stop mid-round 1 (its samples come from the checkpoint) or at the round boundary;
    # offline: the base data set is redrawn from the seed on resume
    task = make_task("GMM1D-v0", steps=10)
    cfg = _small(mode=mode, rounds=2 if mode == "online" else 1)
    straight = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg)
    straight.train(progress=False)
    again = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg)
    again.train(progress=False)
    for a, b in zip(_params(straight), _params(again)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _same_history(straight.history, again.history)

    first = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg)
    first.train(stop, progress=False)
    first.save(tmp_path / "ckpt")
    # a differently initialised model: everything must come from the checkpoint
    resumed = EFMTrainer(task, model=_model(task, hidden=8, seed=1), config=cfg).load(tmp_path / "ckpt")
    assert resumed.iteration == stop and len(resumed.history["loss"]) == stop
    resumed.train(progress=False)
    for a, b in zip(_params(straight), _params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _same_history(straight.history, resumed.history)


def test_corrupt_round_data_is_refused(tmp_path):
    task = make_task("GMM1D-v0", steps=10)
    trainer = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=_small())
    trainer.train(7, progress=False)  # mid-round 1: the round's samples are saved
    folder = trainer.save(tmp_path / "ckpt")
    index = json.loads((folder / "trainer.json").read_text())
    assert index["extra"]["round"]["index"] == 1
    target = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=_small())
    for field, value in (("index", -1), ("stats", {"ess": 1.0})):
        bad = json.loads(json.dumps(index))
        bad["extra"]["round"][field] = value
        (folder / "trainer.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"extra.round.{field}"):
            target.load(folder)
    assert target.iteration == 0 and target._round is None


def test_offline_given_data_resume_and_digest(tmp_path):
    task = make_task("GMM1D-v0", steps=10)
    x1 = task.oracle.mixture.sample(256, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    r, _ = task.reward(x1)
    cfg = EFMConfig(iterations=6, batch_size=16, seed=1)
    straight = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg, data=(x1, r))
    straight.train(progress=False)
    assert math.isnan(straight.history["kl"][0])  # unknown for given data
    first = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg, data=(x1, r))
    first.train(2, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg, data=(x1, r)).load(tmp_path / "ckpt")
    resumed.train(progress=False)
    for a, b in zip(_params(straight), _params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # other data (or none) is refused, and the live trainer is untouched
    other = EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg, data=(x1 + 1, r))
    before = _params(other)
    with pytest.raises(CheckpointError, match="data_digest"):
        other.load(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="data_digest"):
        EFMTrainer(task, model=_model(task, hidden=8, seed=0), config=cfg).load(tmp_path / "ckpt")
    assert other.iteration == 0 and all(torch.equal(a, b) for a, b in zip(before, _params(other)))


def test_default_model_policy_and_evaluate():
    task = make_task("GMM1D-v0", steps=10)
    trainer = EFMTrainer(task, config=_small())
    assert isinstance(trainer.model, TrainableGaussianMixtureModel)  # the base's trainable_copy()
    assert isinstance(trainer.policy, ModelControl)
    x, t = torch.randn(5, 1), torch.full((5,), 0.5)
    torch.testing.assert_close(trainer.policy(x, t), torch.zeros(5, 1), rtol=0, atol=1e-6)  # starts at the base
    metrics = trainer.evaluate(256, seed=0)
    assert sorted(metrics) == sorted(EVALUATION_KEYS)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    trainer.train(progress=False)
    assert trainer.history["lr"][0] == pytest.approx(trainer.config.lr)


def test_default_residual_model_is_seeded_and_starts_at_the_base():
    # a base without trainable_copy(): ResidualModel(base, zero-initialised TimeMLP), whose
    # initialisation comes from config.seed alone (not the caller's global RNG)
    task = make_task("GMM2D-v0", steps=10)
    task.environment.model.trainable_copy = None
    a = EFMTrainer(task, config=_small(seed=4))
    torch.manual_seed(99)
    b = EFMTrainer(task, config=_small(seed=4))
    assert isinstance(a.model, ResidualModel) and isinstance(a.model.net, TimeMLP)
    for x, y in zip(_params(a), _params(b)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not all(torch.equal(x, y) for x, y in zip(_params(a), _params(EFMTrainer(task, config=_small(seed=5)))))
    x, t = torch.randn(5, 2), torch.full((5,), 0.3)
    torch.testing.assert_close(a.policy(x, t), torch.zeros(5, 2), rtol=0, atol=0)


def test_config_and_argument_errors():
    task = make_task("GMM1D-v0")
    with pytest.raises(ValueError, match="mode"):
        EFMConfig(mode="onlin")
    with pytest.raises(ValueError, match="rounds"):
        EFMConfig(mode="offline", rounds=3)
    with pytest.raises(ValueError, match="batch_size"):
        EFMConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        EFMConfig(lr_schedule="cosin")
    with pytest.raises(ValueError, match="iterations"):
        EFMConfig(mode="online", rounds=3, iterations=10)
    with pytest.raises(ValueError, match="inverse_temperature"):
        EFMConfig(mode="online", rounds=2, inverse_temperature=1.0)
    with pytest.raises(ValueError, match="t_min"):
        EFMConfig(t_min=1.0)
    with pytest.raises(TypeError, match="model"):
        EFMTrainer(task, model=task.environment.model.forward)
    with pytest.raises(TypeError, match="reward"):
        EFMTrainer(task, lambda x: x)
    with pytest.raises(ValueError, match="sigma > 0"):
        EFMTrainer(make_task("GMM1D-v0", noise="ode"), model=_model(task))
    with pytest.raises(ValueError, match="mode='offline'"):
        EFMTrainer(task, config=_small(), data=(torch.zeros(4, 1), torch.zeros(4)))
    with pytest.raises(ValueError, match="x1"):
        EFMTrainer(task, data=(torch.zeros(4, 2), torch.zeros(4)))
    with pytest.raises(ValueError, match="rewards"):
        EFMTrainer(task, data=(torch.zeros(4, 1), torch.zeros(3)))


def test_time_window_switches_the_control_off_from_t_stop():
    # ResidualModel(base, TimeWindow(net, t_stop)) is the base from t_stop on: the control and
    # its KL are exactly zero on those steps, and untouched before.
    task = make_task("GMM1D-v0")
    base = task.environment.model
    net = TimeMLP(1, 1, hidden=16, layers=2, zero_init=False)
    window = TimeWindow(net, 0.5)
    x = torch.randn(6, 1, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.3, 0.49, 0.5, 0.7, 1.0])
    out = window(x, t)
    assert torch.equal(out[:3], net(x, t)[:3]) and out[:3].abs().min() > 0
    assert torch.equal(out[3:], torch.zeros(3, 1))
    control = ModelControl(ResidualModel(base, window), task.environment)
    traj = dg.sample(task.environment, 64, steps=10, t_start=0.01, control=control, seed=0)
    late = traj.times[:-1] >= 0.5
    assert late.any() and (~late).any()
    assert torch.equal(traj.running_cost[late], torch.zeros_like(traj.running_cost[late]))
    assert traj.running_cost[~late].sum(1).min() > 0
    # a batch past t_stop (a sampling step) runs the net on one row only: zeros of its output's
    # shape, conditioning rows sliced alike, and a graph that gives zero gradients
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 3)

        def forward(self, x, t, label):
            seen.append((x.shape[0], label.shape[0]))
            return self.lin(x) + label[:, None]

    rec = TimeWindow(Recorder(), 0.5)
    late_out = rec(x, torch.full((6,), 0.8), label=torch.arange(6.0))
    assert seen == [(1, 1)] and torch.equal(late_out, torch.zeros(6, 3))
    late_out.sum().backward()
    assert torch.equal(rec.net.lin.weight.grad, torch.zeros(3, 1))
    rec(x, torch.full((6,), 0.2), label=torch.arange(6.0))
    assert seen[-1] == (6, 6)
    with pytest.raises(ValueError, match="t_stop"):
        TimeWindow(net, 0.0)
    with pytest.raises(ValueError, match="t_stop"):
        TimeWindow(net, 1.5)
    with pytest.raises(TypeError, match="net"):
        TimeWindow(lambda x, t: x, 0.5)

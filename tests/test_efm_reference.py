"""EFM's reference fit and control scale: DeltaModel, the pair of fits being exactly two standalone
runs, the scale's line search and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from diffusiongym.policies.control import ModelControl
from diffusiongym.policies.delta import DeltaModel
from diffusiongym.policies.networks import ResidualModel, TimeMLP
from diffusiongym.tasks import make_task
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.utils.runtime import seeded


def _model(task, seed):
    with seeded(seed):
        return ResidualModel(task.environment.model, TimeMLP(1, 1, hidden=16, layers=2, zero_init=True))


def _config(**kw):
    opts = {"mode": "offline", "samples_per_round": 256, "iterations": 12, "batch_size": 32, "lr": 1e-2, "seed": 3}
    return EFMConfig(**{**opts, **kw})


def _same(m1, m2):
    return all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_delta_model_is_base_plus_scaled_difference():
    task = make_task("GMM1D-v0")
    base = task.environment.model
    m, r = _model(task, 0), _model(task, 1)
    for net in (m.net, r.net):  # non-zero nets
        torch.nn.init.normal_(net.head.weight, generator=torch.Generator().manual_seed(2))
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.05, 0.95, 8)
    with torch.no_grad():
        want = base(x, t) + 1.7 * (m(x, t) - r(x, t))
        fast = DeltaModel(base, m, r, 1.7)(x, t)  # both ResidualModels on base: nets differenced
        general = DeltaModel(base, m, _Wrapped(r), 1.7)  # not a ResidualModel: the general path
        torch.testing.assert_close(fast, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(general(x, t), want, rtol=1e-6, atol=1e-6)
        # no reference: the base; scale 1 reproduces the model
        torch.testing.assert_close(DeltaModel(base, m)(x, t), m(x, t), rtol=1e-6, atol=1e-6)
    # the control is scale times the model's control against the reference
    u = ModelControl(DeltaModel(base, m, None, 2.5), task.environment)(x, t)
    torch.testing.assert_close(u, 2.5 * ModelControl(m, task.environment)(x, t), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="model"):
        DeltaModel(base, lambda x, t: x)
    with pytest.raises(TypeError, match="reference"):
        DeltaModel(base, m, reference=3)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            DeltaModel(base, m, scale=bad)


class _Wrapped(torch.nn.Module):
    """A model that is not a ResidualModel (takes DeltaModel's general path)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, **cond):
        return self.inner(x, t, **cond)


def test_reference_pair_is_exactly_two_standalone_fits():
    # EFMConfig(reference=True) trains the weighted model and a uniform-weight copy on the same
    # samples; each is bit for bit the standalone run (inverse temperature lambda and 0)
    task = make_task("GMM1D-v0", steps=10)
    pair = EFMTrainer(task, model=_model(task, 0), config=_config(reference=True))
    pair.train(progress=False)
    weighted = EFMTrainer(task, model=_model(task, 0), config=_config())
    weighted.train(progress=False)
    uniform = EFMTrainer(task, model=_model(task, 0), config=_config(inverse_temperature=0.0))
    uniform.train(progress=False)
    assert _same(pair.model, weighted.model) and _same(pair.reference.model, uniform.model)
    assert not _same(pair.model, pair.reference.model)
    assert len(pair.history["reference_loss"]) == 12
    # the reference shares the frozen base and the environment
    assert pair.reference.model.base is task.environment.model
    # its policy is base + (model - reference)
    x, t = torch.randn(5, 1, generator=torch.Generator().manual_seed(4)), torch.full((5,), 0.4)
    with torch.no_grad():
        want = ModelControl(weighted.model, task.environment)(x, t) - ModelControl(uniform.model, task.environment)(
            x, t
        )
        torch.testing.assert_close(pair.policy(x, t), want, rtol=1e-5, atol=1e-5)


def test_select_control_scale_takes_the_best_sampled_objective():
    task = make_task("GMM1D-v0", steps=10)
    trainer = EFMTrainer(task, model=_model(task, 0), config=_config())
    trainer.train(progress=False)
    assert trainer.control_scale == 1.0 and trainer.delta is None
    table = trainer.select_control_scale([0.0, 1.0, 2.0], 512, seed=9)
    assert sorted(table) == [0.0, 1.0, 2.0]
    best = max(table, key=table.get)
    assert trainer.control_scale == best
    # scale 0 is the base: no control, so its objective is lambda E_base[r] with KL exactly 0
    trainer.delta.scale = 0.0
    base_traj = trainer.sample(512, 9)
    assert float(base_traj.kl.abs().max()) == 0.0
    torch.testing.assert_close(
        torch.tensor(table[0.0]), (base_traj.reward * task.reward_scale).mean(), rtol=1e-6, atol=1e-6
    )
    for bad in ([], "12", [1.0, float("nan")]):
        with pytest.raises(ValueError, match="scales"):
            trainer.select_control_scale(bad, 16, seed=0)


def test_reference_and_scale_survive_a_checkpoint(tmp_path):
    task = make_task("GMM1D-v0", steps=10)
    straight = EFMTrainer(task, model=_model(task, 0), config=_config(reference=True))
    straight.train(progress=False)
    first = EFMTrainer(task, model=_model(task, 0), config=_config(reference=True))
    first.train(5, progress=False)
    first.delta.scale = 1.25
    first.save(tmp_path / "ckpt")
    resumed = EFMTrainer(task, model=_model(task, 1), config=_config(reference=True)).load(tmp_path / "ckpt")
    assert resumed.control_scale == 1.25 and resumed.iteration == 5
    resumed.train(progress=False)
    assert _same(resumed.model, straight.model) and _same(resumed.reference.model, straight.reference.model)
    # a checkpoint with a reference does not load into a trainer without one
    with pytest.raises(CheckpointError, match="reference"):
        EFMTrainer(task, model=_model(task, 0), config=_config()).load(tmp_path / "ckpt")


def test_reference_needs_offline_mode():
    with pytest.raises(ValueError, match="reference"):
        EFMConfig(mode="online", reference=True)

"""The Trainer contract, checked on every adaptation method (docs/adding_a_method.md).

Each entry of ``TRAINERS`` builds a small trainer of one method with a given seed. For each:
bit-identical resume, history and callback, evaluation keys, atomic save (a failed save leaves
the previous checkpoint intact), staged load (a failed load leaves the trainer intact), and
refusal of another method's or another task's checkpoint. Determinism across fresh processes
is checked by running each trainer twice in subprocesses (with different global RNG states) and
comparing parameter digests and histories.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusiongym.trainers.base import EVALUATION_KEYS, Trainer
from diffusiongym.discrete.tasks import grid_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.checkpoint import CheckpointError
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig
from diffusiongym.trainers.policy_gradient_discrete import DiscretePolicyGradient
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer
from diffusiongym.trainers.rql import RQL, RQLConfig
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig
from diffusiongym.td_flows import LinearGaussianMDP, TDFlow, TDFlowConfig, TerminalFlow, TerminalFlowConfig
from diffusiongym.trainers.offline_data import OfflineTask

ROOT = Path(__file__).resolve().parent.parent


def _example():
    """The worked example of docs/adding_a_method.md (a script, not part of the package)."""
    name = "reward_weighted_regression_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "reward_weighted_regression.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_rwr(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    rwr = _example()
    return rwr.RewardWeightedRegression(
        task, config=rwr.RWRConfig(iterations=6, batch_size=64, updates_per_iteration=2, seed=seed), steps=steps
    )


def make_value_matching(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = ValueMatchingConfig(
        iterations=6, batch_size=32, updates_per_iteration=2, minibatch_size=64, replay=1, seed=seed
    )
    return ValueMatching(task, config=config, steps=steps)


def make_efm(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = EFMConfig(mode="online", rounds=2, iterations=6, samples_per_round=64, batch_size=32, seed=seed)
    return EFMTrainer(task, config=config, steps=steps)


def make_reward_weighted_discrete(seed: int = 0) -> Trainer:
    config = RewardWeightedConfig(iterations=6, num_samples=200, batch_size=32, seed=seed)
    return RewardWeightedTrainer(grid_task(size=8, steps=10), config=config)


def make_adjoint_matching(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = AdjointMatchingConfig(
        iterations=6,
        batch_size=64,
        residual="control",
        hidden=16,
        layers=1,
        restarts=0.5,
        likelihood_ratio=0.1,
        lr_schedule="cosine",
        seed=seed,
    )
    return AdjointMatching(task, config=config, steps=steps)


def make_policy_gradient(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = PolicyGradientConfig(
        iterations=6, batch_size=16, group_size=8, num_minibatches=2, hidden=16, layers=2, seed=seed
    )
    return PolicyGradient(task, config=config, steps=steps)


def make_policy_gradient_discrete(seed: int = 0) -> Trainer:
    config = PolicyGradientConfig(
        iterations=6, batch_size=16, group_size=8, num_minibatches=2, hidden=16, layers=2, seed=seed
    )
    return DiscretePolicyGradient(grid_task(size=8, steps=10), config=config)


def make_rql(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = RQLConfig(
        iterations=6,
        batch_size=64,
        dataset_size=256,
        dataset_steps=20,
        value_hidden=16,
        value_layers=1,
        policy_hidden=16,
        policy_layers=1,
        flow_samples=2,
        seed=seed,
    )
    return RQL(task, config=config, steps=steps)


def make_terminal_flow(seed: int = 0, task: str = "GMM1D-v0", steps: int = 10) -> Trainer:
    config = TerminalFlowConfig(iterations=6, batch_size=64, num_trajectories=64, hidden=16, layers=1, seed=seed)
    return TerminalFlow(task, config=config, steps=steps)


def make_td_flow(seed: int = 0) -> Trainer:
    mdp = LinearGaussianMDP.default()
    data = mdp.dataset(512, generator=torch.Generator().manual_seed(0))
    config = TDFlowConfig(iterations=6, batch_size=32, hidden=16, layers=1, flow_steps=2, seed=seed)
    return TDFlow(OfflineTask(data), config=config, pi=mdp.policy)


# trainers that evaluate a policy rather than adapt one: no objective to report
POLICY_EVALUATION = {"td_flow"}

TRAINERS: dict[str, Callable[..., Trainer]] = {
    "td_flow": make_td_flow,
    "terminal_flow": make_terminal_flow,
    "rql": make_rql,
    "policy_gradient": make_policy_gradient,
    "policy_gradient_discrete": make_policy_gradient_discrete,
    "adjoint_matching": make_adjoint_matching,
    "efm": make_efm,
    "reward_weighted_discrete": make_reward_weighted_discrete,
    "reward_weighted_regression": make_rwr,
    "value_matching": make_value_matching,
}


def state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in trainer.checkpoint_modules().items():
        for key, value in module.state_dict().items():
            out[f"{name}.{key}"] = value.detach().clone()
    for name, gen in trainer.generators().items():
        out[f"generator.{name}"] = gen.get_state().clone()
    for name, opt in trainer.optimizers().items():
        for pid, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer.{name}.{pid}.{key}"] = value.detach().clone()
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_seconds(history: dict[str, list[float]]) -> str:
    """The history except wall times, as comparable text (NaN entries compare equal)."""
    return json.dumps({k: v for k, v in history.items() if k != "seconds"}, sort_keys=True)


@pytest.fixture(params=sorted(TRAINERS))
def method(request):
    return request.param


def test_resume_is_bit_identical(method, tmp_path):
    a = TRAINERS[method](seed=0)
    a.train(2, progress=False)
    a.save(tmp_path / "ckpt")
    b = TRAINERS[method](seed=0)
    b.load(tmp_path / "ckpt")
    assert b.iteration == a.iteration == 2
    a.train(2, progress=False)
    b.train(2, progress=False)
    assert_same_state(state_tensors(a), state_tensors(b))
    assert without_seconds(a.history) == without_seconds(b.history)


def test_history_and_callback(method):
    trainer = TRAINERS[method](seed=0)
    seen = []
    trainer.train(3, callback=lambda record: seen.append(record) or len(seen) == 2, progress=False)
    assert len(seen) == 2 and trainer.iteration == 2  # returning True stopped training
    assert all(len(v) == 2 for v in trainer.history.values())
    assert trainer.history["iteration"] == [0.0, 1.0]
    assert {"iteration", "lr", "seconds"} <= set(seen[0])
    with pytest.raises(TypeError, match="callback"):
        trainer.train(1, callback=3, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        trainer.train(0, progress=False)


def test_evaluate_keys_and_policy(method):
    trainer = TRAINERS[method](seed=0)
    trainer.train(1, progress=False)
    if method in POLICY_EVALUATION:  # refused with a pointer to what to use instead, and training goes on alone
        with pytest.raises(TypeError, match="q_value"):
            trainer.evaluate(num_samples=64, seed=1)
    else:
        metrics = trainer.evaluate(num_samples=64, seed=1)
        assert tuple(metrics) == EVALUATION_KEYS
        assert all(isinstance(v, float) for v in metrics.values())
        assert json.dumps(metrics) == json.dumps(trainer.evaluate(num_samples=64, seed=1))
    # evaluating between iterations leaves training alone: train(1), evaluate, train(1) == train(2)
    trainer.train(1, progress=False)
    straight = TRAINERS[method](seed=0)
    straight.train(2, progress=False)
    assert_same_state(state_tensors(trainer), state_tensors(straight))
    assert without_seconds(trainer.history) == without_seconds(straight.history)


def test_failed_save_leaves_the_previous_checkpoint(method, tmp_path, monkeypatch):
    trainer = TRAINERS[method](seed=0)
    trainer.train(1, progress=False)
    folder = trainer.save(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    trainer.train(1, progress=False)
    # 1. a value JSON cannot hold: refused before the disk is touched
    monkeypatch.setattr(trainer, "extra_state", lambda: ({}, {"bad": np.float32(1.0)}))
    with pytest.raises(TypeError, match="JSON"):
        trainer.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    # 2. a crash between writing the new weights and committing the index: still the old checkpoint
    real_replace = os.replace

    def crash_on_index(src, dst):
        if str(dst).endswith("trainer.json"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_index)
    with pytest.raises(OSError, match="simulated"):
        trainer.save(folder)
    monkeypatch.undo()
    restored = TRAINERS[method](seed=0)
    restored.load(folder)
    assert restored.iteration == 1


def test_failed_load_leaves_the_trainer_intact(method, tmp_path):
    source = TRAINERS[method](seed=0)
    source.train(1, progress=False)
    folder = source.save(tmp_path / "ckpt")
    target = TRAINERS[method](seed=0)
    target.train(2, progress=False)
    state, history = state_tensors(target), without_seconds(target.history)

    index = json.loads((folder / "trainer.json").read_text())
    cases = {
        "history": {**index, "history": {"loss": ["x"]}},
        "iteration": {**index, "iteration": 2.5},
        "optimizers": {**index, "optimizers": {}},
        "modules": {**index, "modules": {"other": []}},
    }
    for field, bad in cases.items():
        (folder / "trainer.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field):
            target.load(folder)
    (folder / "trainer.json").write_text("{not json")
    with pytest.raises(ValueError, match="trainer.json"):
        target.load(folder)
    (folder / "trainer.json").write_text(json.dumps(index))
    weights = folder / index["weights"]
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="weights_sha256"):
        target.load(folder)
    # the seed is part of the config: a checkpoint of another config is refused too
    TRAINERS[method](seed=1).save(folder)
    with pytest.raises(ValueError, match="seed"):
        target.load(folder)
    assert_same_state(state, state_tensors(target))
    assert without_seconds(target.history) == history and target.iteration == 2


def test_another_method_or_task_is_refused(method, tmp_path):
    other = make_rwr(seed=0) if method != "reward_weighted_regression" else None
    trainer = TRAINERS[method](seed=0)
    if other is not None:
        folder = other.save(tmp_path / "other")
        with pytest.raises(
            CheckpointError, match=f"RewardWeightedRegression checkpoint, not a {type(trainer).__name__} one"
        ):
            trainer.load(folder)
    folder = trainer.save(tmp_path / "mine")
    index = json.loads((folder / "trainer.json").read_text())
    index["task"]["steps"] = index["task"]["steps"] + 1
    (folder / "trainer.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="task.steps"):
        trainer.load(folder)


_DETERMINISM_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_trainer_contract import TRAINERS, without_seconds
from diffusiongym.trainers.checkpoint import tensor_digest
torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[1]))  # another global RNG state in each process: the run must not read it
trainer = TRAINERS[{method!r}](seed=3)
trainer.train(2, progress=False)
states = [v for _, module in sorted(trainer.checkpoint_modules().items()) for _, v in sorted(module.state_dict().items())]
print(json.dumps({{"params": tensor_digest(*states), "history": without_seconds(trainer.history)}}))
"""


def test_same_seed_is_bit_identical_in_fresh_processes(method):
    script = _DETERMINISM_SCRIPT.format(tests=str(ROOT / "tests"), method=method)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, global_seed], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
        )
        for global_seed in ("11", "12")
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first == second and len(json.loads(first["history"])["iteration"]) == 2

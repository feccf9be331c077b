"""The Trainer base's own pieces: config validation, task resolution, learning-rate schedules,
scoped process state, and checkpoints that survive a process killed while writing."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusiongym as dg
from diffusiongym.trainers.base import TrainerConfig, make_lr_scheduler, make_optimizer, resolve_task
from diffusiongym.trainers.checkpoint import read_checkpoint, write_checkpoint
from diffusiongym.utils.runtime import denormals_flushed, derive_seed, flush_denormals, seeded

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"iterations": 2.5}, "iterations"),
        ({"iterations": True}, "iterations"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr_schedule": "cosin"}, "lr_schedule"),
        ({"optimizer": "adagrad"}, "optimizer"),
        ({"lr_final_factor": 1.5}, "lr_final_factor"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_refuses_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**kwargs)


def test_config_unknown_keyword_is_a_type_error_and_from_dict_is_strict():
    with pytest.raises(TypeError, match="unexpected keyword"):
        TrainerConfig(learning_rate=1e-3)
    cfg = TrainerConfig(lr=0.5, max_grad_norm=None)
    assert TrainerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"ckpt: TrainerConfig fields do not match: unknown \['extra'\]"):
        TrainerConfig.from_dict({**cfg.to_dict(), "extra": 1}, source="ckpt")
    with pytest.raises(ValueError, match="missing"):
        TrainerConfig.from_dict({"lr": 0.5})
    with pytest.raises(ValueError, match="iterations: expected an integer, got 2.5"):
        TrainerConfig.from_dict({**cfg.to_dict(), "iterations": 2.5})


# ------------------------------------------------------------------------------- task
def test_resolve_task_forms_and_errors():
    task = dg.make_task("GMM1D-v0")
    assert resolve_task("GMM1D-v0").name == "GMM1D-v0"
    assert resolve_task(task, reward_scale=3.0).reward_scale == 3.0
    assert resolve_task(task, reward_scale=np.float32(3.0)).reward_scale == 3.0  # numpy scalars, as make_task
    assert resolve_task(task, steps=7).steps == 7
    custom = resolve_task(task.environment, dg.ConstantReward(0.0), 2.0, steps=5)
    assert (custom.reward_scale, custom.steps, custom.name) == (2.0, 5, "custom")
    with pytest.raises(TypeError, match="reward: required"):
        resolve_task(task.environment)
    with pytest.raises(TypeError, match="CallableReward"):
        resolve_task(task, reward=lambda x: x.sum(1))
    with pytest.raises(ValueError, match="reward_scale"):
        resolve_task(task, reward_scale=float("nan"))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['stpes'\]"):
        resolve_task(task, stpes=5)
    with pytest.raises(ValueError, match="GMM1D-v0"):
        resolve_task("GMM1D-v9")


# ------------------------------------------------------------------ learning rates
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedules_follow_their_closed_forms(schedule):
    cfg = TrainerConfig(iterations=10, lr=2.0, lr_schedule=schedule, lr_final_factor=0.1, warmup_iterations=2)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = make_lr_scheduler(opt, cfg)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [2.0 / 3.0, 2.0 * 2.0 / 3.0]
    progress = [i / 8 for i in range(8)]
    main = {
        "constant": [2.0] * 8,
        "cosine": [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))) for p in progress],
        "linear": [2.0 * (1 - 0.9 * p) for p in progress],
    }[schedule]
    assert rates == pytest.approx(warm + main, rel=1e-12)


# ------------------------------------------------------------------- process state
def test_flush_denormals_restores_the_previous_mode():
    start = denormals_flushed()  # whatever an earlier test in this process left
    for outer in (False, True):
        with flush_denormals(outer):
            assert denormals_flushed() is outer
            with flush_denormals(not outer):
                assert denormals_flushed() is (not outer)
            assert denormals_flushed() is outer
    assert denormals_flushed() is start


def test_seeded_restores_the_global_rng_and_derive_seed_is_stable():
    before = torch.get_rng_state()
    with seeded(5):
        a = torch.rand(3)
    with seeded(5):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    assert derive_seed(0, "init") == derive_seed(0, "init") != derive_seed(1, "init")
    assert 0 <= derive_seed(7, "x", 3) < 2**63
    with pytest.raises(TypeError, match="seed"):
        derive_seed(1.5, "x")


def test_trainer_leaves_process_state_as_it_found_it():
    from test_trainer_contract import make_rwr

    before = torch.get_rng_state()
    dtype, threads, flushed = torch.get_default_dtype(), torch.get_num_threads(), denormals_flushed()
    trainer = make_rwr(seed=0)
    trainer.train(1, progress=False)
    trainer.evaluate(64, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert (torch.get_default_dtype(), torch.get_num_threads(), denormals_flushed()) == (dtype, threads, flushed)


# --------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_errors(tmp_path):
    folder = write_checkpoint(tmp_path / "c", {"method": "X", "value": 1.5}, {"a": torch.arange(3.0)})
    meta, tensors = read_checkpoint(folder)
    assert meta["value"] == 1.5 and torch.equal(tensors["a"], torch.arange(3.0))
    with pytest.raises(FileNotFoundError, match="trainer.json"):
        read_checkpoint(tmp_path / "missing")
    (folder / "trainer.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        read_checkpoint(folder)


_WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from diffusiongym.trainers.checkpoint import write_checkpoint
big = torch.zeros(8_000_000)
write_checkpoint({folder!r}, {{"method": "X", "round": 0}}, {{"big": big}})
print("ready", flush=True)
i = 0
while True:
    i += 1
    big.fill_(float(i))
    write_checkpoint({folder!r}, {{"method": "X", "round": i}}, {{"big": big}})
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_a_process_killed_while_saving_leaves_a_complete_checkpoint(tmp_path, delay):
    folder = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(tests=str(ROOT / "tests"), folder=str(folder))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    meta, tensors = read_checkpoint(folder)  # whichever round committed last, complete and consistent
    assert torch.all(tensors["big"] == float(meta["round"]))
    assert len(list(folder.glob("weights-*.safetensors"))) <= 2  # at most the committed file and one in flight


def test_method_keywords_come_from_setup():
    from test_trainer_contract import _example

    rwr = _example()
    with pytest.raises(TypeError, match=r"RewardWeightedRegression: unexpected keyword arguments \['data'\]"):
        rwr.RewardWeightedRegression("GMM1D-v0", data=1)
    with pytest.raises(TypeError, match="RWRConfig"):
        rwr.RewardWeightedRegression("GMM1D-v0", config=TrainerConfig())


def test_execution_options_do_not_block_resume(tmp_path):
    """``compile`` and ``gradient_checkpointing`` choose how a run executes, not what it computes: a
    checkpoint resumes with either value; any other config field must still match."""
    import dataclasses

    from diffusiongym.trainers.checkpoint import CheckpointError
    from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig

    config = ValueMatchingConfig(iterations=4, batch_size=32, updates_per_iteration=2, minibatch_size=64, seed=0)
    saved = ValueMatching("GMM1D-v0", config=config, steps=10)
    saved.train(1, progress=False)
    folder = saved.save(tmp_path / "ckpt")
    flipped = dataclasses.replace(config, compile=True)  # (gradient_checkpointing needs a diffusers model)
    assert ValueMatching("GMM1D-v0", config=flipped, steps=10).load(folder).iteration == 1
    with pytest.raises(CheckpointError, match=r"\['lr'\]"):
        ValueMatching("GMM1D-v0", config=dataclasses.replace(config, lr=config.lr / 2), steps=10).load(folder)

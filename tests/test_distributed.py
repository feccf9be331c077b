"""Data-parallel training (``docs/distributed.md``): two gloo processes equal one process.

One pair of CPU processes is launched for the whole module (the environment variables torchrun
sets, then :func:`diffusiongym.distributed.init_process_group`). In it every trainer of the
contract that can be sharded trains ``ITERATIONS`` iterations with ``rollout_shards=2`` (one
shard per rank); this process trains the same configuration alone (both shards). The loss
histories, every logged metric and the parameters must agree. The configurations make the
global statistics differ from the per-rank ones: a GRPO group spans both ranks, EFM and the
reward-weighted trainer normalise a softmax over both ranks' samples, RQL normalises its Q
term by the global mean, Adjoint Matching draws shared loss times, TerminalFlow fits its
normaliser on both ranks' pool trajectories; an implementation that used its rank's batch only
for any of them would fail. The pair also checks the collectives on unequal shares directly and
writes checkpoints (sharded state included: a Value Matching replay buffer, an EFM round in
progress; a TerminalFlow pool is redrawn per shard) that this process resumes under one rank.

Tolerance: the two runs do the same arithmetic except the order of two reductions (the
gradient average over ranks vs the mean over the concatenated batch, and the metrics' mean
over ranks), a relative change of ~1e-7 per float32 operation; over a few Adam steps the
measured spread is below 1e-6 (``atol = 1e-5``, ``rtol = 1e-4`` leaves a margin, while a
wrong statistic moves parameters by ~1e-3 and metrics by ~1e-2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer_contract import _example

from diffusiongym.discrete.tasks import grid_task
from diffusiongym.distributed import sample_sharded
from diffusiongym.tasks import make_task
from diffusiongym.td_flows import LinearGaussianMDP, TDFlow, TDFlowConfig, TerminalFlow, TerminalFlowConfig
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.base import Trainer
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.trainers.offline_data import OfflineTask
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig
from diffusiongym.trainers.policy_gradient_discrete import DiscretePolicyGradient
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer
from diffusiongym.trainers.rql import RQL, RQLConfig
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig

ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 3
SAVE_AT = 2  # checkpoints written by the pair after this many iterations
ATOL, RTOL = 1e-5, 1e-4


def make(name: str, shards: int = 2, seed: int = 0) -> Trainer:
    """A small trainer of each shardable method (the contract's sizes, batches divisible by 2)."""
    common = {"iterations": 6, "seed": seed, "rollout_shards": shards}
    if name == "value_matching":  # replay: the buffer holds sharded state across iterations
        cfg = ValueMatchingConfig(batch_size=32, updates_per_iteration=2, minibatch_size=64, replay=1, **common)
        return ValueMatching("GMM1D-v0", config=cfg, steps=10)
    if name == "adjoint_matching":  # loss times drawn from the shared generator, minibatches per shard
        cfg = AdjointMatchingConfig(
            batch_size=64,
            residual="control",
            hidden=16,
            layers=1,
            restarts=0.5,
            likelihood_ratio=0.1,
            loss_times=6,
            always_last=2,
            minibatch_size=256,
            lr_schedule="cosine",
            **common,
        )
        return AdjointMatching("GMM1D-v0", config=cfg, steps=10)
    if name == "efm":  # online: a round is drawn every 3 iterations, its softmax over both ranks
        cfg = EFMConfig(mode="online", rounds=2, samples_per_round=64, batch_size=32, **common)
        return EFMTrainer("GMM1D-v0", config=cfg, steps=10)
    if name == "policy_gradient":  # one group of 16 spans both ranks' 8 episodes
        cfg = PolicyGradientConfig(batch_size=16, group_size=16, num_minibatches=2, hidden=16, layers=2, **common)
        return PolicyGradient("GMM1D-v0", config=cfg, steps=10)
    if name == "policy_gradient_discrete":  # groups of 4 within a rank; the return scale is global
        cfg = PolicyGradientConfig(batch_size=16, group_size=4, num_minibatches=2, hidden=16, layers=2, **common)
        return DiscretePolicyGradient(grid_task(size=8, steps=10), config=cfg)
    if name == "reward_weighted_discrete":
        cfg = RewardWeightedConfig(num_samples=200, batch_size=32, **common)
        return RewardWeightedTrainer(grid_task(size=8, steps=10), config=cfg)
    if name == "rql":
        cfg = RQLConfig(
            batch_size=64,
            dataset_size=256,
            dataset_steps=20,
            value_hidden=16,
            value_layers=1,
            policy_hidden=16,
            policy_layers=1,
            flow_samples=2,
            normalize_q=True,  # the Q term divided by its global mean |Q|
            **common,
        )
        return RQL("GMM1D-v0", config=cfg, steps=10)
    if name == "td_flow":  # TD²-CFM: minibatch, loss noise and the stratified grid offset drawn per shard
        mdp = LinearGaussianMDP.default()
        data = mdp.dataset(512, generator=torch.Generator().manual_seed(0))
        cfg = TDFlowConfig(batch_size=32, hidden=16, layers=1, flow_steps=2, **common)
        return TDFlow(OfflineTask(data), config=cfg, pi=mdp.policy)
    if name == "terminal_flow":  # the pool is sharded; its normaliser is fitted on both ranks' trajectories
        cfg = TerminalFlowConfig(batch_size=64, num_trajectories=64, hidden=16, layers=1, **common)
        return TerminalFlow("GMM1D-v0", config=cfg, steps=10)
    raise KeyError(name)


NAMES = [
    "value_matching",
    "adjoint_matching",
    "efm",
    "policy_gradient",
    "policy_gradient_discrete",
    "reward_weighted_discrete",
    "rql",
    "td_flow",
    "terminal_flow",
]
CHECKPOINTED = ["value_matching", "efm", "policy_gradient", "terminal_flow"]


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in trainer.checkpoint_modules().items()
        for key, value in module.state_dict().items()
    }


def history(trainer: Trainer) -> dict[str, list[float]]:
    return {k: v for k, v in trainer.history.items() if k != "seconds"}


# --------------------------------------------------------------------- the rank program
def rank_main(out: Path) -> None:
    """Run in each of the two processes (see the module docstring)."""
    import diffusiongym.distributed as dist_gym

    torch.set_num_threads(1)
    assert dist_gym.init_process_group(backend="gloo")
    rank, world = dist_gym.rank(), dist_gym.world_size()
    results: dict[str, object] = {}
    for name in NAMES:
        trainer = make(name)
        trainer.train(SAVE_AT, progress=False)
        if name in CHECKPOINTED:
            trainer.save(out / f"ckpt-{name}")
        trainer.train(ITERATIONS - SAVE_AT, progress=False)
        results[name] = {"history": history(trainer), "params": parameters(trainer)}

    # the collectives on unequal shares: rank r holds r + 1 values
    x = torch.arange(rank + 1, dtype=torch.float64) + 10 * rank
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    loss = dist_gym.global_mean_loss(w.sum() * x)  # the mean of w.sum() * x over all 3 values
    loss.backward()
    unused = torch.nn.Parameter(torch.zeros(1))
    if rank == 1:
        unused.grad = torch.full((1,), 4.0)  # a gradient on one rank only: averaged with zeros
    dist_gym.average_gradients([w, unused])
    env = make_task("GMM1D-v0").environment
    traj = sample_sharded(env, 8, seed=5, shards=4, steps=5)
    results["collectives"] = {
        "gathered": dist_gym.gather_cat(x).tolist(),
        "offset": dist_gym.gather_offset(x.numel()),
        "loss_mean": float(dist_gym.all_mean(loss.detach())),
        "grad": w.grad.tolist(),
        "unused_grad": unused.grad.tolist(),
        "any": dist_gym.any_rank(rank == 1),
        "shards": list(dist_gym.shard_range(4)),
        "x1": traj.x1.tolist(),
    }
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results["collectives"])
    if rank == 0:
        results["collectives_all"] = gathered
        torch.save(results, out / "results.pt")
    dist_gym.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("distributed")
    port = str(_free_port())
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_distributed as t; from pathlib import Path; t.rank_main(Path(sys.argv[1]))"
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, str(out)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return torch.load(out / "results.pt", weights_only=False), out


def assert_close_history(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=ATOL, err_msg=key, equal_nan=True)


def assert_close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=key)


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_equal_one_process_with_both_shards(name, pair):
    results, _ = pair
    alone = make(name)
    alone.train(ITERATIONS, progress=False)
    assert_close_history(results[name]["history"], history(alone))
    assert_close_params(results[name]["params"], parameters(alone))
    # the run moved: a comparison of untrained networks would prove nothing
    fresh = parameters(make(name))
    assert any(not torch.allclose(fresh[k], v, atol=1e-4) for k, v in parameters(alone).items())


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_checkpoint_of_two_ranks_resumes_on_one(name, pair):
    _, out = pair
    resumed = make(name)
    resumed.load(out / f"ckpt-{name}")
    assert resumed.iteration == SAVE_AT
    resumed.train(ITERATIONS + 1 - SAVE_AT, progress=False)
    straight = make(name)
    straight.train(ITERATIONS + 1, progress=False)
    assert_close_history(history(resumed), history(straight))
    assert_close_params(parameters(resumed), parameters(straight))


def test_collectives_on_unequal_shares(pair):
    results, _ = pair
    ranks = results["collectives_all"]
    assert all(r["gathered"] == [0.0, 10.0, 11.0] for r in ranks)
    assert [r["offset"] for r in ranks] == [(0, 3), (1, 3)]
    # mean of 2 * x over the 3 values (not the mean of the two ranks' means, 2 * (0 + 10.5) / 2)
    assert all(r["loss_mean"] == pytest.approx(2 * 21 / 3) for r in ranks)
    assert all(r["grad"] == pytest.approx([7.0, 7.0]) for r in ranks)  # d/dw_j mean(w.sum() x) = mean x
    assert all(r["unused_grad"] == [2.0] for r in ranks)
    assert all(r["any"] for r in ranks)
    assert [r["shards"] for r in ranks] == [[0, 1], [2, 3]]
    # the batched sampler: 2 processes x 2 shards = 1 process x 4 shards, exactly
    env = make_task("GMM1D-v0").environment
    alone = sample_sharded(env, 8, seed=5, shards=4, steps=5)
    assert all(torch.equal(torch.tensor(r["x1"]), alone.x1) for r in ranks)


def test_shards_must_divide_the_batch_and_the_world():
    with pytest.raises(ValueError, match="batch_size: expected a multiple of rollout_shards=3"):
        ValueMatching("GMM1D-v0", config=ValueMatchingConfig(batch_size=32, rollout_shards=3), steps=4).step()
    with pytest.raises(ValueError, match="rollout_shards"):
        ValueMatchingConfig(rollout_shards=0)
    # a method that draws from one generator refuses shards instead of silently repeating its batch
    rwr = _example()
    with pytest.raises(ValueError, match="RewardWeightedRegression draws its batch from one generator"):
        rwr.RewardWeightedRegression("GMM1D-v0", config=rwr.RWRConfig(rollout_shards=2), steps=4)


_MPI_RANK_SCRIPT = """
import json, sys
import torch
import diffusiongym.distributed as dgd
assert dgd.init_process_group()
total = torch.tensor([float(dgd.rank() + 1)])
torch.distributed.all_reduce(total)
print(json.dumps({"rank": dgd.rank(), "world": dgd.world_size(), "local": dgd.local_rank(), "sum": total.item()}))
dgd.destroy_process_group()
"""


def test_an_mpi_launch_forms_the_group():
    """``accelerate launch`` runs multi-CPU jobs through ``mpirun``, which sets only MPI's rank
    variables (here Open MPI's): the processes must still form one group, not train alone."""
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MPI_RANK_SCRIPT],
            cwd=ROOT,
            env={
                **base,
                "OMP_NUM_THREADS": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reports = sorted((json.loads(o.strip().splitlines()[-1]) for o in outs), key=lambda r: r["rank"])
    assert reports == [{"rank": 0, "world": 2, "local": 0, "sum": 3.0}, {"rank": 1, "world": 2, "local": 1, "sum": 3.0}]

"""TorchRL PPO (collector, GAE, ClipPPOLoss) fine-tunes the GMM1D-v0 base model.

    python examples/torchrl_collector.py           # 60k env steps, several CPU-minutes
    python examples/torchrl_collector.py --quick   # a smoke run (a few seconds)

The shape of TorchRL's PPO tutorial: ``GymEnv`` wraps the registered id (its Dict observation
``{"x", "t"}`` concatenated into ``"observation"`` by ``CatTensors``), a ``Collector`` gathers
whole episodes with a ``ProbabilisticActor``, ``GAE`` (``gamma = 1``: the return is the objective
``lambda r(x1) - KL``) computes advantages, and ``ClipPPOLoss`` updates actor and critic. The trained
actor's mean is then evaluated on 4096 lockstep episodes of diffusiongym's torch vector env (the
same ``TensorDict`` modules act on its batched observations), against the zero control (the base
model) and the task's exact optimum.
"""

from __future__ import annotations

import argparse
import warnings

import gymnasium as gym
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import CatTensors, GymEnv, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

import diffusiongym as dg  # noqa: F401 - registers the diffusiongym/ ids

ENV_ID = "diffusiongym/GMM1D-v0"
STEPS = 20  # denoising steps per episode


def mlp(out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))


def make_modules() -> tuple[ProbabilisticActor, ValueOperator]:
    """Gaussian actor (mean, small initial std) and critic on ``"observation"`` = (x, t)."""
    net = mlp(2)
    with torch.no_grad():
        net[-1].bias[1] = -2.0  # log std: exploration is a control and costs KL, so start small
    loc_scale = nn.Sequential(net, NormalParamExtractor(scale_mapping="exp"))
    actor = ProbabilisticActor(
        TensorDictModule(loc_scale, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=torch.distributions.Normal,
        return_log_prob=True,
    )
    critic = ValueOperator(mlp(1), in_keys=["observation"])
    return actor, critic


def mean_return(actor: ProbabilisticActor | None, num_envs: int = 4096, seed: int = 1) -> float:
    """Mean return of the actor's mean action (``None``: the zero control) on lockstep torch episodes."""
    envs = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", steps=STEPS)
    obs, _ = envs.reset(seed=seed)
    total = torch.zeros(num_envs)
    for _ in range(STEPS):
        if actor is None:
            action = torch.zeros(num_envs, 1)
        else:
            td = TensorDict({"observation": torch.cat([obs["t"], obs["x"]], -1)}, batch_size=[num_envs])
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                action = actor(td)["action"]
        obs, reward, terminated, _, _ = envs.step(action)
        total += reward
    assert bool(terminated.all())
    envs.close()
    return float(total.mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 collector batches, 256 evaluation episodes"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    frames_per_batch = (10 if args.quick else 50) * STEPS  # whole episodes
    total_frames = (2 if args.quick else 60) * frames_per_batch
    num_eval = 256 if args.quick else 4096
    torch.manual_seed(args.seed)  # a script: the global RNG seeds the modules' initialisation

    # the Dict observation {"t", "x"} (sorted keys) concatenated into one "observation" vector
    env = TransformedEnv(GymEnv(ENV_ID, steps=STEPS), CatTensors(["t", "x"], "observation", del_keys=False))
    env.set_seed(args.seed)
    actor, critic = make_modules()
    # the plain actor needs no extra env transform; TorchRL 0.14 warns about a future default
    warnings.filterwarnings(
        "ignore", message="The env passed to Collector is missing transforms", category=FutureWarning
    )
    collector = Collector(env, actor, frames_per_batch=frames_per_batch, total_frames=total_frames)
    advantage = GAE(gamma=1.0, lmbda=0.95, value_network=critic, average_gae=True)
    loss_fn = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_bonus=False)
    optim = torch.optim.Adam(loss_fn.parameters(), lr=3e-4)

    for batch in collector:
        for _ in range(4):  # PPO epochs over the batch
            advantage(batch)
            for minibatch in batch.reshape(-1).split(200):
                losses = loss_fn(minibatch)
                loss = losses["loss_objective"] + losses["loss_critic"]
                optim.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(loss_fn.parameters(), 1.0)
                optim.step()
    collector.shutdown()

    oracle = env.base_env._env.unwrapped.task.oracle
    base, trained, optimum = mean_return(None, num_eval), mean_return(actor, num_eval), oracle.optimal_objective
    result = {"objective": trained, "base": base, "optimum": optimum, "gap_closed": (trained - base) / (optimum - base)}
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

"""A CleanRL-style PPO loop on diffusiongym's torch vector env: one file, no RL library.

    python examples/cleanrl_loop.py           # 300 iterations x 512 episodes, a few CPU-minutes
    python examples/cleanrl_loop.py --quick   # a smoke run (a few seconds)

The shape of CleanRL's ``ppo_continuous_action.py`` (Gaussian actor with a state-independent log std,
critic, GAE, clipped surrogate, advantage normalisation), on ``gym.make_vec(...,
vectorization_mode="vector_entry_point")``: all episodes run in lockstep as one torch batch and end
together at ``t = 1``, so a rollout is exactly one episode per env (reset at its start; no autoreset
step is ever taken). The return is the KL-regularised objective ``lambda r(x1) - KL``; the trained
actor's mean is evaluated on 4096 fresh episodes against the zero control (the base model) and the
task's exact optimum.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import torch
from torch import nn

import diffusiongym as dg  # noqa: F401 - registers the diffusiongym/ ids

ENV_ID = "diffusiongym/GMM1D-v0"
STEPS = 20  # denoising steps per episode


class Agent(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.actor_mean = nn.Sequential(
            nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, act_dim)
        )
        # exploration noise is a control too (it costs KL): start small
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), -2.0))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(self, x: torch.Tensor, action: torch.Tensor | None = None):
        mean = self.actor_mean(x)
        probs = torch.distributions.Normal(mean, self.actor_logstd.expand_as(mean).exp())
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


def flat(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([obs["t"], obs["x"]], -1)


def mean_return(agent: Agent | None, num_envs: int = 4096, seed: int = 1) -> float:
    """Mean return of the actor's mean (``None``: the zero control) on ``num_envs`` lockstep episodes."""
    envs = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", steps=STEPS)
    obs, _ = envs.reset(seed=seed)
    total = torch.zeros(num_envs)
    for _ in range(STEPS):
        with torch.no_grad():
            action = torch.zeros(num_envs, 1) if agent is None else agent.actor_mean(flat(obs))
        obs, reward, terminated, _, _ = envs.step(action)
        total += reward
    assert bool(terminated.all())
    return float(total.mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 iterations of 64 episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_envs, iterations = (64, 3) if args.quick else (512, 300)
    update_epochs, num_minibatches, clip_coef, gae_lambda, vf_coef, max_grad_norm = 4, 4, 0.2, 0.95, 0.5, 0.5
    num_eval = 256 if args.quick else 4096
    torch.manual_seed(args.seed)  # a script: the global RNG seeds the networks' initialisation

    envs = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", steps=STEPS)
    obs_dim = sum(envs.single_observation_space[k].shape[0] for k in ("t", "x"))
    act_dim = envs.single_action_space.shape[0]
    agent = Agent(obs_dim, act_dim)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)

    obs_buf = torch.zeros(STEPS, num_envs, obs_dim)
    act_buf = torch.zeros(STEPS, num_envs, act_dim)
    logp_buf, rew_buf, val_buf = (torch.zeros(STEPS, num_envs) for _ in range(3))
    for iteration in range(iterations):
        optimizer.param_groups[0]["lr"] = 3e-4 * (1 - iteration / iterations)  # linear annealing
        obs, _ = envs.reset(seed=args.seed * 1_000_003 + iteration)
        for step in range(STEPS):  # one whole episode per env
            x = flat(obs)
            with torch.no_grad():
                action, logp, _, value = agent.get_action_and_value(x)
            obs_buf[step], act_buf[step], logp_buf[step], val_buf[step] = x, action, logp, value[:, 0]
            obs, reward, terminated, _, _ = envs.step(action)
            rew_buf[step] = reward
        assert bool(terminated.all())  # t = 1 reached: the bootstrap value after the last step is 0

        with torch.no_grad():  # GAE with gamma = 1 (the return is the objective)
            advantages = torch.zeros_like(rew_buf)
            last = torch.zeros(num_envs)
            for t in reversed(range(STEPS)):
                next_value = val_buf[t + 1] if t + 1 < STEPS else torch.zeros(num_envs)
                delta = rew_buf[t] + next_value - val_buf[t]
                last = delta + gae_lambda * last
                advantages[t] = last
            returns = advantages + val_buf

        b_obs, b_act = obs_buf.reshape(-1, obs_dim), act_buf.reshape(-1, act_dim)
        b_logp, b_adv, b_ret = logp_buf.reshape(-1), advantages.reshape(-1), returns.reshape(-1)
        batch_size = b_obs.shape[0]
        for _ in range(update_epochs):
            for idx in torch.randperm(batch_size).chunk(num_minibatches):
                _, newlogp, _, newvalue = agent.get_action_and_value(b_obs[idx], b_act[idx])
                ratio = (newlogp - b_logp[idx]).exp()
                adv = (b_adv[idx] - b_adv[idx].mean()) / (b_adv[idx].std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
                v_loss = 0.5 * ((newvalue[:, 0] - b_ret[idx]) ** 2).mean()
                loss = pg_loss + vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
                optimizer.step()

    oracle = envs.unwrapped.task.oracle
    envs.close()
    base, trained, optimum = mean_return(None, num_eval), mean_return(agent, num_eval), oracle.optimal_objective
    result = {"objective": trained, "base": base, "optimum": optimum, "gap_closed": (trained - base) / (optimum - base)}
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

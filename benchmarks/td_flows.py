"""Temporal Difference Flows: TD²-CFM vs TD-CFM, Pendulum Q and GPI, terminal values in the diffusion gym.

    python benchmarks/td_flows.py               # everything (~10 min on one loaded core)
    python benchmarks/td_flows.py --parts lq    # one part: lq, pendulum, diffusion

Parts:

1. ``lq``: the linear-Gaussian MDP of :class:`~diffusiongym.td_flows.LinearGaussianMDP` (gamma 0.8),
   where the successor measure is exact. Distance to the truth vs updates for TD-CFM and TD²-CFM
   (same network, batch, lr, Polyak rate): the energy distance at four ``(s, a)`` divided by the
   two-sample threshold (below 1 passes), and the relative error of ``Q`` for a quadratic reward.
   Then the variance of each loss's stochastic gradient at the same parameters and batch size.
2. ``pendulum``: Pendulum-v1, three fixed policies (:func:`~diffusiongym.td_flows.pendulum.pendulum_policies`),
   one TD²-CFM model each (gamma 0.9) on one shared off-policy dataset. Correlation of ``Q``
   with exact Monte-Carlo returns (on the policy's states, with its own and random first
   actions); then GPI over the three vs each policy (undiscounted returns of 20 episodes).
3. ``diffusion``: on GMM1D-v0 / GMM2D-v0, :class:`~diffusiongym.td_flows.TerminalFlow` (the law of
   ``x1 | x_t``) gives ``V(x_t, t)`` for the task's reward and for a new one with no retraining;
   mean ``|V - V*|`` against the oracle, next to Value Matching's learned ``V`` (trained for the
   task's reward only), on base states and on Value Matching's own states.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from adaptation_methods.value_matching import make as make_value_matching

from diffusiongym.oracle import TiltOracle
from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.sampling import sample
from diffusiongym.tasks import make_task
from diffusiongym.td_flows import (
    GPIPolicy,
    LinearGaussianMDP,
    TDFlow,
    TDFlowConfig,
    TerminalFlow,
    TerminalFlowConfig,
    gradient_variance,
    q_value,
)
from diffusiongym.td_flows.data import collect_transitions, rollouts, torch_behaviour
from diffusiongym.td_flows.losses import td_loss
from diffusiongym.td_flows.pendulum import make_pendulum, monte_carlo_q, pendulum_policies, pendulum_reward
from diffusiongym.trainers.offline_data import OfflineTask
from diffusiongym.utils.stats import energy_distance, null_energy_threshold

LQ_POINTS = [([1.0, 0.0], [0.0]), ([-1.0, 1.0], [0.5]), ([0.0, -1.5], [-0.5]), ([0.5, 0.5], None)]


def lq_distance(mdp, model, gamma, reward, n=500) -> tuple[float, float]:
    """Mean over the points of (energy distance / threshold) and of |Q - Q*| / |Q*|."""
    ratios, errors = [], []
    for i, (s, a) in enumerate(LQ_POINTS):
        s = torch.tensor(s)
        a = mdp.policy(s[None])[0] if a is None else torch.tensor(a)
        truth = mdp.successor(s, a, gamma)
        x = model.sample(s[None], a[None], n, steps=16, generator=torch.Generator().manual_seed(i))[0]
        d = energy_distance(x, truth.sample(n, generator=torch.Generator().manual_seed(100 + i)))
        ratios.append(d / null_energy_threshold(truth, n))
        q = float(
            q_value(model, s[None], a[None], lambda x: reward(x)[0], num_samples=4000, generator=torch.Generator())
        )
        exact = mdp.q_value(s, a, reward, gamma)
        errors.append(abs(q - exact) / abs(exact))
    return float(np.mean(ratios)), float(np.mean(errors))


def part_lq(seed: int) -> None:
    gamma, updates = 0.8, [250, 500, 1000, 1500, 2000, 3000]
    mdp = LinearGaussianMDP.default()
    data = mdp.dataset(20000, generator=torch.Generator().manual_seed(0))
    reward = QuadraticReward([0.5, -0.5], 1.0)
    print("== linear-Gaussian MDP, gamma 0.8: distance to the exact successor measure vs updates")
    print("   (ED/thr: energy distance over the two-sample threshold, mean of 4 (s, a); < 1 passes)")
    print("   (TD-CFM x16: TD-CFM with 16 Euler steps for its bootstrap draws, 4x the sampling cost)")
    print(
        f"{'updates':>8} | {'TD-CFM ED/thr':>13} {'Q rel.err':>9} | {'TD-CFM x16':>10} {'Q rel.err':>9} | "
        f"{'TD2-CFM ED/thr':>14} {'Q rel.err':>9}"
    )
    trainers = {}
    for key, loss, steps in (("td", "td", 4), ("td16", "td", 16), ("td2", "td2", 4)):
        cfg = TDFlowConfig(
            iterations=updates[-1], gamma=gamma, loss=loss, hidden=128, flow_steps=steps, tau=0.02, lr=2e-3, seed=seed
        )
        trainers[key] = TDFlow(OfflineTask(data), config=cfg, pi=mdp.policy)
    seconds = dict.fromkeys(trainers, 0.0)
    done = 0
    for u in updates:
        row = []
        for loss, tr in trainers.items():
            start = time.perf_counter()
            tr.train(u - done, progress=False)
            seconds[loss] += time.perf_counter() - start
            row += list(lq_distance(mdp, tr.model, gamma, reward))
        done = u
        print(
            f"{u:>8} | {row[0]:>13.2f} {row[1]:>9.3f} | {row[2]:>10.2f} {row[3]:>9.3f} | {row[4]:>14.2f} {row[5]:>9.3f}",
            flush=True,
        )
    print(
        f"   training seconds: TD-CFM {seconds['td']:.0f}, TD-CFM x16 {seconds['td16']:.0f}, TD2-CFM {seconds['td2']:.0f}"
    )
    print("== gradient variance E|g - Eg|^2 at the same parameters, batch 256 (32 draws)")
    for label, tr in (("TD2-CFM-trained model", trainers["td2"]), ("fresh model", None)):
        if tr is None:
            cfg = TDFlowConfig(gamma=gamma, hidden=128, flow_steps=4, seed=seed)
            tr = TDFlow(OfflineTask(data), config=cfg, pi=mdp.policy)
        out = {}
        for loss in ("td", "td2"):
            gen = torch.Generator().manual_seed(10)

            def fn(loss=loss, gen=gen, tr=tr):
                return td_loss(
                    loss, tr.model, tr.target, data.batch(256, gen), mdp.policy, gamma=gamma, steps=4, generator=gen
                )

            out[loss] = gradient_variance(tr.model, fn, repeats=32)
        ratio = out["td"]["variance"] / out["td2"]["variance"]
        print(
            f"   {label:<22} TD-CFM {out['td']['variance']:.4g}  TD2-CFM {out['td2']['variance']:.4g}  "
            f"ratio {ratio:.1f}  (|E g|^2: {out['td']['mean_sq_norm']:.3g} / {out['td2']['mean_sq_norm']:.3g})"
        )


def part_pendulum(seed: int, episodes: int = 20) -> None:
    gamma = 0.9
    policies = pendulum_policies()
    env = make_pendulum()
    behaviours = [torch_behaviour(p, 1, noise_std=0.3, random_prob=0.2) for p in policies.values()]
    data = collect_transitions(env, behaviours + [torch_behaviour(None, 1)], 10, seed=seed)
    print(f"== Pendulum-v1, gamma {gamma}: {len(data)} off-policy transitions (3 noisy policies + uniform)")
    models = {}
    for name, pi in policies.items():
        start = time.perf_counter()
        cfg = TDFlowConfig(iterations=1500, gamma=gamma, hidden=128, flow_steps=4, tau=0.02, lr=2e-3, seed=seed)
        tr = TDFlow(OfflineTask(data), config=cfg, pi=pi)
        tr.train(progress=False)
        models[name] = tr.model
        obs = rollouts(make_pendulum, pi, 4, gamma=gamma, seed=100).observations[:, :150:5].reshape(-1, 3)
        rand = torch.rand(obs.shape[0], 1, generator=torch.Generator().manual_seed(3)) * 2 - 1
        cells = []
        for label, act in (("a = pi(s)", pi(obs)), ("a random", rand)):
            mc = monte_carlo_q(obs, act, pi, gamma)
            q = q_value(
                tr.model, obs, act, pendulum_reward, pi=pi, num_samples=64, steps=8, generator=torch.Generator()
            )
            corr = float(np.corrcoef(q.double().numpy(), mc.numpy())[0, 1])
            cells.append(f"{label}: corr {corr:.3f}, mean|Q - MC| {float((q.double() - mc).abs().mean()):.2f}")
        span = f"MC range {float(mc.min()):.0f}..{float(mc.max()):.0f}"
        print(f"   {name:<8} ({time.perf_counter() - start:.0f}s) {'; '.join(cells)}; {span}", flush=True)
    returns = {name: rollouts(make_pendulum, pi, episodes, seed=1000).returns for name, pi in policies.items()}
    grid = torch.linspace(-1, 1, 5)
    variants = {
        "GPI (candidates pi_i(s))": None,
        "GPI (+ 5 fixed actions)": lambda s: grid.reshape(1, -1, 1).expand(s.shape[0], -1, 1),
    }
    for label, extra in variants.items():
        gpi = GPIPolicy(
            list(models.values()),
            list(policies.values()),
            pendulum_reward,
            state_action=True,
            extra_candidates=extra,
            num_samples=32,
            steps=8,
            generator=torch.Generator().manual_seed(5),
        )
        returns[label] = rollouts(make_pendulum, gpi, episodes, seed=1000).returns
    print(f"   undiscounted returns over {episodes} episodes (same initial states; mean +- s.e.):")
    best = max(policies, key=lambda name: float(returns[name].mean()))
    print(f"   {'':<26} {'return':>8}          paired difference to the best policy ({best})")
    for name, r in returns.items():
        diff = r - returns[best]
        paired = f"{float(diff.mean()):+8.1f} +- {float(diff.std() / np.sqrt(len(r))):.1f}" if name != best else ""
        print(f"   {name:<26} {float(r.mean()):8.1f} +- {float(r.std() / np.sqrt(len(r))):<6.1f} {paired}")


def part_diffusion(seed: int) -> None:
    print("== diffusion gym: V(x_t, t) = -log E[exp(lambda r(x1)) | x_t] vs the oracle's V* (mean |V - V*|)")
    for task_id in ("GMM1D-v0", "GMM2D-v0"):
        task = make_task(task_id)
        d = task.oracle.mixture.dim
        start = time.perf_counter()
        terminal = TerminalFlow(task, config=TerminalFlowConfig(iterations=2000, seed=seed))
        terminal.train(progress=False)
        t_terminal = time.perf_counter() - start
        start = time.perf_counter()
        vm = make_value_matching(task_id, False, seed)
        vm.train(progress=False)
        t_vm = time.perf_counter() - start
        print(
            f"   {task_id}: TerminalFlow {t_terminal:.0f}s (once, any reward), Value Matching {t_vm:.0f}s (per reward)"
        )
        base = sample(task.environment, 256, grid=terminal.times, store="states", seed=5)
        own = vm.sample(256, seed=5, store="states")
        new_reward = (LinearReward([1.0] * d), 1.0)
        header = f"   {'reward':<12} {'states':<6} {'t':>5} {'V* std':>7} {'TerminalFlow':>12} {'ValueMatching':>13}"
        print(header)
        for rname, (reward, scale) in (("task", (task.reward, task.reward_scale)), ("new linear", new_reward)):
            oracle = TiltOracle(task.oracle.mixture, reward, scale)
            for sname, traj in (("base", base), ("VM", own)):
                for k in (25, 50, 80, 95):
                    t, x = float(terminal.times[k]), traj.states[k]
                    v_star = oracle.value(x.double(), t)
                    v_tf = terminal.value(x, t, reward, scale, num_samples=512).double()
                    cell = "(retrain)"
                    if rname == "task":
                        with torch.no_grad():
                            v_vm = vm.policy.value(x, torch.full((x.shape[0],), t)).double()
                        cell = f"{float((v_vm - v_star).abs().mean()):.3f}"
                    err = float((v_tf - v_star).abs().mean())
                    print(
                        f"   {rname:<12} {sname:<6} {t:>5.2f} {float(v_star.std()):>7.3f} {err:>12.3f} {cell:>13}",
                        flush=True,
                    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["lq", "pendulum", "diffusion"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for part in args.parts:
        start = time.perf_counter()
        {"lq": part_lq, "pendulum": part_pendulum, "diffusion": part_diffusion}[part](args.seed)
        print(f"   ({part}: {time.perf_counter() - start:.0f}s)\n", flush=True)


if __name__ == "__main__":
    main()

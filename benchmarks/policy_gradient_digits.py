"""GRPO on the shipped digits model: raise the classifier's log-probability of a target class.

    python benchmarks/policy_gradient_digits.py                  # full run (CPU minutes)
    python benchmarks/policy_gradient_digits.py --quick          # a smoke-sized run
    python benchmarks/policy_gradient_digits.py --weights DIR    # weights from `python -m diffusiongym.train.digits --out DIR`

Setting: the *unconditional* digits model (``guidance_scale = 0``) is the base, the reward is
the shipped classifier's ``log p(target | x)`` and ``lambda = 1``. Then
``p* ∝ p_base(x) p(target | x)`` is the base's class-``target`` conditional (as the
classifier sees it), the optimal objective is ``log E_base[p(target | x)]`` (about
``log 0.1``) and the optimal KL is ``-log P_base(target)`` (about 2.3 nats). The agent is a
control network (``TimeMLP`` on the flattened image, zero-initialised) acting on the torch
vector env; numbers are on fresh episodes through the env.

Prints the base and the final mean reward ``E log p(target | x)``, the probability
``E p(target | x)``, the fraction classified as ``target``, KL and objective, plus one line per
iteration; ``--figure PATH`` saves the training curves and a grid of samples (matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from diffusiongym.models.digit_classifier import load_digit_classifier
from diffusiongym.models.digits import digits_environment, digits_task, load_digits_model
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.tasks import Task
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig


def make_digits_task(steps: int, target: int = 3, weights: str | Path | None = None) -> Task:
    """The unconditional digits model with the ``log p(target | x)`` reward.

    ``weights``: a folder with ``digits_unet.*`` and ``digit_classifier.*`` (default: the shipped ones).
    """
    task = digits_task(guidance_scale=0.0, steps=steps, reward=DigitClassifierReward(target=target, mode="log_prob"))
    if weights is not None:
        weights = Path(weights)
        env = digits_environment(model=load_digits_model(path=weights / "digits_unet", guidance_scale=0.0))
        reward = DigitClassifierReward(
            target=target, mode="log_prob", classifier=load_digit_classifier(path=weights / "digit_classifier")
        )
        task = dataclasses.replace(task, environment=env, reward=reward)
    return task


def class_stats(trainer: PolicyGradient, target: int, episodes: int, seed: int) -> dict[str, float]:
    """Env-measured reward / KL / objective plus ``E p(target | x)`` and the classified fraction."""
    reward = trainer.task.reward
    probs, hits, parts = [], [], []
    for e in range(episodes):
        batch = trainer.rollout(seed + e)
        parts.append(trainer.rollout_metrics(batch))
        log_probs = reward.log_probs(batch.states[-1])
        probs.append(log_probs[:, target].exp())
        hits.append((log_probs.argmax(1) == target).float())
    out = {key: sum(p[key] for p in parts) / episodes for key in parts[0]}
    out["prob"] = float(torch.cat(probs).mean())
    out["classified"] = float(torch.cat(hits).mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--num-envs", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-coef", type=float, default=1.0)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    iterations = args.iterations or (5 if args.quick else 60)
    task = make_digits_task(args.steps, args.target, args.weights)
    config = PolicyGradientConfig(
        iterations=iterations,
        batch_size=args.num_envs,
        group_size=args.group_size,
        lr=args.lr,
        kl_coef=args.kl_coef,
        num_minibatches=4,
        hidden=256,
        layers=3,
        seed=args.seed,
    )
    trainer = PolicyGradient(
        task, config=config, policy_type="control"
    )  # a zero-initialised TimeMLP control on the flat image
    eval_episodes = 2 if args.quick else 8
    before = class_stats(trainer, args.target, eval_episodes, seed=10_000)
    start = time.perf_counter()
    trainer.train(
        progress=False,
        callback=lambda rec: print(
            f"iter {int(rec['iteration']):3d} reward={rec['reward']:.3f} kl={rec['kl']:.3f} objective={rec['objective']:.3f} "
            f"clip={rec['clip_fraction']:.3f} approx_kl={rec['approx_kl']:.4f}",
            flush=True,
        ),
    )
    seconds = time.perf_counter() - start
    after = class_stats(trainer, args.target, eval_episodes, seed=10_000)
    n = eval_episodes * args.num_envs
    for name, s in (("base", before), ("grpo", after)):
        print(
            f"{name}: E log p({args.target}|x)={s['reward']:.3f} E p={s['prob']:.3f} classified={s['classified']:.3f} "
            f"kl={s['kl']:.3f} objective={s['objective']:.3f} (n={n})"
        )
    print(f"training seconds={seconds:.1f} iterations={iterations} num_envs={args.num_envs} steps={args.steps}")
    if args.figure is not None:
        _figure(trainer, args, before, after)
    return {"before": before, "after": after, "history": trainer.history, "seconds": seconds}


def _figure(trainer: PolicyGradient, args: argparse.Namespace, before: dict, after: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = trainer.history
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(h["reward"], label="E log p(target|x)")
    axes[0].plot(h["objective"], label="objective (env return)")
    axes[0].axhline(before["reward"], ls=":", c="gray", label="base")
    axes[0].set_xlabel("iteration")
    axes[0].legend()
    axes[1].plot(h["kl"])
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("KL to the base (nats)")
    x1 = trainer.rollout(seed=99).states[-1][:32]
    grid = x1.reshape(4, 8, 8, 8).permute(0, 2, 1, 3).reshape(32, 64)
    axes[2].imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
    axes[2].set_title(f"GRPO samples (target {args.target}): classified {after['classified']:.2f}")
    axes[2].axis("off")
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)


if __name__ == "__main__":
    main()

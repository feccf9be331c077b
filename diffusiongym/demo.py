"""``python -m diffusiongym.demo``: adapt the shipped digits model to a class, on the CPU, in about two minutes.

1. ``diffusiongym/Digits-v0`` through the Gymnasium API: the shipped class-conditional model
   and how often the classifier recognises the requested class.
2. Adjoint Matching fine-tunes the *unconditional* digits model (every class about 10%)
   towards one class (reward ``log p(class | x)`` of the shipped classifier, ``lambda = 2``),
   with a progress bar and a CSV training log; prints the objective ``E[lambda r] - KL``, the KL
   and the class fraction before and after, on the same fresh noise.
3. ``diffusiongym/GMM1D-v0``: Adjoint Matching against the exact tilted optimum ``p*``; and
   ``diffusiongym/GMM2D-v0``: the base model against the exact optimal control ``u*``, through
   the Gymnasium vector env.

Writes to ``--out``: ``demo_samples.png`` (before/after samples), ``demo_curve.png`` (objective,
KL and reward against iterations, from the CSV log), ``demo_gmm.png`` (base, adapted and exact
``p*`` densities), ``metrics.csv`` and ``metrics_images/`` (the logger's sample grids).
Needs matplotlib (``pip install "diffusiongym[notebooks]"``).
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffusiongym.loggers import CSVLogger, make_grid, read_metrics
from diffusiongym.loggers.atomic import write_atomic
from diffusiongym.models.digits import digits_environment
from diffusiongym.policies.agent import ControlAgent
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.tasks import make_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig, multimodal_recipe
from diffusiongym.trainers.base import trajectory_metrics
from diffusiongym.utils.runtime import flush_denormals
from diffusiongym.utils.validation import check_int, check_positive_int

DIGIT_STEPS, DIGIT_T_START, DIGIT_LAMBDA, DIGIT_BATCH = 25, 1e-2, 2.0, 32
GMM_TASK, GMM_TRAIN_STEPS, GMM_EVAL_STEPS = "GMM1D-v0", 50, 100
FIGURES = ("demo_samples.png", "demo_curve.png", "demo_gmm.png")


def rollout(env: gym.vector.VectorEnv, policy: Callable[[Any], torch.Tensor], seed: int) -> tuple[torch.Tensor, dict]:
    """Run one batched episode of a vector env; returns (returns, final info)."""
    obs, _ = env.reset(seed=seed)
    total = torch.zeros(env.num_envs)
    terminated = torch.zeros(env.num_envs, dtype=torch.bool)
    while not terminated.all():
        obs, reward, terminated, _, info = env.step(policy(obs))
        total += reward
    return total, info


def zero_control(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model: no control."""
    return torch.zeros_like(obs["x"])


# ------------------------------------------------------------------------------ digits
def gym_digits(n: int, seed: int) -> None:
    """The conditional ``Digits-v0`` base model through the vector env."""
    start = time.perf_counter()
    env = gym.make_vec("diffusiongym/Digits-v0", num_envs=n, vectorization_mode="vector_entry_point")
    obs, _ = env.reset(seed=seed)
    labels = obs["label"].clone()
    _, info = rollout(env, zero_control, seed)
    with torch.no_grad():
        recognised = env.unwrapped.task.reward.log_probs(info["final_x"]).argmax(1) == labels
    print(
        f"[1/3] Digits-v0 (class-conditional base model, Gymnasium vector env): {n} samples, "
        f"{env.unwrapped.sim.steps} steps, {time.perf_counter() - start:.1f} s; "
        f"requested class recognised by the classifier: {recognised.float().mean():.1%}"
    )


def digits_trainer(target: int, iterations: int, seed: int) -> AdjointMatching:
    """Adjoint Matching of a trainable copy of the *unconditional* digits UNet towards ``target``."""
    env = digits_environment(noise="memoryless")  # no label: the unconditional model
    reward = DigitClassifierReward(target=target, mode="log_prob")
    model = copy.deepcopy(env.model).requires_grad_(True)
    config = AdjointMatchingConfig(
        iterations=iterations,
        batch_size=DIGIT_BATCH,
        lr=3e-4,
        loss_times=10,
        always_last=3,
        max_grad_norm=1.0,
        seed=seed,
    )
    return AdjointMatching(
        env, reward, DIGIT_LAMBDA, model=model, config=config, steps=DIGIT_STEPS, t_start=DIGIT_T_START
    )


def digits_metrics(trainer: AdjointMatching, n: int, seed: int) -> tuple[dict[str, float], torch.Tensor]:
    """``Trainer.evaluate``'s metrics plus the class fraction (classifier argmax), and ``x1``."""
    traj = trainer.sample(n, seed)
    metrics = trajectory_metrics(traj, trainer.task)
    reward = trainer.task.reward
    is_class = DigitClassifierReward(target=reward.target, mode="is_class", classifier=reward.classifier)
    hit, valid = is_class(traj.x1)
    metrics["class_fraction"] = float((hit * valid).sum()) / n
    return metrics, traj.x1


def adapt_digits(
    target: int, iterations: int, n: int, seed: int, out: Path, progress: bool
) -> tuple[dict[str, float], dict[str, float], torch.Tensor, torch.Tensor]:
    """Train (CSV log and sample grids under ``out``) and print the before/after table; returns
    the metrics and samples before and after."""
    trainer = digits_trainer(target, iterations, seed)
    print(
        f"[2/3] Adjoint Matching: the unconditional digits model -> class {target} "
        f"(reward log p({target} | x), lambda {DIGIT_LAMBDA:g}, {DIGIT_STEPS} steps), "
        f"{iterations} iterations of {DIGIT_BATCH} paths"
    )
    eval_seed = seed + 1_000  # fresh noise, never used in training; the same before and after
    before, x_before = digits_metrics(trainer, n, eval_seed)
    start = time.perf_counter()
    with CSVLogger(out / "metrics.csv") as logger:
        trainer.train(progress=progress, logger=logger, log_samples_every=max(iterations // 4, 1))
    seconds = time.perf_counter() - start
    after, x_after = digits_metrics(trainer, n, eval_seed)
    print(f"  trained in {seconds:.0f} s; {n} fresh samples, the same noise before and after:")
    print(f"  {'':6} {'objective':>10} {'KL':>7} {'reward':>8} {f'class-{target} fraction':>17}")
    for name, m in (("before", before), ("after", after)):
        print(f"  {name:6} {m['objective']:10.3f} {m['kl']:7.3f} {m['reward']:8.3f} {m['class_fraction']:17.3f}")
    return before, after, x_before, x_after


# -------------------------------------------------------------------------------- GMM
def adapt_gmm(iterations: int, n: int, seed: int, progress: bool) -> tuple[Any, torch.Tensor]:
    """Adjoint Matching on GMM1D-v0 (the measured mixture recipe); returns (task, adapted x1)."""
    task = make_task(GMM_TASK, parameterization="velocity")
    trainer = AdjointMatching(
        task, config=multimodal_recipe(iterations=iterations, lr=3e-2, seed=seed), steps=GMM_TRAIN_STEPS
    )
    start = time.perf_counter()
    trainer.train(progress=progress)
    traj = trainer.sample(4 * n, seed=seed + 1_000, steps=GMM_EVAL_STEPS)  # on the task's own 100-step grid
    m = trajectory_metrics(traj, task)  # what trainer.evaluate reports, from these samples
    oracle = task.oracle
    print(
        f"[3/3] {GMM_TASK}: Adjoint Matching, {iterations} iterations, {time.perf_counter() - start:.0f} s; "
        f"objective base {oracle.base_objective:.3f} (exact) -> adapted {m['objective']:.3f} "
        f"(KL {m['kl']:.3f}); optimum {oracle.optimal_objective:.3f} (exact); gap closed {m['gap_closed']:.3f}"
    )
    return task, traj.x1


def gym_gmm2d(n: int, seed: int) -> None:
    """GMM2D-v0 through the vector env: the base model and the exact optimal control."""
    env = gym.make_vec("diffusiongym/GMM2D-v0", num_envs=n, vectorization_mode="vector_entry_point")
    oracle = env.unwrapped.oracle
    print(f"      GMM2D-v0 (Gymnasium vector env): {n} samples, {env.unwrapped.sim.steps} steps")
    for name, policy in (("base model", zero_control), ("optimal control u*", ControlAgent(oracle.control(), env))):
        returns, info = rollout(env, policy, seed)
        print(f"  {name:>18}: reward mean={info['reward'].mean():.3f}  return (objective) mean={returns.mean():.3f}")
    print(f"  exact: base objective={oracle.base_objective:.3f}  optimal objective={oracle.optimal_objective:.3f}")


# --------------------------------------------------------------------------- figures
def _pyplot_free_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` with the Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "the demo's figures need matplotlib: pip install matplotlib (or 'diffusiongym[notebooks]')"
        ) from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_atomic(path, buffer.getvalue())


def plot_samples(path: Path, x_before: torch.Tensor, x_after: torch.Tensor, target: int, metrics: tuple) -> Path:
    fig = _pyplot_free_figure(figsize=(8, 4.4), layout="constrained")
    count = min(64, x_before.shape[0])
    for ax, x, name, m in zip(fig.subplots(1, 2), (x_before, x_after), ("before", "after"), metrics):
        ax.imshow(make_grid(x[:count], nrow=8)[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: class {target} {m['class_fraction']:.0%}, KL {m['kl']:.2f}")
        ax.axis("off")
    fig.suptitle(f"Adjoint Matching towards class {target} (same noise before and after)")
    return _save(fig, path)


def plot_curve(path: Path, csv_path: Path, before: dict[str, float], after: dict[str, float]) -> Path:
    """Objective, KL and reward of each iteration's batch (from the CSV log), with the
    evaluations on fresh samples before and after training as dots."""
    history = read_metrics(csv_path)
    steps = np.asarray(history["step"])
    end = float(steps[-1]) + 1 if len(steps) else 1.0
    fig = _pyplot_free_figure(figsize=(10, 3.2), layout="constrained")
    for ax, key in zip(fig.subplots(1, 3), ("objective", "kl", "reward")):
        values = np.asarray(history[key])
        ax.plot(steps, values, color="0.7", lw=1, label="per iteration")
        width = max(len(values) // 10, 1)
        if len(values) > width > 1:
            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            ax.plot(steps[width - 1 :], smooth, color="C0", lw=2, label=f"mean of {width}")
        ax.plot([0.0, end], [before[key], after[key]], "o", color="C3", label="before / after (fresh samples)")
        ax.legend(fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_title(
            {"objective": "objective E[λ r] − KL", "kl": "KL (nats)", "reward": "reward log p(class | x)"}[key]
        )
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gmm(path: Path, task: Any, x1: torch.Tensor) -> Path:
    oracle = task.oracle
    x = torch.linspace(-2.5, 3.0, 500, dtype=torch.float64)[:, None]
    fig = _pyplot_free_figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.hist(x1[:, 0].double().numpy(), bins=80, range=(-2.5, 3.0), density=True, color="C0", alpha=0.45)
    ax.plot([], [], color="C0", alpha=0.45, lw=8, label="adapted (Adjoint Matching samples)")
    ax.plot(x[:, 0], oracle.mixture.log_prob(x).exp(), color="0.3", ls="--", label="base p")
    ax.plot(x[:, 0], oracle.target.log_prob(x).exp(), color="C3", lw=2, label="exact p* ∝ p exp(λ r)")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title(f"{GMM_TASK}: base, adapted and exact tilted densities")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256, help="evaluation samples (digits; 4x for the GMMs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the PNGs and the CSV log")
    parser.add_argument("--iterations", type=int, default=40, help="Adjoint Matching iterations on the digits")
    parser.add_argument("--gmm-iterations", type=int, default=60, help="Adjoint Matching iterations on GMM1D")
    parser.add_argument("--target", type=int, default=3, help="the digit class to reward")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        check_positive_int("--num-samples", args.num_samples)
        check_positive_int("--iterations", args.iterations)
        check_positive_int("--gmm-iterations", args.gmm_iterations)
        check_int("--target", args.target, low=0, high=9)
        check_int("--seed", args.seed, low=0)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _pyplot_free_figure()  # fail now, not after two minutes of training, if matplotlib is missing
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    progress = not args.no_progress
    print(f"diffusiongym demo: seed {args.seed}, writing to {out}/", flush=True)
    with flush_denormals():
        gym_digits(args.num_samples, args.seed)
        before, after, x_before, x_after = adapt_digits(
            args.target, args.iterations, args.num_samples, args.seed, out, progress
        )
        task, x1 = adapt_gmm(args.gmm_iterations, args.num_samples, args.seed, progress)
        gym_gmm2d(4 * args.num_samples, args.seed)
    written = [
        plot_samples(out / FIGURES[0], x_before, x_after, args.target, (before, after)),
        plot_curve(out / FIGURES[1], out / "metrics.csv", before, after),
        plot_gmm(out / FIGURES[2], task, x1),
    ]
    print(f"wrote {', '.join(str(p) for p in written)}, {out / 'metrics.csv'} and {out / 'metrics_images'}/")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Value Matching on the shipped digits model: raise the fraction of one class (full figures).

    OMP_NUM_THREADS=1 python benchmarks/value_matching_digits.py --out out/value_digits  # trains, writes there
    OMP_NUM_THREADS=1 python benchmarks/value_matching_digits.py --eval-only  # evaluates the shipped weights

(``--out diffusiongym/weights/value_digits`` regenerates the shipped weights; nothing is
written there by default.)

Setting (:func:`diffusiongym.trainers.value_matching_digits.digits_value_task`): the shipped
:class:`~diffusiongym.models.digits.DigitsUNet` with the null label (unconditional, every class
about 10%), memoryless SDE, 25 Euler steps from ``t = 0.01``, the non-differentiable reward
``1[classifier argmax = 3]`` with ``lambda = 10``. Value network ``SignalScaled(TimeCNN)``
(unconditional, zero-initialised head: training starts at the base model). Two phases (a
curriculum in ``lambda``): 80 iterations at ``lambda = 5`` (the fraction plateaus at ~0.45-0.55
with KL ~1.4-1.7 there), then 40 at ``lambda = 10`` with a larger batch, fresher replay and a
lower learning rate. ``--init STEM`` starts from saved phase-1 weights and runs phase 2 only.

Prints, on fresh samples (a seed never used in training): the fraction of class 3 under the
base model and under the learned control, the KL (running cost), mean reward, objective
``lambda E[r] - KL``, and the optimum computed from the measured base rate ``p0``:
``log(1 - p0 + p0 e^lambda)`` with class fraction ``p0 e^lambda / (1 - p0 + p0 e^lambda)``
(exact for the tilt of the model's own sample law, up to the Euler error of the grid).
Writes ``<out>.safetensors`` + ``.json`` (the value network, the recipe, the training history
and these figures); the shipped ones, which the notebook and the test load, were written so.
Each phase is a :class:`~diffusiongym.trainers.value_matching.ValueMatching` run (phase 1's
network is initialised from its config's seed; phase 2 continues that network).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import diffusiongym as dg
from diffusiongym.policies.value import ValuePolicy
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig
from diffusiongym.trainers.value_matching_digits import (
    DIGITS_VALUE_WEIGHTS,
    digits_value_task,
    load_value_net,
    save_value_net,
)

RECIPE = {"target": 3, "reward_scale": 10.0, "steps": 25, "mode": "is_class"}
PHASES = [
    (
        5.0,
        ValueMatchingConfig(
            iterations=80,
            batch_size=128,
            updates_per_iteration=16,
            minibatch_size=1024,
            replay=3,
            lr=1e-3,
            lr_final_factor=0.1,
            seed=0,
        ),
    ),
    (
        10.0,
        ValueMatchingConfig(
            iterations=40,
            batch_size=192,
            updates_per_iteration=16,
            minibatch_size=1024,
            replay=1,
            lr=5e-4,
            lr_final_factor=0.1,
            seed=1,
        ),
    ),
]
EVAL_SEED = 123_456


def evaluate(task, control, n: int, seed: int = EVAL_SEED) -> dict[str, float]:
    """Class-``target`` fraction, KL, reward and objective on ``n`` fresh samples (batches of 256)."""
    cond_fn = task.conditioning["label"][1]
    totals = {"fraction": 0.0, "kl": 0.0, "reward": 0.0, "objective": 0.0, "valid": 0.0}
    done = 0
    while done < n:
        m = min(256, n - done)
        traj = dg.sample(
            task.environment,
            m,
            steps=task.steps,
            t_start=task.t_start,
            control=control,
            reward=task.reward,
            reward_scale=task.reward_scale,
            cond={"label": cond_fn(m)},
            seed=seed + done,
        )
        totals["fraction"] += float(traj.reward.sum())  # is_class reward: 1 for the target class
        totals["kl"] += float(traj.kl.sum()) if control is not None else 0.0
        totals["reward"] += float(traj.reward.sum())
        totals["objective"] += float(traj.objective.sum())
        totals["valid"] += float(traj.valid.float().sum())
        done += m
    return {k: v / n for k, v in totals.items()}


def optimum(p0: float, lam: float) -> tuple[float, float]:
    """Optimal objective and target-class fraction of ``p* ∝ p exp(lam 1[class])`` at base rate ``p0``."""
    z = 1 - p0 + p0 * math.exp(lam)
    return math.log(z), p0 * math.exp(lam) / z


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, default=None, help="weights stem of a phase-1 run: run phase 2 only")
    parser.add_argument("--eval-samples", type=int, default=1024)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights stem to write (required to train) or, with --eval-only, to read (default: the shipped diffusiongym/weights/value_digits)",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights at --out instead of training")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.out is None:
        if not args.eval_only:
            parser.error(
                "--out: required to train (pass diffusiongym/weights/value_digits to regenerate the shipped weights)"
            )
        args.out = DIGITS_VALUE_WEIGHTS
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    task = digits_value_task(**RECIPE)

    start = time.perf_counter()
    if args.eval_only:
        value_net, info = load_value_net(args.out, task.environment.scheduler)
        policy = ValuePolicy(value_net, task.environment, action_scale=task.action_scale)
        history = info.get("history", {})
        train_seconds = info.get("train_seconds", float("nan"))
    else:
        phases = PHASES
        history: dict = {}
        phase_starts = []
        value_net = None
        init_seconds = 0.0
        if args.init is not None:
            value_net, init_info = load_value_net(args.init, task.environment.scheduler)
            history = {k: list(v) for k, v in init_info["history"].items()}
            history.setdefault("reward_scale", [PHASES[0][0]] * len(history["loss"]))
            phase_starts = [0]
            phases = PHASES[1:]
            init_seconds = float(init_info.get("train_seconds", 0.0))
        for lam, config in phases:
            phase_task = digits_value_task(**{**RECIPE, "reward_scale": lam})
            trainer = ValueMatching(phase_task, model=value_net, config=config)
            value_net = trainer.model
            offset = len(history.get("loss", []))
            phase_starts.append(offset)

            def log(rec, offset=offset, lam=lam, config=config):
                if rec["iteration"] % 10 == 0 or rec["iteration"] == config.iterations - 1:
                    print(
                        f"  lambda {lam:g} it {offset + int(rec['iteration']):3d}  reward {rec['reward']:.3f}  kl {rec['kl']:.3f}  objective {rec['objective']:.3f}  loss {rec['loss']:.3f}  {time.perf_counter() - start:.0f} s",
                        flush=True,
                    )

            trainer.train(callback=log, progress=args.progress)
            done, new = offset, len(trainer.history["loss"])
            for key in sorted(
                (set(history) | set(trainer.history)) - {"reward_scale"}
            ):  # NaN where a phase lacks a key
                history.setdefault(key, [math.nan] * done).extend(trainer.history.get(key, [math.nan] * new))
            history.setdefault("reward_scale", []).extend([lam] * len(trainer.history["loss"]))
        policy = ValuePolicy(value_net, task.environment, action_scale=task.action_scale)
        train_seconds = time.perf_counter() - start + init_seconds

    base = evaluate(task, None, args.eval_samples)
    learned = evaluate(task, policy, args.eval_samples)
    lam = task.reward_scale
    best, best_fraction = optimum(base["fraction"], lam)
    base_obj = lam * base["fraction"]
    gap = (learned["objective"] - base_obj) / (best - base_obj)
    n = args.eval_samples
    se = lambda p: math.sqrt(max(p * (1 - p), 1e-12) / n)
    print(
        f"Digits (unconditional), target class {RECIPE['target']}, lambda {lam}, {task.steps} steps; {len(history.get('loss', []))} iterations, {train_seconds:.0f} s training"
    )
    print(
        f"  base:    class-{RECIPE['target']} fraction {base['fraction']:.3f} +- {se(base['fraction']):.3f}  objective {base_obj:.3f}"
    )
    print(
        f"  learned: class-{RECIPE['target']} fraction {learned['fraction']:.3f} +- {se(learned['fraction']):.3f}  kl {learned['kl']:.3f}  objective {learned['objective']:.3f}  valid {learned['valid']:.3f}"
    )
    print(
        f"  optimum (from the measured base rate): fraction {best_fraction:.3f}  objective {best:.3f}  kl {lam * best_fraction - best:.3f};  gap closed {gap:.3f}"
    )
    if not args.eval_only:
        info = {
            "recipe": RECIPE,
            "training": [{"reward_scale": lam, **cfg.to_dict()} for lam, cfg in PHASES],
            "phase_starts": phase_starts,
            "init": str(args.init) if args.init is not None else None,
            "train_seconds": train_seconds,
            "history": history,
            "metrics": {
                "eval_samples": n,
                "eval_seed": EVAL_SEED,
                "base": base,
                "learned": learned,
                "optimal_objective": best,
                "optimal_fraction": best_fraction,
                "gap_closed": gap,
            },
            "produced_by": "python benchmarks/value_matching_digits.py",
        }
        weights, cfg = save_value_net(value_net, args.out, info)
        print(f"  wrote {weights} ({weights.stat().st_size / 1024:.0f} KB) and {cfg.name}")


if __name__ == "__main__":
    main()

"""Inference-time guidance against fine-tuning, judged against p* at counted model evaluations.

    python benchmarks/guidance.py --quick     # < 2 CPU minutes
    python benchmarks/guidance.py             # larger budgets, more sample sizes

GMM1D / GMM2D (exact oracle): every method produces ``n`` output samples on the task's 100-step
grid. Columns:

- ``train`` / ``sample`` / ``total``: base-model evaluations (rows through the network),
  counted by :class:`diffusiongym.guidance.CountingModel`. Training: every row through the base
  network during ``trainer.train`` and, for Adjoint Matching, through its fine-tuned copy (a
  forward hook); a row evaluated with autograd on (the lean adjoint's vector-Jacobian products
  of the base drift, the copy's loss) counts once more for its backward pass. Sampling a
  fine-tuned copy counts the copy's rows too; gradient guidance counts the backward pass as one
  evaluation per row.
- ``reward``: mean ``r(x1)`` (p*'s own mean in the ``p*`` row).
- ``ed/thr``: energy distance to ``n`` exact p* samples over the package's i.i.d. two-sample
  threshold at size ``n`` (< 1: indistinguishable from p* at this size; resampled sets carry
  repeats, ``docs/guidance.md``).
- ``logZ``: estimate of the optimal objective ``log E[exp(lambda r)]`` ± standard error (SMC:
  8 replicates; importance resampling: i.i.d. delta method); the oracle value is in the ``p*`` row.
- ``gap``: fraction of the oracle gap closed by ``E[lambda r] - KL``, only for samples from a
  controlled chain (base, oracle u*, gradient guidance, fine-tuned models); ``-`` for resampled
  laws, whose KL to the base is not a per-path quantity.

Digits: the unconditional digits model, reward ``log p(3 | x)`` of the shipped classifier
(``lambda = 1``, so ``p*`` is the model's law conditioned on the classifier saying 3). At equal
model evaluations (``N`` x 50 steps, ``N / 4`` outputs): base, best-of-4, importance resampling,
SMC with the ``pred_final`` twist, gradient guidance; prints the class-3 fraction and mean reward.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from adaptation_methods import adjoint_matching, value_matching
from diffusiongym.guidance import (
    CountingModel,
    OracleTwist,
    PredFinalTwist,
    ValueTwist,
    best_of_n,
    gradient_guidance,
    importance_resampling,
    smc,
)
from diffusiongym.models.digits import digits_environment
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.sampling import sample
from diffusiongym.tasks import make_task
from diffusiongym.trainers.adjoint_matching import AdjointMatching
from diffusiongym.trainers.base import trajectory_metrics
from diffusiongym.trainers.value_matching import ValueMatching
from diffusiongym.utils.runtime import flush_denormals
from diffusiongym.utils.stats import energy_distance, null_energy_threshold

REPLICATES = 8
QUICK_TRAIN_ITERATIONS = {"value_matching": 12, "adjoint_matching": 10}  # quick mode only; full: the modules' budgets
HEADER = f"{'task':9} {'method':28} {'train':>9} {'sample':>9} {'total':>9} {'n':>5} {'reward':>8} {'ed/thr':>7} {'logZ':>16} {'gap':>6}"


def _row(
    task_id, method, x1, reward, sample_evals, exact, threshold, train=0, log_z=math.nan, se=math.nan, gap=math.nan
):
    ed = energy_distance(x1, exact[: x1.shape[0]]) if x1 is not None else math.nan
    return {
        "task": task_id,
        "method": method,
        "train": int(train),
        "sample": int(sample_evals),
        "n": 0 if x1 is None else int(x1.shape[0]),
        "reward": float(reward.double().mean()),
        "ed_thr": ed / threshold,
        "log_z": log_z,
        "se": se,
        "gap": gap,
    }


def print_row(r: dict) -> None:
    log_z = "-" if math.isnan(r["log_z"]) else f"{r['log_z']:.3f}" + ("" if math.isnan(r["se"]) else f"±{r['se']:.3f}")
    gap = "-" if math.isnan(r["gap"]) else f"{r['gap']:.3f}"
    ed = "-" if math.isnan(r["ed_thr"]) else f"{r['ed_thr']:.2f}"
    print(
        f"{r['task']:9} {r['method']:28} {r['train']:>9} {r['sample']:>9} {r['train'] + r['sample']:>9} {r['n']:>5} "
        f"{r['reward']:>8.4f} {ed:>7} {log_z:>16} {gap:>6}",
        flush=True,
    )


class CountingWithBackward(CountingModel):
    """Counts a row evaluated with autograd on once more, for the backward pass it is there for
    (Adjoint Matching's vector-Jacobian products of the base drift)."""

    def __call__(self, x, t, **cond):
        out = super().__call__(x, t, **cond)
        if out.requires_grad:
            self.add_backward(x.shape[0])
        return out


def _trained(kind: str, task, task_id: str, quick: bool, seed: int, iterations: int | None = None):
    """A fine-tuning trainer on a counted copy of ``task``; returns (trainer, counter, training evals)."""
    counter = CountingWithBackward(task.environment.model)
    counted = dataclasses.replace(task, environment=task.environment.with_model(counter))
    if iterations is None and quick:
        iterations = QUICK_TRAIN_ITERATIONS[kind]
    iterations = {} if iterations is None else {"iterations": iterations}
    if kind == "value_matching":
        config = dataclasses.replace(value_matching.config(task_id, quick, seed), **iterations)
        trainer = ValueMatching(counted, config=config)
    else:
        config = adjoint_matching.config(task_id, quick, seed, **iterations)
        trainer = AdjointMatching(counted, config=config, steps=adjoint_matching.TRAIN_STEPS)
    copy_rows = [0]

    def count_copy(module, args, out):  # the fine-tuned copy's rows (+1 each for the loss's backward)
        copy_rows[0] += args[0].shape[0] * (2 if out.requires_grad else 1)

    hook = trainer.model.register_forward_hook(count_copy) if isinstance(trainer.model, torch.nn.Module) else None
    with flush_denormals():
        trainer.train(progress=False)
    if hook is not None:
        hook.remove()
    return trainer, counter, counter.evals + copy_rows[0]


def gmm_rows(
    task_id: str, quick: bool, seed: int, n: int | None = None, train_iterations: int | None = None
) -> list[dict]:
    """The GMM table's rows (printed as they come); ``n`` and ``train_iterations`` shrink it (smoke test)."""
    task = make_task(task_id)
    oracle, env, reward, lam, m = task.oracle, task.environment, task.reward, task.reward_scale, task.steps
    n = n if n is not None else (1024 if quick else 4096)
    budgets = (4,) if quick else (1, 4, 16)
    exact = oracle.target.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    threshold = null_energy_threshold(oracle.target, n, seed=seed + 100)
    rows = []

    def add(*args, **kwargs):
        rows.append(_row(task_id, *args, exact=exact, threshold=threshold, **kwargs))
        print_row(rows[-1])

    other = oracle.target.sample(n, generator=torch.Generator().manual_seed(seed + 2))
    add("p* (exact samples)", other, reward(other)[0], 0, log_z=oracle.optimal_objective)
    common = {"steps": m, "t_start": task.t_start}
    base = sample(env, n, reward=reward, reward_scale=lam, seed=seed, **common)
    add("base", base.x1, base.reward, n * m, gap=trajectory_metrics(base, task)["gap_closed"])
    ustar = sample(env, n, control=oracle.control(), reward=reward, reward_scale=lam, seed=seed, **common)
    add("oracle u* (controlled)", ustar.x1, ustar.reward, n * m, gap=trajectory_metrics(ustar, task)["gap_closed"])

    vm, vm_counter, vm_train = _trained("value_matching", task, task_id, quick, seed, train_iterations)
    am, am_counter, am_train = _trained("adjoint_matching", task, task_id, quick, seed, train_iterations)

    for k in budgets:
        per = k * n // REPLICATES
        smc_kw = {"replicates": REPLICATES, "num_samples": n, "seed": seed, **common}
        if k > 1:
            bon = best_of_n(env, reward, n, k, seed=seed, **common)
            add(f"best-of-{k}", bon.x1, bon.reward, bon.model_evals)
        ir = importance_resampling(env, reward, lam, n, num_proposals=k * n, seed=seed, **common)
        add(
            f"importance resampling x{k}",
            ir.x1,
            ir.reward,
            ir.model_evals,
            log_z=ir.log_normalizer,
            se=ir.log_normalizer_se,
        )
        for name, twist, extra in (
            ("smc V* twist", OracleTwist(oracle), {}),
            ("smc pred_final twist", PredFinalTwist(reward, lam), {}),
            ("smc VM twist", ValueTwist(vm.policy), {}),
            ("smc VM twist+proposal", ValueTwist(vm.policy), {"control": vm.policy}),
        ):
            train = vm_train if "VM" in name else 0
            res = smc(env, twist, reward, lam, per, **smc_kw, **extra)
            add(
                f"{name} x{k}",
                res.x1,
                res.reward,
                res.model_evals,
                train=train,
                log_z=res.log_normalizer,
                se=res.log_normalizer_se,
            )

    gg = gradient_guidance(env, reward, lam, n, seed=seed, **common)
    add("gradient guidance (DPS)", gg.x1, gg.reward, gg.model_evals, gap=oracle.gap_closed(float(gg.objective.mean())))
    for name, trainer, counter, train, copy_rows in (
        ("value matching (fine-tuned)", vm, vm_counter, vm_train, 0),
        ("adjoint matching (fine-tuned)", am, am_counter, am_train, n * m),
    ):
        before = counter.evals
        traj = trainer.sample(n, seed=seed + 10_000, steps=m)
        add(
            name,
            traj.x1,
            traj.reward,
            counter.evals - before + copy_rows,
            train=train,
            gap=trajectory_metrics(traj, task)["gap_closed"],
        )
    return rows


def digits_rows(quick: bool, seed: int, target: int = 3, big: int | None = None) -> list[dict]:
    """Digits rows at ``big`` x 50 evaluations each (``big // 4`` outputs); returns and prints them."""
    env = digits_environment()
    reward = DigitClassifierReward(target=target, mode="log_prob")
    lam, steps, t_start = 1.0, 50, 1e-2
    big = big if big is not None else (128 if quick else 1024)
    out = big // 4
    common = {"steps": steps, "t_start": t_start, "seed": seed}
    rows = []

    def show(method: str, x1, evals: int) -> None:
        with torch.no_grad():
            logp = reward.log_probs(x1)
        frac = float((logp.argmax(1) == target).double().mean())
        rows.append({"method": method, "evals": evals, "n": x1.shape[0], "class_fraction": frac})
        print(
            f"{'Digits':9} {method:34} evals={evals:>7} n={x1.shape[0]:>5} class{target}={frac:.3f} "
            f"reward={float(logp[:, target].double().mean()):.3f}",
            flush=True,
        )

    base = sample(env, big, **common)
    show("base (unconditional)", base.x1, big * steps)
    bon = best_of_n(env, reward, out, 4, **common)
    show("best-of-4", bon.x1, bon.model_evals)
    ir = importance_resampling(env, reward, lam, out, num_proposals=big, **common)
    show("importance resampling", ir.x1, ir.model_evals)
    res = smc(env, PredFinalTwist(reward, lam), reward, lam, big // 4, replicates=4, num_samples=out, **common)
    show("smc pred_final twist", res.x1, res.model_evals)
    gg = gradient_guidance(env, reward, lam, out, **common)
    show("gradient guidance (DPS)", gg.x1, gg.model_evals)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets (< 2 CPU minutes)")
    parser.add_argument("--tasks", nargs="*", default=["GMM1D-v0", "GMM2D-v0", "Digits"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(HEADER)
    for task_id in args.tasks:
        if task_id == "Digits":
            digits_rows(args.quick, args.seed)
        else:
            gmm_rows(task_id, args.quick, args.seed)
    print(f"# {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Reproduce the shipped digits weights: ``python -m diffusiongym.train.digits``.

Trains, on the training split of scikit-learn's 8x8 digits (1,437 images; the 360 test
images are never seen; see :func:`diffusiongym.models.digits.digits_dataset`):

1. :class:`~diffusiongym.models.digit_classifier.DigitClassifier`, cross-entropy with
   Gaussian pixel noise as augmentation;
2. :class:`~diffusiongym.models.digits.DigitsUNet`, conditional flow matching on the linear
   path (``x_t = t x1 + (1 - t) x0``, target ``x1 - x0``, ``t ~ U(0, 1)``) with the label
   dropped to the null label 10% of the time (classifier-free guidance), AdamW with a cosine
   learning rate and an exponential moving average of the weights (the EMA is shipped).

Then it evaluates both (:func:`evaluate`) and writes ``weights/digits_unet.*`` and
``weights/digit_classifier.*`` (safetensors + JSON with the config and the metrics).
Deterministic on the CPU for a fixed seed, torch version and thread count; the shipped weights
were trained with one thread (``OMP_NUM_THREADS=1 python -m diffusiongym.train.digits``: the
script never changes the thread count itself). The global RNG
(network initialisation, dropout) is seeded inside :func:`~diffusiongym.utils.runtime.seeded`
blocks and restored afterwards, with the same streams as the ``torch.manual_seed`` calls that
produced the shipped weights. About 10 minutes on one CPU core with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusiongym.envs.environment import VelocityEnvironment
from diffusiongym.models.digit_classifier import DigitClassifier
from diffusiongym.models.digits import DigitsUNet
from diffusiongym.models.digits_data import NULL_LABEL, NUM_CLASSES, WEIGHTS_DIR, digits_dataset
from diffusiongym.sampling import sample
from diffusiongym.utils.io import save_module
from diffusiongym.utils.runtime import flush_denormals, seeded

__all__ = ["DigitsTrainConfig", "train_classifier", "train_flow_model", "evaluate", "nearest_distances", "main"]


@dataclass
class DigitsTrainConfig:
    """All hyper-parameters of both trainings."""

    seed: int = 0
    # classifier
    classifier_epochs: int = 60
    classifier_batch_size: int = 64
    classifier_lr: float = 1e-3
    classifier_noise: float = 0.15  # std of the Gaussian pixel noise added to training images
    classifier_channels: int = 32
    # flow model
    model_steps: int = 6000
    model_batch_size: int = 128
    model_lr: float = 2e-3
    model_warmup: int = 200
    model_weight_decay: float = 0.0
    ema_decay: float = 0.999
    log_every: int = 100  # flow-loss history: mean over this many steps
    label_dropout: float = 0.1
    channels: int = 32
    emb_dim: int = 128
    # evaluation
    eval_steps: int = 50
    eval_per_class: int = 100


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(
    config: DigitsTrainConfig,
    images: Tensor,
    labels: Tensor,
    progress: bool = False,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> tuple[DigitClassifier, dict[str, list[float]]]:
    """Train the digit classifier. Returns the model (eval mode) and ``history["loss"]`` per epoch.

    Data order and noise come from a generator seeded with ``config.seed``; the initialisation
    and the dropout masks from the global RNG seeded with ``config.seed`` inside
    :func:`~diffusiongym.utils.runtime.seeded` (restored on return).
    """
    gen = torch.Generator().manual_seed(config.seed)
    with seeded(config.seed):  # initialisation and dropout masks
        model = DigitClassifier(channels=config.classifier_channels)
        opt = torch.optim.Adam(model.parameters(), lr=config.classifier_lr)
        history: dict[str, list[float]] = {"loss": []}
        n = len(labels)
        total = config.classifier_epochs * math.ceil(n / config.classifier_batch_size)
        step = 0
        model.train()
        for _ in tqdm(range(config.classifier_epochs), disable=not progress, desc="classifier"):
            perm = torch.randperm(n, generator=gen)
            epoch_loss = 0.0
            for i in range(0, n, config.classifier_batch_size):
                idx = perm[i : i + config.classifier_batch_size]
                x = images[idx] + config.classifier_noise * torch.randn(images[idx].shape, generator=gen)
                loss = nn.functional.cross_entropy(model(x), labels[idx])
                for group in opt.param_groups:
                    group["lr"] = config.classifier_lr * _cosine_lr(step, total, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                epoch_loss += float(loss.detach()) * len(idx)
            history["loss"].append(epoch_loss / n)
            if callback is not None:
                callback({"classifier_loss": history["loss"][-1]})
    return model.eval(), history


def train_flow_model(
    config: DigitsTrainConfig,
    images: Tensor,
    labels: Tensor,
    progress: bool = False,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> tuple[DigitsUNet, dict[str, list[float]]]:
    """Conditional flow matching with label dropout. Returns the EMA model (eval mode) and
    ``history["loss"]`` (mean of every ``log_every`` steps)."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    with seeded(config.seed + 1):  # initialisation (the flow model has no dropout)
        model = DigitsUNet(channels=config.channels, emb_dim=config.emb_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.model_lr, weight_decay=config.model_weight_decay)
    history: dict[str, list[float]] = {"loss": []}
    n, running = len(labels), 0.0
    model.train()
    for step in tqdm(range(config.model_steps), disable=not progress, desc="flow model"):
        idx = torch.randint(0, n, (config.model_batch_size,), generator=gen)
        x1, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < config.label_dropout] = NULL_LABEL
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(len(y), generator=gen)
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        loss = ((model(xt, t, label=y) - (x1 - x0)) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = config.model_lr * _cosine_lr(step, config.model_steps, config.model_warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - config.ema_decay)
        running += float(loss.detach())
        if (step + 1) % config.log_every == 0:
            history["loss"].append(running / config.log_every)
            running = 0.0
            if callback is not None:
                callback({"step": step + 1, "flow_loss": history["loss"][-1]})
    return ema.eval(), history


def nearest_distances(queries: Tensor, reference: Tensor) -> Tensor:
    """Euclidean distance (in [-1, 1] pixel units over the 64 pixels) from each query image to
    its nearest reference image, shape ``(n,)``."""
    return (
        torch.cdist(queries.reshape(len(queries), -1).double(), reference.reshape(len(reference), -1).double())
        .min(1)
        .values
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    classifier: nn.Module,
    *,
    steps: int = 50,
    per_class: int = 100,
    noise: Any = "memoryless",
    t_start: float = 1e-2,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality metrics of a digits model with a classifier.

    Returns a dict with ``classifier_test_accuracy``; ``class_accuracy`` (fraction of
    class-conditional samples the classifier assigns to the requested class) and per class;
    ``nn_distance_samples`` (mean distance of a sample to its nearest training image) next to
    ``nn_distance_test`` (the same for the test split: samples much closer to the training set
    than fresh test digits would be copies); ``min_nn_distance_samples``; pixel range.
    """
    train_x, _ = digits_dataset("train")
    test_x, test_y = digits_dataset("test")
    test_acc = float((classifier(test_x).argmax(1) == test_y).float().mean())
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    env = VelocityEnvironment(model, "linear", noise=noise, sample_shape=(1, 8, 8))
    traj = sample(
        env,
        len(labels),
        steps=steps,
        t_start=t_start,
        cond={"label": labels, "guidance_scale": guidance_scale},
        seed=seed,
    )
    x = traj.x1
    pred = classifier(x).argmax(1)
    correct = (pred == labels).float()
    d_samples = nearest_distances(x, train_x)
    d_test = nearest_distances(test_x, train_x)
    return {
        "classifier_test_accuracy": test_acc,
        "class_accuracy": float(correct.mean()),
        "class_accuracy_per_class": correct.reshape(NUM_CLASSES, per_class).mean(1).tolist(),
        "nn_distance_samples": float(d_samples.mean()),
        "nn_distance_test": float(d_test.mean()),
        "min_nn_distance_samples": float(d_samples.min()),
        "min_nn_distance_test": float(d_test.min()),
        "sample_min": float(x.min()),
        "sample_max": float(x.max()),
        "settings": {
            "steps": steps,
            "per_class": per_class,
            "noise": str(noise),
            "t_start": t_start,
            "guidance_scale": guidance_scale,
            "seed": seed,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Train the shipped digits flow model and classifier.")
    parser.add_argument(
        "--out", type=Path, default=WEIGHTS_DIR, help="folder for the weights (default: the package's weights/)"
    )
    parser.add_argument("--model-steps", type=int, default=None, help="override the flow-model training steps")
    parser.add_argument("--classifier-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with flush_denormals():
        return _train_and_save(args)


def _train_and_save(args: argparse.Namespace) -> dict[str, Any]:
    config = DigitsTrainConfig(seed=args.seed)
    if args.model_steps is not None:
        config.model_steps = args.model_steps
    if args.classifier_epochs is not None:
        config.classifier_epochs = args.classifier_epochs
    progress = not args.no_progress
    images, labels = digits_dataset("train")

    start = time.perf_counter()
    classifier, hist_c = train_classifier(config, images, labels, progress=progress)
    t_classifier = time.perf_counter() - start
    start = time.perf_counter()
    model, hist_m = train_flow_model(config, images, labels, progress=progress)
    t_model = time.perf_counter() - start
    metrics = evaluate(model, classifier, steps=config.eval_steps, per_class=config.eval_per_class, seed=config.seed)
    metrics_ode = evaluate(
        model,
        classifier,
        steps=config.eval_steps,
        per_class=config.eval_per_class,
        noise="ode",
        t_start=0.0,
        seed=config.seed,
    )

    split = (
        "sklearn load_digits, train_test_split(test_size=0.2, random_state=0, stratify=labels): 1437 train / 360 test"
    )
    meta = {
        "torch": torch.__version__,
        "split": split,
        "train_config": asdict(config),
        "data_scaling": "x = intensity / 8 - 1 in [-1, 1], shape (1, 8, 8)",
    }
    save_module(
        classifier,
        Path(args.out) / "digit_classifier",
        {
            **meta,
            "architecture": classifier.config,
            "train_seconds": t_classifier,
            "final_loss": hist_c["loss"][-1],
            "test_accuracy": metrics["classifier_test_accuracy"],
        },
    )
    save_module(
        model,
        Path(args.out) / "digits_unet",
        {
            **meta,
            "architecture": model.config,
            "parameterization": "velocity",
            "scheduler": "linear",
            "null_label": NULL_LABEL,
            "train_seconds": t_model,
            "final_loss": hist_m["loss"][-1],
            "metrics_memoryless": metrics,
            "metrics_ode": metrics_ode,
        },
    )
    report = {"classifier_seconds": t_classifier, "model_seconds": t_model, "memoryless": metrics, "ode": metrics_ode}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Cross-entropy (generalised-KL) training of posterior models on any token dataset, and the
reward-weighted cross-entropy fine-tune (as a plain function; the Trainer is
:class:`diffusiongym.trainers.reward_weighted.RewardWeightedTrainer`).

Loss: ``E_{t ~ U[0, 1), x1 ~ data, x_t ~ p_t(. | x1)} [ -sum_i log p_theta(x1_i | x_t) ]`` (per-sample sum over
coordinates, averaged over the batch). With the mask source, only masked coordinates carry information and
the shipped models are trained on all coordinates anyway (unmasked ones are trivial and never used by
the chain). The reward-weighted fine-tune draws the batch from base samples with probability
``softmax(reward_scale * r)``; its fixed point is the posterior of ``p* ∝ p exp(reward_scale r)``, whose
chain (mask source) is exactly the optimal tilted chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusiongym.discrete.models import PosteriorModel, check_tokens
from diffusiongym.utils.io import load_checkpoint, save_checkpoint
from diffusiongym.utils.runtime import flush_denormals

__all__ = ["CrossEntropyConfig", "cross_entropy_loss", "train_posterior"]


@dataclass
class CrossEntropyConfig:
    """Hyper-parameters of :func:`train_posterior`."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 50
    seed: int = 0


def cross_entropy_loss(model: PosteriorModel, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``mean_n sum_i -log p(x1_i | x_t)`` at ``t ~ U[0, 1)``; ``x1`` (n, D) long."""
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    xt = model.path.sample_xt(x1, t, generator=generator)
    logits = model(xt, t)
    return (
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x1.reshape(-1), reduction="sum")
        / x1.shape[0]
    )


def train_posterior(
    model: PosteriorModel,
    data: Tensor,
    config: CrossEntropyConfig | None = None,
    *,
    weights: Tensor | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Train ``model`` with the cross-entropy loss on ``data`` (N, D) long tokens.

    Parameters
    ----------
    weights : Tensor, (N,), optional
        Non-negative sampling weights of the data rows (batches are drawn with replacement
        proportionally to them); uniform when omitted.
    checkpoint : path, optional
        Folder for :func:`~diffusiongym.utils.io.save_checkpoint` (model + Adam moments + step), written
        at the end; with ``resume=True`` an existing one is loaded first and training continues from its step.
    callback : callable, optional
        ``callback(step, metrics)`` every ``log_every`` steps.

    Returns
    -------
    history : dict
        ``{"step": [...], "loss": [...]}``.
    """
    config = config or CrossEntropyConfig()
    path = model.path
    data = check_tokens(data, path.length, path.vocab_size, "data")
    if weights is not None:
        if (
            not isinstance(weights, Tensor)
            or weights.shape != (data.shape[0],)
            or bool((weights < 0).any())
            or not float(weights.sum()) > 0
        ):
            raise ValueError(f"weights: expected a non-negative tensor of shape ({data.shape[0]},) with a positive sum")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if resume and checkpoint is not None and (Path(checkpoint) / "weights.safetensors").exists():
        cfg, extra = load_checkpoint(checkpoint, {"model": model})
        start = int(cfg.get("step", 0))
        opt.zero_grad()
        for i, p in enumerate(params):
            if f"adam.{i}.exp_avg" in extra:
                opt.state[p] = {
                    "step": extra[f"adam.{i}.step"].clone(),
                    "exp_avg": extra[f"adam.{i}.exp_avg"].clone(),
                    "exp_avg_sq": extra[f"adam.{i}.exp_avg_sq"].clone(),
                }
    gen = torch.Generator(device=data.device)
    gen.manual_seed(config.seed * 1_000_003 + start)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    model.train()
    with flush_denormals():
        for step in tqdm(range(start, config.steps), disable=not progress, desc="cross-entropy"):
            if weights is None:
                idx = torch.randint(data.shape[0], (config.batch_size,), generator=gen, device=data.device)
            else:
                idx = torch.multinomial(weights.double(), config.batch_size, replacement=True, generator=gen)
            loss = cross_entropy_loss(model, data[idx], generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                metrics = {"loss": loss.item()}
                history["step"].append(step + 1)
                history["loss"].append(metrics["loss"])
                if callback is not None:
                    callback(step + 1, metrics)
    model.eval()
    if checkpoint is not None:
        extra = {}
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            for key in ("step", "exp_avg", "exp_avg_sq"):
                if key in st:
                    extra[f"adam.{i}.{key}"] = torch.as_tensor(st[key])
        save_checkpoint(
            checkpoint,
            {"model": model},
            {"step": max(start, config.steps), "train": asdict(config), "path": path.config()},
            extra,
        )
    return history

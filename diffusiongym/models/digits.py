"""The shipped pretrained model: a class-conditional flow-matching UNet on 8x8 digits.

Data, split and scaling (``x = intensity / 8 - 1`` in ``[-1, 1]``, shape ``(1, 8, 8)``): see
:mod:`diffusiongym.models.digits_data` (re-exported here).

Model: a *velocity* (flow-matching) model for the linear path ``x_t = t x1 + (1 - t) x0``
(``t = 0`` noise, ``t = 1`` data), trained on the target ``x1 - x0``. It is
class-conditional with classifier-free guidance: the label ``label`` (LongTensor ``(n,)``
with values 0..9, or :data:`NULL_LABEL` = 10 for "no label") is a keyword argument, and

    v = v(x, t, null) + guidance_scale * (v(x, t, label) - v(x, t, null)).

``guidance_scale = 1`` (default) is the plain conditional model (one network pass),
``0`` the unconditional one; other values cost two passes. Note that guidance other than
1 is not the velocity of any path, so the SDE family's "same marginals" property holds
only at 0 and 1.

The weights (``diffusiongym/weights/digits_unet.safetensors`` + ``.json``) are produced by
``python -m diffusiongym.train.digits``. Importing this module registers the ``Digits-v0``
task (:func:`digits_task`) in :data:`diffusiongym.tasks.TASKS`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gymnasium
import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import VelocityEnvironment
from diffusiongym.models.digits_data import (
    DIGITS_SPLIT,
    IMAGE_SHAPE,
    NULL_LABEL,
    NUM_CLASSES,
    WEIGHTS_DIR,
    digits_dataset,
    sample_labels,
)
from diffusiongym.rewards.base import Reward
from diffusiongym.rewards.images import DigitClassifierReward
from diffusiongym.tasks import Task, check_reward, register_task
from diffusiongym.utils.io import load_module, save_module
from diffusiongym.utils.validation import (
    MAX_STEPS,
    check_architecture,
    check_positive_int,
    check_real,
    read_json_config,
)

# Architecture sizes accepted from a weights' JSON before anything is allocated (the shipped
# model: channels 32, emb_dim 128, num_frequencies 16).
ARCHITECTURE_BOUNDS = {"channels": (8, 1024, int), "emb_dim": (1, 8192, int), "num_frequencies": (1, 1024, int)}

__all__ = [
    "DigitsUNet",
    "NUM_CLASSES",
    "NULL_LABEL",
    "IMAGE_SHAPE",
    "WEIGHTS_DIR",
    "DIGITS_SPLIT",
    "digits_dataset",
    "load_digits_model",
    "digits_environment",
    "digits_task",
    "sample_labels",
    "save_module",
    "load_module",
]


# ------------------------------------------------------------------------ network
class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, FiLM conditioning (scale, shift) from the embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        out = self.conv1(nn.functional.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        out = self.conv2(nn.functional.silu(out))
        return self.skip(h) + out


class DigitsUNet(nn.Module):
    """Class-conditional velocity UNet for ``(1, 8, 8)`` images (two resolutions, 8x8 and 4x4).

    ``forward(x, t, label=None, guidance_scale=None)``: ``x`` (n, 1, 8, 8), ``t`` (n,) or scalar
    in [0, 1], ``label`` LongTensor (n,) with 0..9 or :data:`NULL_LABEL` (``None``: all null,
    i.e. unconditional), ``guidance_scale`` defaults to ``self.guidance_scale``. Returns the
    velocity, shape of ``x``.

    Precision: the network runs in its parameters' dtype (float32 for the shipped weights);
    ``x`` of another floating dtype (e.g. float64) is cast to it and the output cast back to
    ``x``'s dtype, so the model works under any ``torch.get_default_dtype()``.

    Parameters
    ----------
    channels : int
        Width at 8x8 (twice that at 4x4).
    emb_dim : int
        Width of the time + label embedding.
    num_frequencies : int
        Fourier features of ``t``.
    guidance_scale : float
        Default classifier-free guidance scale.
    """

    sample_shape = IMAGE_SHAPE

    def __init__(self, channels: int = 32, emb_dim: int = 128, num_frequencies: int = 16, guidance_scale: float = 1.0):
        super().__init__()
        channels = check_positive_int("channels", channels, maximum=1024)
        if channels % 8:
            raise ValueError(f"channels: expected a multiple of 8 (GroupNorm with 8 groups), got {channels}")
        emb_dim = check_positive_int("emb_dim", emb_dim, maximum=8192)
        num_frequencies = check_positive_int("num_frequencies", num_frequencies, maximum=1024)
        guidance_scale = check_real("guidance_scale", guidance_scale)
        self.config = {"channels": channels, "emb_dim": emb_dim, "num_frequencies": num_frequencies}
        self.guidance_scale = float(guidance_scale)
        self.register_buffer(
            "freqs", torch.exp(torch.linspace(0.0, math.log(200.0), num_frequencies)), persistent=False
        )
        self.time_mlp = nn.Sequential(nn.Linear(2 * num_frequencies, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        c = channels
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = _ResBlock(c, c, emb_dim)
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(2 * c, 2 * c, emb_dim)
        self.mid2 = _ResBlock(2 * c, 2 * c, emb_dim)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(3 * c, c, emb_dim)
        self.up2 = _ResBlock(c, c, emb_dim)
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _net(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        angles = t[:, None] * self.freqs.to(x)
        emb = self.time_mlp(torch.cat([torch.sin(angles), torch.cos(angles)], 1)) + self.label_emb(label)
        emb = nn.functional.silu(emb)
        h0 = self.down1(self.conv_in(x), emb)
        h = self.mid2(self.mid1(self.downsample(h0), emb), emb)
        h = self.up2(self.up1(torch.cat([self.upsample(h), h0], 1), emb), emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

    def forward(
        self, x: Tensor, t: Tensor | float, label: Tensor | None = None, guidance_scale: float | None = None
    ) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (n, 1, 8, 8), got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"x: expected shape (n, 1, 8, 8), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        w = self.guidance_scale if guidance_scale is None else check_real("guidance_scale", guidance_scale)
        n, out_dtype = x.shape[0], x.dtype
        x = x.to(self.conv_in.weight.dtype)
        t = torch.as_tensor(t, device=x.device)
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)) or t.numel() not in (1, n):
            raise ValueError(f"t: expected a time or a tensor of {n} times, got {tuple(t.shape)} {t.dtype}")
        t = t.to(x.dtype)
        t = t.reshape(()).expand(n) if t.numel() == 1 else t.reshape(n)
        null = torch.full((n,), NULL_LABEL, dtype=torch.long, device=x.device)
        if label is None:
            return self._net(x, t, null).to(out_dtype)
        label = torch.as_tensor(label, device=x.device)
        if label.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"label: expected an integer tensor, got {label.dtype}")
        label = label.long().expand(n) if label.ndim == 0 else label.long()
        if label.shape != (n,):
            raise ValueError(f"label: expected shape ({n},), got {tuple(label.shape)}")
        if not torch.compiler.is_compiling() and bool(((label < 0) | (label > NULL_LABEL)).any()):
            bad = label[(label < 0) | (label > NULL_LABEL)][:3].tolist()
            raise ValueError(
                f"label: expected values in 0..{NUM_CLASSES - 1} (or {NULL_LABEL} for unconditional), got {bad}"
            )
        if w == 1.0:
            return self._net(x, t, label).to(out_dtype)
        if w == 0.0:
            return self._net(x, t, null).to(out_dtype)
        both = self._net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([label, null]))
        cond, uncond = both.chunk(2)
        return (uncond + w * (cond - uncond)).to(out_dtype)


# ------------------------------------------------------------------ weights on disk
# save_module / load_module (flat ``<stem>.safetensors`` + ``<stem>.json`` files, the layout of the
# shipped weights) live in diffusiongym.utils.io and are re-exported here.


def _checked_stem(path: str | Path | None, default: Path) -> Path:
    """The weights stem, after checking its JSON's architecture sizes (before any allocation)."""
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path weights stem, got {type(path).__name__}")
    stem = Path(path) if path is not None else default
    cfg = stem.with_suffix(".json")
    if cfg.is_file():
        check_architecture(
            f"path ({cfg.name})", read_json_config("path", cfg).get("architecture", {}), ARCHITECTURE_BOUNDS
        )
    return stem


def load_digits_model(
    device: torch.device | str = "cpu", guidance_scale: float = 1.0, path: str | Path | None = None
) -> DigitsUNet:
    """The shipped pretrained :class:`DigitsUNet` (eval mode, parameters frozen, float32 as
    stored, whatever ``torch.get_default_dtype()`` is).

    Parameters
    ----------
    device : torch device
    guidance_scale : float
        Default classifier-free guidance scale (overridable per call); finite.
    path : str or Path, optional
        A weights stem (without suffix); default the shipped ``weights/digits_unet``. The
        architecture sizes in its JSON are checked before the network is built.

    Raises
    ------
    TypeError
        An unknown keyword, or an argument of the wrong type.
    ValueError
        ``guidance_scale`` not finite, an architecture outside the accepted sizes.
    """
    guidance_scale = check_real("guidance_scale", guidance_scale)
    stem = _checked_stem(path, WEIGHTS_DIR / "digits_unet")
    model, config = load_module(DigitsUNet, stem, device)
    assert isinstance(model, DigitsUNet)
    model.float()  # the stored precision, also when the global default dtype is float64
    model.guidance_scale = guidance_scale
    model.training_config = config  # type: ignore[attr-defined]
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------- environment, task
def digits_environment(
    noise: Any = "memoryless",
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    model: nn.Module | None = None,
) -> VelocityEnvironment:
    """:class:`~diffusiongym.envs.environment.VelocityEnvironment` around the shipped model
    with the linear scheduler (the one it was trained with)."""
    guidance_scale = check_real("guidance_scale", guidance_scale)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module velocity model, got {type(model).__name__}")
    model = model if model is not None else load_digits_model(device, guidance_scale)
    return VelocityEnvironment(model, scheduler="linear", noise=noise, sample_shape=IMAGE_SHAPE)


def digits_task(
    *,
    reward: Reward | None = None,
    reward_scale: float = 1.0,
    noise: Any = "memoryless",
    steps: int = 50,
    t_start: float = 1e-2,
    guidance_scale: float = 1.0,
    action_scale: float = 3.0,
    device: torch.device | str = "cpu",
) -> Task:
    """The ``Digits-v0`` task: the shipped digits model conditioned on a random class label.

    Default reward: the shipped classifier's log-probability of the *requested* label
    (``DigitClassifierReward(target=None, mode="log_prob")``, read from ``label=``), so the
    adapted model draws digits the classifier recognises more surely. ``t_start = 0.01``:
    the memoryless drift ``2 v - x / t`` is stiff near ``t = 0``. ``action_scale = 3``: a
    one-point Tweedie estimate ``sigma grad_x lambda r(x1_hat)`` of ``u*`` along 100 base
    trajectories has per-pixel 99.9th percentile 0.98 and maximum 7.5 (a rough guide only).
    Shipped-model quality (1000 samples, these defaults): 99.5% recognised as the requested class.

    Returns
    -------
    diffusiongym.tasks.Task
        ``conditioning = {"label": (Discrete(10), sample_labels)}``; no oracle.
    """
    guidance_scale = check_real("guidance_scale", guidance_scale)
    reward_scale = check_real("reward_scale", reward_scale)
    steps = check_positive_int("steps", steps, maximum=MAX_STEPS)
    if reward is not None:
        reward = check_reward(reward)
    env = digits_environment(noise=noise, guidance_scale=guidance_scale, device=device)
    reward = reward if reward is not None else DigitClassifierReward(target=None, mode="log_prob", device=device)
    conditioning = {"label": (gymnasium.spaces.Discrete(NUM_CLASSES), sample_labels)}
    return Task(
        "Digits-v0", env, reward, reward_scale, steps, t_start, action_scale, oracle=None, conditioning=conditioning
    )


# The weights load only when the factory runs, so registering costs nothing at import.
register_task("Digits-v0", digits_task)

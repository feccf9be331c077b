"""diffusers UNet models with their scheduler as diffusiongym environments (the loader from folders
and the cache: :mod:`diffusiongym.models.diffusers_loader`).

Sources: a local folder (a pipeline folder with ``unet/`` and ``scheduler/``, or a model
folder with ``config.json`` and ``scheduler_config.json`` / ``scheduler/``), a hub id that
is already in the local Hugging Face cache (resolved from the cache folders alone: the network
is never touched), or objects in memory (:func:`diffusers_environment`).
Model classes: :data:`SUPPORTED_MODELS` (``UNet2DModel``, class-conditional
``UNet2DModel(num_class_embeds=...)``, ``UNet2DConditionModel``); weights: safetensors only
(pickled ``.bin`` files are refused); ``diffusers`` is imported lazily.

Conventions (``docs/maths.md``, "diffusers conventions"), with our ``t`` running from 0 (noise) to 1 (data):

- ``DDPMScheduler`` / ``DDIMScheduler`` (any scheduler with an ``alphas_cumprod`` table):
  ``x_tau = sqrt(abar_tau) x_data + sqrt(1 - abar_tau) eps`` with ``tau = T - 1`` the
  noisiest. We use ``t = 1 - tau / (T - 1)`` and
  :class:`~diffusiongym.schedulers.DiscreteVPScheduler` (``log abar`` interpolated in ``t``),
  and call the UNet with the *float* timestep ``tau = (1 - t)(T - 1)``.

  * ``prediction_type="epsilon"`` -> :class:`EpsilonEnvironment` (output as is);
  * ``"sample"`` -> :class:`EndpointEnvironment` (output as is);
  * ``"v_prediction"`` is Salimans-Ho ``v = alpha eps - beta x_data``, *not* the flow
    velocity: converted to ``eps_hat = beta x + alpha v`` (``alpha^2 + beta^2 = 1``) ->
    :class:`EpsilonEnvironment`.

  A zero-terminal-SNR table (``rescale_betas_zero_snr``, ``abar_{T-1} = 0``) is floored at
  ``2^-24`` as diffusers' Euler schedulers do (ties then broken by ``1e-6`` in ``log abar``). ``clip_sample`` / thresholding of the
  diffusers samplers are not applied (they are sampler heuristics, not part of the model).
- ``FlowMatchEulerDiscreteScheduler``: ``x_sigma = (1 - sigma) x_data + sigma noise``,
  ``sigma`` from 1 (noise) to 0, timestep ``sigma * num_train_timesteps``, model output
  ``noise - x_data``. We use ``t = 1 - sigma`` with the linear scheduler and the velocity
  ``v = -output`` -> :class:`VelocityEnvironment`. ``shift`` only re-spaces the sampling
  grid, not the model, so it is ignored here (pass a grid to the sampler to reproduce it).

Conditioning: ``model(x, t, label=..., guidance_scale=..., **kwargs)``; ``label`` is passed to
the UNet as ``class_labels``, every other keyword (e.g. ``encoder_hidden_states``) as is.
Classifier-free guidance needs the index of the unconditional class (``null_class``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import DiffusionEnvironment, make_environment
from diffusiongym.schedulers import DiscreteVPScheduler, LinearScheduler, Scheduler
from diffusiongym.utils.validation import check_int, check_real, unknown_name_error

__all__ = [
    "DiffusersModel",
    "diffusers_environment",
    "scheduler_from_diffusers",
    "ZERO_SNR_FLOOR",
    "SUPPORTED_MODELS",
    "VP_SCHEDULERS",
]

ZERO_SNR_FLOOR = 2.0**-24
VP_PREDICTIONS = {"epsilon": "epsilon", "sample": "endpoint", "v_prediction": "epsilon"}
SUPPORTED_MODELS = ("UNet2DModel", "UNet2DConditionModel")
MAX_TRAIN_TIMESTEPS = 100_000
"""diffusers model classes a config's ``_class_name`` may name (looked up only among these)."""

VP_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DDIMInverseScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
"""diffusers scheduler classes with an ``alphas_cumprod`` table that a scheduler *config* may name."""


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a core dependency
        raise ImportError("the diffusers bridge needs diffusers: pip install diffusers") from err
    return diffusers


def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    if isinstance(scheduler, dict):
        return dict(scheduler)
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(f"scheduler: expected a diffusers scheduler or its config dict, got {type(scheduler).__name__}")
    out = dict(config)
    out.setdefault("_class_name", type(scheduler).__name__)
    return out


def scheduler_from_diffusers(scheduler: Any, prediction_type: str | None = None) -> tuple[Scheduler, str, str, int]:
    """Map a diffusers scheduler (object or config dict) to ours.

    Returns
    -------
    (scheduler, kind, prediction_type, num_train_timesteps)
        ``kind`` is ``"vp"`` (alphas_cumprod table) or ``"flow"`` (flow matching);
        ``prediction_type`` is diffusers' name (``"flow"`` for flow matching).
    """
    config = _scheduler_config(scheduler)
    name = str(config.get("_class_name", type(scheduler).__name__))
    T = check_int("num_train_timesteps", config.get("num_train_timesteps", 1000), low=2, high=MAX_TRAIN_TIMESTEPS)
    betas = config.get("trained_betas")
    if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) > MAX_TRAIN_TIMESTEPS):
        raise ValueError(f"scheduler: trained_betas must be a list of at most {MAX_TRAIN_TIMESTEPS} numbers")
    if "FlowMatch" in name:
        if prediction_type not in (None, "flow"):
            raise ValueError(
                f"prediction_type: a flow-matching scheduler predicts the flow (noise - data), got {prediction_type!r}"
            )
        return LinearScheduler(), "flow", "flow", T
    pred = prediction_type if prediction_type is not None else config.get("prediction_type", "epsilon")
    if pred not in VP_PREDICTIONS:
        raise unknown_name_error("prediction_type", pred, VP_PREDICTIONS)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        if name not in VP_SCHEDULERS:
            raise ValueError(
                f"scheduler: unsupported diffusers scheduler class {name!r}; expected a flow-matching scheduler or one of {list(VP_SCHEDULERS)}"
            )
        cls = getattr(_import_diffusers(), name)
        abar = getattr(cls.from_config(config), "alphas_cumprod", None)
        if abar is None:
            raise ValueError(
                f"scheduler: {name} has no alphas_cumprod table; expected a DDPM-style or flow-matching scheduler"
            )
    log_abar = torch.log(torch.as_tensor(abar, dtype=torch.float64).clamp(min=ZERO_SNR_FLOOR))
    # A zero-SNR table floored at 2^-24 (or rounded in float32) can end in ties; break them by
    # 1e-6 in log abar so that the table stays strictly decreasing (a change far below float32).
    for i in range(1, len(log_abar)):
        if log_abar[i] >= log_abar[i - 1]:
            log_abar[i] = log_abar[i - 1] - 1e-6
    return DiscreteVPScheduler(torch.exp(log_abar)), "vp", pred, T


class DiffusersModel(nn.Module):
    """A diffusers denoiser as a diffusiongym model ``model(x, t, **cond)``.

    The output is in ``self.parameterization`` (``"epsilon"``, ``"endpoint"`` or
    ``"velocity"``) for ``self.scheduler`` (see the module docstring for the mapping).

    Parameters
    ----------
    unet : callable
        ``unet(sample, timestep, class_labels=..., **kwargs)`` returning a tensor, a tuple or an
        object with ``.sample`` (diffusers' ``UNet2DOutput``).
    scheduler : diffusers scheduler or config dict
    prediction_type : str, optional
        Overrides the scheduler config's.
    null_class : int, optional
        Class index of the unconditional mode (needed for ``guidance_scale != 1``).
    guidance_scale : float
        Default classifier-free guidance scale.
    sample_shape : tuple, optional
        Default from the UNet config (``in_channels``, ``sample_size``).
    """

    def __init__(
        self,
        unet: Callable[..., Any],
        scheduler: Any,
        *,
        prediction_type: str | None = None,
        null_class: int | None = None,
        guidance_scale: float = 1.0,
        sample_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if not callable(unet):
            raise TypeError(f"unet: expected a callable diffusers model, got {type(unet).__name__}")
        guidance_scale = check_real("guidance_scale", guidance_scale)
        if null_class is not None:
            null_class = check_int("null_class", null_class, low=0)
        self.unet = unet
        self.scheduler, self.kind, self.prediction_type, self.num_train_timesteps = scheduler_from_diffusers(
            scheduler, prediction_type
        )
        self.parameterization = "velocity" if self.kind == "flow" else VP_PREDICTIONS[self.prediction_type]
        self.null_class = null_class
        self.guidance_scale = float(guidance_scale)
        if sample_shape is None:
            cfg = getattr(unet, "config", None)
            if cfg is not None and "in_channels" in cfg and "sample_size" in cfg:
                size = cfg["sample_size"]
                hw = (size, size) if isinstance(size, int) else tuple(size)
                sample_shape = (int(cfg["in_channels"]), *map(int, hw))
        if sample_shape is not None:
            if not isinstance(sample_shape, (tuple, list)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_shape
            ):
                raise ValueError(f"sample_shape: expected a tuple of positive ints, got {sample_shape!r}")
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def timestep(self, t: Tensor) -> Tensor:
        """diffusers' (float) timestep for our ``t``: ``(1 - t)(T - 1)`` (VP) or ``(1 - t) T`` (flow)."""
        if self.kind == "flow":
            return (1.0 - t) * self.num_train_timesteps
        return (1.0 - t) * (self.num_train_timesteps - 1)

    def _unet(self, x: Tensor, timestep: Tensor, label: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        if label is not None:
            kwargs = {**kwargs, "class_labels": label}
        dtype = getattr(self.unet, "dtype", x.dtype)
        out = self.unet(x.to(dtype), timestep.to(dtype if dtype.is_floating_point else x.dtype), **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.to(x.dtype)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        label: Tensor | None = None,
        guidance_scale: float | None = None,
        **kwargs: Any,
    ) -> Tensor:
        n = x.shape[0]
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = tt.expand(n) if tt.ndim == 0 else tt
        timestep = self.timestep(tt)
        w = self.guidance_scale if guidance_scale is None else check_real("guidance_scale", guidance_scale)
        if w == 1.0 or label is None:
            out = self._unet(x, timestep, label, kwargs)
        else:
            if self.null_class is None:
                raise ValueError(
                    "guidance_scale: classifier-free guidance needs null_class (the unconditional class index)"
                )
            null = torch.full_like(torch.as_tensor(label, device=x.device), self.null_class)
            cond = self._unet(x, timestep, label, kwargs)
            uncond = self._unet(x, timestep, null, kwargs)
            out = uncond + w * (cond - uncond)
        return self.to_parameterization(out, x, tt)

    def to_parameterization(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The raw diffusers output ``out`` at ``(x, t)`` (``t`` of shape ``(n,)``) in
        ``self.parameterization``: the flow velocity ``-out`` (flow matching),
        ``eps_hat = beta x + alpha v`` (``v_prediction``), else ``out`` itself. Affine in ``out``
        at fixed ``(x, t)``, so guidance may combine raw outputs before this conversion."""
        if self.kind == "flow":
            return -out
        if self.prediction_type == "v_prediction":
            shape = (-1,) + (1,) * (x.ndim - 1)
            t64 = t.to(torch.float64)
            alpha = self.scheduler.alpha(t64).to(x.dtype).reshape(shape)
            beta = self.scheduler.beta(t64).to(x.dtype).reshape(shape)
            return beta * x + alpha * out
        return out

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, prediction_type={self.prediction_type!r}, parameterization={self.parameterization!r}"
        )


def diffusers_environment(
    unet: Callable[..., Any],
    scheduler: Any,
    *,
    noise: Any = "memoryless",
    prediction_type: str | None = None,
    null_class: int | None = None,
    guidance_scale: float = 1.0,
    sample_shape: tuple[int, ...] | None = None,
) -> DiffusionEnvironment:
    """Wrap a diffusers model and scheduler (objects in memory) in the matching environment.

    Returns
    -------
    DiffusionEnvironment
        :class:`EpsilonEnvironment` (DDPM/DDIM epsilon or v_prediction),
        :class:`EndpointEnvironment` (``sample``) or :class:`VelocityEnvironment` (flow
        matching); ``env.model`` is the :class:`DiffusersModel`.
    """
    model = DiffusersModel(
        unet,
        scheduler,
        prediction_type=prediction_type,
        null_class=null_class,
        guidance_scale=guidance_scale,
        sample_shape=sample_shape,
    )
    return make_environment(
        model, model.parameterization, scheduler=model.scheduler, noise=noise, sample_shape=model.sample_shape
    )

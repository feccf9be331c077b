"""The latent text-to-image environment: the state is the latent, the prompt index the conditioning.

:class:`TextToImageModel` is the bridge's :class:`~diffusiongym.models.diffusers_bridge.DiffusersModel`
for a text-conditioned denoiser: ``model(x, t, prompt=idx, guidance_scale=g)`` gathers the cached
prompt encodings, runs the denoiser (the batch doubled under guidance: unconditional rows first, as
the pipelines do), combines ``out = out_uncond + g (out_text - out_uncond)`` *in the model's own
parameterisation* (eps, v or flow), and converts that to ours with the bridge (``eps_hat = beta x +
alpha v`` for ``v_prediction``, ``-out`` for flow). ``g`` is the environment's default or per
sample (a tensor ``(n,)`` in ``cond``); ``g == 1`` skips the unconditional branch.

:class:`TextToImageEnvironment` is a :class:`~diffusiongym.envs.environment.DiffusionEnvironment`
(epsilon for VP schedulers, velocity for flow matching) with the decoder attached
(:meth:`~TextToImageEnvironment.decode`, :meth:`~TextToImageEnvironment.pred_final_images`) and,
with ``integrator="scheduler"`` (ODE only), the scheduler's own update on its own grid
(:mod:`~diffusiongym.text_to_image.integrator`): the per-step drift coefficients are then the
scheduler's, so :func:`diffusiongym.sample` with ``grid=env.step_grid.times`` reproduces the stock
pipeline. ``integrator="euler"`` is the engine's Euler(-Maruyama) step in ``t`` (any noise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.models.diffusers_bridge import DiffusersModel
from diffusiongym.noise import Noise
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.text_to_image.components import PipelineComponents, components_from_pipeline, load_components
from diffusiongym.text_to_image.decode import LatentDecoder
from diffusiongym.text_to_image.families import family_adapter
from diffusiongym.text_to_image.integrator import SchedulerGrid, scheduler_grid
from diffusiongym.text_to_image.prompts import PromptCache, PromptSet
from diffusiongym.utils.validation import check_positive_int, check_real, unknown_name_error

__all__ = ["TextToImageModel", "TextToImageEnvironment", "text_to_image_environment", "generate", "INTEGRATORS"]

INTEGRATORS = ("euler", "scheduler")


class TextToImageModel(DiffusersModel):
    """A text-conditioned diffusers denoiser as ``model(x, t, prompt=idx, guidance_scale=g)``.

    Parameters
    ----------
    components : PipelineComponents
    cache : PromptCache
    guidance_scale : float
        Default classifier-free guidance scale (1: no guidance).
    """

    def __init__(self, components: PipelineComponents, cache: PromptCache, guidance_scale: float = 1.0):
        super().__init__(
            components.denoiser,
            components.scheduler,
            guidance_scale=guidance_scale,
            sample_shape=cache.adapter.latent_shape,
        )
        self.cache = cache
        self.adapter = cache.adapter

    def timestep(self, t: Tensor) -> Tensor:
        """The denoiser's timestep, computed in float64 (``tau`` exact to ``1e-12`` on the scheduler's grid)."""
        return self.adapter.timestep(self, t.to(torch.float64))

    def _unet(self, x: Tensor, timestep: Tensor, label: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        return self.adapter.call(self, x, timestep, kwargs)  # the family's calling convention

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        prompt: Tensor | None = None,
        guidance_scale: float | Tensor | None = None,
        **unknown: Any,
    ) -> Tensor:
        if unknown:
            raise TypeError(
                f"TextToImageModel: unexpected conditioning {sorted(unknown)}; expected prompt= and guidance_scale="
            )
        if prompt is None:
            raise ValueError(
                "prompt: the text-to-image model needs the prompt indices (cond={'prompt': LongTensor (n,)})"
            )
        n = x.shape[0]
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = tt.expand(n) if tt.ndim == 0 else tt
        timestep = self.timestep(tt)
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(g, Tensor):
            if g.shape not in ((), (n,)):
                raise ValueError(f"guidance_scale: expected a number or a tensor of shape ({n},), got {tuple(g.shape)}")
            g = g.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        else:
            g = check_real("guidance_scale", g)
        dtype = getattr(self.unet, "dtype", x.dtype)
        cond = {k: v.to(dtype) for k, v in self.cache.lookup(prompt).items()}
        if not isinstance(g, Tensor) and g == 1.0:
            out = self._unet(x, timestep, None, self.adapter.denoiser_kwargs(cond, x))
        else:
            neg = {k: v.to(dtype) for k, v in self.cache.negative(n).items()}
            both = {k: torch.cat([neg[k], cond[k]]) for k in cond}
            x2 = torch.cat([x, x])
            out2 = self._unet(x2, torch.cat([timestep, timestep]), None, self.adapter.denoiser_kwargs(both, x2))
            out = self.guide(*out2.chunk(2), g)
        return self.to_parameterization(out, x, tt)

    @staticmethod
    def guide(out_uncond: Tensor, out_text: Tensor, g: float | Tensor) -> Tensor:
        """Classifier-free guidance on raw outputs: ``out_uncond + g (out_text - out_uncond)``."""
        return out_uncond + g * (out_text - out_uncond)


class TextToImageEnvironment(DiffusionEnvironment):
    """Latent environment of a text-to-image pipeline (see the module docstring).

    Attributes
    ----------
    model : TextToImageModel
    decoder : LatentDecoder
    prompts : PromptSet
    components : PipelineComponents
    step_grid : SchedulerGrid or None
        The scheduler's grid and update (``integrator="scheduler"``), else ``None``.
    """

    def __init__(
        self,
        model: TextToImageModel,
        decoder: LatentDecoder,
        components: PipelineComponents,
        noise: str | float | Noise | Callable[[Tensor], Tensor] = "ode",
        step_grid: SchedulerGrid | None = None,
    ):
        self.parameterization = model.parameterization  # per instance: epsilon (VP) or velocity (flow)
        super().__init__(model, model.scheduler, noise, model.sample_shape)
        self.decoder = decoder
        self.components = components
        self.prompts = model.cache.prompts
        if step_grid is not None and not self.noise.is_deterministic:
            raise ValueError("integrator: 'scheduler' is the deterministic (ODE) update; use noise='ode' or 'euler'")
        self.step_grid = step_grid

    @property
    def integrator(self) -> str:
        return "euler" if self.step_grid is None else "scheduler"

    def coefficients(self, t: Tensor, target: str) -> tuple[Tensor, Tensor]:
        """As the base class; with ``integrator="scheduler"`` the ``"drift"`` coefficients are the
        scheduler's update divided by the step (defined on ``step_grid.times`` only)."""
        if target == "drift" and self.step_grid is not None:
            return self.step_grid.drift_coefficients(t)
        return super().coefficients(t, target)

    def with_noise(self, noise: Any) -> TextToImageEnvironment:
        """A copy with another noise; a stochastic one drops the scheduler integrator (Euler-Maruyama in ``t``)."""
        new = super().with_noise(noise)
        if not new.noise.is_deterministic:
            new.step_grid = None
        return new

    def decode(self, z: Tensor, grad: bool | None = None) -> Tensor:
        """Images ``(n, 3, H, W)`` in ``[-1, 1]`` of latents ``z`` (:class:`LatentDecoder`)."""
        return self.decoder(z, grad=grad)

    def pred_final_images(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The decoded Tweedie estimate ``decode(E[x1 | x_t = x])``."""
        return self.decode(self.pred_final(x, t, **cond))

    def initial_latents(self, z: Tensor) -> Tensor:
        """The first state for the pipeline's ``latents=z``: ``step_grid.init_scale * z`` (the
        scheduler's ``init_noise_sigma`` and input scaling), ``z`` itself without a step grid."""
        return z if self.step_grid is None else z * self.step_grid.init_scale


def text_to_image_environment(
    pipeline: str | Any,
    prompts: PromptSet | Any,
    *,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    integrator: str = "euler",
    steps: int | None = None,
    noise: Any = "ode",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    offload_text_encoders: bool = True,
    decode_chunk_size: int | None = None,
    family_options: dict[str, Any] | None = None,
    local_files_only: bool = True,
) -> TextToImageEnvironment:
    """Build the latent environment of a pipeline.

    Parameters
    ----------
    pipeline : str, Path, PipelineComponents or diffusers pipeline
        A pipeline folder (:func:`~diffusiongym.text_to_image.components.load_components`),
        loaded components, or a pipeline object in memory.
    prompts : PromptSet, list of str, str or Path
    guidance_scale : float, optional
        Default classifier-free guidance scale (overridable per call and per sample); ``None``: the
        family's (7.5 SD/SDXL, 7.0 SD3, 1.0 FLUX, whose ``guidance_scale`` is the pipeline's
        ``true_cfg_scale``; its embedded guidance is ``family_options={"guidance": ...}``).
    negative_prompt : str, optional
        Used when ``prompts`` is not already a :class:`PromptSet`.
    integrator : {"euler", "scheduler"}
        ``"scheduler"`` needs ``steps`` and ``noise="ode"``.
    steps : int, optional
        Step count of the scheduler grid.
    noise : str, float or Noise
    device, dtype
        Where the networks run, their precision (``torch.float16`` / ``torch.bfloat16``).
    offload_text_encoders : bool
        Keep the text encoders on the CPU between prompt encodings.
    decode_chunk_size : int, optional
        Latents per VAE call.
    family_options : dict, optional
        Adapter options (SDXL: ``original_size``, ``crops_coords_top_left``, ``target_size``;
        SD3/FLUX: ``height``, ``width``, ``max_sequence_length``; FLUX: ``guidance``).
    local_files_only : bool
        Offline loading (default).
    """
    if integrator not in INTEGRATORS:
        raise unknown_name_error("integrator", integrator, INTEGRATORS)
    if isinstance(pipeline, PipelineComponents):
        components = pipeline
    elif isinstance(pipeline, str) or hasattr(pipeline, "__fspath__"):
        components = load_components(pipeline, device=device, dtype=dtype, local_files_only=local_files_only)
    elif hasattr(pipeline, "components"):
        components = components_from_pipeline(pipeline)
    else:
        raise TypeError(
            f"pipeline: expected a folder path, PipelineComponents or a diffusers pipeline, got {type(pipeline).__name__}"
        )
    if not isinstance(prompts, PromptSet):
        prompts = PromptSet(prompts, negative_prompt=negative_prompt)
    adapter = family_adapter(components.family, components, **dict(family_options or {}))
    denoiser = components.denoiser
    cache = PromptCache(prompts, adapter, device=denoiser.device, dtype=denoiser.dtype, offload=offload_text_encoders)
    if guidance_scale is None:
        guidance_scale = adapter.default_guidance_scale
    model = TextToImageModel(components, cache, guidance_scale=guidance_scale)
    grid = None
    if integrator == "scheduler":
        if steps is None:
            raise ValueError("steps: integrator='scheduler' builds the scheduler's grid for a step count; pass steps=")
        grid = scheduler_grid(
            components.scheduler,
            check_positive_int("steps", steps),
            model.scheduler,
            model.kind,
            model.parameterization,
            **adapter.grid_options(steps),
        )
    decoder = LatentDecoder(components.vae, decode_chunk_size)
    return TextToImageEnvironment(model, decoder, components, noise=noise, step_grid=grid)


def generate(
    env: TextToImageEnvironment,
    prompts: Any,
    z: Tensor,
    *,
    guidance_scale: float | Tensor | None = None,
    steps: int | None = None,
    **sample_kwargs: Any,
) -> Trajectory:
    """The base rollout from the pipeline's initial latents ``z`` ``(n, C, h, w)`` for ``prompts``
    (texts or indices, one per sample): :func:`diffusiongym.sample` on the scheduler's grid
    (``integrator="scheduler"``) or on ``steps`` uniform steps (``"euler"``). ``sample_kwargs``
    go to :func:`~diffusiongym.sample` (e.g. ``grid=``, ``reward=``)."""
    if not isinstance(env, TextToImageEnvironment):
        raise TypeError(f"env: expected a TextToImageEnvironment, got {type(env).__name__}")
    idx = torch.as_tensor(env.prompts.indices(prompts), device=z.device).reshape(-1)
    if idx.numel() != z.shape[0]:
        raise ValueError(f"prompts: expected {z.shape[0]} prompts (one per latent), got {idx.numel()}")
    cond = {"prompt": idx}
    if guidance_scale is not None:
        cond["guidance_scale"] = guidance_scale
    if env.step_grid is not None:
        sample_kwargs.setdefault("grid", env.step_grid.times)
    elif "grid" not in sample_kwargs:
        sample_kwargs["steps"] = check_positive_int("steps", steps if steps is not None else 50)
        sample_kwargs.setdefault("t_start", 0.0)
    return sample(env, x=env.initial_latents(z), cond=cond, **sample_kwargs)

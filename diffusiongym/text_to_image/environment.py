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
(:meth:`~TextToImageEnvironment.decode`, :meth:`~TextToImageEnvironment.pred_final_images`).
Its default time grid (``time_grid="scheduler"``) is the scheduler's own: ``t_k = 1 - sigma_k`` for
flow matching (with SD3's ``shift`` or FLUX's dynamic shift), ``t_k = 1 - tau_k / (T - 1)`` for the
VP tables, as the stock pipelines step (:meth:`TextToImageEnvironment.time_points`);
``time_grid="uniform"`` opts out (uniform in ``t``). ``integrator="euler"`` (default) is the
engine's Euler(-Maruyama) step in ``t`` on that grid (any noise; for flow matching it *is* the
scheduler's step); ``integrator="scheduler"`` (ODE only) is the scheduler's own update on its grid
(:mod:`~diffusiongym.text_to_image.integrator`, e.g. DDIM's): the per-step drift coefficients are
then the scheduler's. Either way :func:`generate` and the ``TextToImage-v0`` envs use the grid.
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
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.validation import check_positive_int, check_real, unknown_name_error

__all__ = [
    "TextToImageModel",
    "TextToImageEnvironment",
    "text_to_image_environment",
    "generate",
    "INTEGRATORS",
    "TIME_GRIDS",
]

INTEGRATORS = ("euler", "scheduler")
TIME_GRIDS = ("scheduler", "uniform")


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
    integrator : {"euler", "scheduler"}
    time_grid : {"scheduler", "uniform"}
    step_grid : SchedulerGrid or None
        The scheduler's grid for ``steps`` steps (with its update for ``integrator="scheduler"``);
        ``None`` for ``time_grid="uniform"`` or without ``steps``.
    """

    def __init__(
        self,
        model: TextToImageModel,
        decoder: LatentDecoder,
        components: PipelineComponents,
        noise: str | float | Noise | Callable[[Tensor], Tensor] = "ode",
        step_grid: SchedulerGrid | None = None,
        *,
        integrator: str | None = None,
        time_grid: str = "scheduler",
    ):
        self.parameterization = model.parameterization  # per instance: epsilon (VP) or velocity (flow)
        super().__init__(model, model.scheduler, noise, model.sample_shape)
        self.decoder = decoder
        self.components = components
        self.prompts = model.cache.prompts
        if integrator is None:  # a grid with the scheduler's update means its integrator
            integrator = "scheduler" if step_grid is not None and step_grid.A is not None else "euler"
        if integrator not in INTEGRATORS:
            raise unknown_name_error("integrator", integrator, INTEGRATORS)
        if time_grid not in TIME_GRIDS:
            raise unknown_name_error("time_grid", time_grid, TIME_GRIDS)
        if integrator == "scheduler":
            if step_grid is None or step_grid.A is None:
                raise ValueError("integrator: 'scheduler' needs the scheduler's grid and update (pass steps=)")
            if time_grid != "scheduler":
                raise ValueError("time_grid: integrator='scheduler' runs on the scheduler's own grid only")
            if not self.noise.is_deterministic:
                raise ValueError(
                    "integrator: 'scheduler' is the deterministic (ODE) update; use noise='ode' or 'euler'"
                )
        self.integrator = integrator
        self.time_grid = time_grid
        self.step_grid = step_grid

    def coefficients(self, t: Tensor, target: str) -> tuple[Tensor, Tensor]:
        """As the base class; with ``integrator="scheduler"`` the ``"drift"`` coefficients are the
        scheduler's update divided by the step (defined on ``step_grid.times`` only)."""
        if target == "drift" and self.integrator == "scheduler":
            return self.step_grid.drift_coefficients(t)
        return super().coefficients(t, target)

    def with_noise(self, noise: Any) -> TextToImageEnvironment:
        """A copy with another noise; a stochastic one drops the scheduler integrator (Euler-Maruyama
        in ``t``, on the same grid)."""
        new = super().with_noise(noise)
        if not new.noise.is_deterministic:
            new.integrator = "euler"
        return new

    def scheduler_grid(self, steps: int | None = None) -> SchedulerGrid:
        """The scheduler's grid for ``steps`` steps (default and cached: the env's ``step_grid``), as
        the pipeline sets it (``set_timesteps`` with the family's shift options)."""
        if steps is None or (self.step_grid is not None and steps == len(self.step_grid)):
            if self.step_grid is None:
                raise ValueError("steps: this environment was built without steps; pass steps=")
            return self.step_grid
        if self.integrator == "scheduler":
            raise ValueError(
                f"steps: integrator='scheduler' runs its own {len(self.step_grid)}-step grid, got steps={steps}"
            )
        steps = check_positive_int("steps", steps)
        model = self.model
        return scheduler_grid(
            self.components.scheduler,
            steps,
            model.scheduler,
            model.kind,
            model.parameterization,
            update=False,
            **model.adapter.grid_options(steps),
        )

    def default_t_start(self) -> float | None:
        """The grid's start by default: ``DEFAULT_T_START`` for flow matching with a stochastic noise
        (memoryless noise is singular at ``t = 0``), else ``None`` (the scheduler grid's own start; 0
        for a uniform grid)."""
        return DEFAULT_T_START if self.model.kind == "flow" and not self.noise.is_deterministic else None

    def time_points(self, steps: int | None = None, t_start: float | None = None) -> Tensor:
        """The default time grid, float64 ``(steps + 1,)``.

        ``time_grid="scheduler"``: the scheduler's evaluation times (:meth:`scheduler_grid`), its first
        point raised to ``t_start`` when that is later (``ValueError`` unless ``t_start`` stays below
        the second point). ``"uniform"``: ``steps`` uniform steps from ``t_start`` (default 0).
        ``t_start=None``: :meth:`default_t_start`.
        """
        t_start = self.default_t_start() if t_start is None else check_real("t_start", t_start, low=0.0)
        if self.time_grid == "uniform":
            if steps is None:
                raise ValueError("steps: time_grid='uniform' needs a step count; pass steps=")
            return make_time_grid(check_positive_int("steps", steps), 0.0 if t_start is None else t_start)
        times = self.scheduler_grid(steps).times
        if t_start is None or t_start <= float(times[0]):
            return times
        if self.integrator == "scheduler":
            raise ValueError(f"t_start: integrator='scheduler' starts at its own t = {float(times[0])}, got {t_start}")
        if t_start >= float(times[1]):
            raise ValueError(
                f"t_start: expected a start below the scheduler grid's second time {float(times[1])}, got {t_start}"
            )
        times = times.clone()
        times[0] = t_start
        return times

    def decode(self, z: Tensor, grad: bool | None = None) -> Tensor:
        """Images ``(n, 3, H, W)`` in ``[-1, 1]`` of latents ``z`` (:class:`LatentDecoder`)."""
        return self.decoder(z, grad=grad)

    def pred_final_images(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """The decoded Tweedie estimate ``decode(E[x1 | x_t = x])``."""
        return self.decode(self.pred_final(x, t, **cond))

    def initial_latents(self, z: Tensor, steps: int | None = None) -> Tensor:
        """The first state for the pipeline's ``latents=z``: ``init_scale * z`` of the scheduler grid
        for ``steps`` (the scheduler's ``init_noise_sigma`` and input scaling), ``z`` itself with
        ``time_grid="uniform"`` or without a step count."""
        if self.time_grid == "uniform" or (steps is None and self.step_grid is None):
            return z
        return z * self.scheduler_grid(steps).init_scale


def text_to_image_environment(
    pipeline: str | Any,
    prompts: PromptSet | Any,
    *,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    integrator: str = "euler",
    steps: int | None = None,
    time_grid: str = "scheduler",
    noise: Any = "ode",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    offload_text_encoders: bool = True,
    decode_chunk_size: int | None = None,
    family_options: dict[str, Any] | None = None,
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
        ``"euler"``: our Euler(-Maruyama) step in ``t``; ``"scheduler"``: the scheduler's own
        update (needs ``steps`` and ``noise="ode"``).
    steps : int, optional
        Step count of the stored scheduler grid (``env.step_grid``); :func:`generate` builds the
        grid of another count on demand.
    time_grid : {"scheduler", "uniform"}
        The default time grid: the scheduler's (as the pipeline steps: SD3's shift, FLUX's dynamic
        shift, the VP timesteps) or uniform in ``t`` (the opt-out).
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
    """
    if integrator not in INTEGRATORS:
        raise unknown_name_error("integrator", integrator, INTEGRATORS)
    if time_grid not in TIME_GRIDS:
        raise unknown_name_error("time_grid", time_grid, TIME_GRIDS)
    if integrator == "scheduler" and time_grid != "scheduler":
        raise ValueError(
            "time_grid: integrator='scheduler' runs on the scheduler's own grid; use time_grid='scheduler'"
        )
    if isinstance(pipeline, PipelineComponents):
        components = pipeline
    elif isinstance(pipeline, str) or hasattr(pipeline, "__fspath__"):
        components = load_components(pipeline, device=device, dtype=dtype)
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
    if integrator == "scheduler" and steps is None:
        raise ValueError("steps: integrator='scheduler' builds the scheduler's grid for a step count; pass steps=")
    if time_grid == "scheduler" and steps is not None:
        steps = check_positive_int("steps", steps)
        grid = scheduler_grid(
            components.scheduler,
            steps,
            model.scheduler,
            model.kind,
            model.parameterization,
            update=integrator == "scheduler",
            **adapter.grid_options(steps),
        )
    decoder = LatentDecoder(components.vae, decode_chunk_size)
    return TextToImageEnvironment(
        model, decoder, components, noise=noise, step_grid=grid, integrator=integrator, time_grid=time_grid
    )


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
    (texts or indices, one per sample): :func:`diffusiongym.sample` on
    ``env.time_points(steps, t_start)`` (the scheduler's grid by default, as the pipeline steps;
    ``steps`` default: the env's, else 50), from ``env.initial_latents(z)``. ``sample_kwargs`` go to
    :func:`~diffusiongym.sample` (e.g. ``grid=`` to override the grid, ``t_start=``, ``reward=``)."""
    if not isinstance(env, TextToImageEnvironment):
        raise TypeError(f"env: expected a TextToImageEnvironment, got {type(env).__name__}")
    idx = torch.as_tensor(env.prompts.indices(prompts), device=z.device).reshape(-1)
    if idx.numel() != z.shape[0]:
        raise ValueError(f"prompts: expected {z.shape[0]} prompts (one per latent), got {idx.numel()}")
    cond = {"prompt": idx}
    if guidance_scale is not None:
        cond["guidance_scale"] = guidance_scale
    t_start = sample_kwargs.pop("t_start", None)
    if "grid" in sample_kwargs:
        if steps is not None or t_start is not None:
            raise ValueError("grid: pass either grid= or steps= / t_start=, not both")
    else:
        if steps is None and env.step_grid is None:
            steps = 50
        sample_kwargs["grid"] = env.time_points(steps, t_start)
    return sample(env, x=env.initial_latents(z, steps), cond=cond, **sample_kwargs)

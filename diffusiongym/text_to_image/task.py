"""The ``diffusiongym/TextToImage-v0`` task and its Gymnasium environments.

::

    env = gym.make("diffusiongym/TextToImage-v0", pipeline="path/to/sd15", prompts=["a red cube", ...],
                   reward=BrightnessReward(), guidance_scale=7.5, steps=50)

The state is the latent ``(C, h, w)``; the observation is ``{"x", "t", "prompt"}`` with the prompt
index in ``Discrete(capacity)`` (the prompt set's initial prompts plus ``extra_slots``, as
``label`` in ``Digits-v0``). ``reset(options={"prompt": "a photo of a cat"})`` uses that prompt
(a text, appended to the set if new, or an index); the vector env takes one per sub-env. The
terminal reward is the image reward on the decoded latents (:class:`DecodedReward`).
``render()`` shows the decoded Tweedie estimate of the current state. Episodes step on the
scheduler's time grid (the task's ``times``, as the pipeline steps: SD3's shift, FLUX's dynamic shift;
``time_grid="uniform"`` opts out); with ``integrator="scheduler"`` (``noise="ode"``, ``action_mode``
``"drift"`` or ``"model"``) also with the scheduler's own update, so zero control reproduces the
pipeline (for flow matching our Euler step already is the scheduler's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusiongym.envs.gym_env import SINGLE_ENV_KWARGS, DiffusionEnv, render_frame, render_state
from diffusiongym.envs.registry import NAMESPACE, register_ids
from diffusiongym.envs.simulator import resolve_task
from diffusiongym.envs.vector_env import VECTOR_ENV_KWARGS, DiffusionVectorEnv
from diffusiongym.rewards.base import Reward
from diffusiongym.rewards.model_base import ModelImageReward
from diffusiongym.tasks import Task, check_reward, register_task
from diffusiongym.text_to_image.decode import DecodedReward
from diffusiongym.text_to_image.environment import text_to_image_environment
from diffusiongym.text_to_image.prompts import PromptSet
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.validation import check_positive_int, check_real

__all__ = ["text_to_image_task", "TextToImageEnv", "TextToImageVectorEnv", "TASK_NAME", "ENV_ID"]

TASK_NAME = "TextToImage-v0"
ENV_ID = f"{NAMESPACE}/{TASK_NAME}"


def text_to_image_task(
    *,
    pipeline: str | Path | Any = None,
    prompts: Any = None,
    reward: Reward | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    reward_scale: float = 1.0,
    noise: Any = "memoryless",
    integrator: str = "euler",
    steps: int = 50,
    time_grid: str = "scheduler",
    t_start: float | None = None,
    action_scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    offload_text_encoders: bool = True,
    decode_chunk_size: int | None = None,
    extra_slots: int = 16,
    text_keyword: str | None = None,
    family_options: dict[str, Any] | None = None,
) -> Task:
    """The ``TextToImage-v0`` task.

    Parameters
    ----------
    pipeline : str, Path, PipelineComponents or diffusers pipeline
        Required: a folder saved by ``DiffusionPipeline.save_pretrained`` (offline, safetensors).
    prompts : list of str, str or Path
        Required: the prompt set (or a ``.txt`` file, one prompt a line).
    reward : Reward
        Required: an image reward on decoded images in ``[-1, 1]`` (e.g. ``BrightnessReward()``), or
        a :class:`DecodedReward` / latent reward used as is.
    guidance_scale, negative_prompt
        Classifier-free guidance (``None``: the family's default, 7.5 for SD/SDXL, 7.0 for SD3, 1.0
        for FLUX).
    reward_scale, noise, steps, action_scale
        As every task.
    time_grid : {"scheduler", "uniform"}
        The episodes' grid (the task's ``times``): the scheduler's for ``steps`` steps, as the
        pipeline steps (default), or uniform in ``t`` from ``t_start``.
    t_start : float, optional
        Start of the grid. Scheduler grid: its first point raised to ``t_start`` when that is later
        (default: the scheduler's own start, raised to ``DEFAULT_T_START`` for flow matching with a
        stochastic noise, which the memoryless noise needs: it is singular at ``t = 0``). Uniform
        grid: default 0 for the VP tables (their noisiest point with ``alpha > 0``),
        ``DEFAULT_T_START`` for flow matching (SD3, FLUX).
    integrator : {"euler", "scheduler"}
        See :func:`~diffusiongym.text_to_image.environment.text_to_image_environment`.
    device, dtype, offload_text_encoders, decode_chunk_size
        Memory and speed options.
    extra_slots : int
        Room for prompts first given at reset.
    text_keyword : str, optional
        Pass the batch's prompt texts to the image reward under this keyword (default
        ``"prompt"`` for rewards on pretrained models, e.g. ``CLIPScore``, which read the texts there).
    family_options : dict, optional
        Adapter options (e.g. FLUX's ``guidance``, ``height``, ``width``; see
        :func:`~diffusiongym.text_to_image.environment.text_to_image_environment`).
    """
    missing = [
        name for name, value in (("pipeline", pipeline), ("prompts", prompts), ("reward", reward)) if value is None
    ]
    if missing:
        raise TypeError(
            f"{TASK_NAME}: missing required argument(s) {missing}; e.g. gym.make({ENV_ID!r}, "
            "pipeline='path/to/pipeline_folder', prompts=['a photo of a cat'], reward=BrightnessReward())"
        )
    reward = check_reward(reward)
    reward_scale = check_real("reward_scale", reward_scale)
    steps = check_positive_int("steps", steps)
    prompt_set = prompts if isinstance(prompts, PromptSet) else None
    if prompt_set is None:
        prompt_set = PromptSet(prompts, negative_prompt=negative_prompt, extra_slots=extra_slots)
    env = text_to_image_environment(
        pipeline,
        prompt_set,
        guidance_scale=guidance_scale,
        integrator=integrator,
        steps=steps,
        time_grid=time_grid,
        noise=noise,
        device=device,
        dtype=dtype,
        offload_text_encoders=offload_text_encoders,
        decode_chunk_size=decode_chunk_size,
        family_options=family_options,
    )
    if text_keyword is None and isinstance(reward, ModelImageReward):
        text_keyword = "prompt"  # the prompt index becomes each sample's text (rewards.model_base)
    if not isinstance(reward, DecodedReward) and not getattr(reward, "on_latents", False):
        reward = DecodedReward(reward, env.decoder, prompt_set, text_keyword)
    conditioning = {"prompt": (prompt_set.space, prompt_set.sample)}
    times, init_std = None, None
    if time_grid == "scheduler":
        times = env.time_points(steps, t_start)
        if float(times[0]) == float(env.step_grid.times[0]):  # the pipeline's start: its initial latents
            init_std = env.step_grid.init_scale
        t_start = float(times[0])
    elif t_start is None:
        t_start = DEFAULT_T_START if env.model.kind == "flow" else 0.0
    return Task(
        TASK_NAME,
        env,
        reward,
        reward_scale,
        steps,
        t_start,
        action_scale,
        None,
        conditioning,
        times=times,
        init_std=init_std,
    )


def _prompt_options(options: dict[str, Any] | None, prompts: PromptSet, batch: int | None) -> dict[str, Any] | None:
    if not options or "prompt" not in options:
        return options
    idx = prompts.indices(options["prompt"])
    if batch is not None and idx.ndim == 0:
        idx = np.full(batch, int(idx))
    return {**options, "prompt": idx if batch is not None else int(idx)}


class TextToImageEnv(DiffusionEnv):
    """:class:`~diffusiongym.envs.gym_env.DiffusionEnv` for text-to-image tasks: prompts as texts at
    reset, decoded frames in ``render``; the episodes run on the task's grid (the scheduler's by default)."""

    def __init__(
        self, task: Task | str = TASK_NAME, render_mode: str | None = None, *, flat_obs: bool = False, **kwargs: Any
    ):
        task, env_kw = resolve_task(task, kwargs, SINGLE_ENV_KWARGS, "TextToImageEnv", ("render_mode", "flat_obs"))
        super().__init__(task, render_mode=render_mode, flat_obs=flat_obs, **env_kw)

    @property
    def prompts(self) -> PromptSet:
        return self.task.environment.prompts

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """As :meth:`DiffusionEnv.reset`; ``options["prompt"]`` may be a text (appended to the set if new)."""
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options: expected a dict or None, got {type(options).__name__}")
        return super().reset(seed=seed, options=_prompt_options(options, self.prompts, None))

    def prompt(self) -> str:
        """The text of the current episode's prompt."""
        if self.sim.x is None:
            raise RuntimeError("prompt: call reset() first")
        return self.prompts[int(self.sim.cond["prompt"][0])]

    def render(self) -> np.ndarray | None:
        """The decoded Tweedie estimate of the current latent as a uint8 ``(H, W, 3)`` frame."""
        sim = self.sim

        def draw() -> np.ndarray:
            env = self.task.environment
            t = sim.times[sim.k]
            with torch.no_grad():
                image = env.pred_final_images(sim.x, t.expand(sim.num_envs), **sim.cond)
            return render_state(self.task, image[0].float().cpu().numpy(), float(t))

        return render_frame(self.render_mode, sim.x is not None, draw)


class TextToImageVectorEnv(DiffusionVectorEnv):
    """:class:`~diffusiongym.envs.vector_env.DiffusionVectorEnv` for text-to-image tasks
    (``options["prompt"]``: one text or index per sub-env, or one for all)."""

    def __init__(self, task: Task | str = TASK_NAME, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any):
        task, env_kw = resolve_task(
            task, kwargs, VECTOR_ENV_KWARGS, "TextToImageVectorEnv", ("num_envs", "render_mode")
        )
        super().__init__(task, num_envs, render_mode=render_mode, **env_kw)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        prompts = self.task.environment.prompts
        return super().reset(seed=seed, options=_prompt_options(options, prompts, self.num_envs))


register_task(TASK_NAME, text_to_image_task)
register_ids(
    {ENV_ID: TASK_NAME},
    "diffusiongym.text_to_image.task:TextToImageEnv",
    "diffusiongym.text_to_image.task:TextToImageVectorEnv",
)

"""Text-to-image latent diffusion models (diffusers pipelines) as diffusiongym environments."""

from diffusiongym.text_to_image.components import PipelineComponents, components_from_pipeline, load_components
from diffusiongym.text_to_image.decode import DecodedReward, LatentDecoder
from diffusiongym.text_to_image.environment import (
    TextToImageEnvironment,
    TextToImageModel,
    generate,
    text_to_image_environment,
)
from diffusiongym.text_to_image.families import FAMILIES, FamilyAdapter, register_family
from diffusiongym.text_to_image.flow_families import (
    FluxAdapter,
    StableDiffusion3Adapter,
    calculate_shift,
    pack_latents,
    unpack_latents,
)
from diffusiongym.text_to_image.integrator import SchedulerGrid, scheduler_grid
from diffusiongym.text_to_image.prompts import PromptCache, PromptSet
from diffusiongym.text_to_image.task import ENV_ID, TextToImageEnv, TextToImageVectorEnv, text_to_image_task

__all__ = [
    "PipelineComponents",
    "load_components",
    "components_from_pipeline",
    "LatentDecoder",
    "DecodedReward",
    "TextToImageModel",
    "TextToImageEnvironment",
    "text_to_image_environment",
    "generate",
    "FAMILIES",
    "FamilyAdapter",
    "register_family",
    "StableDiffusion3Adapter",
    "FluxAdapter",
    "calculate_shift",
    "pack_latents",
    "unpack_latents",
    "SchedulerGrid",
    "scheduler_grid",
    "PromptSet",
    "PromptCache",
    "text_to_image_task",
    "TextToImageEnv",
    "TextToImageVectorEnv",
    "ENV_ID",
]

"""Gradient checkpointing of the trained diffusers denoiser (``TrainerConfig.gradient_checkpointing``).

diffusers models (``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
...) recompute the activations of their blocks during the backward pass instead of keeping them
once ``enable_gradient_checkpointing()`` has been called (``torch.utils.checkpoint`` with
``use_reentrant=False``, active only while autograd records): a trainer's update then holds one
block's activations at a time, at the price of a second forward pass of each block. The
gradients are the same up to float rounding (the recomputation runs the same kernels); sampling
(no autograd) is unaffected.

Only diffusers models that hold trainable parameters are switched: the frozen base that a
trainer samples with, or one wrapped inside a residual model, is left as it is.
"""

from __future__ import annotations

from torch import nn

__all__ = ["enable_gradient_checkpointing"]


def _supports(module: nn.Module) -> bool:
    return callable(getattr(module, "enable_gradient_checkpointing", None)) and bool(
        getattr(module, "_supports_gradient_checkpointing", False)
    )


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def enable_gradient_checkpointing(modules: dict[str, nn.Module]) -> list[str]:
    """Call ``enable_gradient_checkpointing()`` on every diffusers model inside ``modules`` that
    has a trainable parameter (the outermost such model of each branch).

    Parameters
    ----------
    modules : dict of str to nn.Module
        A trainer's :meth:`~diffusiongym.trainers.base.Trainer.checkpoint_modules`.

    Returns
    -------
    list of str
        ``"<name>.<submodule path>"`` of each model switched.

    Raises
    ------
    ValueError
        Naming ``gradient_checkpointing`` when no trainable diffusers model is found.
    """
    switched: list[str] = []
    for name, root in modules.items():
        done: list[str] = []
        for path, module in root.named_modules():
            if any(_inside(path, d) for d in done):
                continue
            if _supports(module) and any(p.requires_grad for p in module.parameters()):
                module.enable_gradient_checkpointing()
                done.append(path)
                switched.append(f"{name}.{path}" if path else name)
    if not switched:
        kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in modules.items()) or "none"
        raise ValueError(
            "gradient_checkpointing: expected a trained model holding a diffusers model with trainable parameters "
            f"(e.g. add_lora(env.model) of a text-to-image or diffusers environment); the trained modules are {kinds}"
        )
    return switched

"""A fine-tuned model as the base plus a scaled difference of two fits.

``DeltaModel(base, model, reference, scale)`` outputs ``base + scale (model - reference)``, all in
the base model's parameterisation. Inside :class:`~diffusiongym.policies.control.ModelControl`
its control is ``scale`` times the control of ``model`` measured against ``reference``::

    u = coef_out (DeltaModel - base) / sigma = scale * coef_out (model - reference) / sigma.

Two uses, both in :class:`~diffusiongym.trainers.efm.EFMTrainer`:

- ``reference`` a second fit of the same kind on the same samples with *uniform* weights. A
  regression on samples of the discretised base chain learns, besides the reward's tilt, how
  those samples differ from the base model's own flow; the uniform-weight fit learns that part
  alone (its ideal answer is the base itself), so the difference keeps the tilt.
- ``scale != 1``: a fitted tilt can come out shrunk towards the base; a scale chosen by the
  sampled objective (``lambda E[r] - KL``, no oracle needed) undoes that.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from diffusiongym.policies.networks import ResidualModel

__all__ = ["DeltaModel"]


class DeltaModel(nn.Module):
    """``base + scale * (model - reference)`` (``reference=None``: the base).

    Parameters
    ----------
    base : nn.Module
        The frozen base model ``base(x, t, **cond)``; not registered as a submodule.
    model, reference : nn.Module
        Fine-tuned models in the base's parameterisation. When ``model`` (and ``reference``,
        if given) are :class:`~diffusiongym.policies.networks.ResidualModel` on ``base``, their
        nets are used directly (the base runs once).
    scale : float
        Finite; ``1`` with ``reference=None`` is ``model`` itself.
    """

    def __init__(self, base: nn.Module, model: nn.Module, reference: nn.Module | None = None, scale: float = 1.0):
        super().__init__()
        for name, value in (("base", base), ("model", model)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module, got {type(value).__name__}")
        if reference is not None and not isinstance(reference, nn.Module):
            raise TypeError(f"reference: expected an nn.Module or None, got {type(reference).__name__}")
        self._base = (base,)  # a tuple: not a registered submodule
        self.model = model
        self.reference = reference
        self.scale = scale

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or abs(value) == float("inf")
        ):
            raise ValueError(f"scale: expected a finite number, got {value!r}")
        self._scale = float(value)

    def _on_base(self, m: nn.Module | None) -> bool:
        return isinstance(m, ResidualModel) and m.base is self._base[0]

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        base = self._base[0](x, t, **cond)
        ref = self.reference
        if self._on_base(self.model) and (ref is None or self._on_base(ref)):
            # ResidualModels on this base: difference their nets (the base runs once)
            delta = self.model.net(x, t, **cond).reshape(x.shape)
            if ref is not None:
                delta = delta - ref.net(x, t, **cond).reshape(x.shape)
        else:
            ref = base if self.reference is None else self.reference(x, t, **cond)
            delta = self.model(x, t, **cond) - ref
        return base + self.scale * delta

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

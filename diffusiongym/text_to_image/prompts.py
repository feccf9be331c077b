"""Prompts as conditioning: a prompt set sampled per episode, and the cache of their encodings.

A :class:`PromptSet` holds the prompt texts (a list, or a text file with one prompt per line;
blank lines and lines starting with ``#`` are skipped). Episodes draw a prompt index uniformly
from the initial prompts; a prompt given at reset (``reset(options={"prompt": "a red cube"})``)
is looked up, or appended to one of ``extra_slots`` free slots, so the observation's
``Discrete(capacity)`` index stays valid. The index is the conditioning that travels with the
state (``cond["prompt"]``, a LongTensor ``(n,)``).

A :class:`PromptCache` encodes each prompt once (on first use, in one batch per call) with the
family adapter and keeps the tensors in the denoiser's dtype on its device, so every denoiser
call only gathers rows. The text encoders may live off the accelerator (``offload=True``: moved
to ``device`` to encode, back to the CPU after). The cache is shared, not copied, by
``copy.deepcopy`` (a fine-tuned copy of the model uses the same prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffusiongym.text_to_image.families import FamilyAdapter
from diffusiongym.utils.validation import check_device, check_int

__all__ = ["PromptSet", "PromptCache", "read_prompts"]

MAX_PROMPT_FILE_BYTES = 10_000_000


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one a line (blank lines and ``#`` comments skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts: no prompt file {file}")
    if file.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ValueError(f"prompts: {file} is larger than {MAX_PROMPT_FILE_BYTES} bytes")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class PromptSet:
    """The prompts of a task.

    Parameters
    ----------
    prompts : sequence of str, str or Path
        The prompts; a ``Path`` or a ``str`` ending in ``.txt`` is a prompt file, another ``str``
        a single prompt.
    negative_prompt : str, optional
        The unconditional branch of classifier-free guidance (``None``: the pipeline's default,
        ``""`` for SD, zeros for SDXL).
    extra_slots : int
        Room for prompts given at reset that are not in the set.
    """

    def __init__(
        self, prompts: Sequence[str] | str | Path, *, negative_prompt: str | None = None, extra_slots: int = 16
    ):
        if isinstance(prompts, Path) or (isinstance(prompts, str) and prompts.endswith(".txt")):
            texts = read_prompts(prompts)
        elif isinstance(prompts, str):
            texts = [prompts]
        elif isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
            texts = list(prompts)
        else:
            raise TypeError(f"prompts: expected a list of str, a prompt or a .txt file, got {type(prompts).__name__}")
        if not texts:
            raise ValueError("prompts: expected at least one prompt, got none")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt: expected a str or None, got {type(negative_prompt).__name__}")
        self.texts: list[str] = texts
        self.num_sampled = len(texts)
        self.capacity = len(texts) + check_int("extra_slots", extra_slots, low=0)
        self.negative_prompt = negative_prompt

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]

    @property
    def space(self) -> spaces.Discrete:
        """The observation space of the prompt index."""
        return spaces.Discrete(self.capacity)

    def index(self, text: str, add: bool = True) -> int:
        """The index of ``text``; appended to a free slot when new (``add``)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt: expected a str, got {type(text).__name__}")
        if text in self.texts:
            return self.texts.index(text)
        if not add:
            raise ValueError(f"prompt: {text!r} is not in the prompt set")
        if len(self.texts) >= self.capacity:
            raise ValueError(
                f"prompt: no free slot for {text!r} ({self.capacity} prompts); build the task with a larger extra_slots"
            )
        self.texts.append(text)
        return len(self.texts) - 1

    def indices(self, values: Any) -> np.ndarray:
        """Prompt indices (int64 array) from texts or indices (a scalar or a sequence)."""
        arr = np.asarray(values)
        if arr.dtype.kind in "US":
            return np.array([self.index(str(v)) for v in arr.reshape(-1)], dtype=np.int64).reshape(arr.shape)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"prompt: expected prompt texts or integer indices, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.texts)):
            raise ValueError(f"prompt: expected indices in [0, {len(self.texts) - 1}], got {arr.tolist()}")
        return arr.astype(np.int64)

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """``n`` indices drawn uniformly from the initial prompts (the task's conditioning sampler)."""
        return torch.randint(self.num_sampled, (n,), generator=generator, device=device)

    def __repr__(self) -> str:
        return f"PromptSet({len(self.texts)} prompts, capacity={self.capacity})"


class PromptCache:
    """Encodings of a :class:`PromptSet`, computed once per prompt.

    Parameters
    ----------
    prompts : PromptSet
    adapter : FamilyAdapter
    device : torch device
        Where the cached tensors live (the denoiser's device).
    dtype : torch.dtype
        Their precision (the denoiser's).
    offload : bool
        Keep the text encoders on the CPU between encodings (moved to ``device`` to encode).
    """

    def __init__(
        self,
        prompts: PromptSet,
        adapter: FamilyAdapter,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = True,
    ):
        if not isinstance(prompts, PromptSet):
            raise TypeError(f"prompts: expected a PromptSet, got {type(prompts).__name__}")
        self.prompts = prompts
        self.adapter = adapter
        self.device = check_device(device)
        self.dtype = dtype
        self.offload = bool(offload)
        self._rows: dict[int, dict[str, Tensor]] = {}
        self._negative: dict[str, Tensor] | None = None
        self._table: dict[str, Tensor] | None = None
        self._position = torch.empty(0, dtype=torch.long)
        self.encode_calls = 0
        if self.offload:
            for encoder in adapter.text_encoders:
                encoder.to("cpu")

    def __deepcopy__(self, memo: dict) -> PromptCache:
        return self

    def _encode(self, texts: list[str], negative: bool = False) -> list[dict[str, Tensor]]:
        encoders = self.adapter.text_encoders
        if self.offload:
            for encoder in encoders:
                encoder.to(self.device)
        try:
            with torch.no_grad():
                out = self.adapter.negative(texts[0]) if negative else self.adapter.encode(texts)
        finally:
            if self.offload:
                for encoder in encoders:
                    encoder.to("cpu")
        self.encode_calls += 1
        out = {k: v.to(device=self.device, dtype=self.dtype) for k, v in out.items()}
        return [{k: v[i] for k, v in out.items()} for i in range(len(texts))]

    def lookup(self, index: Tensor) -> dict[str, Tensor]:
        """The encodings of the prompts ``index`` (LongTensor ``(n,)``), each ``(n, ...)``: rows
        gathered from one table (new prompts are encoded first, in one batch)."""
        index = torch.as_tensor(index).reshape(-1)
        idx = index.tolist()
        missing = sorted({i for i in idx if i not in self._rows})
        for i in missing:
            if not 0 <= i < len(self.prompts):
                raise ValueError(f"prompt: index {i} is outside the prompt set (0..{len(self.prompts) - 1})")
        if missing or self._table is None:
            for i, row in zip(missing, self._encode([self.prompts[i] for i in missing])):
                self._rows[i] = row
            order = sorted(self._rows)
            self._table = {k: torch.stack([self._rows[i][k] for i in order]) for k in self._rows[order[0]]}
            position = torch.full((self.prompts.capacity,), -1, dtype=torch.long)
            position[order] = torch.arange(len(order))
            self._position = position.to(self.device)
        rows = self._position[index.to(self.device)]
        return {k: v.index_select(0, rows) for k, v in self._table.items()}

    def negative(self, n: int) -> dict[str, Tensor]:
        """The unconditional branch, expanded to ``n`` rows."""
        if self._negative is None:
            (self._negative,) = self._encode([self.prompts.negative_prompt], negative=True)
        return {k: v.expand(n, *v.shape) for k, v in self._negative.items()}

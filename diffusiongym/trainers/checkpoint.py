"""Trainer checkpoints: one folder, written atomically, read and validated before use.

Layout of a checkpoint folder::

    trainer.json                     method, format version, config, task fingerprint,
                                     iteration, history, optimiser / scheduler metadata,
                                     the name and SHA-256 of the weights file
    weights-<sha256[:16]>.safetensors  every tensor: trainable module weights (frozen ones
                                     left out), optimiser moments, generator states, and
                                     the method's extra tensors (e.g. a replay buffer)

Writing (:func:`write_checkpoint`) serialises everything in memory first, so a value that
cannot be serialised raises before the disk is touched. The weights go to a new
content-named file (never over the old one), then ``trainer.json`` is replaced by an atomic
rename: that rename is the commit point. A crash at any moment leaves either the old
checkpoint or the new one, both complete; stale weight files are removed afterwards.

Reading (:func:`read_checkpoint`) checks the JSON, the weights' hash and the format, and
names the file and the field in every error; the trainer then validates the contents
against itself before touching its live state (:meth:`Trainer.load`, with
:func:`stage_modules`, :func:`stage_optimizers`, :func:`stage_generators`: each checks and
returns the functions that apply, so nothing is changed until everything has been checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from diffusiongym.utils.io import frozen_parameter_names, load_optimizer_tensors

__all__ = [
    "FORMAT",
    "VERSION",
    "write_checkpoint",
    "read_checkpoint",
    "CheckpointError",
    "tensor_digest",
    "check_header",
    "check_state",
    "stage_modules",
    "stage_optimizers",
    "stage_generators",
]

FORMAT = "diffusiongym.trainer"
VERSION = 1
INDEX = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the trainer (names file and field)."""


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``meta`` (JSON-serialisable) and ``tensors`` to the folder ``path`` atomically.

    Returns the folder. Raises ``TypeError`` naming the offending entry when ``meta`` holds a
    value JSON cannot represent (e.g. a numpy scalar); nothing is written then.
    """
    folder = Path(path)
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    blob = save_safetensors(flat, metadata={"format": FORMAT})
    digest = hashlib.sha256(blob).hexdigest()
    weights_name = f"weights-{digest[:16]}.safetensors"
    index = {"format": FORMAT, "version": VERSION, **meta, "weights": weights_name, "weights_sha256": digest}
    try:
        text = json.dumps(index, indent=1, sort_keys=True)
    except TypeError as err:
        raise TypeError(
            f"{folder / INDEX}: cannot write the checkpoint, a value is not JSON-serialisable ({err})"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / weights_name, blob)
    _write_atomic(folder / INDEX, (text + "\n").encode())
    _fsync_dir(folder)
    for stale in folder.glob("weights-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return folder


def read_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a folder written by :func:`write_checkpoint`: ``(meta, tensors)``.

    Checks the index's format and version and the weights' SHA-256; raises
    :class:`CheckpointError` (a ``ValueError``) or ``FileNotFoundError`` naming the file.
    """
    folder = Path(path)
    index_path = folder / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"path: expected a trainer checkpoint folder with {INDEX}, got {folder}")
    try:
        meta = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{index_path}: format: expected {FORMAT!r}, got {got!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{index_path}: version: expected {VERSION}, got {meta.get('version')!r}")
    name = meta.get("weights")
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{index_path}: weights: expected a .safetensors file name in the folder, got {name!r}")
    weights_path = folder / name
    if not weights_path.is_file():
        raise FileNotFoundError(f"{index_path}: weights: the file {weights_path} is missing")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path}: content does not match weights_sha256 in {index_path} (corrupt or edited file)"
        )
    tensors = load_safetensors(blob)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return meta, tensors


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes (identifies a fixed data set)."""
    h = hashlib.sha256()
    for x in tensors:
        x = x.detach().cpu().contiguous()
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


#: config fields that choose how a run executes, not what it computes (equal up to float rounding):
#: a checkpoint resumes with either value
EXECUTION_OPTIONS = frozenset({"compile", "gradient_checkpointing"})


def check_header(
    meta: dict[str, Any], where: Path, method: str, fingerprint: dict[str, Any], config: Any
) -> tuple[int, dict[str, list[float]]]:
    """Check a checkpoint's method, task fingerprint, config (must equal ``config``), iteration and
    history against the live trainer's; returns ``(iteration, history)``."""
    if meta.get("method") != method:
        raise CheckpointError(f"{where}: method: this is a {meta.get('method')} checkpoint, not a {method} one")
    got_task = meta.get("task")
    if not isinstance(got_task, dict):
        raise CheckpointError(f"{where}: task: expected a dict, got {type(got_task).__name__}")
    for key, value in fingerprint.items():
        if got_task.get(key) != value:
            raise CheckpointError(
                f"{where}: task.{key}: the checkpoint has {got_task.get(key)!r}, this trainer's task has {value!r}"
            )
    saved = type(config).from_dict(meta.get("config"), source=f"{where}: config")
    diff = [
        f.name
        for f in dataclasses.fields(config)
        if f.name not in EXECUTION_OPTIONS and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diff:
        raise CheckpointError(
            f"{where}: config: fields {diff} differ from this trainer's; build it with {type(config).__name__}.from_dict(the saved config)"
        )
    iteration = meta.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"{where}: iteration: expected a non-negative integer, got {iteration!r}")
    history = meta.get("history")
    numbers = lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)  # noqa: E731
    if not isinstance(history, dict) or not all(numbers(v) for v in history.values()):
        raise CheckpointError(f"{where}: history: expected a dict of lists of numbers")
    return iteration, history


def check_state(where: str, module: nn.Module, state: dict[str, Tensor], optional: set[str] = frozenset()) -> None:
    """``state`` must hold exactly ``module``'s state-dict keys (those in ``optional``, e.g. frozen
    parameters, may be absent) with their shapes and dtypes; a :class:`CheckpointError` names
    ``where`` and the first offending key otherwise."""
    live = module.state_dict()
    missing, unexpected = sorted(set(live) - set(state) - set(optional)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: missing tensors {missing[:5]}, unexpected {unexpected[:5]} (another architecture, or other frozen parameters)"
        )
    for key, value in state.items():
        if value.shape != live[key].shape or value.dtype != live[key].dtype:
            raise CheckpointError(
                f"{where}: {key}: expected {live[key].dtype} of shape {tuple(live[key].shape)}, got {value.dtype} of shape {tuple(value.shape)}"
            )


def stage_modules(
    modules: dict[str, nn.Module], saved: Any, tensors: dict[str, Tensor], where: Path, used: set[str]
) -> list[Callable[[], None]]:
    """Check the saved trainable state of ``modules`` (keys, shapes, dtypes; frozen parameters
    are not saved) and return the functions that load it. Adds the tensor names it used to ``used``."""
    steps = []
    if not isinstance(saved, dict) or sorted(saved) != sorted(modules):
        raise CheckpointError(
            f"{where}: modules: expected {sorted(modules)}, got {sorted(saved) if isinstance(saved, dict) else saved!r}"
        )
    for name, module in modules.items():
        prefix = f"module.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        check_state(f"{where}: module {name!r}", module, state, frozen_parameter_names(module))
        used |= {prefix + k for k in state}
        steps.append(lambda module=module, state=state: module.load_state_dict(state, strict=False))
    return steps


def stage_optimizers(
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    where: Path,
    used: set[str],
) -> list[Callable[[], None]]:
    """Check saved optimiser and learning-rate-scheduler state against the live ones and return
    the functions that load it."""
    steps = []
    saved, saved_sched = meta.get("optimizers"), meta.get("lr_schedulers")
    if not isinstance(saved, dict) or sorted(saved) != sorted(optimizers):
        raise CheckpointError(
            f"{where}: optimizers: expected {sorted(optimizers)}, got {sorted(saved) if isinstance(saved, dict) else saved!r} (a checkpoint without optimiser state cannot resume exactly)"
        )
    if not isinstance(saved_sched, dict) or sorted(saved_sched) != sorted(schedulers):
        raise CheckpointError(f"{where}: lr_schedulers: expected {sorted(schedulers)}, got {saved_sched!r}")
    for name, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        groups = saved[name].get("param_groups") if isinstance(saved[name], dict) else None
        if not isinstance(groups, list) or [len(g.get("params", [])) for g in groups] != [
            len(g["params"]) for g in opt.param_groups
        ]:
            raise CheckpointError(f"{where}: optimizers.{name}: parameter groups do not match this trainer's")
        prefix = f"optimizer-{name}."
        mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, value in mine.items():
            pid = key[len(prefix) :].split(".", 1)[0]
            if not pid.isdigit() or int(pid) >= len(params):
                raise CheckpointError(f"{where}: optimizers.{name}: tensor {key} names no parameter")
            if value.ndim > 0 and value.shape != params[int(pid)].shape:
                raise CheckpointError(
                    f"{where}: optimizers.{name}: {key}: expected shape {tuple(params[int(pid)].shape)}, got {tuple(value.shape)}"
                )
        used |= set(mine)
        steps.append(
            lambda opt=opt, mine=mine, m=saved[name], prefix=prefix[:-1]: load_optimizer_tensors(
                opt, mine, m, prefix=prefix
            )
        )
    for name, sched in schedulers.items():
        state = saved_sched[name]
        if not isinstance(state, dict) or sorted(state) != sorted(sched.state_dict()):
            raise CheckpointError(f"{where}: lr_schedulers.{name}: expected keys {sorted(sched.state_dict())}")
        steps.append(lambda sched=sched, state=state: sched.load_state_dict(state))
    return steps


def stage_generators(
    generators: dict[str, torch.Generator], tensors: dict[str, Tensor], where: Path, used: set[str]
) -> list[Callable[[], None]]:
    """Check saved generator states (uint8, the live state's size) and return the setters."""
    steps = []
    for name, gen in generators.items():
        key = f"generator.{name}"
        state = tensors.get(key)
        live = gen.get_state()
        if state is None or state.dtype != torch.uint8 or state.shape != live.shape:
            raise CheckpointError(
                f"{where}: {key}: expected a uint8 generator state of shape {tuple(live.shape)}, got {None if state is None else (state.dtype, tuple(state.shape))}"
            )
        used.add(key)
        steps.append(lambda gen=gen, state=state: gen.set_state(state.cpu()))
    return steps

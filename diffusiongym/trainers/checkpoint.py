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
against itself before touching its live state (:meth:`Trainer.load`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = ["FORMAT", "VERSION", "write_checkpoint", "read_checkpoint", "CheckpointError"]

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
        raise TypeError(f"{folder / INDEX}: cannot write the checkpoint, a value is not JSON-serialisable ({err})") from None
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / weights_name, blob)
    _write_atomic(folder / INDEX, (text + "\n").encode())
    _fsync_dir(folder)
    for stale in folder.glob("weights-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return folder


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
        raise CheckpointError(f"{weights_path}: content does not match weights_sha256 in {index_path} (corrupt or edited file)")
    tensors = load_safetensors(blob)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return meta, tensors

"""The replay buffer in Value Matching's checkpoints: what it saves and how a saved one is checked.

:class:`ReplayBufferState` gives :class:`~diffusiongym.trainers.value_matching.ValueMatching`
the :class:`~diffusiongym.trainers.base.Trainer` hooks ``extra_state`` / ``stage_extra_state``
for its buffer (tensors ``buffer.<j>.states`` / ``.cost_to_go`` / ``.cond.<key>``, the value
network's spec and the action scale, which :func:`~diffusiongym.trainers.value_matching.load_value_policy`
reads), resumable under any world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.policies.value_nets import value_net_spec
from diffusiongym.trainers.checkpoint import CheckpointError

__all__ = ["ReplayBufferState"]


class ReplayBufferState:
    """Checkpoint hooks for a trainer with ``buffer``, ``model``, ``task``, ``config.replay`` and
    ``config.rollout_shards`` (a mixin placed before :class:`~diffusiongym.trainers.base.Trainer`)."""

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The replay buffer (tensors ``buffer.<j>.states`` / ``.cost_to_go`` /
        ``.cond.<key>``), the value network's architecture and the action scale (read by
        :func:`load_value_policy`). Sharded runs (``rollout_shards > 1``) gather every rank's
        samples in shard order and add ``shard_counts`` (valid samples per shard and entry)."""
        tensors: dict[str, Tensor] = {}
        shard_counts = []
        for j, entry in enumerate(self.buffer):
            if self.sharded:  # every rank's shards, in shard order: resumable under any world size
                tensors[f"buffer.{j}.states"] = gather_cat(entry["states"], 1)
                tensors[f"buffer.{j}.cost_to_go"] = gather_cat(entry["cost_to_go"], 1)
                for key, value in entry["cond"].items():
                    tensors[f"buffer.{j}.cond.{key}"] = gather_cat(value)
                shard_counts.append(gather_cat(torch.tensor(entry["counts"], dtype=torch.int64)).tolist())
                continue
            tensors[f"buffer.{j}.states"] = entry["states"]
            tensors[f"buffer.{j}.cost_to_go"] = entry["cost_to_go"]
            for key, value in entry["cond"].items():
                tensors[f"buffer.{j}.cond.{key}"] = value
        meta: dict[str, Any] = {
            "buffer_size": len(self.buffer),
            "cond_keys": sorted(self.buffer[0]["cond"]) if self.buffer else [],
            "value_net": value_net_spec(self.model),
            "action_scale": float(self.task.action_scale),
        }
        if self.sharded:
            meta["shard_counts"] = shard_counts
        return tensors, meta

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        """Validate a saved replay buffer against this trainer (sizes, keys, shapes, dtypes)
        and return the function that installs it; raises ``CheckpointError`` naming the field."""
        expected_meta = {"buffer_size", "cond_keys", "value_net", "action_scale"}
        if self.sharded:
            expected_meta.add("shard_counts")
        if not isinstance(meta, dict) or set(meta) != expected_meta:
            raise CheckpointError(
                f"extra: expected keys {sorted(expected_meta)}, got {sorted(meta) if isinstance(meta, dict) else meta!r}"
            )
        size, keys = meta["buffer_size"], meta["cond_keys"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.config.replay + 1:
            raise CheckpointError(
                f"extra.buffer_size: expected an integer in [0, {self.config.replay + 1}], got {size!r}"
            )
        if (
            not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys)
            or sorted(keys) != sorted(getattr(self.task, "conditioning", {}))
        ):
            raise CheckpointError(
                f"extra.cond_keys: expected the task's conditioning keys {sorted(getattr(self.task, 'conditioning', {}))}, got {keys!r}"
            )
        if meta["value_net"] != value_net_spec(self.model):
            raise CheckpointError(
                f"extra.value_net: the checkpoint's network is {meta['value_net']!r}, this trainer's is {value_net_spec(self.model)!r}"
            )
        if meta["action_scale"] != float(self.task.action_scale):
            raise CheckpointError(
                f"extra.action_scale: the checkpoint has {meta['action_scale']!r}, this trainer's task has {float(self.task.action_scale)!r}"
            )
        wanted = {
            f"buffer.{j}.{part}" for j in range(size) for part in ["states", "cost_to_go", *(f"cond.{k}" for k in keys)]
        }
        if set(tensors) != wanted:
            raise CheckpointError(
                f"extra: replay buffer tensors: missing {sorted(wanted - set(tensors))[:5]}, unexpected {sorted(set(tensors) - wanted)[:5]}"
            )
        m1, shape = self.task.steps + 1, tuple(self.env.sample_shape)
        buffer = []
        for j in range(size):
            states, ctg = tensors[f"buffer.{j}.states"], tensors[f"buffer.{j}.cost_to_go"]
            num = ctg.shape[1] if ctg.ndim == 2 else -1
            if ctg.ndim != 2 or ctg.shape[0] != m1 or ctg.dtype != self.dtype:
                raise CheckpointError(
                    f"extra: buffer.{j}.cost_to_go: expected {self.dtype} of shape ({m1}, N), got {ctg.dtype} of shape {tuple(ctg.shape)}"
                )
            if tuple(states.shape) != (m1, num, *shape) or states.dtype != self.dtype:
                raise CheckpointError(
                    f"extra: buffer.{j}.states: expected {self.dtype} of shape {(m1, num, *shape)}, got {states.dtype} of shape {tuple(states.shape)}"
                )
            cond = {}
            for key in keys:
                value = tensors[f"buffer.{j}.cond.{key}"]
                if value.ndim == 0 or value.shape[0] != num:
                    raise CheckpointError(
                        f"extra: buffer.{j}.cond.{key}: expected a leading dimension of {num}, got shape {tuple(value.shape)}"
                    )
                cond[key] = value.to(self.device)
            counts = [num]
            if self.sharded:
                counts = self._check_shard_counts(meta["shard_counts"], j, size, num)
                first, last = self.local_shards.start, self.local_shards.stop
                start, stop = sum(counts[:first]), sum(counts[:last])
                states, ctg = states[:, start:stop], ctg[:, start:stop]
                cond = {key: value[start:stop] for key, value in cond.items()}
                counts = counts[first:last]
            buffer.append(
                {"states": states.to(self.device), "cost_to_go": ctg.to(self.device), "cond": cond, "counts": counts}
            )

        def apply() -> None:
            self.buffer = buffer

        return apply

    def _check_shard_counts(self, shard_counts: Any, j: int, size: int, num: int) -> list[int]:
        shards = self.config.rollout_shards
        if not isinstance(shard_counts, list) or len(shard_counts) != size:
            raise CheckpointError(f"extra.shard_counts: expected a list of {size} lists, got {shard_counts!r}")
        counts = shard_counts[j]
        if (
            not isinstance(counts, list)
            or len(counts) != shards
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            or sum(counts) != num
        ):
            raise CheckpointError(
                f"extra.shard_counts[{j}]: expected {shards} non-negative integers summing to {num}, got {counts!r}"
            )
        return counts

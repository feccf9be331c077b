"""The round state in EFM's checkpoints: what :class:`~diffusiongym.trainers.efm.EFMTrainer` saves and
how a saved one is checked.

:class:`RoundState` gives the trainer the :class:`~diffusiongym.trainers.base.Trainer` hooks
``extra_state`` / ``stage_extra_state``: the digest of a given offline data set, and an unfinished
online round's samples, weights and statistics (every process's part, in shard order, so a run
resumes under any world size). Offline data drawn from the base are redrawn on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.trainers.checkpoint import CheckpointError

__all__ = ["ROUND_STATS", "RoundState"]

#: per-round statistics recorded with every step of the round
ROUND_STATS = ("ess", "ess_fraction", "reward", "valid_fraction", "kl", "objective")


class RoundState:
    """Checkpoint hooks for a trainer with ``_round``, ``_data_digest``, ``config`` (``mode``,
    ``samples_per_round``, ``rollout_shards``, ``iterations_per_round``), ``iteration``, ``task``
    and ``env`` (a mixin placed before :class:`~diffusiongym.trainers.base.Trainer`)."""

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The data-set digest (offline, given data) and the current online round's data
        while it is unfinished (offline data are redrawn or given again on resume)."""
        meta: dict[str, Any] = {} if self._data_digest is None else {"data_digest": self._data_digest}
        rd = self._round
        if (
            self.config.mode == "offline"
            or rd is None
            or rd["index"] != self.iteration // self.config.iterations_per_round
        ):
            return {}, meta
        tensors = {  # sharded: every process's part, in shard order (resumable under any world size)
            "round.x1": gather_cat(rd["x1"]),
            "round.weights": gather_cat(rd["weights"]),
            **{f"round.cond.{k}": gather_cat(v) for k, v in rd["cond"].items()},
        }
        meta["round"] = {"index": rd["index"], "stats": rd["stats"]}
        return tensors, meta

    def stage_extra_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Callable[[], None]:
        unknown = sorted(set(meta) - {"data_digest", "round"})
        if unknown:
            raise CheckpointError(f"extra: unexpected keys {unknown}")
        if meta.get("data_digest") != self._data_digest:
            raise CheckpointError(
                f"extra.data_digest: the checkpoint was trained on {'other data' if meta.get('data_digest') else 'data drawn from the base'}, "
                f"this trainer {'was given other data' if self._data_digest else 'was built without data='}; pass the same data set to resume"
            )
        if "round" not in meta:
            if tensors:
                raise CheckpointError(f"extra: unexpected tensors {sorted(tensors)[:5]}")

            def clear() -> None:
                self._round = None

            return clear
        if self.config.mode != "online":
            raise CheckpointError("extra.round: offline trainers keep no round data")
        info = meta["round"]
        index = info.get("index") if isinstance(info, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise CheckpointError(f"extra.round.index: expected a non-negative integer, got {index!r}")
        stats = info.get("stats")
        if (
            not isinstance(stats, dict)
            or sorted(stats) != sorted(ROUND_STATS)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats.values())
        ):
            raise CheckpointError(f"extra.round.stats: expected numbers {sorted(ROUND_STATS)}")
        x1, g = tensors.get("round.x1"), tensors.get("round.weights")
        n = self.config.samples_per_round
        shape = tuple(self.env.sample_shape or x1.shape[1:]) if x1 is not None else ()
        if x1 is None or tuple(x1.shape) != (n, *shape) or x1.dtype != self.dtype:
            raise CheckpointError(
                f"extra.round.x1: expected {self.dtype} of shape {(n, *shape)}, got {None if x1 is None else (x1.dtype, tuple(x1.shape))}"
            )
        if (
            g is None
            or g.shape != (n,)
            or g.dtype != torch.float64
            or not bool(torch.isfinite(g).all() and (g >= 0).all())
            or abs(float(g.sum()) - 1.0) > 1e-6
        ):
            raise CheckpointError(f"extra.round.weights: expected {n} non-negative float64 weights summing to 1")
        cond = {k[len("round.cond.") :]: v for k, v in tensors.items() if k.startswith("round.cond.")}
        names = sorted(getattr(self.task, "conditioning", {}))
        if sorted(cond) != names or any(v.shape[:1] != (n,) for v in cond.values()):
            raise CheckpointError(f"extra.round.cond: expected tensors {names} with {n} rows, got {sorted(cond)}")
        leftover = sorted(set(tensors) - {"round.x1", "round.weights"} - {f"round.cond.{k}" for k in cond})
        if leftover:
            raise CheckpointError(f"extra: unexpected tensors {leftover[:5]}")
        dev = self.device
        if self.sharded:  # this process's shards
            per = n // self.config.rollout_shards
            rows = slice(self.local_shards.start * per, self.local_shards.stop * per)
            x1, g, cond = x1[rows], g[rows], {k: v[rows] for k, v in cond.items()}

        def apply() -> None:
            self._round = {
                "index": index,
                "x1": x1.to(dev),
                "weights": g.to(dev),
                "cond": {k: v.to(dev) for k, v in cond.items()},
                "stats": {k: float(v) for k, v in stats.items()},
            }

        return apply

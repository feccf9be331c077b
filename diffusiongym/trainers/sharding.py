"""The per-shard randomness of a trainer's batches (``TrainerConfig.rollout_shards``).

:class:`ShardedBatches` is a mixin of :class:`~diffusiongym.trainers.base.Trainer`: it reads the
trainer's ``config``, ``iteration``, ``generator``, ``device``, ``local_shards`` (the shards this
process draws, :func:`diffusiongym.distributed.group.shard_range`) and ``init_seed``. With one
shard every method draws from ``trainer.generator`` as a one-process trainer always did; with
``S > 1`` shard ``s`` of iteration ``k`` draws from a generator seeded from ``(seed, k, s)``, so
a run does not depend on how many processes draw the shards (``docs/distributed.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from diffusiongym.distributed.collectives import average_gradients
from diffusiongym.utils.runtime import derive_seed

__all__ = ["ShardedBatches"]


class ShardedBatches:
    """Shard generators, shard sizes and seeds, and the gradient sync before an optimiser step."""

    config: Any
    iteration: int
    generator: torch.Generator
    device: torch.device
    local_shards: range
    _shard_gens: tuple[int, list[torch.Generator], torch.Generator] | None
    _synced: set[int]

    @property
    def sharded(self) -> bool:
        """Whether batches are drawn in ``rollout_shards > 1`` shards (see :class:`TrainerConfig`)."""
        return self.config.rollout_shards > 1

    def _iteration_generators(self) -> tuple[list[torch.Generator], torch.Generator]:
        if self._shard_gens is None or self._shard_gens[0] != self.iteration:
            seed, it = self.config.seed, self.iteration

            def gen(*names: object) -> torch.Generator:
                return torch.Generator(device=self.device).manual_seed(derive_seed(seed, "iteration", it, *names))

            self._shard_gens = (it, [gen("shard", s) for s in self.local_shards], gen("shared"))
        return self._shard_gens[1], self._shard_gens[2]

    def shard_generators(self) -> list[torch.Generator]:
        """One generator per shard this process draws, for this iteration: ``[self.generator]``
        with one shard; else fresh generators seeded from ``(seed, iteration, shard)``, the same
        objects for the whole iteration. Draw each shard's per-sample randomness from its own."""
        return [self.generator] if not self.sharded else self._iteration_generators()[0]

    def shared_generator(self) -> torch.Generator:
        """A generator for draws every shard shares (e.g. which grid times a loss uses): the
        trainer's with one shard, else one seeded from ``(seed, iteration)``, equal on all ranks."""
        return self.generator if not self.sharded else self._iteration_generators()[1]

    def shard_size(self, total: int, name: str = "batch_size") -> int:
        """``total / rollout_shards`` (``ValueError`` naming ``name`` unless it divides)."""
        shards = self.config.rollout_shards
        if total % shards:
            raise ValueError(f"{name}: expected a multiple of rollout_shards={shards}, got {total}")
        return total // shards

    def shard_seed(self, *names: object) -> list[int]:
        """Per local shard, a seed derived from ``config.seed``, ``names`` and the shard (one
        shard: ``[init_seed(*names)]``, the unsharded seed)."""
        if not self.sharded:
            return [self.init_seed(*names)]
        return [self.init_seed(*names, "shard", s) for s in self.local_shards]

    def _sync_before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        average_gradients([p for p in params if id(p) not in self._synced])
        self._synced.difference_update(id(p) for p in params)

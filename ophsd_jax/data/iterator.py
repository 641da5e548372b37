"""A seeded batch iterator whose position can be saved and restored exactly.

The order of epoch `e` is a permutation drawn from `default_rng([seed, e])`,
so it depends only on (seed, epoch) and never on how many batches were drawn
before: restoring `{epoch, position}` reproduces the remaining stream
exactly, with nothing but a few integers in the checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_STATE_KEYS = ("seed", "epoch", "position", "size", "batch_size", "shuffle", "drop_remainder")


class ExampleIterator:
    """Batches (lists of example dicts) from any random-access `source`."""

    def __init__(
        self,
        source: Sequence[dict],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        share: tuple[int, int] = (0, 1),
    ):
        self.size = len(source)
        if self.size == 0:
            raise ValueError("ExampleIterator: the source is empty")
        if batch_size < 1:
            raise ValueError(f"ExampleIterator: batch_size must be >= 1, got {batch_size}")
        if drop_remainder and batch_size > self.size:
            raise ValueError(
                f"ExampleIterator: batch_size {batch_size} > {self.size} examples with drop_remainder=True "
                "would never yield a batch"
            )
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.num_epochs = num_epochs
        # (index, count): yield only block `index` of `count` of each batch (one process's
        # share); the position still advances by whole batches, so it is the same everywhere.
        self.share = share
        self.epoch = 0
        self.position = 0
        self._order_epoch = None
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            else:
                self._order = np.arange(self.size)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            remaining = self.size - self.position
            if remaining <= 0 or (self.drop_remainder and remaining < self.batch_size):
                self.epoch += 1
                self.position = 0
                continue
            take = min(self.batch_size, remaining)
            indices = self._epoch_order()[self.position : self.position + take]
            self.position += take
            i, count = self.share
            indices = indices[i * take // count : (i + 1) * take // count]
            return [self.source[int(i)] for i in indices]

    def state(self) -> dict:
        """JSON-serialisable position (plus the settings it is only valid for)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "size": self.size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def restore(self, state: dict) -> None:
        """Continue from `state`; refuses a state saved for other data or settings."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"iterator state is missing keys {missing}")
        for key in ("seed", "size", "batch_size", "shuffle", "drop_remainder"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"iterator state was saved with {key}={state[key]!r}, this iterator has {getattr(self, key)!r}"
                )
        if not 0 <= int(state["position"]) <= self.size or int(state["epoch"]) < 0:
            raise ValueError(f"iterator state has an impossible position: {state}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

"""Batches of (input, target) token windows from prepared shards, resumable exactly.

A split is one long token stream (its shards back to back). It is cut into windows of
``block_size + 1`` tokens; the targets are the inputs shifted by one. Each epoch visits every window
once in a fresh random order, with the window grid shifted by a random offset so the model does not
always see the same boundaries.

The order is a pure function of ``(seed, epoch)``, so the loader's whole state is two integers,
``epoch`` and ``position`` (windows consumed so far, counted over all processes). Saving them in a
checkpoint and loading them back continues the exact same sequence of batches. With several
processes, rank r takes every world_size-th window of each global batch, so ranks never overlap.
"""

from __future__ import annotations

import numpy as np
import torch

from gptforge.errors import GptforgeError


class TokenStream:
    """Random access to windows of a split stored as several memory-mapped shards."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # start offset of each shard
        self.n_tokens = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        end = start + length
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - self.starts[i]
        if end <= self.starts[i + 1]:  # the common case: inside one shard
            return self.shards[i][local:local + length]
        parts, pos = [], start
        while pos < end:  # a window that crosses shard boundaries
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            stop = min(end, int(self.starts[i + 1]))
            parts.append(self.shards[i][pos - self.starts[i]:stop - self.starts[i]])
            pos = stop
        return np.concatenate(parts)


class BatchLoader:
    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, *,
                 seed: int, split: str = "train", rank: int = 0, world_size: int = 1,
                 shuffle_offset: bool = True):
        self.stream = TokenStream(shards)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_offset = shuffle_offset
        self.global_batch = batch_size * world_size
        if self.stream.n_tokens < block_size + 1:
            raise GptforgeError(
                f"the {split} split has {self.stream.n_tokens} tokens, fewer than "
                f"model.block_size + 1 = {block_size + 1}; lower model.block_size or add data")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> tuple[int, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = 0
        if self.shuffle_offset:
            offset = int(torch.randint(0, self.block_size, (1,), generator=g))
        n_windows = (self.stream.n_tokens - 1 - offset) // self.block_size
        if n_windows < 1:  # tiny split: fall back to the unshifted grid
            offset, n_windows = 0, (self.stream.n_tokens - 1) // self.block_size
        return offset, torch.randperm(n_windows, generator=g)

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order[1])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) int64 batch of shape (batch_size, block_size) for this rank."""
        starts = []
        while len(starts) < self.batch_size:
            offset, perm = self._order
            if self.position + self.global_batch > len(perm) and len(perm) >= self.global_batch:
                self._advance_epoch()  # drop the ragged tail so ranks stay in step
                continue
            index = self.position + self.rank + len(starts) * self.world_size
            starts.append(offset + int(perm[index % len(perm)]) * self.block_size)
        self.position += self.global_batch
        rows = np.stack([self.stream.window(s, self.block_size + 1) for s in starts])
        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._order = self._epoch_order(self.epoch)

    def reset(self) -> None:
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)

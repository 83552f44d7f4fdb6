"""Batches of (input, target) token windows from prepared shards, resumable exactly.

A split is one long token stream (its shards back to back). It is cut into windows of
``block_size + 1`` tokens; the targets are the inputs shifted by one. Each epoch visits every window
once in a fresh random order, with the window grid shifted by a random offset so the model does not
always see the same boundaries.

The order is a pure function of ``(seed, epoch)``, so a stream's whole state is two integers,
``epoch`` and ``position`` (windows consumed so far, counted over all processes). Saving them in a
checkpoint and loading them back continues the exact same sequence of batches (``EpochOrder``
does this for any items; ``data/finetune_loader.py`` uses it for its rows).

The order depends on the *global* batch only. One optimizer step draws its whole global batch,
``batch_size x grad_accum x world_size`` windows, at once (``next_batches``); micro-batch m of rank
r is then the fixed slice ``[(m * world_size + r) * batch_size, ... + batch_size)`` of it. So one
process with ``grad_accum=2``, two processes with ``grad_accum=1`` and one process with twice the
batch see the same windows in every step, and a run moved between world sizes with its global
batch kept continues the same trajectory. Ranks never overlap and need not talk to each other.

A *mixture* draws each row of a global batch from one of several prepared datasets with given
weights. The choice for row i of global batch b comes from a generator seeded by (seed, b), so it
is the same on every rank, in every layout and after a resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gptforge.errors import GptforgeError


class TokenStream:
    """Random access to windows of a split stored as several memory-mapped shards.

    With ``vocab_size``, every window is checked for ids outside the vocabulary (a shard prepared
    with another tokenizer, or damaged): the embedding lookup would fail steps later with an
    IndexError, or a device-side assert on CUDA. The check is a max over the window, which costs
    nothing beside a training step, where scanning every shard up front would read the whole
    dataset before the first step.
    """

    def __init__(self, shards: list[np.ndarray], vocab_size: int | None = None):
        self.shards, self.vocab_size = shards, vocab_size
        self.starts = np.cumsum([0] + [len(s) for s in shards])  # start offset of each shard
        self.n_tokens = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        tokens = self._window(start, length)
        if self.vocab_size is not None and len(tokens) and int(tokens.max()) >= self.vocab_size:
            self._refuse(start + int(np.argmax(tokens >= self.vocab_size)))
        return tokens

    def _refuse(self, position: int) -> None:
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        shard = self.shards[i]
        name = getattr(shard, "filename", None) or f"shard {i} of the split"
        token = int(shard[position - self.starts[i]])
        raise GptforgeError(
            f"{name}: token id {token} (at token {position - self.starts[i]:,}) is outside the "
            f"vocabulary of {self.vocab_size} tokens; the data was prepared with another "
            "tokenizer or is damaged: re-run `gptforge prepare` with the right --tokenizer")

    def _window(self, start: int, length: int) -> np.ndarray:
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


class EpochOrder:
    """Indices ``0 .. n_items - 1``, every epoch in a fresh random order; state = (epoch, position).

    An epoch's order is a pure function of ``(seed, epoch)``, so two integers locate any point of
    the sequence: ``epoch`` and ``position`` (indices taken so far in that epoch). Fine-tuning
    rows use it nearly as is (``RowOrder``); ``WindowOrder`` below changes what an epoch holds
    (``_begin_epoch``) and what is handed out for an index (``_items_of``).
    """

    def __init__(self, n_items: int, seed: int):
        self.n_items, self.seed = n_items, seed
        self.epoch, self.position = 0, 0
        self._perm = self._epoch_order(0)

    @property
    def items_per_epoch(self) -> int:
        """Items in the current epoch: ``n_items`` unless a subclass decides per epoch."""
        return len(self._perm)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self._begin_epoch(g), generator=g)

    def _begin_epoch(self, g: torch.Generator) -> int:
        """How many items the new epoch holds. A subclass may first draw choices of its own from
        ``g``: drawn before the permutation, they too follow from ``(seed, epoch)``."""
        return self.n_items

    def _items_of(self, indices: torch.Tensor) -> list[int]:
        """What ``take`` hands out for these indices of the current epoch: the indices."""
        return indices.tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` items. A new epoch begins rather than split them, unless an epoch holds
        fewer than ``n``: then they run on into the next epochs."""
        if self.position + n > len(self._perm) >= n:
            self.seek(self.epoch + 1, 0)  # drop the ragged tail so every batch is whole
        items: list[int] = []
        while len(items) < n:
            if self.position >= len(self._perm):  # (past it only if the data shrank since a save)
                self.seek(self.epoch + 1, 0)
            k = min(n - len(items), len(self._perm) - self.position)
            items += self._items_of(self._perm[self.position:self.position + k])
            self.position += k
        return items

    def seek(self, epoch: int, position: int) -> None:
        if epoch != self.epoch:
            self._perm = self._epoch_order(epoch)
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._perm = self._epoch_order(int(state["epoch"]))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class WindowOrder(EpochOrder):
    """The epoch order of one stream's windows, handed out as their start offsets.

    Each epoch draws a grid offset in ``[0, block_size)`` (when ``shuffle_offset``) before its
    permutation; the shifted grid may hold one window fewer than the unshifted one.
    """

    def __init__(self, stream: TokenStream, block_size: int, seed: int, shuffle_offset: bool):
        self.stream, self.block_size, self.shuffle_offset = stream, block_size, shuffle_offset
        self._offset = 0
        super().__init__((stream.n_tokens - 1) // block_size, seed)  # windows of the plain grid

    def _begin_epoch(self, g: torch.Generator) -> int:
        self._offset = 0
        if self.shuffle_offset:
            self._offset = int(torch.randint(0, self.block_size, (1,), generator=g))
        n_windows = (self.stream.n_tokens - 1 - self._offset) // self.block_size
        if n_windows < 1:  # tiny split: fall back to the unshifted grid
            self._offset, n_windows = 0, self.n_items
        return n_windows

    def _items_of(self, indices: torch.Tensor) -> list[int]:
        return (self._offset + indices * self.block_size).tolist()


def _check_length(stream: TokenStream, block_size: int, split: str) -> None:
    if stream.n_tokens < block_size + 1:
        raise GptforgeError(
            f"the {split} split has {stream.n_tokens} tokens, fewer than "
            f"model.block_size + 1 = {block_size + 1}; lower model.block_size or add data")


def _rows_to_batch(streams_and_starts, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([stream.window(s, block_size + 1) for stream, s in streams_and_starts])
    tokens = torch.from_numpy(rows.astype(np.int64))
    return tokens[:, :-1], tokens[:, 1:]


def micro_slices(items: list, batch_size: int, rank: int, world_size: int) -> list[list]:
    """This rank's micro-batches of one global batch: micro m takes the slice starting at
    ``(m * world_size + rank) * batch_size`` (the same slices whatever the layout's split)."""
    step = batch_size * world_size
    return [items[m + rank * batch_size:m + (rank + 1) * batch_size]
            for m in range(0, len(items), step)]


class OrderedLoader:
    """What a loader whose whole position is its ``order`` (an :class:`EpochOrder`) needs: each
    step's global batch is the next ``batch_size * world_size * micro_batches`` items, sliced
    into this rank's micro-batches by :func:`micro_slices`; resetting and saving or restoring the
    position are the order's. Subclasses turn a list of items into a batch (``_batch_of``)."""

    order: EpochOrder
    batch_size: int
    rank: int
    world_size: int
    depends_on_model = False
    """Whether batches are generated by the model being trained (RL rollouts), so that the
    next step's cannot be drawn before this step's update (see ``Trainer.prefetch``)."""

    def _batch_of(self, items: list[int]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def next_batches(self, micro_batches: int) -> list[tuple[torch.Tensor, ...]]:
        """This rank's ``micro_batches`` batches of the next global batch (one optimizer step)."""
        items = self.order.take(self.batch_size * self.world_size * micro_batches)
        return [self._batch_of(part)
                for part in micro_slices(items, self.batch_size, self.rank, self.world_size)]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The next batch of shape (batch_size, ...) for this rank (a global batch of one)."""
        return self.next_batches(1)[0]

    def reset(self) -> None:
        self.order.seek(0, 0)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class BatchLoader(OrderedLoader):
    """Batches from one prepared split."""

    def __init__(self, shards: list[np.ndarray], block_size: int, batch_size: int, *,
                 seed: int, split: str = "train", rank: int = 0, world_size: int = 1,
                 shuffle_offset: bool = True, vocab_size: int | None = None):
        self.stream = TokenStream(shards, vocab_size)
        _check_length(self.stream, block_size, split)
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.order = WindowOrder(self.stream, block_size, seed, shuffle_offset)

    @property
    def windows_per_epoch(self) -> int:
        return self.order.items_per_epoch

    def _batch_of(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (len(starts), block_size) for windows starting at ``starts``."""
        return _rows_to_batch([(self.stream, s) for s in starts], self.block_size)


class MixtureLoader:
    """Batches whose rows come from several prepared splits, chosen with fixed weights."""

    depends_on_model = False  # as OrderedLoader's

    def __init__(self, sources: list[list[np.ndarray]], weights: list[float], block_size: int,
                 batch_size: int, *, seed: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, shuffle_offset: bool = True, vocab_size: int | None = None):
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source is needed")
        self.streams = [TokenStream(s, vocab_size) for s in sources]
        for i, stream in enumerate(self.streams):
            _check_length(stream, block_size, f"{split} (mixture source {i + 1})")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.orders = [WindowOrder(s, block_size, seed + 7 * i, shuffle_offset)
                       for i, s in enumerate(self.streams)]
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches = 0  # global batches drawn so far
        self.rows_per_source = [0] * len(sources)

    @property
    def windows_per_epoch(self) -> int:
        return sum(o.items_per_epoch for o in self.orders)

    def next_batches(self, micro_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``micro_batches`` batches of the next global batch (one optimizer step)."""
        n = self.batch_size * self.world_size * micro_batches
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        choice = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        starts = {d: iter(order.take(choice.count(d))) for d, order in enumerate(self.orders)}
        rows = [(self.streams[d], next(starts[d])) for d in choice]  # global row order
        self.batches += 1
        for d in choice:
            self.rows_per_source[d] += 1
        return [_rows_to_batch(part, self.block_size)
                for part in micro_slices(rows, self.batch_size, self.rank, self.world_size)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batches(1)[0]

    def reset(self) -> None:
        for order in self.orders:
            order.seek(0, 0)
        self.batches, self.rows_per_source = 0, [0] * len(self.orders)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "rows_per_source": list(self.rows_per_source),
                "sources": [o.state_dict() for o in self.orders]}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
        self.rows_per_source = list(state["rows_per_source"])
        for order, saved in zip(self.orders, state["sources"], strict=True):
            order.load_state_dict(saved)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"data/web:3, data/code:1"`` -> [("data/web", 0.75), ("data/code", 0.25)]."""
    parts = []
    for item in spec.split(","):
        path, sep, weight = item.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not path or not 0 < value < math.inf:  # also refuses nan
            raise GptforgeError(f"data.mixture: '{item.strip()}' must look like DIR:WEIGHT with a "
                                "positive weight, e.g. data.mixture='data/web:3,data/code:1'")
        parts.append((path, value))
    total = sum(w for _, w in parts)
    return [(p, w / total) for p, w in parts]

"""A preallocated key/value cache for autoregressive decoding.

Without a cache, every new token re-runs attention over the whole prefix: O(T^2) work per token.
With it, each layer stores the keys and values it has computed, and a decoding step only computes
q, k, v for the one new token. The tensors are allocated once at full length, so decoding never
reallocates or concatenates. Each layer has its own tensors, so a compiled decode step can take
them as separate inputs and write into them in place (see ``decode.py``).

The cache also remembers which token sits at each filled position (``ids``). A cache kept after
one generation can then serve the next: the keys and values of a position depend only on the
tokens up to it, so where a new prompt starts with the same ids, those positions are still valid
and only the rest of the prompt needs a forward pass (a chat turn, which re-sends the whole
conversation, shares everything but the newest message with the turn before).

:class:`SlotCache` is the cache of a continuous-batching server: a fixed number of rows
("slots"), each holding its own sequence of its own length. One row is a :class:`KVCache` view
(prefill, or decoding a lone row); a decode step over several rows of different lengths writes
each row's new keys at that row's position (:meth:`SlotCache.step`; the model masks each row
to its own length, see ``model/gpt.py``). A freed row keeps its ids, keys and values, so the next
request whose prompt shares its beginning prefills only the rest.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int,
                 max_len: int, *, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        # ids[:, :pos] are the tokens whose keys/values fill positions :pos. They are written
        # (record) before the forward pass and pos moves only once every layer is written, so the
        # two agree even if a forward pass is interrupted.
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    @classmethod
    def row_of(cls, cache: KVCache, row: int) -> KVCache:
        """A one-row cache that reads and writes row ``row`` of ``cache`` in place."""
        view = cls.__new__(cls)
        view.k = [t[row:row + 1] for t in cache.k]  # (1, nkv, max_len, hs) views
        view.v = [t[row:row + 1] for t in cache.v]
        view.ids = cache.ids[row:row + 1]
        view.batch_size, view.max_len, view.pos = 1, cache.max_len, 0
        return view

    @classmethod
    def for_model(cls, model, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = model.config
        weight = model.lm_head.weight
        return cls(cfg.n_layer, batch_size, cfg.kv_heads, cfg.head_size, cfg.block_size,
                   dtype=dtype or weight.dtype, device=weight.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) at the current position; return all keys/values so far
        (in the dtype of ``k``: the cache may hold a narrower one)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def record(self, idx: torch.Tensor) -> None:
        """Note the tokens ``idx`` (B, T) about to be stored from the current position on."""
        end = self.pos + idx.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.ids[:, self.pos:end] = idx

    def shared_prefix(self, idx: torch.Tensor) -> int:
        """How many leading positions hold exactly the first tokens of ``idx`` (B, T), in every
        row: the part of a new prompt whose keys and values are already here."""
        n = min(self.pos, idx.size(1))
        same = (self.ids[:, :n] == idx[:, :n]).all(dim=0).tolist()  # (n,)
        return same.index(False) if False in same else n

    def rewind(self, n: int) -> None:
        """Forget every position from ``n`` on; later updates overwrite them."""
        self.pos = min(self.pos, n)


class SlotCache:
    """``slots`` independent rows of one preallocated cache; ``rows[s]`` is row s as a
    :class:`KVCache` (its ``pos`` is the row's length)."""

    def __init__(self, cache: KVCache):
        self.whole = cache
        self.rows = [KVCache.row_of(cache, s) for s in range(cache.batch_size)]

    @classmethod
    def for_model(cls, model, slots: int, dtype: torch.dtype | None = None) -> SlotCache:
        return cls(KVCache.for_model(model, slots, dtype))

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` hold what row ``src`` holds (n choices of one prompt)."""
        n = self.rows[src].pos
        for t in self.whole.k + self.whole.v:
            t[dst, :, :n] = t[src, :, :n]
        self.whole.ids[dst, :n] = self.whole.ids[src, :n]
        self.rows[dst].pos = n

    def step(self, slots: list[int], idx: torch.Tensor) -> RowsStep:
        """The cache for one forward pass of tokens ``idx`` (len(slots), T) continuing each of
        ``slots``; call its :meth:`RowsStep.advance` once the pass is done."""
        return RowsStep(self, slots, idx)


class RowsStep:
    """Rows of a :class:`SlotCache` in one forward pass with per-row ``positions`` (A, T):
    ``update`` stores each token's keys and values at the index of its position and returns the
    indices ``0..max(positions)`` of those rows (the model masks what each row must not see)."""

    pos = None  # the rows have no common length; the model uses ``positions`` instead

    def __init__(self, cache: SlotCache, slots: list[int], idx: torch.Tensor):
        self.cache, self.slots, self.T = cache, slots, idx.size(1)
        device = idx.device
        starts = torch.tensor([cache.rows[s].pos for s in slots], device=device)
        self.positions = starts[:, None] + torch.arange(self.T, device=device)  # (A, T)
        self.length = max(cache.rows[s].pos for s in slots) + self.T
        if self.length > cache.whole.max_len:
            raise ValueError(f"KV cache full: {self.length} > {cache.whole.max_len} positions")
        self.index = torch.tensor(slots, device=device)[:, None]  # (A, 1)
        lo = min(slots)  # contiguous rows are read as a view, others gathered
        self.rows = slice(lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) \
            else self.index[:, 0]
        cache.whole.ids[self.index, self.positions] = idx

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.whole.k[layer], self.cache.whole.v[layer]
        # Index (A, T) in dims 0 and 2 with a slice between: the target is (A, T, nkv, hs).
        keys[self.index, :, self.positions] = k.transpose(1, 2).to(keys.dtype)
        values[self.index, :, self.positions] = v.transpose(1, 2).to(values.dtype)
        return (keys[self.rows, :, :self.length].to(k.dtype),
                values[self.rows, :, :self.length].to(v.dtype))

    def advance(self) -> None:
        for s in self.slots:
            self.cache.rows[s].advance(self.T)

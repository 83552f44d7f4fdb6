"""Batches for fine-tuning: SFT rows (padded or packed) and DPO preference pairs, resumable exactly.

An example is a rendered conversation: token ids and the chat template's loss mask (True on what
the assistant says, see ``tokenizer/chat_template.py``). It becomes an input ``x = ids[:-1]`` and a
target ``y = ids[1:]`` in which every target that is not an assistant token is ``IGNORE_INDEX``,
so the loss never asks the model to predict a user's words, a role marker or padding. Examples
longer than ``block_size + 1`` tokens are cut at the end (``loader.truncated`` counts them, so the
command can warn); one left with no assistant target at all is dropped (``loader.dropped``).

Rows of a batch always have ``block_size`` positions, so shapes never change (no recompiles):

- *padding*: one example per row, right-padded with ``pad_id`` (targets ``IGNORE_INDEX``). Causal
  attention keeps pads, which come last, from affecting the real tokens.
- *packing*: examples back to back in a row (an example of n tokens takes n - 1 positions: its
  last token is only a target), in reading order, a new row started when the next one does not
  fit (an example is never split), the rest of a row padded. ``segment_ids`` (B, T)
  numbers the examples of each row 0, 1, 2, ... (the padding is one more segment); the model uses
  it to keep attention inside each example and to restart positions, so packing changes speed,
  not results.

Order and resume come from ``EpochOrder`` in ``data/loader.py``: each epoch visits every row once
in a random order that is a pure function of ``(seed, epoch)``; the state is ``(epoch, position)``
counted in global rows; rank r takes rows r, r + N, ... of each global batch of
``batch_size * world_size`` rows.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gptforge.data.loader import EpochOrder, OrderedLoader
from gptforge.errors import GptforgeError
from gptforge.model.loss import IGNORE_INDEX
from gptforge.tokenizer.base import Tokenizer
from gptforge.tokenizer.chat_template import DEFAULT, ChatTemplate, encode_segments

log = logging.getLogger(__name__)

Example = tuple[list[int], list[bool]]
# Conversations encoded per call to the tokenizer: big enough for its batch path, small enough
# that an encoding error can be traced to one conversation cheaply.
ENCODE_CHUNK = 512


# ---- conversations -> examples ---------------------------------------------------------------

def encode_sft_examples(tokenizer: Tokenizer, conversations: list[list[dict]],
                        template: ChatTemplate = DEFAULT) -> list[Example]:
    """(ids, loss mask) of each conversation, rendered with the chat ``template``."""
    return _encode_all(tokenizer, conversations, "conversation", template)


def encode_preference_examples(tokenizer: Tokenizer, records: list[dict],
                               template: ChatTemplate = DEFAULT
                               ) -> list[tuple[list[int], list[bool], list[int], list[bool]]]:
    """(chosen ids, chosen mask, rejected ids, rejected mask) of each preference record.

    Each side is the prompt followed by that answer; the mask covers the answer's assistant
    tokens only (assistant turns inside the prompt are context, not the preferred behaviour).
    """
    parts = [side for r in records for side in (r["prompt"] + r["chosen"],
                                                 r["prompt"] + r["rejected"])]
    encoded = _encode_all(tokenizer, parts, "preference record", template, per_record=2)
    examples = []
    for i, record in enumerate(records):
        (chosen, chosen_mask), (rejected, rejected_mask) = encoded[2 * i:2 * i + 2]
        # Assistant turns inside the prompt are context: the mask starts after the prompt,
        # whose tokens are where the two sides first differ at the latest.
        context = _prompt_length(chosen, rejected, template, tokenizer, record["prompt"])
        examples.append((chosen, [False] * context + chosen_mask[context:],
                         rejected, [False] * context + rejected_mask[context:]))
    return examples


def _prompt_length(chosen: list[int], rejected: list[int], template: ChatTemplate,
                   tokenizer: Tokenizer, prompt: list[dict]) -> int:
    """Tokens of the prompt at the start of both sides (rendered in one piece with each answer,
    so that a template that renders whole conversations sees the answer in place)."""
    if not prompt:
        return 0
    prompt_ids = encode_segments(tokenizer, [template.segments(prompt)])[0][0]
    n = len(prompt_ids)
    if chosen[:n] != prompt_ids or rejected[:n] != prompt_ids:  # a template that looks ahead
        n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                 min(len(chosen), len(rejected)))
    return n


def _encode_all(tokenizer: Tokenizer, conversations: list[list[dict]], what: str,
                template: ChatTemplate, per_record: int = 1) -> list[Example]:
    examples: list[Example] = []
    for start in range(0, len(conversations), ENCODE_CHUNK):
        chunk = conversations[start:start + ENCODE_CHUNK]
        try:
            examples += _encode_chunk(tokenizer, chunk, template)
        except GptforgeError:
            for i, conversation in enumerate(chunk, start=start):  # find the culprit
                try:
                    _encode_chunk(tokenizer, [conversation], template)
                except GptforgeError as err:
                    raise GptforgeError(f"{what} {i // per_record} (counting from 0 in reading "
                                        f"order): {err}") from None
            raise
    return examples


def _encode_chunk(tokenizer: Tokenizer, conversations: list[list[dict]],
                  template: ChatTemplate) -> list[Example]:
    examples = encode_segments(tokenizer, [template.segments(c) for c in conversations])
    check_ids = getattr(template, "check_ids", None)  # templates that are only text (Jinja)
    if check_ids is not None:
        for messages, (ids, _) in zip(conversations, examples, strict=True):
            check_ids(tokenizer, messages, ids)
    return examples


# ---- examples -> rows ------------------------------------------------------------------------

def shift_example(ids: list[int], mask: list[bool], block_size: int
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, y, truncated): inputs and masked next-token targets, at most ``block_size`` of each."""
    if len(ids) != len(mask):
        raise ValueError(f"an example has {len(ids)} ids but a mask of {len(mask)}")
    truncated = len(ids) > block_size + 1
    ids = np.asarray(ids[:block_size + 1], dtype=np.int64)
    keep = np.asarray(mask[1:block_size + 1], dtype=bool)
    x = ids[:-1].astype(np.int32)
    y = np.where(keep, ids[1:], IGNORE_INDEX).astype(np.int32)
    return x, y, truncated


def pack_rows(lengths: list[int], block_size: int) -> list[list[int]]:
    """Example indices of each packed row: in order, a new row when the next one does not fit."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if row and used + n > block_size:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def fill_rows(rows: list[list[int]], examples: list[tuple[np.ndarray, np.ndarray]],
              block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, segment_ids), each int64 (B, block_size), from rows of example indices."""
    B, T = len(rows), block_size
    x = np.full((B, T), pad_id, dtype=np.int64)
    y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for segment, i in enumerate(row):
            ex_x, ex_y = examples[i]
            x[b, t:t + len(ex_x)], y[b, t:t + len(ex_x)] = ex_x, ex_y
            segments[b, t:t + len(ex_x)] = segment
            t += len(ex_x)
        segments[b, t:] = len(row)  # the padding is a segment of its own
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(segments)


# ---- order -----------------------------------------------------------------------------------

class RowOrder(EpochOrder):
    """The epoch order of ``n_items`` fine-tuning rows; the state also records ``n_items``."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rows": self.n_items}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("rows", self.n_items)) != self.n_items:
            log.warning("the fine-tuning data changed since the checkpoint (%s rows per epoch, "
                        "now %d): resuming at the saved position of a different order",
                        state["rows"], self.n_items)
        super().load_state_dict(state)
        self.position = min(self.position, self.n_items)


class _RowLoader(OrderedLoader):
    """What SFT and preference loaders share: checks and the row order (rank slicing and state
    come from :class:`OrderedLoader`)."""

    def __init__(self, block_size: int, batch_size: int, seed: int, pad_id: int, rank: int,
                 world_size: int):
        if block_size < 1 or batch_size < 1:
            raise ValueError("block_size and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.block_size, self.batch_size, self.pad_id = block_size, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.truncated = 0  # examples cut to block_size + 1 tokens
        self.dropped = 0  # examples left with nothing to learn after the cut, not used

    def _start_order(self, n_rows: int) -> None:
        if n_rows == 0:
            raise GptforgeError("no fine-tuning examples left: every one was empty or lost all of "
                                f"its assistant tokens when cut to model.block_size = "
                                f"{self.block_size}; raise model.block_size or check the data")
        self.order = RowOrder(n_rows, self.seed)

    @property
    def windows_per_epoch(self) -> int:
        return self.order.n_items



class SFTLoader(_RowLoader):
    """Supervised fine-tuning batches: ``(x, y)``, or ``(x, y, segment_ids)`` when packing."""

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, *, seed: int,
                 pad_id: int, packing: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(block_size, batch_size, seed, pad_id, rank, world_size)
        self.packing = packing
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        for ids, mask in examples:
            x, y, truncated = shift_example(ids, mask, block_size)
            self.truncated += truncated
            if (y != IGNORE_INDEX).any():
                self.examples.append((x, y))
            else:
                self.dropped += 1
        self.rows = (pack_rows([len(x) for x, _ in self.examples], block_size) if packing
                     else None)  # padding: row i is example i
        self._start_order(len(self.rows) if packing else len(self.examples))

    def _batch_of(self, picked: list[int]) -> tuple[torch.Tensor, ...]:
        """The int64 batch of shape (len(picked), block_size) of these rows."""
        rows = [self.rows[r] for r in picked] if self.packing else [[r] for r in picked]
        x, y, segment_ids = fill_rows(rows, self.examples, self.block_size, self.pad_id)
        return (x, y, segment_ids) if self.packing else (x, y)


class PreferenceLoader(_RowLoader):
    """DPO batches ``(chosen_x, chosen_y, rejected_x, rejected_y)``, each padded (B, block_size)."""

    def __init__(self, examples: list[tuple[list[int], list[bool], list[int], list[bool]]],
                 block_size: int, batch_size: int, *, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(block_size, batch_size, seed, pad_id, rank, world_size)
        self.chosen: list[tuple[np.ndarray, np.ndarray]] = []
        self.rejected: list[tuple[np.ndarray, np.ndarray]] = []
        for chosen_ids, chosen_mask, rejected_ids, rejected_mask in examples:
            cx, cy, c_cut = shift_example(chosen_ids, chosen_mask, block_size)
            rx, ry, r_cut = shift_example(rejected_ids, rejected_mask, block_size)
            self.truncated += c_cut or r_cut
            if (cy != IGNORE_INDEX).any() and (ry != IGNORE_INDEX).any():
                self.chosen.append((cx, cy))
                self.rejected.append((rx, ry))
            else:
                self.dropped += 1
        self._start_order(len(self.chosen))

    def _batch_of(self, picked: list[int]) -> tuple[torch.Tensor, ...]:
        rows = [[r] for r in picked]
        cx, cy, _ = fill_rows(rows, self.chosen, self.block_size, self.pad_id)
        rx, ry, _ = fill_rows(rows, self.rejected, self.block_size, self.pad_id)
        return cx, cy, rx, ry

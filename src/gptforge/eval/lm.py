"""Language-modelling metrics of a token stream: mean loss, perplexity and bits per byte.

The stream is the text's tokens with an end-of-text token in front, so that its first token is
predicted from "a document starts here", as every document start after the first was in
training. Every token after that front one is a *target* and is scored exactly once, in windows
of at most ``block_size`` inputs (:func:`sliding_windows`):

- ``stride == block_size`` (the default): non-overlapping windows, as training and nanoGPT's
  ``estimate_loss`` see the data. A target near the start of its window has little context.
- ``stride < block_size``: window k starts at ``k * stride`` and scores only the targets no
  earlier window scored, so every target after the first window is predicted from at least
  ``block_size - stride`` tokens (the sliding-window perplexity of the Hugging Face guide). It
  costs about ``block_size / stride`` times more compute and gives a lower, fairer loss.

Metrics (docs/evaluation.md explains them):

- ``loss``: the mean negative log-likelihood in nats over every target, end-of-text tokens
  included (what training logs as val_loss);
- ``perplexity``: ``exp(loss)``;
- ``bits_per_byte``: the nats of the text's own tokens / ln 2 / the UTF-8 bytes those tokens
  encode. Special tokens (the end-of-text separators) are left out of both sums, as in nanochat,
  so the number measures how well the text is compressed and does not depend on the tokenizer.
  The bytes are counted by decoding the scored targets (:func:`text_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.data.loader import TokenStream
from gptforge.errors import GptforgeError
from gptforge.runtime.device import Precision

# Decoding for the byte count works in pieces of at most this many tokens.
DECODE_CHUNK_TOKENS = 1 << 20


@dataclass(frozen=True)
class Window:
    """Inputs ``stream[begin:end]``, targets ``stream[begin + 1:end + 1]``; only the last
    ``scored`` targets count, the ones before are context already scored by an earlier window."""

    begin: int
    end: int
    scored: int


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> Iterator[Window]:
    """Windows that score targets ``1 .. n_tokens - 1`` of a stream once each, in order."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    last = n_tokens - 1  # the position of the last target
    scored_to, begin = 0, 0  # targets 1 .. scored_to are done
    while scored_to < last:
        end = min(begin + block_size, last)
        yield Window(begin, end, end - scored_to)
        scored_to, begin = end, begin + stride


@dataclass
class Totals:
    """Sums over the scored targets; ``text_*`` leave out special tokens."""

    nats: float = 0.0
    tokens: int = 0
    text_nats: float = 0.0
    windows: int = 0


@dataclass(frozen=True)
class LMResult:
    loss: float  # nats per target token
    perplexity: float
    bits_per_byte: float | None  # None when the scored targets hold no text
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes of the text those targets encode
    windows: int
    block_size: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(windows: Iterable[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows, up to ``batch_size`` of equal length per batch (only the last
    window of a stream can be shorter)."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or
                      w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.no_grad()
def score_stream(model: torch.nn.Module, stream: TokenStream, n_tokens: int, *,
                 stride: int, batch_size: int, precision: Precision, special_ids: Iterable[int],
                 progress: bool = False) -> Totals:
    """Sum the negative log-likelihoods of targets ``1 .. n_tokens - 1`` of ``stream``."""
    from tqdm import tqdm

    device = precision.device
    specials = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)
    windows = sliding_windows(n_tokens, model.config.block_size, stride)
    totals = Totals()
    with tqdm(total=n_tokens - 1, unit="tok", disable=not progress, leave=False) as bar:
        for batch in _batches(windows, batch_size):
            rows = np.stack([stream.window(w.begin, w.end - w.begin + 1) for w in batch])
            tokens = torch.from_numpy(rows.astype(np.int64)).to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T)
            with precision.autocast():
                logits = model(x)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                  reduction="none").view(y.shape)  # (B, T)
            T = y.size(1)
            scored = torch.tensor([w.scored for w in batch], device=device)
            counted = torch.arange(T, device=device) >= (T - scored)[:, None]  # (B, T)
            text = counted & ~torch.isin(y, specials)
            totals.nats += float(nll[counted].sum())
            totals.text_nats += float(nll[text].sum())
            totals.tokens += int(counted.sum())
            totals.windows += len(batch)
            bar.update(int(scored.sum()))
    return totals


def text_bytes(tokenizer, stream: TokenStream, start: int, end: int,
               chunk_tokens: int = DECODE_CHUNK_TOKENS) -> int:
    """UTF-8 bytes of the text that ``stream[start:end]`` encodes, special tokens left out.

    Each run of tokens between special tokens is decoded on its own: a special token is always
    at a character boundary, and SentencePiece or byte-level BPE decode a run exactly. A run
    longer than ``chunk_tokens`` is decoded in pieces, which can miscount a character cut at a
    piece boundary (a few bytes in a million tokens).
    """
    specials = np.array(sorted(set(tokenizer.special_tokens.values())))
    total, pos = 0, start
    while pos < end:
        ids = np.asarray(stream.window(pos, min(chunk_tokens, end - pos)))
        special_at = np.flatnonzero(np.isin(ids, specials))
        if pos + len(ids) < end and len(special_at):  # end this piece on a special token
            ids = ids[:special_at[-1] + 1]
        bounds = [-1, *special_at[special_at < len(ids)].tolist(), len(ids)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - a > 1:
                total += len(tokenizer.decode(ids[a + 1:b].tolist()).encode("utf-8"))
        pos += len(ids)
    return total


def evaluate_stream(model: torch.nn.Module, tokenizer, stream: TokenStream, *,
                    precision: Precision, stride: int | None = None, batch_size: int = 8,
                    max_tokens: int | None = None, progress: bool = False) -> LMResult:
    """Loss, perplexity and bits per byte of ``model`` on ``stream`` (from :func:`text_stream`
    or :func:`prepared_stream`); ``max_tokens`` bounds the number of targets scored."""
    block_size = model.config.block_size
    stride = stride or block_size
    n_tokens = stream.n_tokens if max_tokens is None else min(stream.n_tokens, max_tokens + 1)
    if n_tokens < 2:
        raise GptforgeError("nothing to evaluate: the text holds no tokens")
    totals = score_stream(model, stream, n_tokens, stride=stride, batch_size=batch_size,
                          precision=precision, special_ids=tokenizer.special_tokens.values(),
                          progress=progress)
    nbytes = text_bytes(tokenizer, stream, 1, n_tokens)
    loss = totals.nats / totals.tokens
    bpb = totals.text_nats / math.log(2) / nbytes if nbytes else None
    return LMResult(loss=loss, perplexity=math.exp(min(loss, 80.0)), bits_per_byte=bpb,
                    tokens=totals.tokens, bytes=nbytes, windows=totals.windows,
                    block_size=block_size, stride=stride)


def text_stream(tokenizer, documents: Iterable[tuple[str, str]],
                max_tokens: int | None = None) -> TokenStream:
    """The stream of ``documents`` (``(label, text)`` pairs) laid out as ``prepare`` writes
    them: each document's tokens followed by end-of-text, with one end-of-text in front.

    Reading stops once the stream holds more than ``max_tokens`` targets.
    """
    eos = tokenizer.eos_id
    ids = [eos]
    for label, text in documents:
        try:
            ids += tokenizer.encode(text)
        except GptforgeError as err:
            raise GptforgeError(f"{label}: {err}") from None
        ids.append(eos)
        if max_tokens is not None and len(ids) > max_tokens + 1:
            break
    return TokenStream([np.array(ids, dtype=np.uint32)])


def prepared_stream(data_dir: str | Path, split: str, tokenizer) -> TokenStream:
    """A split of a prepared data directory as a stream, with end-of-text in front.

    The data must have been encoded with ``tokenizer`` (the checkpoint's): token ids of another
    tokenizer would be scored as if they meant something else.
    """
    from gptforge.data.manifest import Manifest
    from gptforge.data.shards import open_split

    manifest = Manifest.read(data_dir)
    saved, ours = manifest.tokenizer.sha256, tokenizer.fingerprint()
    if saved != ours:
        raise GptforgeError(
            f"{data_dir} was prepared with a different tokenizer than the checkpoint's "
            f"(sha256 {str(saved)[:12]}... vs {ours[:12]}...); evaluate on data prepared with "
            "the checkpoint's tokenizer (gptforge prepare --tokenizer CKPT/tokenizer ...), or "
            "pass the raw text with --text")
    if split not in manifest.split_tokens:
        have = ", ".join(manifest.split_tokens) or "none"
        raise GptforgeError(f"{data_dir} has no '{split}' split (it has: {have}); use --split")
    if not manifest.tokens(split):
        raise GptforgeError(f"the {split} split of {data_dir} is empty; use another --split")
    shards = open_split(data_dir, split)
    front = np.array([tokenizer.eos_id], dtype=shards[0].dtype)
    return TokenStream([front, *shards])

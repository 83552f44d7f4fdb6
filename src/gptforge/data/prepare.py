"""The prepare pipeline: text files in, a data directory of token shards out.

``prepare`` reads documents (:mod:`~gptforge.data.sources`), trains or loads a tokenizer, assigns
each document to the train or val split, encodes the text in parallel, and streams the ids into
shards (:mod:`~gptforge.data.shards`) of a fixed size. Everything is streamed, so the corpus never
has to fit in memory, and the result depends only on the inputs and settings, never on the number
of worker processes. The output directory::

    OUT/manifest.json              what is here and how it was made (written last)
    OUT/tokenizer/<file>           the tokenizer the shards were encoded with
    OUT/train/shard_000000.bin ... every document's tokens followed by <|endoftext|>
    OUT/val/shard_000000.bin ...

It is built in ``OUT.partial/`` beside OUT and renamed into place at the end, so an interrupted
run leaves OUT as it was, and a directory with a manifest is always complete. A journal there
(:mod:`~gptforge.data.journal`) lets a run that was interrupted continue where it stopped.

Before the split, documents pass the quality filters (:mod:`~gptforge.data.filters`: exact and
near duplicates, length, damaged text, punctuation, script) and are taken at their source's
sampling rate (:mod:`~gptforge.data.mixing`); a *dry run* does only that, and shows what came out.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gptforge import atomic
from gptforge.data.corpora import fetch_corpus, get_corpus
from gptforge.data.filters import FilterSettings
from gptforge.data.journal import (
    JOURNAL_NAME,
    JOURNAL_VERSION,
    LOCK_NAME,
    Position,
    SplitProgress,
    WorkDir,
    open_work_dir,
    partial_dir,
)
from gptforge.data.manifest import MANIFEST_NAME, MANIFEST_VERSION, read_manifest
from gptforge.data.mixing import Mixture, parse_rates
from gptforge.data.rendering import RecordTemplate
from gptforge.data.shards import FORMAT_VERSION as SHARD_FORMAT_VERSION
from gptforge.data.shards import ShardWriter, shard_name, split_shard_paths, token_dtype
from gptforge.data.sources import TEXT_SUFFIXES, DocumentShape, describe_file, resolve_sources
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import (
    KINDS,
    Tokenizer,
    check_tokenizer_options,
    find_tokenizer_file,
    load_tokenizer,
    train_tokenizer,
)

log = logging.getLogger(__name__)

# With at least this many documents whole documents go to val; with fewer, each one's tail does.
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20
MAX_VAL_FRACTION = 0.5
PREVIEW_CHARS = 400  # a dry run shows at most this much of each sample document
# Text longer than this is cut at line breaks before encoding, for parallelism and bounded memory.
CHUNK_CHARS = 1 << 20
BATCH_CHARS = 1 << 20  # characters of text per encoding task
AUTO_WORKER_BYTES = 4 << 20  # workers=None starts at most one worker per this much input
# A cut here gives the same ids as encoding the text whole (see _chunks): after a "\n", or
# between the "\r" and "\n" of a Windows line end, with non-space on both sides.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S\r)(?=\n\S)")
# Failing that (one long line), before a single space between non-spaces: every backend starts a
# token at such a space (byte-level BPE's pre-tokens begin with it, SentencePiece splits at it).
_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
# Progress as log lines, where no progress bar shows (a log file, a pipe): one per this interval.
PROGRESS_LOG_S = 5.0


class Piece(NamedTuple):
    """Text bound for one split; ``eos`` marks the end of a document (or document part).

    Once numbered for encoding, ``index`` is the piece's place in the split plan's stream and
    ``chunk`` the chunk of it this is; ``skip_tokens`` of its tokens are already in completed
    shards of an interrupted run (see :mod:`~gptforge.data.journal`).
    """

    split: str
    label: str
    text: str
    eos: bool = True
    index: int = 0
    chunk: int = 0
    skip_tokens: int = 0


# --------------------------------------------------------------------------- the split


def split_method(documents: Iterable[tuple]) -> str:
    """``"document"`` for 20 documents or more, else ``"position"`` (see :func:`plan_split`).

    Reads no further than the 20th document and keeps none, so a pass of its own over the inputs
    decides; the pass that follows streams, one document at a time.
    """
    count = sum(1 for _ in itertools.islice(documents, MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT))
    return "document" if count == MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT else "position"


def plan_split(documents: Iterable[tuple[str, str, int]], method: str, val_fraction: float,
               seed: int) -> Iterator[Piece]:
    """Assign ``(label, text, copies)`` documents to train/val by ``method``
    (:func:`split_method`); the stream of pieces, each piece ``copies`` times over, so that the
    copies of a document (:mod:`~gptforge.data.mixing`) are all on the same side.

    With >= 20 documents, whole documents go to val (see :func:`document_goes_to_val`): decided
    per document from its index alone, so the stream never has to be seen in full. With fewer
    (one big .txt file, say), the last ``val_fraction`` of each document, cut at a nearby line
    break, goes to val.
    """
    if method == "document":
        return _split_by_document(documents, val_fraction, seed)
    return _split_by_position(documents, val_fraction)


def document_goes_to_val(index: int, val_fraction: float, seed: int) -> bool:
    """Whether document ``index`` belongs to val: exactly one of every ``1 / val_fraction``.

    The documents are cut into consecutive windows of ``1 / val_fraction`` (10 for 0.1), and a
    hash of ``(seed, window)`` picks the one document of each window that goes to val. Unlike a
    coin flip per document, this hits the fraction within one document even on small corpora (a
    coin flip puts 1 of Shakespeare's 42 plays in val as easily as 7). The first window's pick is
    among the first 20 documents, so val is never empty.
    """
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)
    if fraction == 0:
        return False
    num, den = fraction.numerator, fraction.denominator
    window = index * num // den  # exact integer arithmetic: no float rounding at the edges
    first = -(-window * den // num)  # the window's first index, ceil(window / fraction)
    size = -(-(window + 1) * den // num) - first
    if window == 0:
        size = min(size, MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT)
    return index == first + int(_val_score(seed, window) * size)


def _val_score(seed: int, window: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split_by_document(documents: Iterable[tuple[str, str, int]], val_fraction: float,
                       seed: int) -> Iterator[Piece]:
    for index, (label, text, copies) in enumerate(documents):
        to_val = document_goes_to_val(index, val_fraction, seed)
        for _ in range(copies):
            yield Piece("val" if to_val else "train", label, text)


def _split_by_position(documents: Iterable[tuple[str, str, int]],
                       val_fraction: float) -> Iterator[Piece]:
    for label, text, copies in documents:
        cut = _cut_point(text, val_fraction)
        for _ in range(copies):
            if cut > 0:
                yield Piece("train", label, text[:cut])
            if cut < len(text):
                yield Piece("val", label, text[cut:])


def _cut_point(text: str, val_fraction: float) -> int:
    """Where val starts: ``1 - val_fraction`` into the text, moved to a nearby line start."""
    cut = round(len(text) * (1 - val_fraction))
    if cut in (0, len(text)):
        return cut
    window = max(100, (len(text) - cut) // 10)
    before = text.rfind("\n", max(0, cut - window), cut)
    after = text.find("\n", cut, min(len(text), cut + window))
    starts = [i + 1 for i in (before, after) if i >= 0]
    return min(starts, key=lambda s: abs(s - cut)) if starts else cut


# --------------------------------------------------------------------------- the documents


@dataclass(frozen=True)
class Corpus:
    """What prepare reads: the sources, how their records become documents, the quality filters
    and the sampling rate of each source."""

    sources: list
    shape: DocumentShape
    rates: list[float]
    filters: FilterSettings
    seed: int

    def mixture(self) -> Mixture:
        """A new pass over the documents, ``(label, text, copies)`` (with new filters)."""
        return Mixture(self.sources, self.rates, self.seed, self.shape, self.filters.build())


def _corpus_settings(template: str | None, text_unit: str, input_rates: list[str] | None,
                     filters: FilterSettings | None) -> dict:
    """The settings of :class:`Corpus` beyond the text field and dedup, for the journal and the
    manifest."""
    chosen = {k: v for k, v in asdict(filters or FilterSettings()).items() if k != "dedup"}
    return {"template": template, "text_unit": text_unit,
            "input_rates": [str(r) for r in input_rates] if input_rates else None,
            "filters": chosen}


def build_corpus(settings: dict, sources: list) -> Corpus:
    """The :class:`Corpus` of ``settings``, every option checked (one line for each problem)."""
    filters = FilterSettings(**settings["filters"], dedup=settings["dedup"])
    filters.check()
    template = RecordTemplate(settings["template"]) if settings["template"] is not None else None
    shape = DocumentShape(settings["text_field"], template, settings["text_unit"])
    if shape.text_unit != "file" and not any(
            isinstance(s, Path) and s.suffix.lower() in TEXT_SUFFIXES for s in sources):
        raise GptforgeError(f"--split {shape.text_unit} applies to .txt and .md files, and the "
                            "inputs have none")
    rates = parse_rates(settings["input_rates"], settings["inputs"], sources,
                        settings["hf_data_files"])
    return Corpus(sources, shape, rates, filters, settings["seed"])


def preview(corpus: Corpus, count: int = 3) -> dict:
    """A dry run: one pass over the documents, keeping the first ``count`` (cut to
    ``PREVIEW_CHARS``) and counting what the filters and rates did."""
    documents = corpus.mixture()
    samples, read, taken, chars = [], 0, 0, 0
    for label, text, copies in documents:
        if len(samples) < count:
            samples.append({"label": label, "text": text[:PREVIEW_CHARS], "chars": len(text)})
        read, taken, chars = read + 1, taken + copies, chars + copies * len(text)
    return {"dry_run": True, "samples": samples, "documents": read, "taken": taken,
            "chars": chars, **_corpus_report(documents, {"dedup": corpus.filters.dedup})}


def _corpus_report(documents: Mixture, settings: dict) -> dict:
    """What the filters removed and the rates took, for the manifest and the summary."""
    report = documents.chain.report()
    return {"dedup": {"duplicates_removed": report["removed"]["duplicate"]["documents"]
                      if settings["dedup"] else None},
            "filters": report, "sampling": documents.report()}


# --------------------------------------------------------------------------- encoding


def _chunks(piece: Piece) -> Iterator[Piece]:
    """Cut a long piece at line breaks with non-space on both sides, else at single spaces.

    No backend lets a token span such a break (byte-level BPE pre-splits there, SentencePiece is
    trained on single lines, char is per character), so the ids are those of the whole text. A
    Windows "\r\n" is cut before its "\n": after it, byte-level BPE would take "\r\n" at the
    end of a chunk as one pre-token where the whole text gives "\r" and "\n". (A
    SentencePiece model trained elsewhere, with pieces that hold a newline, may tokenize a cut
    slightly differently; the text still decodes exactly.) Text with neither for ``CHUNK_CHARS``
    (a megabyte without a space) is cut anyway, to bound the time and memory of encoding it.
    """
    text, start, warned = piece.text, 0, False
    while len(text) - start > CHUNK_CHARS:
        cut, safe = _cut_after(text, start + CHUNK_CHARS)
        if cut is None:
            break
        if not safe and not warned:
            log.warning("%s: %s characters without a space or line break were cut for encoding; "
                        "the tokens at the cut may differ from encoding them whole",
                        piece.label, f"{CHUNK_CHARS:,}")
            warned = True
        yield Piece(piece.split, piece.label, text[start:cut], False)
        start = cut
    yield Piece(piece.split, piece.label, text[start:], piece.eos)


def _cut_after(text: str, pos: int) -> tuple[int | None, bool]:
    """(the first safe cut in ``text[pos:pos + CHUNK_CHARS]``, True); if there is none, (``pos``,
    False), or (None, False) when the text ends first."""
    end = pos + CHUNK_CHARS
    for pattern in (_SAFE_CUT, _SPACE_CUT):
        match = pattern.search(text, pos, end + 1)  # end + 1: room for the lookahead
        if match is not None:
            return match.end(), True
    return (None if end >= len(text) else pos), False


def _numbered_chunks(pieces: Iterable[Piece],
                     starts: dict[str, Position]) -> Iterator[Piece]:
    """The chunks of every piece, numbered, from each split's start position on.

    A resumed run passes where each split's completed shards end: pieces and chunks before that
    are not cut or encoded at all, and the chunk at it says how many of its tokens to skip.
    """
    for index, piece in enumerate(pieces):
        start = starts.get(piece.split, Position())
        if index < start.piece:
            continue
        for number, chunk in enumerate(_chunks(piece)):
            if (index, number) < (start.piece, start.chunk):
                continue
            skip = start.skip_tokens if (index, number) == (start.piece, start.chunk) else 0
            yield chunk._replace(index=index, chunk=number, skip_tokens=skip)


def _batches(chunks: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class Encoded(NamedTuple):
    split: str
    tokens: np.ndarray  # with eos appended when the piece ends a document
    nbytes: int  # UTF-8 bytes of the text
    eos: bool
    index: int = 0  # the Piece's numbers: where these tokens are in the stream
    chunk: int = 0
    skip_tokens: int = 0  # leading tokens already written by an interrupted run


def encode_pieces(tokenizer: Tokenizer, batch: list[Piece], dtype: str,
                  use_batch_api: bool = True) -> list[Encoded]:
    """Encode a batch; an error names the document it came from."""
    texts = [p.text for p in batch]
    try:
        all_ids = tokenizer.encode_batch(texts) if use_batch_api else None
    except GptforgeError:
        all_ids = None  # encode one by one below to find the document at fault
    if all_ids is None:
        all_ids = []
        for piece in batch:
            try:
                all_ids.append(tokenizer.encode(piece.text))
            except GptforgeError as err:
                raise GptforgeError(f"{piece.label}: {err}") from None
    out = []
    for piece, ids in zip(batch, all_ids, strict=True):
        if piece.eos:
            ids.append(tokenizer.eos_id)
        out.append(Encoded(piece.split, np.array(ids, dtype=dtype), len(piece.text.encode()),
                           piece.eos, piece.index, piece.chunk, piece.skip_tokens))
    return out


_worker_tokenizer: Tokenizer | None = None
_worker_dtype = "uint16"


def _init_worker(tokenizer_file: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Ctrl-C reaches the whole process group; the main process handles it and stops the pool,
    # so a worker ignores it rather than print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process of many: native thread pools in it would only oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_file)
    _worker_dtype = dtype


def _encode_in_worker(batch: list[Piece]) -> list[Encoded]:
    assert _worker_tokenizer is not None, "worker not initialised"
    return encode_pieces(_worker_tokenizer, batch, _worker_dtype, use_batch_api=False)


def _encode_stream(batches: Iterable[list[Piece]], tokenizer: Tokenizer, tokenizer_file: Path,
                   dtype: str, workers: int) -> Iterator[list[Encoded]]:
    """Encoded batches in input order; with workers > 1, from a process pool.

    At most two tasks per worker are in flight, so a fast reader cannot pile the whole corpus
    into the pool's queue (``Pool.imap`` has no such limit).
    """
    if workers == 1:
        for batch in batches:
            yield encode_pieces(tokenizer, batch, dtype)
        return
    with _start_pool(workers, tokenizer_file, dtype) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _start_pool(workers: int, tokenizer_file: Path, dtype: str):
    """A pool of encoding processes, each loading the tokenizer from its saved file.

    On Linux the workers are forked: they start at once and do not re-run the caller's main
    script, which "spawn" does and which fails in scripts without an ``if __name__ ==
    "__main__"`` guard. The workers only run tokenizers and numpy, which are fork-safe, and
    ``TOKENIZERS_PARALLELISM`` is set for the fork so the Rust library neither warns nor starts
    thread pools. Elsewhere fork is unsafe or missing, and "spawn" is used.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return multiprocessing.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(str(tokenizer_file), dtype))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


class SplitWriter:
    """Tokens of one split into ``shard_000000.bin``, ... of exactly ``shard_tokens`` each (the
    last one shorter); documents run on across shard boundaries.

    ``start`` is the progress of an interrupted run to continue from. After each completed shard,
    :attr:`done` says what the completed shards hold and where the next one starts, and
    ``on_shard`` is called (to write the journal).
    """

    def __init__(self, directory: Path, dtype: str, shard_tokens: int,
                 start: SplitProgress | None = None,
                 on_shard: Callable[[], None] | None = None):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.done = start or SplitProgress()
        self.tokens, self.documents, self.bytes = (self.done.tokens, self.done.documents,
                                                   self.done.bytes)
        self.shards = [f"{directory.name}/{shard_name(i)}" for i in range(self.done.shards)]
        self.on_shard = on_shard
        self._writer: ShardWriter | None = None

    def write(self, item: Encoded) -> None:
        documents, nbytes = self.documents, self.bytes  # what shards ending in this item hold
        self.documents += item.eos
        self.bytes += item.nbytes
        offset = item.skip_tokens
        while offset < len(item.tokens):
            if self._writer is None:
                self.directory.mkdir(exist_ok=True)
                path = self.directory / shard_name(len(self.shards))
                self._writer = ShardWriter(path, self.dtype)
                self.shards.append(f"{self.directory.name}/{self._writer.path.name}")
            count = min(self.shard_tokens - self._writer.count, len(item.tokens) - offset)
            self._writer.write(item.tokens[offset:offset + count])
            offset += count
            self.tokens += count
            if self._writer.count >= self.shard_tokens:
                self._complete_shard(Position(item.index, item.chunk, offset), documents, nbytes)

    def _complete_shard(self, next_start: Position, documents: int, nbytes: int) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None
        atomic.fsync_directory(self.directory)  # the shard is durable before the journal says so
        self.done = SplitProgress(len(self.shards), self.tokens, documents, nbytes, next_start)
        if self.on_shard is not None:
            self.on_shard()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        """Drop the shard being written (it is redone by the next run)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "shards": len(self.shards),
                "bytes": self.bytes, "files": list(self.shards)}


# --------------------------------------------------------------------------- prepare


def prepare(inputs: list[str], out_dir: Path, tokenizer: str = "char",
            vocab_size: int | None = None, *, text_field: str = "text",
            val_fraction: float = 0.1, seed: int = 1337, workers: int | None = None,
            shard_tokens: int = 100_000_000, token_dtype: str = "auto",
            sp_model_type: str = "bpe", progress: bool = True,
            corpus: str | None = None, dedup: bool = True, resume: bool = True,
            hf_data_files: list[str] | None = None, template: str | None = None,
            text_unit: str = "file", input_rates: list[str] | None = None,
            filters: FilterSettings | None = None, dry_run: bool = False,
            preview_documents: int = 3, tokenizer_options: dict | None = None) -> dict:
    """Tokenize ``inputs`` into the data directory ``out_dir``; returns the manifest.

    ``inputs`` are files, directories, globs and ``hf:NAME[:CONFIG][@SPLIT]`` datasets (which
    read ``hf_data_files`` with a file loader such as ``hf:json``). ``tokenizer`` is a kind to
    train on the corpus (``char`` on all of it, so val has no unknown characters;
    ``bpe``/``sentencepiece`` on the train split only) or the path of a saved tokenizer.
    ``dedup`` drops documents identical to an earlier one. ``resume`` continues the work an
    interrupted run with the same settings left in ``OUT.partial``; False starts over. ``corpus``
    only records which built-in corpus the inputs are. ``tokenizer_options`` are
    :func:`~gptforge.tokenizer.base.train_tokenizer`'s options when training, or
    :func:`~gptforge.tokenizer.base.load_tokenizer`'s for a tokenizer made elsewhere.

    How records become documents: ``template`` (e.g. ``"{title}\n{paragraphs}"``) renders each
    record from several fields instead of taking ``text_field``; ``text_unit`` makes each line
    (``"lines"``) or paragraph (``"paragraphs"``) of a text file a document. ``input_rates``
    (``["PATH=RATE", ...]``) take the documents of an input item that many times, and
    ``filters`` drop documents by quality (exact duplicates are ``dedup``'s, whatever
    ``filters.dedup`` says). ``dry_run`` writes nothing and returns, instead of the manifest,
    the first ``preview_documents`` documents and what the filters and rates did.
    """
    started = time.perf_counter()
    settings = {"inputs": [str(i) for i in inputs], "corpus": corpus, "tokenizer": str(tokenizer),
                "vocab_size": vocab_size or None, "text_field": text_field,
                "val_fraction": val_fraction, "seed": seed, "workers": workers,
                "shard_tokens": shard_tokens, "token_dtype": token_dtype,
                "sp_model_type": sp_model_type, "dedup": bool(dedup),
                "hf_data_files": [str(f) for f in hf_data_files] if hf_data_files else None,
                "tokenizer_options": dict(tokenizer_options or {}),
                **_corpus_settings(template, text_unit, input_rates, filters)}
    _check_settings(settings)
    out_dir = Path(out_dir).expanduser().absolute()
    sources = resolve_sources(settings["inputs"], settings["hf_data_files"])
    corpus = build_corpus(settings, sources)
    if dry_run:
        return preview(corpus, preview_documents)
    _check_output_dir(out_dir, _local_files(sources))
    described = [_describe(source, corpus.shape) for source in sources]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission
        raise GptforgeError(f"--out {out_dir}: cannot create {err.filename or out_dir.parent} "
                            f"({err.strerror})") from None
    work = open_work_dir(out_dir, _identity(settings, described), restart=not resume)
    try:
        manifest = _prepare_into(work, corpus, settings, described, progress, started)
        _move_into_place(work.path, out_dir)
    except BaseException as err:
        work.discard_unless_worth_keeping(quiet=isinstance(err, (GptforgeError, OSError)))
        if isinstance(err, OSError):  # a full disk, above all
            raise _failed_write(err, work) from None
        raise
    for name in (JOURNAL_NAME, LOCK_NAME):  # the work directory's, not the data directory's
        (out_dir / name).unlink(missing_ok=True)
    work.release()
    _log_summary(manifest, out_dir)
    return manifest


def _failed_write(err: OSError, work: WorkDir) -> GptforgeError:
    """One line for an I/O error while preparing: what failed, and that the run can resume."""
    what = err.filename or work.path
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = "free some disk space" if full else "fix that"
    kept = f"the work done is kept in {work.path}; " if work.journal.worth_keeping() else ""
    return GptforgeError(f"writing {what} failed: {err.strerror or err}; {kept}{fix} and run the "
                         "same command again to continue")


def _prepare_into(work: WorkDir, corpus: Corpus, settings: dict, described: list[dict],
                  progress: bool, started: float) -> dict:
    journal = work.journal
    before = dict(journal.timings)  # time spent by earlier, interrupted runs

    def pieces(documents: Mixture) -> tuple[str, Iterator[Piece]]:
        method = split_method(corpus.mixture())  # a pass (and a filter chain) of its own
        return method, plan_split(documents, method, settings["val_fraction"], settings["seed"])

    def checkpoint() -> None:
        journal.splits = {name: w.done for name, w in writers.items()}
        journal.timings.update(
            encode_s=before.get("encode_s", 0.0) + time.perf_counter() - encode_started,
            duration_s=before.get("duration_s", 0.0) + time.perf_counter() - started)
        work.save()

    tokenizer_started = time.perf_counter()
    tok, tokenizer_file = _work_tokenizer(work, settings, corpus.mixture,
                                          lambda: pieces(corpus.mixture()), progress)
    journal.timings["tokenizer_s"] = (before.get("tokenizer_s", 0.0)
                                      + time.perf_counter() - tokenizer_started)
    work.save()
    dtype = token_dtype(tok.vocab_size, settings["token_dtype"])
    documents = corpus.mixture()
    method, stream = pieces(documents)
    writers = {split: SplitWriter(work.path / split, dtype, settings["shard_tokens"],
                                  journal.splits[split], checkpoint)
               for split in ("train", "val")}
    workers = _worker_count(settings["workers"], _input_bytes(described))
    log.debug("encoding with %d worker%s", workers, "" if workers == 1 else "s")
    starts = {name: p.next for name, p in journal.splits.items()}
    chunks = _numbered_chunks(stream, starts)
    encoded = _encode_stream(_batches(chunks), tok, tokenizer_file, dtype, workers)
    encode_started = time.perf_counter()
    _write_splits(encoded, writers, progress)
    checkpoint()
    splits = {name: w.summary() for name, w in writers.items()}
    _check_splits(splits, settings["val_fraction"])
    if settings["val_fraction"] == 0:
        del splits["val"]
    manifest = _manifest(tok, tokenizer_file.relative_to(work.path), dtype, method, splits,
                         described, settings, journal.timings)
    manifest.update(_corpus_report(documents, settings))
    atomic.write_bytes(work.path / MANIFEST_NAME,
                       (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


def _work_tokenizer(work: WorkDir, settings: dict, documents, pieces,
                    progress: bool) -> tuple[Tokenizer, Path]:
    """The tokenizer an interrupted run saved in the work directory, or a new one saved there."""
    journal = work.journal
    if journal.tokenizer is not None:
        file = work.path / journal.tokenizer["file"]
        return load_tokenizer(file), file
    tok = _get_tokenizer(settings, documents, pieces, progress)
    file = tok.save(work.path / "tokenizer")[0]
    journal.tokenizer = {"file": file.relative_to(work.path).as_posix(),
                         "sha256": tok.fingerprint(), "kind": tok.kind,
                         "trained": settings["tokenizer"] in KINDS}
    return tok, file


def _get_tokenizer(settings: dict, documents, pieces, progress: bool) -> Tokenizer:
    spec, vocab_size = settings["tokenizer"], settings["vocab_size"]
    if spec in KINDS:
        if spec == "char":
            # Every document taken, whatever its split, so val holds no unknown character.
            texts: Iterable[str] = (text for _, text, _ in documents())
            where = "all documents"
        else:
            texts = (p.text for p in pieces()[1] if p.split == "train")
            where = "the train split"
        log.debug("training a %s tokenizer on %s", spec, where)
        bar = progress and sys.stderr.isatty()  # the backend's own bars, on a terminal only
        with TrainingLog(f"training the {spec} tokenizer", enabled=not bar) as lines:
            return train_tokenizer(spec, lines.read(texts), vocab_size, progress=bar,
                                   sp_model_type=settings["sp_model_type"],
                                   **settings["tokenizer_options"])
    return load_tokenizer(spec, **settings["tokenizer_options"])


class ProgressLog:
    """Progress as log lines, one every ``PROGRESS_LOG_S`` seconds at most: what a progress bar
    shows, for a log file or a pipe, where no bar is drawn."""

    def __init__(self, what: str):
        self.what = what
        self.started = self.last = time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < PROGRESS_LOG_S:
            return False
        self.last = now
        return True

    def report(self, done: str, count: float, unit: str) -> None:
        rate = count / max(time.perf_counter() - self.started, 1e-9)
        log.info("%s: %s (%s %s/s)", self.what, done, _human(rate), unit)


def _human(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


class TrainingLog:
    """Log lines while a tokenizer trains, where no bar shows: how much text was read, then one
    every ``PROGRESS_LOG_S`` while the backend learns the vocabulary. The backends release the GIL
    while they learn, so a thread can speak meanwhile."""

    def __init__(self, what: str, enabled: bool = True):
        self.progress, self.enabled = ProgressLog(what), enabled
        self._learning, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def read(self, texts: Iterable[str]) -> Iterator[str]:
        """``texts`` passed through, counted."""
        chars = count = 0
        for text in texts:
            chars, count = chars + len(text), count + 1
            if self.enabled and self.progress.due():
                self.progress.report(f"read {_human(chars)} characters of {_texts(count)}",
                                     chars, "chars")
            yield text
        if self.enabled and self._elapsed() >= PROGRESS_LOG_S:  # (quiet about small inputs)
            log.info("%s: read all %s characters of %s in %.1f s; learning the vocabulary",
                     self.progress.what, _human(chars), _texts(count), self._elapsed())
        self._learning.set()

    def _heartbeat(self) -> None:
        while not self._stop.wait(PROGRESS_LOG_S):
            if self._learning.is_set():
                log.info("%s: learning the vocabulary (%.0f s so far)", self.progress.what,
                         self._elapsed())

    def _elapsed(self) -> float:
        return time.perf_counter() - self.progress.started

    def __enter__(self) -> TrainingLog:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


def _texts(count: int) -> str:
    return f"{count:,} text{'' if count == 1 else 's'}"


def _check_tokenizer_spec(settings: dict) -> None:
    spec = settings["tokenizer"]
    check_tokenizer_options(spec in KINDS, settings["tokenizer_options"])
    if spec in KINDS:
        return
    if settings["vocab_size"]:
        raise GptforgeError("--vocab-size applies only when training a tokenizer (--tokenizer "
                            "char, bpe or sentencepiece), not with a saved tokenizer")
    if not Path(spec).exists() and os.sep not in spec and "." not in spec:
        raise GptforgeError(f"unknown tokenizer '{spec}': choose {', '.join(KINDS)}, or give the "
                            "path of a saved tokenizer")


def _identity(settings: dict, described: list[dict]) -> dict:
    """What the output depends on, for the journal's fingerprint (see gptforge.data.journal)."""
    saved = None
    if settings["tokenizer"] not in KINDS:
        try:
            saved = describe_file(find_tokenizer_file(settings["tokenizer"]))["sha256"]
        except GptforgeError:
            pass  # reported when the tokenizer is loaded
    return {"version": _version(), "journal_version": JOURNAL_VERSION,
            "shard_format_version": SHARD_FORMAT_VERSION,
            "settings": {k: v for k, v in settings.items() if k != "workers"},
            "sources": described, "saved_tokenizer_sha256": saved}


def _write_splits(encoded: Iterable[list[Encoded]], writers: dict[str, SplitWriter],
                  progress: bool) -> None:
    from tqdm import tqdm

    done = sum(w.tokens for w in writers.values())  # by an interrupted run
    bar = tqdm(desc="encoding", unit="tok", unit_scale=True, file=sys.stderr, initial=done,
               disable=None if progress else True)  # None: only on a terminal
    lines, tokens, nbytes = ProgressLog("encoding"), 0, 0
    try:
        with bar:
            for results in encoded:
                for item in results:
                    writers[item.split].write(item)
                    bar.update(len(item.tokens) - item.skip_tokens)
                    tokens += len(item.tokens) - item.skip_tokens
                    nbytes += item.nbytes
                if bar.disable and lines.due():
                    lines.report(f"{_human(tokens)} tokens from {_human(nbytes)}B of text", tokens,
                                 "tokens")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        close = getattr(encoded, "close", None)
        if close is not None:
            close()  # stops the worker pool now, even when a write failed
    for writer in writers.values():
        writer.close()


def _check_splits(splits: dict, val_fraction: float) -> None:
    if splits["train"]["tokens"] == 0:
        raise GptforgeError("the train split came out empty; lower --val-fraction or add text")
    if val_fraction > 0 and splits["val"]["tokens"] == 0:
        raise GptforgeError("the val split came out empty (the corpus is too small for "
                            f"--val-fraction {val_fraction}); add text, raise --val-fraction, or "
                            "use --val-fraction 0 for no validation split")


def _check_settings(s: dict) -> None:
    if s["vocab_size"] is not None and s["vocab_size"] < 1:
        raise GptforgeError(f"--vocab-size must be positive, got {s['vocab_size']}")
    if not 0 <= s["val_fraction"] <= MAX_VAL_FRACTION:
        raise GptforgeError(f"--val-fraction must be between 0 and {MAX_VAL_FRACTION}, "
                            f"got {s['val_fraction']}")
    if s["shard_tokens"] < 1:
        raise GptforgeError(f"--shard-tokens must be positive, got {s['shard_tokens']}")
    if s["workers"] is not None and s["workers"] < 1:
        raise GptforgeError(f"--workers must be at least 1, got {s['workers']}")
    # Unknown names, and a vocabulary asked for that cannot fit, now rather than after training
    # (a char vocabulary is the text's, whatever was asked for).
    trained_size = s["vocab_size"] if s["tokenizer"] in ("bpe", "sentencepiece") else None
    token_dtype(trained_size or 0, s["token_dtype"])
    _check_tokenizer_spec(s)


def _worker_count(requested: int | None, input_bytes: int | None) -> int:
    """``requested``, or one per CPU but at most one per ``AUTO_WORKER_BYTES`` of input (all
    CPUs when the size is unknown: a streamed Hub dataset)."""
    if requested is not None:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use, e.g. in a container
    except AttributeError:
        cpus = os.cpu_count() or 1
    if input_bytes is None:
        return cpus
    # Starting a worker costs about a second; not worth it for small inputs.
    return max(1, min(cpus, input_bytes // AUTO_WORKER_BYTES + 1))


def _input_bytes(described: list[dict]) -> int | None:
    total = 0
    for source in described:
        if "hf" in source and not source["files"]:
            return None  # a Hub dataset: size unknown
        total += source["bytes"] if "path" in source else sum(f["bytes"] for f in source["files"])
    return total


# --------------------------------------------------------------------------- output directory


def _check_output_dir(out_dir: Path, files: list[Path]) -> None:
    if not out_dir.name:
        raise GptforgeError(f"--out {out_dir} is the root directory; name a directory for the "
                            "data, e.g. --out data/mine")
    if out_dir.exists() and not out_dir.is_dir():
        raise GptforgeError(f"--out {out_dir} is a file, not a directory")
    for path in files:
        for directory in (out_dir, partial_dir(out_dir)):
            if path.is_relative_to(directory.resolve()):
                raise GptforgeError(f"input {path} is inside the output directory {directory}, "
                                    "which prepare replaces; move it or choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise GptforgeError(f"--out {out_dir} exists and is not a gptforge data directory (no "
                            f"{MANIFEST_NAME}); choose another --out or empty it")


def _local_files(sources: list) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        files.extend([source] if isinstance(source, Path) else source.local_files())
    return files


def _describe(source, shape: DocumentShape) -> dict:
    if isinstance(source, Path):
        return describe_file(source)
    source.check(shape.text_field, shape.template)
    return source.describe()


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Swap the finished directory in; the old one is only removed once the new one is there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    atomic.fsync_directory(out_dir.parent)  # the rename survives a power cut
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- manifest


def _manifest(tok: Tokenizer, tokenizer_file: Path, dtype: str, method: str, splits: dict,
              sources: list[dict], settings: dict, timings: dict[str, float]) -> dict:
    tokens = sum(s["tokens"] for s in splits.values())
    text_bytes = sum(s["bytes"] for s in splits.values())
    return {
        "format_version": MANIFEST_VERSION,
        "created_by": f"gptforge {_version()}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"kind": tok.kind, "file": tokenizer_file.as_posix(),
                      "sha256": tok.fingerprint(), "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "special_tokens": tok.special_tokens},
        "token_dtype": dtype,
        "shard_format_version": SHARD_FORMAT_VERSION,
        "split": {"method": method, "val_fraction": settings["val_fraction"],
                  "seed": settings["seed"]},
        "splits": splits,
        "sources": sources,
        "settings": settings,
        "stats": {"tokens": tokens, "text_bytes": text_bytes,
                  "bytes_per_token": round(text_bytes / max(tokens, 1), 4),
                  "tokenizer_s": round(timings["tokenizer_s"], 3),
                  "encode_s": round(timings["encode_s"], 3),
                  "tokens_per_s": round(tokens / max(timings["encode_s"], 1e-9))},
        "duration_s": round(timings["duration_s"], 3),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptforge")
    except PackageNotFoundError:
        return "unknown"


def _log_summary(manifest: dict, out_dir: Path) -> None:
    parts = [f"{name} {s['tokens']:,} tokens ({s['documents']:,} docs, {s['shards']} shard"
             f"{'' if s['shards'] == 1 else 's'})" for name, s in manifest["splits"].items()]
    stats = manifest["stats"]
    log.info("prepared %s: %s%s; %.2f bytes/token; tokenizer %.1f s, encoding %.1f s (%s "
             "tokens/s), total %.1f s", out_dir, ", ".join(parts), _dedup_note(manifest),
             stats["bytes_per_token"], stats["tokenizer_s"], stats["encode_s"],
             f"{stats['tokens_per_s']:,}", manifest["duration_s"])


def _dedup_note(manifest: dict) -> str:
    removed = manifest.get("dedup", {}).get("duplicates_removed")
    if removed is None:
        return ""
    return f"; {removed:,} duplicate document{'' if removed == 1 else 's'} removed"


# --------------------------------------------------------------------------- built-in corpora


def ensure_builtin(name: str, out_dir: Path, tokenizer: str = "char",
                   vocab_size: int | None = None) -> Path:
    """``out_dir`` holding built-in corpus ``name``, prepared now unless it already is.

    An existing data directory is returned untouched when it was prepared from this corpus with
    this tokenizer; one prepared otherwise is an error rather than silently replaced. Call it from
    one process only (rank 0) when training on several.
    """
    get_corpus(name)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        try:
            manifest = read_manifest(out_dir)
        except GptforgeError as err:
            log.warning("%s; preparing it again", err)
        else:
            _check_same_build(manifest, out_dir, name, tokenizer, vocab_size)
            tokenizer_file = out_dir / manifest["tokenizer"]["file"]
            if split_shard_paths(out_dir, "train") and tokenizer_file.is_file():
                return out_dir
            log.warning("%s is incomplete; preparing it again", out_dir)
    files = fetch_corpus(name)
    prepare([str(p) for p in files], out_dir, tokenizer, vocab_size, corpus=name)
    return out_dir


def _check_same_build(manifest: dict, out_dir: Path, name: str, tokenizer: str,
                      vocab_size: int | None) -> None:
    settings = manifest.get("settings", {})
    have = (settings.get("corpus"), settings.get("tokenizer"), settings.get("vocab_size") or None)
    want = (name, tokenizer, vocab_size or None)
    if have != want:
        raise GptforgeError(
            f"{out_dir} holds corpus={have[0]} tokenizer={have[1]} vocab_size={have[2]}, not the "
            f"requested corpus={want[0]} tokenizer={want[1]} vocab_size={want[2]}; use another "
            "data directory, or delete this one to rebuild it")

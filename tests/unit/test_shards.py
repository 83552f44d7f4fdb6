"""The shard file format: round trips, the header layout, and refusing damaged files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from gptforge.data.shards import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    ShardWriter,
    open_split,
    read_shard,
    token_dtype,
    write_shard,
)
from gptforge.errors import GptforgeError


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip(tmp_path, dtype):
    tokens = np.arange(1000, dtype=dtype) * 7
    write_shard(tmp_path / "s.bin", tokens)
    back = read_shard(tmp_path / "s.bin")
    assert isinstance(back, np.memmap) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, tokens)
    assert not back.flags.writeable


def test_header_layout_is_as_documented(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([1, 2, 65535], dtype=np.uint16))
    raw = (tmp_path / "s.bin").read_bytes()
    assert len(raw) == HEADER_SIZE + 3 * 2 == 70
    assert raw[:8] == MAGIC == b"GPTFSHRD"
    assert struct.unpack_from("<IIQ", raw, 8) == (FORMAT_VERSION, 16, 3)
    assert raw[24:64] == bytes(40)
    assert raw[64:] == b"\x01\x00\x02\x00\xff\xff"  # little-endian


def test_big_endian_input_is_stored_little_endian(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([1, 256], dtype=">u4"))
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin"), [1, 256])


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([], dtype=np.uint16))
    assert len(read_shard(tmp_path / "s.bin")) == 0


def test_only_unsigned_16_or_32_bit_tokens(tmp_path):
    with pytest.raises(TypeError):
        write_shard(tmp_path / "s.bin", np.array([1], dtype=np.int64))
    assert not (tmp_path / "s.bin").exists()


def test_writer_appears_only_when_closed_and_abort_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path / "s.bin", "uint16")
    writer.write(np.array([1, 2], dtype=np.uint16))
    assert not (tmp_path / "s.bin").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "t.bin", "uint32") as w:
        w.write(np.array([3], dtype=np.uint32))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def corrupt(tmp_path, change):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(raw)))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw[:-3], r"file is truncated: the header promises 100 tokens \(264 bytes\) but "
                           r"the file has 261 bytes"),
    (lambda raw: raw + b"\0\0", "file has trailing bytes"),
    (lambda raw: b"NOTASHRD" + raw[8:], r"not a gptforge token shard \(bad magic\)"),
    (lambda raw: raw[:10], r"not a gptforge token shard"),
    (lambda raw: raw[:8] + struct.pack("<I", 99) + raw[12:], "shard format version 99 is not "
                                                              "supported"),
    (lambda raw: raw[:12] + struct.pack("<I", 8) + raw[16:], "unknown token dtype code 8"),
])
def test_damaged_shards_are_refused_by_name(tmp_path, change, message):
    path = corrupt(tmp_path, change)
    with pytest.raises(GptforgeError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value) and "gptforge prepare" in str(err.value)


def test_missing_shard(tmp_path):
    with pytest.raises(GptforgeError, match="no such shard: .*gone.bin"):
        read_shard(tmp_path / "gone.bin")


def test_token_dtype_selection():
    assert token_dtype(50_000) == "uint16"
    assert token_dtype(65_536) == "uint16"  # ids 0..65535
    assert token_dtype(65_537) == "uint32"
    assert token_dtype(100, "uint32") == "uint32"
    assert token_dtype(65_536, "uint16") == "uint16"
    with pytest.raises(GptforgeError,
                       match=r"^vocab size 70000 does not fit uint16; use --token-dtype uint32$"):
        token_dtype(70_000, "uint16")
    with pytest.raises(GptforgeError, match="unknown token dtype 'int8'"):
        token_dtype(10, "int8")


def test_open_split_orders_shards_and_needs_one(tmp_path):
    (tmp_path / "train").mkdir()
    for i in (1, 0, 2):
        write_shard(tmp_path / "train" / f"shard_{i:06d}.bin", np.full(3, i, dtype=np.uint16))
    shards = open_split(tmp_path, "train")
    assert [int(s[0]) for s in shards] == [0, 1, 2]
    with pytest.raises(GptforgeError, match=r"val: no token shards \(shard_\*\.bin\); run "
                                            r"`gptforge prepare"):
        open_split(tmp_path, "val")

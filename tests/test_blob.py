from __future__ import annotations

import struct

import pytest
import safetensors.torch
import torch

from kvswap.blob import pack, read_blob, read_header, write_blob
from kvswap.connectors import open_connector
from kvswap.errors import IntegrityError, NotFoundError

TENSORS = {
    "bf16": torch.randn(3, 5, dtype=torch.bfloat16), "f32": torch.randn(7), "i64": torch.arange(9),
    "u8": torch.arange(3, dtype=torch.uint8), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
    "empty": torch.empty(0, 4), "f8": torch.randn(6).to(torch.float8_e4m3fn), "f16": torch.randn(2, 2).half(),
}


@pytest.fixture
def store():
    with open_connector("mem://") as conn:
        yield conn


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def test_roundtrip_all_dtypes_and_metadata(store) -> None:
    write_blob(store, "b", TENSORS, {"fingerprint": "llama/bf16/tp0of1", "tokens": "0:256"})
    blob = read_blob(store, "b")
    assert set(blob.tensors) == set(TENSORS)
    assert all(_equal(blob.tensors[n], t) for n, t in TENSORS.items())
    assert blob.header.metadata == {"fingerprint": "llama/bf16/tp0of1", "tokens": "0:256"}
    assert blob.header.checksum.startswith("xxh3_128:")


def test_views_are_aligned_and_share_the_buffer(store) -> None:
    write_blob(store, "b", {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float64)})
    blob = read_blob(store, "b")
    for tensor in blob.tensors.values():
        assert tensor.data_ptr() % tensor.element_size() == 0
        assert blob.buffer.data_ptr() <= tensor.data_ptr() < blob.buffer.data_ptr() + blob.buffer.numel()


def test_read_into_caller_buffer(store) -> None:
    tensors = {"k": torch.randn(1 << 16)}  # 256 KiB: larger than the header probe
    header = write_blob(store, "b", tensors)
    out = torch.zeros(header.data_size + 64, dtype=torch.uint8)
    blob = read_blob(store, "b", out=out)
    assert blob.tensors["k"].data_ptr() == out.data_ptr()
    assert torch.equal(blob.tensors["k"], tensors["k"])
    with pytest.raises(ValueError):
        read_blob(store, "b", out=torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError):
        read_blob(store, "b", out=torch.zeros(header.data_size, dtype=torch.float32))


def test_safetensors_interop_both_ways(store, tmp_path) -> None:
    write_blob(store, "b", TENSORS)
    loaded = safetensors.torch.load(bytes(store.get("b")))
    assert all(_equal(loaded[n], t) for n, t in TENSORS.items())
    plain = {n: t for n, t in TENSORS.items() if n != "f8"}
    with open_connector(f"file://{tmp_path}") as files:
        safetensors.torch.save_file(plain, tmp_path / "plain.safetensors")
        with pytest.raises(IntegrityError, match="no kvswap checksum"):
            read_blob(files, "plain.safetensors")
        blob = read_blob(files, "plain.safetensors", require_checksum=False)
        assert all(_equal(blob.tensors[n], t) for n, t in plain.items())


def test_large_header_needs_second_read(store) -> None:
    tensors = {f"layer.{i}.with.a.rather.long.name.to.grow.the.header": torch.tensor([i]) for i in range(2000)}
    write_blob(store, "b", tensors)
    header = read_header(store, "b")
    assert header.data_offset > 64 << 10
    blob = read_blob(store, "b")
    assert all(torch.equal(blob.tensors[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("damage", ["payload", "truncate", "extend", "header-json", "header-length", "offsets",
                                    "dtype"])
def test_damaged_blobs_raise_integrity_error_naming_the_key(store, damage: str) -> None:
    _header, parts = pack({"x": torch.randn(1000), "y": torch.arange(10)})
    raw = bytearray(b"".join(bytes(p) for p in parts))
    head_len = struct.unpack_from("<Q", raw)[0]
    if damage == "payload":
        raw[-7] ^= 1
    elif damage == "truncate":
        raw = raw[:-4]
    elif damage == "extend":
        raw += b"\0\0\0\0"
    elif damage == "header-json":
        raw[8] = ord("[")
    elif damage == "header-length":
        raw[0:8] = struct.pack("<Q", 1 << 40)
    elif damage == "offsets":
        text = raw[8:8 + head_len].decode().replace('"data_offsets":[0,', '"data_offsets":[4,')
        raw[8:8 + head_len] = text.encode()
    elif damage == "dtype":
        text = raw[8:8 + head_len].decode().replace('"F32"', '"Q32"')
        raw[8:8 + head_len] = text.encode()
    store.put("damaged/key", raw)
    with pytest.raises(IntegrityError, match="damaged/key"):
        read_blob(store, "damaged/key")


def test_not_a_blob_and_missing(store) -> None:
    store.put("tiny", b"abc")
    with pytest.raises(IntegrityError, match="tiny"):
        read_blob(store, "tiny")
    with pytest.raises(NotFoundError):
        read_blob(store, "missing")


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="reserved"):
        pack({"a": torch.ones(1)}, {"kvswap.checksum": "x"})
    with pytest.raises(TypeError):
        pack({"a": torch.ones(1)}, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="dtype"):
        pack({"a": torch.ones(1, dtype=torch.complex64)})
    with pytest.raises(ValueError):
        pack({"__metadata__": torch.ones(1)})


def test_non_contiguous_tensor_is_stored_by_value(store) -> None:
    base = torch.randn(8, 8)
    write_blob(store, "b", {"t": base.t()})
    assert torch.equal(read_blob(store, "b").tensors["t"], base.t())


@pytest.mark.parametrize("scheme", ["mem", "file"])
@pytest.mark.parametrize("size", ["below", "at", "chunk-multiple", "chunk-multiple-minus-one", "odd"])
@pytest.mark.parametrize("damage", [None, "flip-first", "flip-last", "flip-chunk-edge", "truncate", "extend",
                                    "extend-chunk"])
@pytest.mark.parametrize("written", ["tree", "single-hash", "tree-read-whole"])
def test_chunked_reads_hash_every_byte_once(monkeypatch, tmp_path, scheme: str, size: str, damage: str | None,
                                            written: str) -> None:
    """Large data sections are read and hashed chunk by chunk: chunk-tree blobs on several
    threads (or read whole, the benchmarks' baseline), single-hash blobs (written before the
    tree) chunk k hashed while k + 1 is read. At every size around the chunk edges the tensors
    come back exact, and every damage is caught."""
    import kvswap.blob as blob

    monkeypatch.setattr(blob, "STREAM_MIN", 1 << 62 if written == "single-hash" else 64 << 10)
    monkeypatch.setattr(blob, "STREAM_CHUNK", 16 << 10)
    nbytes = {"below": (64 << 10) - 1000, "at": 64 << 10, "chunk-multiple": 160 << 10,
              "chunk-multiple-minus-one": (160 << 10) - 1, "odd": 200_003}[size] + (64 << 10)  # past the probe
    value = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    uri = "mem://" if scheme == "mem" else f"file://{tmp_path}"
    with open_connector(uri) as conn:
        header = write_blob(conn, "big/blob", {"v": value})
        assert header.checksum.startswith("xxh3_128:" if written == "single-hash" else "xxh3_128-tree-16384:")
        monkeypatch.setattr(blob, "STREAM_MIN", 64 << 10)
        monkeypatch.setattr(blob, "PARALLEL_CHUNKS", written != "tree-read-whole")
        raw = bytearray(conn.get("big/blob"))
        start = header.data_offset
        if damage == "flip-first":
            raw[start] ^= 0x80
        elif damage == "flip-last":
            raw[-1] ^= 1
        elif damage == "flip-chunk-edge":
            raw[start + (16 << 10) * 3 - 1] ^= 4
        elif damage == "truncate":
            del raw[-1:]
        elif damage == "extend":
            raw += b"\0"
        elif damage == "extend-chunk":
            raw += bytes(16 << 10)
        conn.put("big/blob", bytes(raw))
        if damage is None:
            assert torch.equal(read_blob(conn, "big/blob").tensors["v"], value)
        else:
            with pytest.raises(IntegrityError, match="big/blob"):
                read_blob(conn, "big/blob")


def test_every_bit_flip_of_a_header_is_refused(store) -> None:
    """Exhaustive over the header's bits (the data's are the checksum's): no single flip yields a
    blob that reads back as the same span (a renamed ``kvswap.format`` key once did)."""
    kv, tokens = torch.randn(2, 2, 20, 2, 4), torch.arange(20, dtype=torch.int32)
    metadata = {"fingerprint": "fp", "token_offset": "0", "token_length": "20", "prefix_hash": "ab" * 16}
    header = write_blob(store, "orig", {"tokens": tokens, "kv": kv}, metadata)
    raw = bytes(store.get("orig"))
    accepted = []
    for index in range(header.data_offset):
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[index] ^= 1 << bit
            store.put("flipped", bytes(damaged))
            try:
                blob = read_blob(store, "flipped", expected_size=len(raw))
            except IntegrityError:
                continue
            if ((blob.header.checksum, blob.header.metadata) == (header.checksum, metadata)
                    and set(blob.header.tensors) == {"kv", "tokens"}
                    and all(blob.header.tensors[n].shape == header.tensors[n].shape for n in ("kv", "tokens"))):
                accepted.append((index, bit))
    assert accepted == []

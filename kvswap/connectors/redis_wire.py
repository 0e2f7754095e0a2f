"""The Redis/Valkey connector's wire format and helpers: a value's manifest (``KVSM`` + u32
length + JSON header, then the value itself when it is inline), chunk write ids, re-cutting a
put into chunks, reading a bulk reply straight into a buffer, and a hash tag per cluster slot.
:mod:`kvswap.connectors.redis` is the connector that uses them."""

from __future__ import annotations

import json
import re
import struct
import time
import uuid
from typing import Any

from kvswap.errors import IntegrityError

MAGIC = b"KVSM"
_HEADER = struct.Struct("<4sI")
_WRITE_ID = re.compile(r"[0-9a-f]{1,64}")


def new_write_id() -> str:
    """A chunk group's id: the time it was written (ms, 12 hex digits), then 20 random hex digits."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


def write_time(write_id: str) -> float:
    """When a chunk group was written (seconds), from its id; +inf if the id tells nothing."""
    try:
        return int(write_id[:12], 16) / 1000 if len(write_id) == 32 else float("inf")
    except ValueError:
        return float("inf")


def encode_header(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, len(body)) + body


def decode_manifest(raw: bytes | bytearray | memoryview, key: str,
                    partial: bool = False) -> tuple[dict[str, Any], memoryview]:
    """The manifest's header (checked: every field present, typed and consistent) and its
    inline value. A damaged manifest, whatever the damage, is an IntegrityError."""
    view = memoryview(raw)
    try:
        magic, length = _HEADER.unpack_from(view)
        if magic != MAGIC:
            raise ValueError("bad magic")
        if _HEADER.size + length > len(view):
            raise ValueError(f"header length {length} runs past the manifest")
        header = json.loads(bytes(view[_HEADER.size:_HEADER.size + length]))
        check_manifest_header(header)
        inline = view[_HEADER.size + length:]
        if not partial and not header["chunks"] and len(inline) != header["size"]:
            raise ValueError(f"inline value holds {len(inline)} bytes, header says {header['size']}")
    except (ValueError, KeyError, TypeError, RecursionError, struct.error) as exc:
        raise IntegrityError(f"corrupt manifest for {key!r}: {exc}") from None
    return header, inline


def check_manifest_header(header: Any) -> None:
    """ValueError unless ``header`` is what :meth:`RedisConnector._put` writes."""
    def natural(value: Any) -> bool:
        return type(value) is int and value >= 0

    if not isinstance(header, dict) or not natural(header.get("size")) or not natural(header.get("chunks")):
        raise ValueError("size and chunks must be non-negative integers")
    if header["chunks"]:
        chunk, write_id = header.get("chunk_size"), header.get("id")
        if not natural(chunk) or not chunk or not isinstance(write_id, str) or not _WRITE_ID.fullmatch(write_id):
            raise ValueError("a chunked value needs a positive chunk_size and a write id")
        if -(-header["size"] // chunk) != header["chunks"]:
            raise ValueError(f"{header['chunks']} chunks of {chunk} bytes cannot hold {header['size']} bytes")


def split(parts: list[memoryview], chunk: int) -> list[Any]:
    """Re-cut the put's parts into ``chunk``-sized pieces (views; joins only at seams)."""
    pieces: list[Any] = []
    pending: list[memoryview] = []
    pending_size = 0
    for part in parts:
        while part.nbytes:
            take = min(chunk - pending_size, part.nbytes)
            pending.append(part[:take])
            pending_size += take
            part = part[take:]
            if pending_size == chunk:
                pieces.append(pending[0] if len(pending) == 1 else b"".join(pending))
                pending, pending_size = [], 0
    if pending:
        pieces.append(pending[0] if len(pending) == 1 else b"".join(pending))
    return pieces


def set_nx_command(name: str, parts: list[Any]) -> list[Any]:
    """``SET name <parts, back to back> NX`` as RESP, the parts as they are (no joined copy)."""
    encoded = name.encode()
    size = sum(memoryview(part).nbytes for part in parts)
    return [b"*4\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(encoded), encoded, size), *parts,
            b"\r\n$2\r\nNX\r\n"]


def read_bulk(reader: Any, target: memoryview | None = None) -> memoryview | None:
    """Read one RESP2/RESP3 bulk reply from ``reader`` (a connection's socket opened as a
    buffered binary file: ``sock.makefile("rb")``) straight into ``target``, which must be its
    length (IntegrityError if the reply holds another), or into a new buffer when None: the
    bytes read, None for a null."""
    line = reader.readline(1 << 16)
    if not line.endswith(b"\r\n"):
        raise ConnectionError("server closed the connection mid-reply" if len(line) < 1 << 16 else "reply too long")
    if line == b"_\r\n":  # RESP3 null
        return None
    if line[:1] == b"-":
        message = line[1:-2].decode(errors="replace")
        if message.startswith(("MOVED ", "ASK ")):
            raise Redirected(message)
        raise ConnectionError(f"server error: {message}")
    if line[:1] != b"$":
        raise ConnectionError(f"unexpected reply {bytes(line[:20])!r}")
    length = int(line[1:-2])
    if length < 0:
        return None
    if target is None:
        target = memoryview(bytearray(length))
    elif length != len(target):
        raise IntegrityError(f"a chunk holds {length} bytes where its manifest says {len(target)}")
    if reader.readinto(target) != length or reader.read(2) != b"\r\n":
        raise ConnectionError("server closed the connection mid-reply")
    return target


class Redirected(Exception):
    """A direct chunk read met MOVED or ASK: the slot map changed."""


def glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)

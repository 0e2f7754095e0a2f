"""A byte-level tokenizer: one token per UTF-8 byte, plus BOS and EOS. Nothing to download."""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """Token ``b`` (0-255) is byte ``b``; ``bos_id`` = 256, ``eos_id`` = 257."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

"""Tokenizers the engine and the service use: bytes (nothing to download) or a model's own.

Both turn chat messages into the model's prompt (:meth:`render_chat`) and name the tokens
that end an answer (``stop_ids``). :class:`ByteTokenizer` serves the random-weight models:
one token per UTF-8 byte plus BOS and EOS, and a fixed ``<|role|>`` chat format.
:class:`HFTokenizer` serves real models: a Hugging Face ``tokenizer.json`` (the
``tokenizers`` library, no hub access) and the model's own Jinja chat template, rendered
in a sandbox as transformers renders it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kvswap.errors import ConfigError

Message = Mapping[str, str]  # {"role": ..., "content": ...}

#: Files of a model directory that tokenization and chat rendering need (all optional).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


class Tokenizer(Protocol):
    vocab_size: int
    stop_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Message]) -> str: ...


class ByteTokenizer:
    """Token ``b`` (0-255) is byte ``b``; ``bos_id`` = 256, ``eos_id`` = 257."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258
    stop_ids = frozenset({eos_id})

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[Message]) -> str:
        """Each message as ``<|role|>\\ncontent\\n``, then the assistant's turn."""
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


class HFTokenizer:
    """A model's own tokenizer from its files (:data:`TOKENIZER_FILES`, name -> text).

    ``tokenizer.json`` is required. The chat template comes from ``chat_template.jinja`` or
    ``tokenizer_config.json``; without one, :meth:`render_chat` uses the byte tokenizer's
    plain format. Stop tokens: the generation config's ``eos_token_id`` and the tokenizer
    config's ``eos_token``.
    """

    def __init__(self, files: Mapping[str, str]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if "tokenizer.json" not in files:
            raise ConfigError("a model tokenizer needs tokenizer.json")
        self._tokenizer = RustTokenizer.from_str(files["tokenizer.json"])
        self.vocab_size = self._tokenizer.get_vocab_size()
        config = _json(files, "tokenizer_config.json")
        generation = _json(files, "generation_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template: str | None = files.get("chat_template.jinja") or config.get("chat_template") or None
        if isinstance(self.chat_template, list):  # several named templates: take the default
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        stops = generation.get("eos_token_id")
        ids = set(stops if isinstance(stops, list) else [stops] if isinstance(stops, int) else [])
        if self.eos_token is not None and self._tokenizer.token_to_id(self.eos_token) is not None:
            ids.add(self._tokenizer.token_to_id(self.eos_token))
        self.stop_ids = frozenset(ids)
        self._template: Any = None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[Message]) -> str:
        if not self.chat_template:
            return ByteTokenizer().render_chat(messages)
        if self._template is None:
            self._template = _compile(self.chat_template)
        try:
            return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template error is the model's, told as a config error
            raise ConfigError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None


def _json(files: Mapping[str, str], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON: {exc}") from None
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile(template: str) -> Any:
    """A chat template compiled as transformers does: sandboxed Jinja, trimmed blocks,
    ``raise_exception`` and ``strftime_now`` available."""
    import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"the chat template refused the conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return environment.from_string(template)
    except Exception as exc:  # noqa: BLE001 - jinja's syntax errors, told as a config error
        raise ConfigError(f"the model's chat template does not compile: {exc}") from None

"""The URI is the configuration: one immutable, typed, secret-safe parse of it.

``URI.parse("redis://:pw@127.0.0.1:6379/0?timeout=2")`` splits scheme, credentials,
host, port, path and query once. Backends declare their query options as a table of
typed :class:`Option` s and read them with :meth:`URI.options`, which rejects unknown or
repeated parameters, parses values, applies keyword overrides and refuses a keyword that
contradicts the URI. ``str()``, ``repr()`` and :meth:`URI.render` mask the password unless
asked not to, so a URI can be logged as it is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from kvswap.errors import ConfigError

_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")
MASK = "***"


@dataclasses.dataclass(frozen=True)
class URI:
    """An immutable parsed URI. Fields are percent-decoded."""

    scheme: str
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | URI) -> URI:
        """Parse ``text``; a :class:`ConfigError` says what is wrong, without secrets."""
        if isinstance(text, URI):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"a URI must be a string, not {type(text).__name__}")
        if not text or any(c in text for c in "\x00\r\n\t "):
            raise ConfigError("malformed URI: empty, or contains whitespace or NUL")
        if "://" not in text:
            raise ConfigError(
                f"malformed URI {_mask_raw(text)!r}: expected scheme://..., "
                "for example file:///var/kvswap or redis://127.0.0.1:6379/0"
            )
        scheme = text.split("://", 1)[0].lower()
        if not _SCHEME_RE.match(scheme):
            raise ConfigError(f"malformed URI scheme {scheme!r}")
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"malformed URI {_mask_raw(text)!r}: {exc}") from None
        if parts.fragment:
            raise ConfigError(f"malformed URI {_mask_raw(text)!r}: fragments are not used")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError(f"malformed query in URI {_mask_raw(text)!r}: {exc}") from None
        return cls(
            scheme=scheme,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            host=parts.hostname or None,
            port=port,
            path=unquote(parts.path),
            query=tuple(pairs),
        )

    def render(self, *, hide_password: bool = True) -> str:
        """The URI as text; the password is replaced by ``***`` unless told otherwise."""
        netloc = ""
        if self.username is not None or self.password is not None:
            netloc = quote(self.username or "", safe="")
            if self.password is not None:
                netloc += ":" + (MASK if hide_password else quote(self.password, safe=""))
            netloc += "@"
        if self.host:
            netloc += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            netloc += f":{self.port}"
        text = f"{self.scheme}://{netloc}{quote(self.path, safe='/:@')}"
        if self.query:
            text += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe=':/')}" for k, v in self.query)
        return text

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"URI({self.render()!r})"

    def with_query(self, **params: Any) -> URI:
        """A copy with query parameters replaced or added (None removes one)."""
        query = dict(self.query)
        for name, value in params.items():
            if value is None:
                query.pop(name, None)
            else:
                query[name] = str(value)
        return dataclasses.replace(self, query=tuple(query.items()))

    def options(self, table: Mapping[str, Option], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Typed options: defaults, then query parameters, then keyword overrides.

        Unknown or repeated query parameters, unparsable values, unknown keywords, and a
        keyword that contradicts the URI's own value raise :class:`ConfigError`.
        """
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(table))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for {self.scheme}://; known: {sorted(table)}")
        seen: dict[str, Any] = {}
        for name, raw in self.query:
            if name not in table:
                raise ConfigError(
                    f"unknown query parameter {name!r} in {self}; known for {self.scheme}://: {sorted(table)}"
                )
            if name in seen:
                raise ConfigError(f"query parameter {name!r} given twice in {self}")
            seen[name] = table[name].parse(name, raw)
        result = {name: opt.default for name, opt in table.items()}
        result.update(seen)
        for name, value in overrides.items():
            if value is None:
                continue
            if name in seen and seen[name] != value:
                raise ConfigError(f"option {name!r} is {seen[name]!r} in the URI but {value!r} as a keyword")
            result[name] = value
        return result


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed query parameter: its parser, its default and a one-line help."""

    parser: Callable[[str], Any]
    default: Any = None
    help: str = ""

    def parse(self, name: str, raw: str) -> Any:
        try:
            return self.parser(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad value for query parameter {name!r}: {exc}") from None


def _mask_raw(text: str) -> str:
    """Mask a password in a URI we could not parse (for error messages only)."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", rf"\1{MASK}@", text)


# ---- typed parsers for query parameters ----------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """Bytes from ``"4194304"``, ``"4MiB"``, ``"4MB"`` (decimal), ``"1.5GiB"``."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a byte size: {text!r} (examples: 1048576, 4MiB, 2GB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value != int(value) or value <= 0:
        raise ValueError(f"byte size must be a positive whole number of bytes: {text!r}")
    return int(value)


def parse_seconds(text: str) -> float:
    """A positive duration in seconds, such as ``"2"`` or ``"0.5"``."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"seconds must be positive and finite: {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer: {text!r}")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")

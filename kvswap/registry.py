"""Lazy scheme -> implementation registries (connectors, meta stores).

An entry names ``"module:Class"`` and the pip extra that brings its driver; nothing is
imported until a URI with that scheme is opened, so a missing optional driver costs
nothing until it is asked for, and then it is a :class:`ConfigError` saying what to
install.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Generic, TypeVar

from kvswap.errors import ConfigError
from kvswap.uri import URI

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where a scheme's class lives, and the pip extra that installs its driver."""

    target: str  # "package.module:ClassName"
    extra: str | None = None  # pip extra that installs the driver, None if built in


class LazyRegistry(Generic[T]):
    """Maps URI schemes to classes, importing each on first use."""

    def __init__(self, kind: str, entries: dict[str, Backend]) -> None:
        self.kind = kind
        self._entries = dict(sorted(entries.items()))

    @property
    def schemes(self) -> list[str]:
        return list(self._entries)

    def register(self, scheme: str, target: str, extra: str | None = None) -> None:
        """Add or replace a scheme (for third-party backends)."""
        self._entries[scheme.lower()] = Backend(target, extra)

    def resolve(self, uri: str | URI) -> tuple[URI, type[T]]:
        parsed = URI.parse(uri)
        entry = self._entries.get(parsed.scheme)
        if entry is None:
            raise ConfigError(
                f"unknown {self.kind} scheme {parsed.scheme!r} in {parsed}; known schemes: "
                + ", ".join(f"{s}://" + (f" (pip install 'kvswap[{e.extra}]')" if e.extra else "")
                            for s, e in self._entries.items())
            )
        module_name, _, class_name = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = exc.name or ""
            own = missing == module_name or module_name.startswith(missing + ".")
            if own or entry.extra is None:
                raise  # the entry itself is wrong: a bug, not a missing driver
            raise ConfigError(
                f"the {parsed.scheme}:// {self.kind} needs the {missing!r} package: "
                f"pip install 'kvswap[{entry.extra}]'"
            ) from exc
        return parsed, getattr(module, class_name)

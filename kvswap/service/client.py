"""A small client of the service's REST API (what ``kvswap sessions`` and the tests use).

Errors come back as kvswap's kinds: the service's ``{"error": kind, "message": ...}`` body
names one (NotFoundError, SessionBusyError, ...); other refusals are :class:`ServiceError`
with the HTTP status; an unreachable service is a BackendUnavailableError. Every call has
a timeout.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

from kvswap import errors


class ServiceError(errors.KVSwapError):
    """The service refused a call (``status`` is the HTTP status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_KINDS: dict[str, type[errors.KVSwapError]] = {
    kind.__name__: kind for kind in (errors.NotFoundError, errors.AlreadyExistsError, errors.VersionConflictError,
                                     errors.BackendUnavailableError, errors.IntegrityError, errors.ConfigError,
                                     errors.InvalidKeyError, errors.StorageFullError, errors.SessionBusyError)}


class ServiceClient:
    """Calls one service URL (or a load balancer in front of several) with a bearer token."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:  # the token stays out
        return f"ServiceClient({self.url!r})"

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the decoded JSON body (None for 204), or the error as a kvswap kind."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.BackendUnavailableError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:300]}
        if response.status_code < 400:
            return body
        message = body.get("message") or body.get("detail") or response.reason_phrase
        if not isinstance(message, str):
            message = str(message)[:500]
        kind = _KINDS.get(body.get("error", ""))
        if kind is not None:
            raise kind(message)
        if response.status_code in (502, 503, 504):
            raise errors.BackendUnavailableError(f"{self.url} answered {response.status_code}: {message}")
        raise ServiceError(f"{response.status_code}: {message}", response.status_code)

    @staticmethod
    def _path(session_id: str, action: str = "") -> str:
        return f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}" + (f"/{action}" if action else "")

    # ---- generate ---------------------------------------------------------------------------

    def generate(self, session_id: str, *, tokens: list[int] | None = None, text: str | None = None,
                 max_tokens: int = 64, stop_token: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": max_tokens, "stop_token": stop_token}
        body.update({"tokens": tokens} if tokens is not None else {"text": text})
        return self.call("POST", self._path(session_id, "generate"), json=body)

    # ---- admin -----------------------------------------------------------------------------

    def list_sessions(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self.call("GET", "/v1/sessions", params=params)

    def iter_sessions(self, page_size: int = 1000, **filters: Any) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            page = self.list_sessions(limit=page_size, cursor=cursor, **filters)
            yield from page["sessions"]
            cursor = page["cursor"]
            if cursor is None:
                return

    def session(self, session_id: str) -> dict[str, Any]:
        return self.call("GET", self._path(session_id))

    def prefetch(self, session_id: str) -> dict[str, Any]:
        return self.call("POST", self._path(session_id, "prefetch"))

    def swap_out(self, session_id: str, *, to: str = "auto") -> dict[str, Any]:
        return self.call("POST", self._path(session_id, "swap-out"), params={"to": to})

    def delete(self, session_id: str) -> None:
        self.call("DELETE", self._path(session_id))

    def gc(self) -> dict[str, Any]:
        return self.call("POST", "/v1/admin/gc")

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/health")

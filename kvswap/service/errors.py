"""How the service answers errors: kvswap's error kinds to HTTP codes, in one handler that
every app of the service installs (the instance's and a standalone seed's).
No ``from __future__ import annotations``: FastAPI reads these annotations."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvswap.errors import (
    BackendUnavailableError,
    BusyError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    KVSwapError,
    NotFoundError,
    OverloadedError,
    StorageFullError,
)
from kvswap.service import schemas

STATUS_OF: list[tuple] = [  # the error tree's kinds, most specific first
    (InvalidInputError, 400), (NotFoundError, 404), (ConflictError, 409), (BusyError, 409),
    (IntegrityError, 502), (BackendUnavailableError, 503), (OverloadedError, 503), (StorageFullError, 507),
]
RETRY_LATER = {409, 503}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody} for status in (401, 403, 404, 409, 503)}


def status_of(exc: KVSwapError) -> int:
    """The HTTP status of an error: its kind's (500 for none)."""
    return next((status for kind, status in STATUS_OF if isinstance(exc, kind)), 500)


def printable(value: Any) -> Any:
    """``value`` (str, or lists and dicts of them) with lone surrogates made visible escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def install_error_handlers(app: FastAPI) -> None:
    """kvswap errors as ``{"error": class name, "message": ...}`` with their kind's status
    (``Retry-After`` on 409 and 503); validation errors as FastAPI's 422, made printable."""

    @app.exception_handler(KVSwapError)
    async def kvswap_error(request: Request, exc: KVSwapError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": "1"} if status in RETRY_LATER else None
        return JSONResponse({"error": type(exc).__name__, "message": printable(str(exc))}, status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own body, with the offending input made printable: a lone surrogate in
        # it would otherwise fail the response itself (a 500 instead of this 422).
        return JSONResponse({"detail": printable(jsonable_encoder(exc.errors()))}, status_code=422)

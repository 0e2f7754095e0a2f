"""The FastAPI app of one instance: session admin, generate, chat completions, seed, health, metrics.

Auth (bearer tokens, compared in constant time):

* generate routes need the API token when one is set (the admin token works too);
* admin routes (``/v1/sessions`` ..., ``/v1/admin/...``) and the seed routes need the admin
  token: a valid API token there is 403, a missing or unknown one 401. With no token set at
  all (a laptop), every route is open except the seed routes, which are only mounted with an
  admin token; with only an API token set, admin routes are refused.
* ``/health`` and ``/metrics`` are open (they carry no secrets).

Routes come from one router per resource (:mod:`kvswap.service.routes`: ops, generate,
sessions, seed); kvswap's error kinds map to HTTP codes in one handler
(:mod:`kvswap.service.errors`); bodies larger than ``max_body_bytes`` are refused with 413
before they are read whole.
No ``from __future__ import annotations``: FastAPI reads these annotations.
"""

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import Depends, FastAPI, HTTPException, Request

from kvswap.service.errors import install_error_handlers
from kvswap.service.instance import AdminInstance, Instance
from kvswap.service.metrics import Metrics
from kvswap.service.routes.generate import generate_router
from kvswap.service.routes.ops import ops_router
from kvswap.service.routes.seed import seed_router
from kvswap.service.routes.sessions import sessions_router


class _BodyLimitAndTiming:
    """Pure ASGI: 413 for bodies over the limit (by Content-Length, or counted as they stream
    in), and each request's duration into the metrics by route template and status."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = HTTPException(413, f"the body is larger than {self.max_body_bytes} bytes")
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large
            return message

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                await _send_json(observed_send, 413, {"error": "PayloadTooLarge", "message": too_large.detail})
                return
            if not _utf8_path(scope):  # the server would read it with replacement characters
                await _send_json(observed_send, 400, {"error": "InvalidKeyError",
                                                      "message": "the request path is not valid UTF-8"})
                return
            await self.app(scope, limited_receive, observed_send)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope["method"], getattr(route, "path", "unmatched"), status, began)


def _utf8_path(scope: dict) -> bool:
    """Whether the path's percent-encoded bytes are UTF-8 (session ids travel in it)."""
    raw = scope.get("raw_path")
    if not raw:
        return True
    try:
        unquote_to_bytes(raw.decode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _send_json(send: Callable, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(instance: Instance | AdminInstance, *, owns_instance: bool = True) -> FastAPI:
    """The app over ``instance`` (closed at shutdown when ``owns_instance``)."""
    config = instance.config
    metrics = Metrics(instance)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        if owns_instance:
            await asyncio.to_thread(instance.close)

    app = FastAPI(title="kvswap", version=_version(), lifespan=lifespan,
                  description="Session-aware generation with KV reuse across instances; session admin; weights seed.")
    app.add_middleware(_BodyLimitAndTiming, max_body_bytes=config.max_body_bytes, metrics=metrics)

    install_error_handlers(app)
    user = Depends(_authorizer(config.api_token, config.admin_token, admin=False))
    admin = Depends(_authorizer(config.api_token, config.admin_token, admin=True))
    app.include_router(ops_router(instance, metrics))
    if isinstance(instance, Instance):
        app.include_router(generate_router(instance, user))
    app.include_router(sessions_router(instance, admin))
    if config.admin_token and isinstance(instance, Instance):
        app.include_router(seed_router(instance.seed(config.admin_token)))
    return app


def _authorizer(api_token: str | None, admin_token: str | None, *, admin: bool) -> Callable:
    def check(request: Request) -> None:
        if not api_token and not admin_token:
            return  # development mode: nothing configured
        if not admin and not api_token:
            return  # only an admin token is set: generate routes are open
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        if admin_token and hmac.compare_digest(given.encode(), admin_token.encode()):
            return
        if api_token and hmac.compare_digest(given.encode(), api_token.encode()):
            if not admin:
                return
            raise HTTPException(403, "this route needs the admin token" if admin_token
                                else "admin routes are off: no admin token is configured")
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})

    return check


def _version() -> str:
    import kvswap

    return kvswap.__version__

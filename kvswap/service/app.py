"""The FastAPI app of one instance: session admin, generate, chat completions, seed, health, metrics.

Auth (bearer tokens, compared in constant time):

* generate routes need the API token when one is set (the admin token works too);
* admin routes (``/v1/sessions`` ..., ``/v1/admin/...``) and the seed routes need the admin
  token: a valid API token there is 403, a missing or unknown one 401. With no token set at
  all (a laptop), every route is open except the seed routes, which are only mounted with an
  admin token; with only an API token set, admin routes are refused.
* ``/health`` and ``/metrics`` are open (they carry no secrets).

kvswap's error kinds map to HTTP codes in one handler (:data:`STATUS_OF`); bodies larger
than ``max_body_bytes`` are refused with 413 before they are read whole.
No ``from __future__ import annotations``: FastAPI reads these annotations.
"""

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
from kvswap.meta.base import Session
from kvswap.service import schemas
from kvswap.service.instance import AdminInstance, Instance, RequestError, SessionView
from kvswap.service.metrics import Metrics
from kvswap.session_cache import LocalState

STATUS_OF: list[tuple] = [  # the error tree's kinds, most specific first
    (InvalidInputError, 400), (NotFoundError, 404), (ConflictError, 409), (BusyError, 409),
    (IntegrityError, 502), (BackendUnavailableError, 503), (OverloadedError, 503), (StorageFullError, 507),
]
RETRY_LATER = {409, 503}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody} for status in (401, 403, 404, 409, 503)}


def status_of(exc: KVSwapError) -> int:
    return next((status for kind, status in STATUS_OF if isinstance(exc, kind)), 500)


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

    user = Depends(_authorizer(config.api_token, config.admin_token, admin=False))
    admin = Depends(_authorizer(config.api_token, config.admin_token, admin=True))

    # ---- open ------------------------------------------------------------------------------

    @app.get("/health", response_model=schemas.Health, tags=["ops"])
    def health() -> Any:
        return schemas.Health(status="ok", instance=instance.instance_id, fingerprint=instance.fingerprint,
                              uptime_s=time.time() - instance.started)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if isinstance(instance, Instance):
        _generate_routes(app, instance, user)

    # ---- admin -------------------------------------------------------------------------------

    @app.get("/v1/sessions", response_model=schemas.SessionList, dependencies=[admin], tags=["sessions"],
             responses=ERROR_RESPONSES)
    def list_sessions(owner: str | None = Query(None, max_length=256, description="lease holder"),
                      idle_since: float | None = Query(None, ge=0, allow_inf_nan=False,
                                                          description="last access at or before (epoch s)"),
                      fingerprint: str | None = Query(None, max_length=1024),
                      limit: int = Query(100, ge=1, le=1000),
                      cursor: str | None = Query(None, max_length=2048)) -> Any:
        page = instance.list_sessions(owner=owner, idle_since=idle_since, fingerprint=fingerprint, limit=limit,
                                      cursor=cursor)
        return schemas.SessionList(sessions=[_summary(s) for s in page.sessions], cursor=page.cursor)

    @app.get("/v1/sessions/{session_id:path}", response_model=schemas.SessionDetail, dependencies=[admin],
             tags=["sessions"], responses=ERROR_RESPONSES)
    def get_session(session_id: str = Path(...)) -> Any:
        return _detail(session_id, instance.view(session_id), instance.instance_id)

    @app.post("/v1/sessions/{session_id:path}/prefetch", response_model=schemas.PrefetchResult,
              dependencies=[admin], tags=["sessions"], responses=ERROR_RESPONSES)
    def prefetch(session_id: str = Path(...)) -> Any:
        """Bring the session's stored KV into HBM ahead of its next request."""
        return schemas.PrefetchResult(session_id=session_id, resident_tokens=instance.prefetch(session_id))

    @app.post("/v1/sessions/{session_id:path}/swap-out", response_model=schemas.SwapOutResult,
              dependencies=[admin], tags=["sessions"], responses=ERROR_RESPONSES)
    def swap_out(session_id: str = Path(...),
                 to: Literal["auto", "store"] = Query("auto", description="auto: the host tier if it fits, "
                                                      "else the store; store: the store (host copy too)")) -> Any:
        """Move the session's KV out of HBM. 409 while a request holds it."""
        local = instance.swap_out(session_id, to_store=to == "store")
        return schemas.SwapOutResult(session_id=session_id, local=_local(local, instance.instance_id))

    @app.delete("/v1/sessions/{session_id:path}", status_code=204, dependencies=[admin], tags=["sessions"],
                responses=ERROR_RESPONSES)
    def delete_session(session_id: str = Path(...)) -> Response:
        """Forget the session everywhere: HBM, host tier, meta, stored blobs. 409 while in use."""
        instance.delete(session_id)
        return Response(status_code=204)

    @app.post("/v1/admin/gc", response_model=schemas.GCResult, dependencies=[admin], tags=["sessions"],
              responses=ERROR_RESPONSES)
    def collect_garbage() -> Any:
        """Delete expired sessions and blobs that no meta entry points to (older than the grace period)."""
        return schemas.GCResult(**instance.gc())

    if config.admin_token and isinstance(instance, Instance):
        from kvswap.weights.seed_app import seed_router

        app.include_router(seed_router(instance.seed(config.admin_token)))
    return app


def _generate_routes(app: FastAPI, instance: Instance, user: Any) -> None:
    """The routes of an instance that serves a model: generate, chat completions, models."""

    @app.get("/v1/models", response_model=schemas.ModelList, dependencies=[user], tags=["generate"])
    def models() -> Any:
        """The model this instance serves (what OpenAI-style clients ask first)."""
        return schemas.ModelList(data=[schemas.ModelCard(id=instance.layout.model, created=int(instance.started))])
    @app.post("/v1/sessions/{session_id:path}/generate", response_model=schemas.GenerateResponse,
              dependencies=[user], tags=["generate"], responses=ERROR_RESPONSES)
    async def generate(body: schemas.GenerateRequest, session_id: str = Path(...)) -> Any:
        """Continue the session's conversation (all of it, as the client keeps it): KV of its
        longest verified stored prefix is reused, the rest computed. ``stream``: server-sent
        events, ``token`` per new token then ``done`` with the response body."""
        tokens = body.tokens if body.tokens is not None else instance.tokenizer.encode(body.text or "")
        stop = () if body.stop_token is None else (body.stop_token,)

        def respond(result: Any) -> dict:
            return schemas.GenerateResponse(
                session_id=session_id, tokens=result.tokens, text=instance.tokenizer.decode(result.tokens),
                cached_tokens=result.cached, computed_tokens=result.computed, ttft_ms=result.ttft * 1e3,
                total_ms=result.seconds * 1e3, instance=instance.instance_id).model_dump()

        if not body.stream:
            result = await asyncio.to_thread(instance.generate, session_id, tokens, body.max_tokens,
                                             stop_tokens=stop)
            return respond(result)
        return await _stream(instance, session_id, tokens, body.max_tokens, stop,
                             on_token=lambda t: ("token", {"token": t, "text": instance.tokenizer.decode([t])}),
                             on_done=lambda r: ("done", respond(r)))

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse, dependencies=[user],
              tags=["generate"], responses=ERROR_RESPONSES)
    async def chat_completions(body: schemas.ChatCompletionRequest,
                               x_session_id: str | None = Header(None, max_length=1024)) -> Any:
        """OpenAI-style chat completions, rendered with the model's own chat template. The
        session whose KV to reuse is ``session_id`` or the ``X-Session-ID`` header; without
        either the turn is computed whole and nothing is kept. Greedy decoding."""
        session_id = _session_of(body.session_id, x_session_id)
        tokens = instance.tokenizer.encode(instance.tokenizer.render_chat(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]))
        max_new = body.max_completion_tokens or body.max_tokens or 64
        stop = instance.tokenizer.stop_ids
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body.model or instance.layout.model

        def usage(result: Any) -> schemas.ChatUsage:
            return schemas.ChatUsage(prompt_tokens=len(tokens), completion_tokens=len(result.tokens),
                                     total_tokens=len(tokens) + len(result.tokens), cached_tokens=result.cached,
                                     prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=result.cached))

        def reason(result: Any) -> Literal["stop", "length"]:
            return "stop" if result.tokens and result.tokens[-1] in stop else "length"

        def text(tokens: list[int]) -> str:
            return instance.tokenizer.decode([t for t in tokens if t not in stop])

        if not body.stream:
            result = await asyncio.to_thread(instance.generate, session_id, tokens, max_new, stop_tokens=stop)
            return schemas.ChatCompletionResponse(
                id=completion_id, created=created, model=model,
                choices=[schemas.ChatChoice(message=schemas.ChatChoiceMessage(content=text(result.tokens)),
                                            finish_reason=reason(result))],
                usage=usage(result)).model_dump()

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def done(result: Any) -> list[tuple]:
            events = [(None, chunk({}, reason(result)))]
            if include_usage:
                events.append((None, {**chunk({}), "choices": [], "usage": usage(result).model_dump()}))
            return events

        return await _stream(instance, session_id, tokens, max_new, stop,
                             on_token=lambda t: (None, chunk({"content": text([t])})),
                             on_done=done, end="[DONE]")


def printable(value: Any) -> Any:
    """``value`` (str, or lists and dicts of them) with lone surrogates made visible escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def _session_of(body: str | None, header: str | None) -> str | None:
    """The request's session: the body's ``session_id`` or the ``X-Session-ID`` header (both:
    they must agree); None when neither is given."""
    if header is not None:
        header = _valid_header_text(header)
    if body is not None and header is not None and body != header:
        raise RequestError("session_id and the X-Session-ID header name different sessions")
    return body if body is not None else header


def _valid_header_text(value: str) -> str:
    # Starlette decodes headers as latin-1; a client sends UTF-8 bytes.
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise RequestError("the X-Session-ID header is not UTF-8 text") from None


async def _stream(instance: Instance, session_id: str | None, tokens: list[int], max_new: int,
                  stop: Collection[int], *,
                  on_token: Callable, on_done: Callable, end: str | None = None) -> StreamingResponse:
    """Server-sent events of a generate running in a worker thread. Errors before the first
    token (unknown session, busy, bad request) are answered as HTTP errors, not as events."""
    instance.check_request(tokens, max_new)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        try:
            result = instance.generate(session_id, tokens, max_new, stop_tokens=stop,
                                       on_token=lambda t: _post(loop, queue, ("token", t)))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except BaseException as exc:  # noqa: BLE001 - handed to the response
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    first = await queue.get()
    if first[0] == "error":
        await worker
        raise first[1]

    def event(name: str | None, data: Any) -> str:
        return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"

    async def events() -> Any:
        item = first
        while True:
            kind, value = item
            if kind == "token":
                yield event(*on_token(value))
            elif kind == "done":
                done = on_done(value)
                for item in done if isinstance(done, list) else [done]:
                    yield event(*item)
                if end:
                    yield f"data: {end}\n\n"
                break
            else:
                body = {"error": type(value).__name__, "message": str(value)}
                yield event("error", body)
                break
            item = await queue.get()
        await worker

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: tuple) -> None:
    loop.call_soon_threadsafe(queue.put_nowait, item)


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


def _summary(session: Session) -> schemas.SessionSummary:
    return schemas.SessionSummary(id=session.id, fingerprint=session.fingerprint, version=session.version,
                                  total_tokens=session.total_tokens, created=session.created,
                                  last_access=session.last_access, ttl=session.ttl, owner=session.owner,
                                  lease_expires=session.lease_expires)


def _local(local: LocalState, instance_id: str) -> schemas.LocalView:
    return schemas.LocalView(instance=instance_id, hbm_tokens=local.hbm_tokens, hbm_blocks=local.hbm_blocks,
                             host_tokens=local.host_tokens, pinned=local.pinned)


def _detail(session_id: str, view: SessionView, instance_id: str) -> schemas.SessionDetail:
    tiers = (["hbm"] if view.local.hbm_tokens else []) + (["host"] if view.local.host_tokens else [])
    tiers += list(dict.fromkeys(e.connector for e in view.entries))
    return schemas.SessionDetail(
        id=session_id, session=_summary(view.session) if view.session else None, tiers=tiers,
        stored_tokens=sum(e.token_length for e in view.entries), stored_bytes=sum(e.size for e in view.entries),
        entries=[schemas.EntryView(seq=e.seq, token_offset=e.token_offset, token_length=e.token_length,
                                   connector=e.connector, key=e.key, size=e.size, checksum=e.checksum,
                                   created=e.created) for e in view.entries],
        local=_local(view.local, instance_id))


def _version() -> str:
    import kvswap

    return kvswap.__version__

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
from typing import Any, Callable, List, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    InvalidKeyError,
    KVSwapError,
    NotFoundError,
    StorageFullError,
    VersionConflictError,
)
from kvswap.meta.base import InvalidEntryError, LeaseError, Session
from kvswap.service import schemas
from kvswap.service.instance import Instance, RequestError, SessionView
from kvswap.service.metrics import Metrics
from kvswap.session_cache import LocalState, OutOfBlocksError, SessionBusyError, SwapError
from kvswap.weights.seed import SeedBusyError

# First match wins: subclasses before their bases.
STATUS_OF: List[tuple] = [
    (RequestError, 400), (InvalidKeyError, 400), (InvalidEntryError, 400), (ConfigError, 400),
    (NotFoundError, 404),
    (SessionBusyError, 409), (SeedBusyError, 409), (LeaseError, 409), (VersionConflictError, 409),
    (AlreadyExistsError, 409),
    (IntegrityError, 502),
    (BackendUnavailableError, 503), (SwapError, 503), (OutOfBlocksError, 503),
    (StorageFullError, 507),
]
RETRY_LATER = {409, 503}

ERROR_RESPONSES = {401: {"model": schemas.ErrorBody}, 403: {"model": schemas.ErrorBody},
                404: {"model": schemas.ErrorBody}, 409: {"model": schemas.ErrorBody},
                503: {"model": schemas.ErrorBody}}


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
            await self.app(scope, limited_receive, observed_send)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope["method"], getattr(route, "path", "unmatched"), status, began)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def create_app(instance: Instance, *, owns_instance: bool = True) -> FastAPI:
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
        return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status_code=status, headers=headers)

    user = Depends(_authorizer(config.api_token, config.admin_token, admin=False))
    admin = Depends(_authorizer(config.api_token, config.admin_token, admin=True))

    # ---- open ------------------------------------------------------------------------------

    @app.get("/health", response_model=schemas.Health, tags=["ops"])
    def health() -> Any:
        return schemas.Health(status="ok", instance=instance.instance_id, fingerprint=instance.layout.fingerprint,
                              uptime_s=time.time() - instance.started)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- generate ----------------------------------------------------------------------------

    @app.post("/v1/sessions/{session_id:path}/generate", response_model=schemas.GenerateResponse,
              dependencies=[user], tags=["generate"], responses=ERROR_RESPONSES)
    async def generate(body: schemas.GenerateRequest, session_id: str = Path(...)) -> Any:
        """Continue the session's conversation (all of it, as the client keeps it): KV of its
        longest verified stored prefix is reused, the rest computed. ``stream``: server-sent
        events, ``token`` per new token then ``done`` with the response body."""
        tokens = body.tokens if body.tokens is not None else instance.tokenizer.encode(body.text)

        def respond(result: Any) -> dict:
            return schemas.GenerateResponse(
                session_id=session_id, tokens=result.tokens, text=instance.tokenizer.decode(result.tokens),
                cached_tokens=result.cached, computed_tokens=result.computed, ttft_ms=result.ttft * 1e3,
                total_ms=result.seconds * 1e3, instance=instance.instance_id).model_dump()

        if not body.stream:
            result = await asyncio.to_thread(instance.generate, session_id, tokens, body.max_tokens,
                                             stop_token=body.stop_token)
            return respond(result)
        return await _stream(instance, session_id, tokens, body.max_tokens, body.stop_token,
                             on_token=lambda t: ("token", {"token": t, "text": instance.tokenizer.decode([t])}),
                             on_done=lambda r: ("done", respond(r)))

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse, dependencies=[user],
              tags=["generate"], responses=ERROR_RESPONSES)
    async def chat_completions(body: schemas.ChatCompletionRequest) -> Any:
        """OpenAI-style chat completions; ``session_id`` (required) names whose KV to reuse.
        Greedy decoding; messages are rendered as ``<|role|>\\ncontent\\n`` turns."""
        tokens = instance.tokenizer.encode(render_chat(body.messages))
        max_new = body.max_completion_tokens or body.max_tokens or 64
        stop = getattr(instance.tokenizer, "eos_id", None)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body.model or instance.layout.model

        def respond(result: Any) -> dict:
            reason = "stop" if stop is not None and result.tokens[-1] == stop else "length"
            return schemas.ChatCompletionResponse(
                id=completion_id, created=created, model=model,
                choices=[schemas.ChatChoice(message=schemas.ChatChoiceMessage(
                    content=instance.tokenizer.decode(result.tokens)), finish_reason=reason)],
                usage=schemas.ChatUsage(prompt_tokens=len(tokens), completion_tokens=len(result.tokens),
                                        total_tokens=len(tokens) + len(result.tokens),
                                        cached_tokens=result.cached)).model_dump()

        if not body.stream:
            result = await asyncio.to_thread(instance.generate, body.session_id, tokens, max_new, stop_token=stop)
            return respond(result)

        def chunk(delta: dict, reason: Optional[str] = None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        def done(result: Any) -> tuple:
            return None, chunk({}, respond(result)["choices"][0]["finish_reason"])

        return await _stream(instance, body.session_id, tokens, max_new, stop,
                             on_token=lambda t: (None, chunk({"content": instance.tokenizer.decode([t])})),
                             on_done=done, end="[DONE]")

    # ---- admin -------------------------------------------------------------------------------

    @app.get("/v1/sessions", response_model=schemas.SessionList, dependencies=[admin], tags=["sessions"],
             responses=ERROR_RESPONSES)
    def list_sessions(owner: Optional[str] = Query(None, max_length=256, description="lease holder"),
                      idle_since: Optional[float] = Query(None, ge=0, allow_inf_nan=False,
                                                          description="last access at or before (epoch s)"),
                      fingerprint: Optional[str] = Query(None, max_length=1024),
                      limit: int = Query(100, ge=1, le=1000),
                      cursor: Optional[str] = Query(None, max_length=2048)) -> Any:
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

    if config.admin_token:
        from kvswap.weights.seed_app import seed_router

        app.include_router(seed_router(instance.seed(config.admin_token)))
    return app


def render_chat(messages: List[schemas.ChatMessage]) -> str:
    """The prompt text of a chat: each message as ``<|role|>\\ncontent\\n``, then the assistant's turn."""
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


async def _stream(instance: Instance, session_id: str, tokens: List[int], max_new: int, stop: Optional[int], *,
                  on_token: Callable, on_done: Callable, end: Optional[str] = None) -> StreamingResponse:
    """Server-sent events of a generate running in a worker thread. Errors before the first
    token (unknown session, busy, bad request) are answered as HTTP errors, not as events."""
    instance.check_request(tokens, max_new)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        try:
            result = instance.generate(session_id, tokens, max_new, stop_token=stop,
                                       on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, ("token", t)))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except BaseException as exc:  # noqa: BLE001 - handed to the response
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    first = await queue.get()
    if first[0] == "error":
        await worker
        raise first[1]

    def event(name: Optional[str], data: Any) -> str:
        return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"

    async def events() -> Any:
        item = first
        while True:
            kind, value = item
            if kind == "token":
                yield event(*on_token(value))
            elif kind == "done":
                yield event(*on_done(value))
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


def _authorizer(api_token: Optional[str], admin_token: Optional[str], *, admin: bool) -> Callable:
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

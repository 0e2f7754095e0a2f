"""Generation (API token): ``/v1/models``, a session's ``generate`` (JSON or server-sent
events) and OpenAI-style ``/v1/chat/completions``."""

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any, Literal

from fastapi import APIRouter, Header, Path
from fastapi.responses import StreamingResponse

from kvswap.service import schemas
from kvswap.service.errors import ERROR_RESPONSES
from kvswap.service.instance import Instance, RequestError


def generate_router(instance: Instance, user: Any) -> APIRouter:
    """The routes of an instance that serves a model: generate, chat completions, models."""
    router = APIRouter(dependencies=[user], tags=["generate"])

    @router.get("/v1/models", response_model=schemas.ModelList)
    def models() -> Any:
        """The model this instance serves (what OpenAI-style clients ask first)."""
        return schemas.ModelList(data=[schemas.ModelCard(id=instance.layout.model, created=int(instance.started))])

    @router.post("/v1/sessions/{session_id:path}/generate", response_model=schemas.GenerateResponse,
                 responses=ERROR_RESPONSES)
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

    @router.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse,
                 responses=ERROR_RESPONSES)
    async def chat_completions(body: schemas.ChatCompletionRequest,
                               x_session_id: str | None = Header(None, max_length=1024)) -> Any:
        """OpenAI-style chat completions, rendered with the model's own chat template. The
        session whose KV to reuse is ``session_id`` or the ``X-Session-ID`` header; without
        either the turn is computed whole and nothing is kept. Greedy decoding."""
        turn = _ChatTurn(instance, body, _session_of(body.session_id, x_session_id))
        if not body.stream:
            result = await asyncio.to_thread(instance.generate, turn.session_id, turn.tokens, turn.max_new,
                                             stop_tokens=turn.stop)
            return turn.response(result).model_dump()
        return await _stream(instance, turn.session_id, turn.tokens, turn.max_new, turn.stop,
                             on_token=turn.token_event, on_done=turn.done_events, end="[DONE]")

    return router


class _ChatTurn:
    """One chat completion: its prompt rendered with the model's chat template, and the
    OpenAI-shaped response, or stream chunks, built from the result."""

    def __init__(self, instance: Instance, body: schemas.ChatCompletionRequest, session_id: str | None) -> None:
        tokenizer = instance.tokenizer
        self.session_id = session_id
        self.tokens = tokenizer.encode(tokenizer.render_chat(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]))
        self.max_new = body.max_completion_tokens or body.max_tokens or 64
        self.stop = tokenizer.stop_ids
        self.decode = tokenizer.decode
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = body.model or instance.layout.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage(self, result: Any) -> schemas.ChatUsage:
        prompt, completion = len(self.tokens), len(result.tokens)
        return schemas.ChatUsage(prompt_tokens=prompt, completion_tokens=completion,
                                 total_tokens=prompt + completion, cached_tokens=result.cached,
                                 prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=result.cached))

    def reason(self, result: Any) -> Literal["stop", "length"]:
        return "stop" if result.tokens and result.tokens[-1] in self.stop else "length"

    def text(self, tokens: list[int]) -> str:
        return self.decode([t for t in tokens if t not in self.stop])

    def response(self, result: Any) -> schemas.ChatCompletionResponse:
        return schemas.ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model,
            choices=[schemas.ChatChoice(message=schemas.ChatChoiceMessage(content=self.text(result.tokens)),
                                        finish_reason=self.reason(result))],
            usage=self.usage(result))

    def chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def token_event(self, token: int) -> tuple:
        return None, self.chunk({"content": self.text([token])})

    def done_events(self, result: Any) -> list[tuple]:
        events = [(None, self.chunk({}, self.reason(result)))]
        if self.include_usage:
            events.append((None, {**self.chunk({}), "choices": [], "usage": self.usage(result).model_dump()}))
        return events


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

"""Request and response bodies of the service (pydantic; they make the OpenAPI schema).

No ``from __future__ import annotations``: FastAPI and pydantic read these annotations.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kvswap.meta.rules import MAX_ID_CHARS


def _valid_unicode(value: str) -> str:
    """Text that can be encoded (JSON's \\ud800 escapes decode to lone surrogates, which cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode: it holds a lone surrogate") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
SESSION_ID_HELP = "the session's id (1-255 characters, no control characters)"


class ErrorBody(BaseModel):
    error: str = Field(..., description="kvswap's error kind, e.g. NotFoundError, SessionBusyError")
    message: str


class GenerateRequest(BaseModel):
    """The whole conversation so far, as tokens or as text; the session id says whose KV to reuse.

    The client keeps the transcript (as with any chat completions API): kvswap reuses the
    longest stored prefix whose tokens match, verified, and computes the rest. A lost or
    corrupt blob costs a recompute, never a conversation.
    """

    model_config = ConfigDict(extra="forbid")

    tokens: list[int] | None = Field(None, description="the conversation as token ids")
    text: Text | None = Field(None, description="the conversation as text (tokenized by the instance)")
    max_tokens: int = Field(64, ge=1, description="how many tokens to generate at most")
    stop_token: int | None = Field(None, ge=0, description="stop after generating this token")
    stream: bool = Field(False, description="answer with server-sent events, one per token")

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of tokens or text")
        return self


class GenerateResponse(BaseModel):
    session_id: str
    tokens: list[int] = Field(..., description="the generated tokens")
    text: str = Field(..., description="the generated tokens, decoded")
    cached_tokens: int = Field(..., description="tokens of the conversation whose KV was reused")
    computed_tokens: int = Field(..., description="tokens of the conversation that were prefilled")
    ttft_ms: float = Field(..., description="time to the first new token, swap-in included")
    total_ms: float
    instance: str = Field(..., description="the instance that served the request")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] = Field(..., description="text, or a list of text parts")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completions body. ``session_id`` (kvswap's extension, or the
    ``X-Session-ID`` header as vLLM takes it) names whose KV to reuse; without one the turn
    is computed whole and nothing is kept. Decoding is greedy: sampling fields are accepted
    and ignored."""

    model: Text | None = Field(None, max_length=1024)
    messages: list[ChatMessage] = Field(..., min_length=1)
    session_id: Text | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, description=SESSION_ID_HELP)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice only")
    stop: Text | list[Text] | None = Field(None, description="not supported: answers end at the model's "
                                                    "own end-of-turn token")
    user: Text | None = Field(None, max_length=1024, description="accepted, not used")
    temperature: float | None = Field(None, description="ignored: decoding is greedy")
    top_p: float | None = Field(None, description="ignored: decoding is greedy")
    seed: int | None = Field(None, description="ignored: decoding is greedy")

    @model_validator(mode="after")
    def _no_stop_strings(self) -> "ChatCompletionRequest":
        if self.stop:
            raise ValueError("stop strings are not supported: answers end at the model's end-of-turn token")
        return self


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="prompt tokens whose KV was reused")


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    cached_tokens: int = Field(..., description="the same as prompt_tokens_details.cached_tokens (kept for "
                               "clients of kvswap 0.1)")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvswap"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionSummary(BaseModel):
    id: str
    fingerprint: str
    version: int
    total_tokens: int = Field(..., description="tokens stored (in meta)")
    created: float
    last_access: float
    ttl: float | None = None
    owner: str | None = Field(None, description="the instance holding its lease, if any")
    lease_expires: float | None = None


class SessionList(BaseModel):
    sessions: list[SessionSummary]
    cursor: str | None = Field(None, description="pass it back for the next page; null at the end")


class LocalView(BaseModel):
    instance: str
    hbm_tokens: int
    hbm_blocks: int
    host_tokens: int
    pinned: bool


class EntryView(BaseModel):
    """One stored span of a session: meta's entry record (:class:`kvswap.meta.Entry`)."""

    token_offset: int
    token_length: int
    connector: str = Field(..., description="the store holding its bytes (a URI without credentials)")
    key: str
    size: int = Field(..., description="bytes")
    checksum: str
    prefix_hash: str = Field(..., description="chained hash of the token ids up to its end")
    session_id: str
    seq: int
    created: float


class SessionDetail(BaseModel):
    id: str
    session: SessionSummary | None = Field(None, description="meta's record (null: held here, not in meta)")
    tiers: list[str] = Field(..., description="where its KV is: hbm, host (this instance), store locations")
    stored_tokens: int
    stored_bytes: int
    entries: list[EntryView] = Field(..., description="its stored spans, in order (meta's entry records)")
    local: LocalView


class PrefetchResult(BaseModel):
    session_id: str
    resident_tokens: int


class SwapOutResult(BaseModel):
    session_id: str
    local: LocalView


class GCResult(BaseModel):
    sessions: int = Field(..., description="expired sessions deleted")
    blobs: int = Field(..., description="blobs no session's entry named, and what interrupted writes left "
                       "in the stores (temporary files, chunks), older than the grace period")


class Health(BaseModel):
    status: Literal["ok"]
    instance: str
    fingerprint: str
    uptime_s: float

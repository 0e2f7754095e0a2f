"""Request and response bodies of the service (pydantic; they make the OpenAPI schema).

No ``from __future__ import annotations``: FastAPI and pydantic read these annotations.
"""

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvswap.meta.base import MAX_ID_CHARS

SessionId = Field(..., min_length=1, max_length=MAX_ID_CHARS, description="the session's id (1-255 characters, "
                  "no control characters)")


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

    tokens: Optional[List[int]] = Field(None, description="the conversation as token ids")
    text: Optional[str] = Field(None, description="the conversation as text (tokenized by the instance)")
    max_tokens: int = Field(64, ge=1, description="how many tokens to generate at most")
    stop_token: Optional[int] = Field(None, ge=0, description="stop after generating this token")
    stream: bool = Field(False, description="answer with server-sent events, one per token")

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of tokens or text")
        return self


class GenerateResponse(BaseModel):
    session_id: str
    tokens: List[int] = Field(..., description="the generated tokens")
    text: str = Field(..., description="the generated tokens, decoded")
    cached_tokens: int = Field(..., description="tokens of the conversation whose KV was reused")
    computed_tokens: int = Field(..., description="tokens of the conversation that were prefilled")
    ttft_ms: float = Field(..., description="time to the first new token, swap-in included")
    total_ms: float
    instance: str = Field(..., description="the instance that served the request")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=1 << 20)


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completions body, plus ``session_id`` (kvswap's extension)."""

    model: Optional[str] = None
    messages: List[ChatMessage] = Field(..., min_length=1)
    session_id: str = SessionId
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    temperature: Optional[float] = Field(None, description="ignored: decoding is greedy")


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: ChatUsage


class SessionSummary(BaseModel):
    id: str
    fingerprint: str
    version: int
    total_tokens: int = Field(..., description="tokens stored (in meta)")
    created: float
    last_access: float
    ttl: Optional[float] = None
    owner: Optional[str] = Field(None, description="the instance holding its lease, if any")
    lease_expires: Optional[float] = None


class SessionList(BaseModel):
    sessions: List[SessionSummary]
    cursor: Optional[str] = Field(None, description="pass it back for the next page; null at the end")


class EntryView(BaseModel):
    seq: int
    token_offset: int
    token_length: int
    connector: str
    key: str
    size: int
    checksum: str
    created: float


class LocalView(BaseModel):
    instance: str
    hbm_tokens: int
    hbm_blocks: int
    host_tokens: int
    pinned: bool


class SessionDetail(BaseModel):
    id: str
    session: Optional[SessionSummary] = Field(None, description="meta's record (null: held here, not in meta)")
    tiers: List[str] = Field(..., description="where its KV is: hbm, host (this instance), store locations")
    stored_tokens: int
    stored_bytes: int
    entries: List[EntryView]
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

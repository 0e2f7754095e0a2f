"""One engine instance: the model, its paged KV pool, the session cache and the engine; or,
with ``--model none``, an admin instance over the shared meta and stores (:class:`AdminInstance`).

The service's handlers call this class and nothing below it. Generation runs one request
at a time (``Instance.generate`` holds the engine lock); admin calls (prefetch, swap-out,
delete) go straight to the session cache, whose own lock and per-session pins keep them
consistent with a generate in flight: touching a session that a request holds open is a
:class:`~kvswap.session_cache.SessionBusyError` (HTTP 409), never a half-moved session.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

from kvswap.engine import Engine
from kvswap.engine.engine import Generation
from kvswap.errors import ConfigError, NotFoundError
from kvswap.meta import Entry, Session, validate_session_id
from kvswap.service.model import LoadedModel, load_model
from kvswap.session_cache import LocalState, PagedKVPool, SessionCache, StackSettings
from kvswap.session_cache.base import Policy

log = logging.getLogger("kvswap.service")


class RequestError(ConfigError):
    """A request that cannot be served as asked (too long, token ids out of range...): HTTP 400."""


@dataclasses.dataclass
class ServeConfig:
    """Everything ``kvswap serve`` is configured by. The defaults run on a laptop, no server needed."""

    model: str = "tiny"  # a name in kvswap.engine.MODEL_CONFIGS, a weights directory or URI, instance://
    model_id: str | None = None  # names the weights in KV fingerprints (default: their content digest)
    device: str = "cpu"
    dtype: str | None = None  # default: the checkpoint's (float32 for named configs)
    directory: str = "/tmp/kvswap-serve"
    meta: str | None = None  # default $KVSWAP_META, else sqlite:///<directory>/meta.db
    stores: list[str] = dataclasses.field(default_factory=list)  # default $KVSWAP_STORE, else [file://<directory>/kv]
    hbm_blocks: int = 1024
    block_size: int = 16
    host_bytes: int = 0
    policy: str = "write-through"
    instance_id: str | None = None
    lease_ttl: float | None = 30.0
    session_ttl: float | None = None
    recompute_when_faster: bool = True  # skip a load predicted slower than recomputing
    max_new_tokens: int = 1024  # the most one request may ask for
    max_body_bytes: int = 4 << 20
    api_token: str | None = None  # generate routes (the admin token works there too)
    admin_token: str | None = None  # session admin and seed routes
    seed_token: str | None = None  # for model=instance://... (default: KVSWAP_SEED_TOKEN)

    def __repr__(self) -> str:  # tokens stay out of logs
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("_token")}
        return f"ServeConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def stack(self) -> StackSettings:
        """Where sessions live (flags, else $KVSWAP_META / $KVSWAP_STORE, else under ``directory``)."""
        return StackSettings.resolve(self.meta, self.stores or None, self.directory, session_ttl=self.session_ttl)


@dataclasses.dataclass
class SessionView:
    """A session as the admin API shows it: meta's record and entries, and what this instance holds."""

    session: Session | None
    entries: list[Entry]
    local: LocalState


class Instance:
    """The model, KV pool, session cache and engine of one ``kvswap serve`` process."""

    def __init__(self, config: ServeConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.started = time.time()
        stack = config.stack
        began = time.perf_counter()
        self.loaded = loaded or load_model(config.model, device=config.device, dtype=config.dtype,
                                           model_id=config.model_id, seed_token=config.seed_token)
        self.model_load_seconds = time.perf_counter() - began
        self.layout = self.loaded.layout
        self.tokenizer = self.loaded.tokenizer
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pool = PagedKVPool(self.layout, config.hbm_blocks, config.block_size, config.device)
        policy = Policy.parse(config.policy)
        store = stack.open(self.layout, minimum_entry_tokens=config.block_size, check=True)
        self.cache = SessionCache(self.pool, store=store, host_bytes=config.host_bytes,
                                  policy=policy, instance_id=self.instance_id,
                                  lease_ttl=config.lease_ttl, recompute_when_faster=config.recompute_when_faster)
        self.meta = store.meta  # the admin routes list sessions from it
        self.engine = Engine(self.loaded.model, self.cache)
        self._engine_lock = threading.Lock()
        self.max_tokens = min(self.pool.num_blocks * self.pool.block_size, self.loaded.max_positions)
        log.info("kvswap instance %s: %s, pool %d x %d tokens on %s, meta %s, stores %s", self.instance_id,
                 self.layout.fingerprint, config.hbm_blocks, config.block_size, config.device,
                 self.cache.meta.uri.render(), [s.location for s in self.cache.stores])

    def __repr__(self) -> str:
        return f"Instance({self.instance_id!r}, {self.layout.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint

    # ---- generation --------------------------------------------------------------------------

    def check_request(self, tokens: Sequence[int], max_new_tokens: int) -> None:
        """RequestError unless the request fits the model and the pool."""
        if not tokens:
            raise RequestError("the conversation is empty: give tokens or text")
        if not 1 <= max_new_tokens <= self.config.max_new_tokens:
            raise RequestError(f"max_tokens must be between 1 and {self.config.max_new_tokens}")
        bad = next((t for t in tokens if not 0 <= t < self.loaded.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the model's vocabulary (0..{self.loaded.vocab_size - 1})")
        if len(tokens) + max_new_tokens > self.max_tokens:
            raise RequestError(f"{len(tokens)} tokens + {max_new_tokens} new exceed this instance's "
                               f"{self.max_tokens}-token limit (HBM pool and model positions)")

    def generate(self, session_id: str | None, tokens: Sequence[int], max_new_tokens: int, *,
                 stop_tokens: Collection[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        """Continue the conversation ``tokens`` (all of it, as the client keeps it) by up to
        ``max_new_tokens``, reusing the session's stored KV for its longest verified prefix.
        With no session (``None``) it is computed whole and nothing is kept."""
        if session_id is not None:
            session_id = validate_session_id(session_id)
        tokens = list(tokens)
        self.check_request(tokens, max_new_tokens)
        with self._engine_lock:
            if session_id is None:
                return self.engine.generate_uncached(tokens, max_new_tokens, stop_tokens=stop_tokens,
                                                     on_token=on_token)
            return self.engine.generate(session_id, tokens, max_new_tokens, stop_tokens=stop_tokens,
                                        on_token=on_token)

    # ---- admin ---------------------------------------------------------------------------------

    def view(self, session_id: str) -> SessionView:
        """NotFoundError if neither meta nor this instance knows the session."""
        session_id = validate_session_id(session_id)
        local = self.cache.local_state(session_id)
        try:
            session, entries = self.cache.meta.read(session_id)  # one snapshot, one round trip
        except NotFoundError:
            if not (local.hbm_tokens or local.host_tokens):
                raise NotFoundError(f"no session {session_id!r}") from None
            session, entries = None, []
        return SessionView(session, entries, local)

    def require(self, session_id: str) -> None:
        """NotFoundError unless meta or this instance knows the session (one meta read, no entries)."""
        session_id = validate_session_id(session_id)
        local = self.cache.local_state(session_id)
        if not (local.hbm_tokens or local.host_tokens):
            self.cache.meta.get(session_id)

    def prefetch(self, session_id: str) -> int:
        self.require(session_id)
        return self.cache.prefetch(session_id)

    def swap_out(self, session_id: str, *, to_store: bool) -> LocalState:
        self.require(session_id)
        self.cache.swap_out(session_id, to_store=to_store)
        return self.cache.local_state(session_id)

    def delete(self, session_id: str) -> None:
        session_id = validate_session_id(session_id)
        if not self.cache.drop(session_id):
            raise NotFoundError(f"no session {session_id!r}")

    def gc(self) -> dict[str, int]:
        return self.cache.gc()

    def seed(self, token: str) -> Any:
        """A :class:`~kvswap.weights.seed.WeightSeed` over this instance's weights."""
        from kvswap.weights.seed import WeightSeed

        return WeightSeed(self.loaded.model, token=token, fingerprint=self.layout.model, config=self.loaded.config,
                          files=self.loaded.files)

    def close(self) -> None:
        """Store what only this instance holds (write-back sessions), then close meta and stores."""
        try:
            stored = self.cache.flush()
            if stored:
                log.info("stored %d sessions at shutdown", stored)
        finally:
            self.cache.close()


class AdminInstance:
    """A ``kvswap serve --model none`` process: session administration without a model.

    It opens the shared meta store and stores that engines write (kvswap's own instances,
    or vLLM instances through the kvswap connector) and answers the admin routes: list,
    show, delete (meta and blobs) and gc. It holds no KV, so prefetch and swap-out, and the
    generate routes, are not served.
    """

    def __init__(self, config: ServeConfig) -> None:

        self.config = config
        self.started = time.time()
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}-admin"
        self.store = config.stack.open(None, check=True)
        self.meta = self.store.meta
        log.info("kvswap admin instance %s: meta %s, stores %s", self.instance_id, self.store.meta.uri.render(),
                 self.store.locations)

    fingerprint = "none"  # it serves no model

    def __repr__(self) -> str:
        return f"AdminInstance({self.instance_id!r})"

    def view(self, session_id: str) -> SessionView:
        session_id = validate_session_id(session_id)
        session, entries = self.store.meta.read(session_id)  # one snapshot, one round trip
        return SessionView(session, entries, LocalState())

    def prefetch(self, session_id: str) -> int:
        raise RequestError("this instance serves no model (--model none): it holds no KV to prefetch into")

    def swap_out(self, session_id: str, *, to_store: bool) -> LocalState:
        raise RequestError("this instance serves no model (--model none): it holds no KV to swap out")

    def delete(self, session_id: str) -> None:
        session_id = validate_session_id(session_id)
        if not self.store.delete(session_id):
            raise NotFoundError(f"no session {session_id!r}")

    def gc(self) -> dict[str, int]:
        return self.store.gc()

    def close(self) -> None:
        self.store.close()

"""What crosses between the connector's two halves: plain data, never objects holding connections.

The scheduler half sends, in each step's :class:`KVSwapConnectorMetadata`:

* :class:`FetchJob`: read a session's planned entries from the stores (or the worker's host
  tier), verify every byte, and hold the verified KV in host memory. Nothing is promised to
  vLLM before this is done, so what vLLM reports as cached is what was verified.
* :class:`LoadJob`: copy fetched tokens into the blocks vLLM allocated for them.
* :class:`SaveJob`: gather a finished request's new tokens from its blocks and write them as
  blobs (the data half of a save; the scheduler commits meta once they are written).
* ``releases``: fetched KV that will not be loaded (the request went away, or vLLM's own
  prefix cache covered it).

The worker half answers, in its :class:`KVSwapWorkerMetadata`, with a :class:`Fetched` per
fetch and a :class:`Saved` per save (before it, a :class:`Held` when its host tier holds the
save's KV: the session's next turn can be served from there while the blobs are written).
vLLM aggregates the workers' answers (one per tensor-parallel rank) before the scheduler sees
them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvswap.integrations.vllm.outcomes import Fetched, Held, Saved
from kvswap.meta import Entry


@dataclasses.dataclass
class FetchJob:
    """Read ``entries`` of ``session`` for tokens ``start..end-1`` of a request whose tokens
    are ``tokens``; give up after ``seconds``. ``root``: the prefix-hash chain's root (the
    scheduler's identity, which a connector reset changes)."""

    request_id: str
    session: str
    entries: list[Entry]
    start: int
    end: int
    tokens: list[int]
    seconds: float
    root: str = ""


@dataclasses.dataclass
class LoadJob:
    """Copy the fetched tokens ``start..end-1`` of a request into its ``block_ids``."""

    request_id: str
    start: int
    end: int
    block_ids: list[int]


@dataclasses.dataclass
class SaveJob:
    """Write tokens ``base..len(tokens)-1`` of a finished request (held in ``block_ids``) as
    blobs after the stored entry ending at ``base`` with prefix hash ``base_hash`` (at ``base`` 0
    the root of the session's chain: the scheduler's identity, which a connector reset changes), their keys
    ending in ``stamp`` (every rank names its blobs of the save alike); give up after ``seconds``."""

    request_id: str
    session: str
    tokens: list[int]
    base: int
    base_hash: str
    block_ids: list[int]
    seconds: float
    stamp: str


@dataclasses.dataclass
class KVSwapConnectorMetadata(KVConnectorMetadata):
    fetches: list[FetchJob] = dataclasses.field(default_factory=list)
    loads: list[LoadJob] = dataclasses.field(default_factory=list)
    saves: list[SaveJob] = dataclasses.field(default_factory=list)
    releases: list[str] = dataclasses.field(default_factory=list)
    step_tokens: int = 0  # the tokens this step computes (the worker times them: the prefill speed)


@dataclasses.dataclass
class KVSwapWorkerMetadata(KVConnectorWorkerMetadata):
    """A worker's outcomes of this step, by request and rank (vLLM aggregates the ranks' into one)."""

    fetched: dict[str, dict[int, Fetched]] = dataclasses.field(default_factory=dict)
    saved: dict[str, dict[int, Saved]] = dataclasses.field(default_factory=dict)
    held: dict[str, dict[int, Held]] = dataclasses.field(default_factory=dict)

    def aggregate(self, other: Any) -> KVSwapWorkerMetadata:
        if isinstance(other, KVSwapWorkerMetadata):
            for request_id, fetched in other.fetched.items():
                self.fetched.setdefault(request_id, {}).update(fetched)
            for request_id, saved in other.saved.items():
                self.saved.setdefault(request_id, {}).update(saved)
            for request_id, held in other.held.items():
                self.held.setdefault(request_id, {}).update(held)
        return self

    def is_empty(self) -> bool:
        return not self.fetched and not self.saved and not self.held


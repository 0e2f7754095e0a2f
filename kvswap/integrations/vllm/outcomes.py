"""What the connector's worker half reports of its jobs (one report per tensor-parallel rank),
and how the ranks' reports of one job combine into what the scheduler half acts on. Plain
data, free of vLLM imports."""

from __future__ import annotations

import dataclasses

from kvswap.meta import Entry, EntrySpec
from kvswap.session_cache.base import UNWRITTEN
from kvswap.session_cache.ranks import combined_checksum, entry_key, joined

#: Why a fetch stopped, when the worker knows it in a word; otherwise its reason is an error's
#: own text (which the worker logs).
FETCH_TIMED_OUT = "timed out"
STORE_NOT_ANSWERING = "store not answering"
PREFIX_CACHE_SHRANK = "prefix cache shrank"  # vLLM's own hit lost blocks while the fetch ran, more than once
NOT_HELD = "not held"  # a save's unwritten entries, gone from the host tier (their write failed)
SLOWER_THAN_RECOMPUTE = "slower than recompute"


@dataclasses.dataclass
class Fetched:
    """A fetch's outcome: tokens ``start..end-1`` are verified and held (``end == start``: none).
    ``source`` is where they came from ("host", "store", "host+store"); ``rejected`` counts
    tokens of entries found damaged, missing or foreign, from ``damaged_at`` on (meta should
    drop them); ``reason`` says why the fetch stopped short ("" when it got all it asked).
    ``checksums``: the checksum of each entry's blob read on this rank, from the first entry
    read (the ranks' checksums together are checked against the entry where they meet)."""

    end: int
    source: str = ""
    rejected: int = 0
    damaged_at: int | None = None
    reason: str = ""
    nbytes: int = 0
    seconds: float = 0.0
    checksums: list[str] = dataclasses.field(default_factory=list)
    share: int = 0  # the share of the KV heads this rank read (config.kv_share)


@dataclasses.dataclass
class Saved:
    """A save's data half: ``specs`` are the blobs written, in token order (None: nothing was
    written, ``reason`` says why; ``replica``: this rank's KV heads are another rank's, which
    wrote them)."""

    specs: list[EntrySpec] | None
    reason: str = ""
    nbytes: int = 0
    seconds: float = 0.0
    replica: bool = False


@dataclasses.dataclass
class Held:
    """A save's KV in its worker's host tier before any blob is written: ``specs`` are the
    entries the blobs will be (checksum :data:`~kvswap.session_cache.base.UNWRITTEN`), which
    the worker serves from its host tier until they are written. Reported only when the host
    tier holds all of them."""

    specs: list[EntrySpec]


def merge_held(reports: list[Held]) -> list[EntrySpec] | None:
    """The unwritten entries of a save every rank holds (``reports`` in rank order): rank 0's
    spans under their entry keys, or None when the ranks hold different spans."""
    first = reports[0].specs
    if any([(s.token_offset, s.token_length, s.prefix_hash) for s in report.specs]
           != [(s.token_offset, s.token_length, s.prefix_hash) for s in first] for report in reports):
        return None
    return [spec._replace(key=entry_key(spec.key)) for spec in first]


def fetch_outcome(fetched: Fetched) -> str:
    """Why a fetch brought nothing usable, in words fit for a metric label and a reply: one of
    a few (an error's own text would make both unbounded)."""
    if fetched.reason in (FETCH_TIMED_OUT, STORE_NOT_ANSWERING, SLOWER_THAN_RECOMPUTE, NOT_HELD):
        return fetched.reason
    if fetched.damaged_at is not None:
        return "damaged"
    return "fetch failed" if fetched.reason else "fetch came back empty"


def merge_fetched(reports: list[Fetched], entries: list[Entry], start: int, end: int) -> Fetched:
    """The fetch of a request as every rank did it (``reports`` in rank order) for the tokens
    ``start..end-1`` of ``entries``: what all ranks hold, verified together. With several
    shares of the KV heads, each entry's checksums of the shares' blobs must combine to the
    entry's checksum (and ranks reading the same share must have read the same blob); the
    first entry where they do not is damaged (its tokens and all after it are not used)."""
    if len(reports) == 1:
        return reports[0]
    held = min(report.end for report in reports)
    damaged = [report.damaged_at for report in reports if report.damaged_at is not None]
    reason = next((r.reason for r in reports if r.end == held and r.reason), "")
    read = [entry for entry in entries if entry.token_end > start]
    first = {report.share: report for report in reversed(reports)}  # a share's first rank reads for it
    shares = [first[share] for share in sorted(first)]
    for position in range(min(len(report.checksums) for report in reports)):
        entry = read[position] if position < len(read) else None
        if entry is not None and entry.checksum == UNWRITTEN:
            continue  # each rank's own copy of what it computed: no blob to check yet
        alike = all(r.checksums[position] == first[r.share].checksums[position] for r in reports)
        if entry is None or not alike or combined_checksum([r.checksums[position] for r in shares]) != entry.checksum:
            offset = entry.token_offset if entry is not None else held
            damaged.append(offset)
            held, reason = min(held, offset), reason or "the ranks' blobs do not match their entry"
            break
    damaged_at = min(damaged) if damaged else None
    sources = {report.source for report in reports if report.source}
    return Fetched(held, source=sources.pop() if len(sources) == 1 else "host+store" if sources else "",
                   rejected=max(0, end - damaged_at) if damaged_at is not None else 0, damaged_at=damaged_at,
                   reason=reason, nbytes=sum(r.nbytes for r in reports), seconds=max(r.seconds for r in reports))


def merge_saved(reports: list[Saved]) -> tuple[Saved, list[EntrySpec]]:
    """A save as every rank did it (``reports`` in rank order): what to commit (one entry per
    span), and the blobs to delete when it cannot be (the ranks that wrote theirs). Replicas
    (ranks whose KV heads another rank wrote) add nothing."""
    reports = [report for report in reports if not report.replica]
    written = [spec for report in reports for spec in report.specs or ()]
    failed = next((report for report in reports if report.specs is None), None)
    if failed is not None:
        return Saved(None, failed.reason), written
    try:
        specs = joined([report.specs or [] for report in reports])
    except ValueError as exc:
        return Saved(None, str(exc)), written
    return Saved(specs, nbytes=sum(r.nbytes for r in reports), seconds=max(r.seconds for r in reports)), []

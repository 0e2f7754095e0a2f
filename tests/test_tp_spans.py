"""Spans of a tensor-parallel engine (one meta entry, one blob per rank) and how the ranks'
reports of a fetch or a save combine (:mod:`kvswap.session_cache.ranks`,
:mod:`kvswap.integrations.vllm.outcomes`); the real engine runs in tests/test_vllm_tp.py."""

from __future__ import annotations

import dataclasses

import pytest

from kvswap.integrations.vllm.outcomes import Fetched, Saved, merge_fetched, merge_saved
from kvswap.meta import Entry, EntrySpec
from kvswap.session_cache.base import KVLayout
from kvswap.session_cache.ranks import (
    RANKS_CHECKSUM,
    blob_keys,
    combined_checksum,
    entry_key,
    joined,
    rank_count,
    rank_key,
    rank_view,
)


def spec(rank: int, start: int, length: int, checksum: str, key: str = "kv/s/a") -> EntrySpec:
    return EntrySpec(start, length, "file:///x", rank_key(f"{key}-{start}", rank), 100, checksum, f"h{start}")


def test_keys_and_counts() -> None:
    assert rank_key("kv/s/0-16-1-ab", 0) == "kv/s/0-16-1-ab" and rank_key("kv/s/0-16-1-ab", 3) == "kv/s/0-16-1-ab.r3"
    assert entry_key("kv/s/0-16-1-ab.r3") == entry_key("kv/s/0-16-1-ab") == "kv/s/0-16-1-ab"
    one = spec(0, 0, 16, "xxh3_128:00")
    assert rank_count(one) == 1 and blob_keys(one) == [one.key]
    many = one._replace(checksum=combined_checksum(["a", "b", "c"]))
    assert rank_count(many) == 3 and blob_keys(many) == [one.key, one.key + ".r1", one.key + ".r2"]


def test_fingerprints_name_the_rank_and_the_session_every_rank() -> None:
    single = KVLayout("m", 2, 4, 64, "float32")
    assert single.fingerprint == single.session_fingerprint == "m|float32|L2xH4xD64|tp0/1"
    ranks = [KVLayout("m", 2, 1, 64, "float32", tp_rank=r, tp_size=16) for r in (3, 12)]
    assert [r.fingerprint for r in ranks] == ["m|float32|L2xH1xD64|tp03/16", "m|float32|L2xH1xD64|tp12/16"]
    assert {r.session_fingerprint for r in ranks} == {"m|float32|L2xH1xD64|tp*/16"}


def test_joined_commits_one_entry_per_span_or_refuses() -> None:
    ranks = [[spec(r, 0, 16, f"c{r}0"), spec(r, 16, 8, f"c{r}1")] for r in (0, 1)]
    specs = joined(ranks)
    assert [s.key for s in specs] == [ranks[0][0].key, ranks[0][1].key]
    assert [s.checksum for s in specs] == [combined_checksum(["c00", "c10"]), combined_checksum(["c01", "c11"])]
    assert joined([ranks[0]]) == ranks[0]  # one rank: its blobs as they are
    with pytest.raises(ValueError):
        joined([ranks[0], ranks[1][:1]])  # rank 1 wrote fewer spans
    with pytest.raises(ValueError):
        joined([ranks[0], [ranks[1][0]._replace(token_length=15), ranks[1][1]]])
    with pytest.raises(ValueError):
        joined([ranks[0], [spec(1, 0, 16, "c", key="kv/s/other"), ranks[1][1]]])  # another save's blob


def test_a_rank_reads_its_own_blob_checked_where_the_ranks_meet() -> None:
    entry = Entry.of(spec(0, 0, 16, "x")._replace(checksum=combined_checksum(["a", "b"])), "s", 1, 0.0)
    view = rank_view(entry, 1, 2)
    assert (view.key, view.checksum) == (entry.key + ".r1", RANKS_CHECKSUM)
    assert rank_view(entry, 0, 1) is entry


def test_merged_fetch_holds_what_every_rank_holds_and_checks_the_checksums() -> None:
    entries = [Entry.of(spec(0, start, 16, "x")._replace(checksum=combined_checksum([f"a{start}",
                                                                                                   f"b{start}"])),
                        "s", seq, 0.0) for seq, start in enumerate((0, 16, 32))]
    good = [Fetched(48, "store", nbytes=10, seconds=1.0, checksums=["a0", "a16", "a32"], share=0),
            Fetched(40, "host", nbytes=5, seconds=2.0, checksums=["b0", "b16", "b32"], share=1)]
    merged = merge_fetched(good, entries, 0, 48)
    assert (merged.end, merged.source, merged.nbytes, merged.seconds, merged.damaged_at) == (40, "host+store", 15, 2.0,
                                                                                            None)
    bad = [good[0], dataclasses.replace(good[1], end=48, checksums=["b0", "a16", "b32"])]  # rank 1's 2nd blob: foreign
    merged = merge_fetched(bad, entries, 0, 48)
    assert (merged.end, merged.damaged_at, merged.rejected) == (16, 16, 32) and merged.reason
    # From a start inside the history, the reports' checksums begin at the first entry read.
    assert merge_fetched([Fetched(48, checksums=["a16", "a32"]), Fetched(48, checksums=["b16", "b32"], share=1)],
                         entries, 20, 48).end == 48
    # Four ranks holding two KV heads (two shares, each read by two ranks): the shares combine,
    # and two ranks of one share must have read the same blob.
    replicated = [dataclasses.replace(good[share], end=48, share=share) for share in (0, 0, 1, 1)]
    assert merge_fetched(replicated, entries, 0, 48).end == 48
    replicated[3] = dataclasses.replace(replicated[3], checksums=["b0", "b16", "x"])
    assert merge_fetched(replicated, entries, 0, 48).damaged_at == 32
    one = Fetched(48, "store")
    assert merge_fetched([one], entries, 0, 48) is one


def test_merged_save_commits_all_or_deletes_what_was_written() -> None:
    ranks = [Saved([spec(r, 0, 16, f"c{r}")], nbytes=100, seconds=0.5 + r) for r in (0, 1)]
    saved, orphans = merge_saved(ranks)
    assert saved.specs is not None and saved.specs[0].checksum == combined_checksum(["c0", "c1"]) and not orphans
    assert (saved.nbytes, saved.seconds) == (200, 1.5)
    saved, orphans = merge_saved([ranks[0], Saved(None, "store full")])
    assert saved.specs is None and saved.reason == "store full" and orphans == ranks[0].specs
    # A rank whose KV heads another rank wrote adds nothing: rank 0's blobs are the span's.
    saved, orphans = merge_saved([ranks[0], Saved([], replica=True)])
    assert saved.specs == ranks[0].specs and not orphans

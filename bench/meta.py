"""Meta-store operations per second against the raw driver's nearest operation, same run.

    .venv/bin/python bench/meta.py [--only memkv,sqlite,postgresql,mysql,etcd,redis,valkey]
                                   [--sessions 100000] [--rounds 3]

Starts its own servers on loopback (kvswap.testing.servers). For each backend, one thread:

* get session         vs one parameterized SELECT by primary key / Redis HGETALL / etcd get;
* append (CAS)        vs one parameterized INSERT, autocommit / Redis RPUSH / etcd put;
* list 100 entries    vs one SELECT of 100 rows / LRANGE of 100 / etcd range of 100 keys;
* lookup              (a session and its 100 entries: ``read``, what every request's lookup
                      does, one round trip) vs the raw get and list 100 above, one after the other;
* page 100k sessions  (1000 per page) vs SELECT ... WHERE id > ? ORDER BY id LIMIT 1000 /
                      ZRANGEBYLEX + pipelined HGETALL of 1000 / etcd range with limit 1000.

The raw side reads copies of kvswap's own rows and hashes (same shapes, same DDL), or for
etcd the very keys kvswap wrote (see RawEtcd). Raw and kvswap runs alternate (``--rounds``), the median
per-op time of each is kept;
the ratio is kvswap's cost per operation over the raw driver's (goal: <= 2). For the SQL
stores, ``append_txn`` also runs kvswap's own guarded append statements in their
transaction through the bare driver: the database's share of an append. memkv has no
driver; its raw column is a dict lookup / list append. JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.meta import EntrySpec, MetaStore, open_meta_store
from kvswap.testing import servers
from kvswap.uri import URI

OPS = ("get", "append", "list100", "lookup", "page")
ENV = {"postgresql": "KVSWAP_TEST_POSTGRES_URI", "mysql": "KVSWAP_TEST_MYSQL_URI", "etcd": "KVSWAP_TEST_ETCD_URI",
       "redis": "KVSWAP_TEST_REDIS_URI", "valkey": "KVSWAP_TEST_VALKEY_URI"}
SERVER = {"postgresql": "postgres", "mysql": "mariadb", "etcd": "etcd", "redis": "redis", "valkey": "valkey"}
VALUE = json.dumps({"fingerprint": "llama-3-8b/bf16/paged16/tp0of1", "version": 7, "total_tokens": 4096,
                    "attrs": {}, "created": time.time(), "last_access": time.time(), "ttl": None})


def spec(offset: int, length: int = 16) -> EntrySpec:
    return EntrySpec(offset, length, "file:///var/kvswap", f"sessions/bench/{offset}", length * 131072,
                     f"xxh3:{offset:032x}", f"{offset + length:064x}")


# ---- the raw drivers ----------------------------------------------------------------------------
# Each raw side reads the same data in the same shape as kvswap's (a copy of kvswap's rows or
# hashes under other names; etcd: kvswap's own keys), so a ratio is kvswap's cost over the bare
# driver's for the same bytes, not over a thinner data model.

LIST_ID, APPEND_ID = "bench-list", "bench-append"


class RawSQL:
    """The same tables (kvswap's DDL, prefix ``rawbench_``) through the bare DB-API driver,
    autocommit, parameterized."""

    def __init__(self, uri: URI) -> None:
        import sqlalchemy as sa

        from kvswap.meta.sql.dialects import DIALECTS
        from kvswap.meta.sql.schema import tables

        self.scheme = uri.scheme
        if uri.scheme == "sqlite":
            self.conn = sqlite3.connect(uri.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.mark = "?"
            url = f"sqlite:///{uri.path}"
        elif uri.scheme == "postgresql":
            import psycopg

            self.conn = psycopg.connect(host=uri.host, port=uri.port, user=uri.username, password=uri.password,
                                        dbname=uri.path.strip("/"), autocommit=True)
            self.mark = "%s"
            url = uri.render(hide_password=False).replace("postgresql://", "postgresql+psycopg://", 1)
        else:
            import pymysql
            from pymysql.constants import CLIENT

            self.conn = pymysql.connect(host=uri.host, port=uri.port, user=uri.username, password=uri.password,
                                        database=uri.path.strip("/"), autocommit=True,
                                        client_flag=CLIENT.MULTI_STATEMENTS)
            self.mark = "%s"
            url = uri.render(hide_password=False).replace("mysql://", "mysql+pymysql://", 1)
        engine = sa.create_engine(url)
        md = tables("rawbench_")[0]
        md.drop_all(engine)
        md.create_all(engine)
        # kvswap's own statements, on these tables, for append_txn.
        self.sql = DIALECTS[uri.scheme]("rawbench_", {})
        engine.dispose()
        self.seq, self.version, self.total = 0, 1, 0

    def execute(self, sql: str, params: tuple = (), fetch: bool = False) -> Any:
        cursor = self.conn.cursor()
        cursor.execute(sql.replace("?", self.mark), params)
        rows = cursor.fetchall() if fetch else None
        cursor.close()
        return rows

    def seed(self, ids: list[str]) -> None:
        """Copy kvswap's rows: every session, and the listed session's entries."""
        self.execute("INSERT INTO rawbench_sessions SELECT * FROM kvswap_sessions")
        self.execute("INSERT INTO rawbench_entries SELECT * FROM kvswap_entries WHERE session_id = ?",
                     (LIST_ID.encode(),))
        self.entry = self.execute("SELECT * FROM rawbench_entries WHERE session_id = ? AND seq = 0",
                                  (LIST_ID.encode(),), fetch=True)[0]
        # Fresh statistics for both sides (a copied table has none: PostgreSQL would sort it).
        names = "rawbench_sessions, rawbench_entries, kvswap_sessions, kvswap_entries"
        self.execute({"sqlite": "ANALYZE", "postgresql": f"ANALYZE {names}"}.get(self.scheme, f"ANALYZE TABLE {names}"),
                     fetch=self.scheme == "mysql")

    def get(self, i: int) -> Any:
        return self.execute("SELECT * FROM rawbench_sessions WHERE id = ?", (b"s%07d" % i,), fetch=True)

    def append(self, i: int) -> Any:
        self.seq += 1
        return self.execute("INSERT INTO rawbench_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (b"raw-append", self.seq, *self.entry[2:]))

    def append_txn(self, i: int) -> Any:
        """An append as kvswap runs it (its guarded statements, its transaction) through the
        bare driver: what the database itself costs for a compare-and-swap append."""
        now, sid, cursor = time.time(), APPEND_ID.encode(), self.conn.cursor()
        guard = (16, now, now, sid, self.version, self.total)
        values = (self.total, *self.entry[3:9], now)
        if self.scheme == "sqlite":
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(self.sql.append, guard)
            assert cursor.rowcount == 1
            row = cursor.execute(self.sql.appended, (now, now, sid)).fetchone()
            cursor.execute(self.sql.insert_entry, (sid, row[-1], *values))
            cursor.execute("COMMIT")
        elif self.scheme == "postgresql":
            cursor.execute(self.sql.append, (*guard, *values, now, now))
            assert cursor.fetchone() is not None
        else:
            cursor.execute(self.sql.append, (*guard, *values, sid, now, now, sid))
            while cursor.nextset():
                pass
        cursor.close()
        self.version, self.total = self.version + 1, self.total + 16

    def list100(self, i: int) -> Any:
        return self.execute("SELECT * FROM rawbench_entries WHERE session_id = ? ORDER BY seq",
                            (LIST_ID.encode(),), fetch=True)

    def page_all(self) -> int:
        after, total = b"", 0
        while True:
            rows = self.execute("SELECT * FROM rawbench_sessions WHERE id > ? ORDER BY id LIMIT 1000", (after,),
                                fetch=True)
            if not rows:
                return total
            total += len(rows)
            after = rows[-1][0]

    def close(self) -> None:
        self.conn.close()


class RawRedis:
    """Copies of kvswap's session hashes, id index and entry list, under ``raw:``."""

    def __init__(self, uri: URI) -> None:
        lib = __import__("redis" if uri.scheme == "redis" else "valkey")
        self.client = lib.Redis(host=uri.host, port=uri.port, db=int(uri.path.strip("/") or 0))
        self.seq = 0

    def seed(self, ids: list[str]) -> None:
        prefix = "kvswap:meta:"
        for start in range(0, len(ids), 5000):
            batch = ids[start:start + 5000]
            read = self.client.pipeline(transaction=False)
            for session_id in batch:
                read.hgetall(f"{prefix}s:{session_id}")
            write = self.client.pipeline(transaction=False)
            for session_id, fields in zip(batch, read.execute()):
                write.hset(f"raw:s:{session_id}", mapping=fields)
                write.zadd("raw:idx", {session_id: 0})
            write.execute()
        self.entries = self.client.lrange(f"{prefix}e:{LIST_ID}", 0, -1)
        self.client.rpush("raw:list", *self.entries)

    def get(self, i: int) -> Any:
        return self.client.hgetall(f"raw:s:s{i:07d}")

    def append(self, i: int) -> Any:
        return self.client.rpush("raw:append", self.entries[0])

    def list100(self, i: int) -> Any:
        return self.client.lrange("raw:list", 0, -1)

    def page_all(self) -> int:
        start, total = b"-", 0
        while True:
            ids = self.client.zrangebylex("raw:idx", start, b"+", start=0, num=1000)
            if not ids:
                return total
            pipe = self.client.pipeline(transaction=False)
            for session_id in ids:
                pipe.hgetall(b"raw:s:" + session_id)
            total += len(pipe.execute())
            start = b"(" + ids[-1]

    def close(self) -> None:
        self.client.close()


class RawEtcd:
    """etcd's gRPC KV API, with the same stubs the store uses, reading the keys kvswap wrote.

    Not a copy, unlike the others: etcd reads each value by its revision, and a bulk copy
    lays revisions out in key order where kvswap's 16 concurrent creators did not, which
    alone makes a range of the copy ~1.8x faster than the same range over the originals."""

    def __init__(self, uri: URI) -> None:
        import grpc
        from aetcd import rpc

        self.rpc = rpc
        self.root = uri.path.strip("/").encode() + b"/"
        self.channel = grpc.insecure_channel(f"{uri.host}:{uri.port}")
        self.kv = rpc.KVStub(self.channel)
        self.seq = 0

    def seed(self, ids: list[str]) -> None:
        self.entries_start = self.root + b"e/" + LIST_ID.encode() + b"\x00"
        self.entries = self.range(self.entries_start, self.entries_start[:-1] + b"\x01")
        assert len(self.entries) == 100

    # Like the SQL and Redis drivers, the raw calls take each key and value out of the reply
    # as Python objects (a protobuf reply left unread costs nothing per record).

    def range(self, key: bytes, end: bytes = b"", limit: int = 0) -> list[tuple[bytes, bytes]]:
        reply = self.kv.Range(self.rpc.RangeRequest(key=key, range_end=end, limit=limit), timeout=10)
        self.more = reply.more
        return [(kv.key, kv.value) for kv in reply.kvs]

    def get(self, i: int) -> Any:
        return self.range(self.root + b"s/s%07d" % i)

    def append(self, i: int) -> Any:
        self.seq += 1
        return self.kv.Put(self.rpc.PutRequest(key=b"raw/a/%010d" % self.seq, value=self.entries[0][1]), timeout=10)

    def list100(self, i: int) -> Any:
        return self.range(self.entries_start, self.entries_start[:-1] + b"\x01")

    def page_all(self) -> int:
        start, end, total = self.root + b"s/", self.root + b"s0", 0
        while True:
            records = self.range(start, end, 1000)
            total += len(records)
            if not self.more:
                return total
            start = records[-1][0] + b"\x00"

    def close(self) -> None:
        self.channel.close()


class RawMemory:
    """memkv's nearest 'driver': a dict under a lock."""

    def __init__(self, uri: URI) -> None:
        import threading

        self.lock, self.data, self.log = threading.Lock(), {}, []

    def seed(self, ids: list[str]) -> None:
        self.data = dict.fromkeys(ids, VALUE)
        self.ids = sorted(ids)
        self.entries = [VALUE] * 100

    def get(self, i: int) -> Any:
        with self.lock:
            return self.data.get(f"s{i:07d}")

    def append(self, i: int) -> Any:
        with self.lock:
            self.log.append(VALUE)

    def list100(self, i: int) -> Any:
        with self.lock:
            return list(self.entries)

    def page_all(self) -> int:
        total = 0
        for start in range(0, len(self.ids), 1000):
            with self.lock:
                total += len(list(map(self.data.__getitem__, self.ids[start:start + 1000])))
        return total

    def close(self) -> None:
        pass


RAW: dict[str, Callable[[URI], Any]] = {"memkv": RawMemory, "sqlite": RawSQL, "postgresql": RawSQL,
                                         "mysql": RawSQL, "etcd": RawEtcd, "redis": RawRedis, "valkey": RawRedis}


# ---- measuring ------------------------------------------------------------------------------------


@dataclasses.dataclass
class KVSwapOps:
    meta: MetaStore
    session: Any = None

    def prepare(self) -> None:
        self.meta.create(APPEND_ID, "fp")
        self.session = self.meta.get(APPEND_ID)
        listed = self.meta.create(LIST_ID, "fp")
        for _ in range(100):
            listed, _ = self.meta.append(LIST_ID, listed.version, spec(listed.total_tokens))

    def get(self, i: int) -> Any:
        return self.meta.get(f"s{i:07d}")

    def append(self, i: int) -> Any:
        self.session, _ = self.meta.append(APPEND_ID, self.session.version, spec(self.session.total_tokens))

    def list100(self, i: int) -> Any:
        return self.meta.entries(LIST_ID)

    def lookup(self, i: int) -> Any:
        return self.meta.read(LIST_ID)

    def page_all(self) -> int:
        cursor, total = None, 0
        while True:
            page = self.meta.list_sessions(limit=1000, cursor=cursor)
            total += len(page.sessions)
            if (cursor := page.cursor) is None:
                return total


def per_op(fn: Callable[[int], Any], count: int, sessions: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i % sessions)
    return (time.perf_counter() - start) / count


def seed_sessions(meta: MetaStore, ids: list[str]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: meta.create(i, "fp"), ids, chunksize=256))
    return time.perf_counter() - start


def bench_backend(name: str, uri: URI, sessions: int, rounds: int, counts: dict[str, int]) -> dict[str, Any]:
    meta = open_meta_store(uri)
    raw = RAW[name](uri)
    ids = [f"s{i:07d}" for i in range(sessions)]
    seconds = seed_sessions(meta, ids)
    print(f"  {name}: seeded {sessions} sessions in {seconds:.1f} s ({sessions / seconds:,.0f}/s)", flush=True)
    ops = KVSwapOps(meta)
    ops.prepare()
    raw.seed(ids)
    samples: dict[str, dict[str, list[float]]] = {op: {"kvswap": [], "raw": []} for op in (*OPS, "append_txn")}
    for _ in range(rounds):
        for op in OPS:
            for side, target in (("raw", raw), ("kvswap", ops)):
                if op == "page":
                    start = time.perf_counter()
                    seen = target.page_all()
                    assert seen >= sessions, (name, side, seen)  # kvswap also holds the two bench sessions
                    samples[op][side].append((time.perf_counter() - start) / seen)
                elif op == "lookup" and side == "raw":  # the same data by the bare driver: two round trips
                    samples[op][side].append(per_op(lambda i: (raw.get(i), raw.list100(i)), counts[op], sessions))
                else:
                    samples[op][side].append(per_op(getattr(target, op), counts[op], sessions))
            if op == "append" and hasattr(raw, "append_txn"):
                samples["append_txn"]["raw"].append(per_op(raw.append_txn, counts[op], sessions))
    meta.close()
    raw.close()
    row: dict[str, Any] = {"backend": name, "uri": str(uri)}
    for op in OPS:
        kv, rw = (statistics.median(samples[op][side]) for side in ("kvswap", "raw"))
        unit = "sessions/s" if op == "page" else "ops/s"
        row[op] = {"kvswap_per_s": 1 / kv, "raw_per_s": 1 / rw, "cost_ratio": kv / rw, "unit": unit}
    if samples["append_txn"]["raw"]:
        txn = statistics.median(samples["append_txn"]["raw"])
        kv, rw = (statistics.median(samples["append"][side]) for side in ("kvswap", "raw"))
        row["append"].update(raw_txn_per_s=1 / txn, txn_over_raw=txn / rw, cost_ratio_vs_txn=kv / txn)
    return row


def main() -> int:
    stop_servers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="memkv,sqlite,postgresql,mysql,etcd,redis,valkey")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    backends = args.only.split(",")
    state = Path(tempfile.mkdtemp(prefix="kvswap-bench-meta-"))
    state.chmod(0o755)  # the database servers run as their own users
    env = servers.up(state / "servers", tuple(SERVER[b] for b in backends if b in SERVER))
    counts = {"get": 2000, "append": 1000, "list100": 500, "lookup": 500}
    rows = []
    try:
        for name in backends:
            if name == "memkv":
                uri = URI.parse("memkv://")
            elif name == "sqlite":
                uri = URI.parse(f"sqlite://{state}/meta.db")
            else:
                uri = URI.parse(env[ENV[name]])
            rows.append(bench_backend(name, uri, args.sessions, args.rounds, counts))
            print_row(rows[-1])
    finally:
        servers.down(state / "servers")
    write_record(args.out, "meta", {"sessions": args.sessions, "rounds": args.rounds, "counts": counts,
                                    "rows": rows})
    print(f"\n{'backend':<11}" + "".join(f"{op + ' kvswap/raw (ratio)':>34}" for op in OPS))
    for row in rows:
        print(f"{row['backend']:<11}" + "".join(
            f"{row[op]['kvswap_per_s']:>12,.0f} /{row[op]['raw_per_s']:>10,.0f} ({row[op]['cost_ratio']:.2f})"
            for op in OPS))
    print("\nappend, the database's own share: kvswap's guarded statements and transaction through the bare "
          "driver\n(append_txn), against one autocommit INSERT (raw) and kvswap (cost ratio over append_txn):")
    for row in rows:
        if "raw_txn_per_s" in row["append"]:
            a = row["append"]
            print(f"  {row['backend']:<11} append_txn {a['raw_txn_per_s']:>8,.0f}/s = {a['txn_over_raw']:.2f}x raw's "
                  f"time; kvswap {a['cost_ratio_vs_txn']:.2f}x append_txn's")
    return 0


def print_row(row: dict[str, Any]) -> None:
    print("  " + ", ".join(f"{op}: {row[op]['kvswap_per_s']:,.0f} vs {row[op]['raw_per_s']:,.0f} {row[op]['unit']}"
                           f" (cost x{row[op]['cost_ratio']:.2f})" for op in OPS), flush=True)


if __name__ == "__main__":
    sys.exit(main())

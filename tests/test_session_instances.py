"""Stateless instances: two engine processes share a meta store and a KV store."""

from __future__ import annotations

import os

import pytest
from test_session_faults import _Worker
from test_session_reuse import TOKENIZER

from kvswap.testing.connector_suite import env_or_skip
from kvswap.workload import first_prompt, user_turn


def _backends(kind: str, unique: str) -> tuple[str, str]:
    if kind == "postgresql+valkey":
        return (f"{env_or_skip('KVSWAP_TEST_POSTGRES_URI')}?table_prefix={unique.replace('-', '_')}_",
                f"{env_or_skip('KVSWAP_TEST_VALKEY_URI')}?prefix={unique}:&timeout=5")
    if kind == "postgresql+valkey-cluster":
        return (f"{env_or_skip('KVSWAP_TEST_POSTGRES_URI')}?table_prefix={unique.replace('-', '_')}_",
                f"{env_or_skip('KVSWAP_TEST_VALKEY_CLUSTER_URI')}&prefix={unique}:&timeout=5")
    if kind == "valkey-cluster":  # meta and store on one cluster
        cluster = env_or_skip("KVSWAP_TEST_VALKEY_CLUSTER_URI")
        return f"{cluster}&prefix={unique}:meta:&timeout=5", f"{cluster}&prefix={unique}:&timeout=5"
    if kind == "etcd+juicefs":
        return (f"{env_or_skip('KVSWAP_TEST_ETCD_URI')}/{unique}",
                f"file://{env_or_skip('KVSWAP_TEST_JUICEFS_DIR')}/{unique}")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["postgresql+valkey", "postgresql+valkey-cluster", "valkey-cluster",
                                  "etcd+juicefs"])
def test_any_instance_resumes_any_session(kind: str) -> None:
    unique = f"i{os.urandom(5).hex()}"
    meta, store = _backends(kind, unique)
    a = _Worker(meta, store, instance="engine-a")
    b = _Worker(meta, store, instance="engine-b")
    try:
        history = first_prompt(TOKENIZER, 0)
        for turn, worker in enumerate([a, b, a, b]):
            reply = worker.ask(op="generate", session="chat", tokens=history, max_new=8)
            assert "error" not in reply, reply
            assert reply["tokens"] == reply["reference"], f"turn {turn}"
            if turn:  # the other instance wrote the history: a hit here, all but the new user turn
                assert reply["cached"] == len(history) - len(TOKENIZER.encode(user_turn(0, turn))) - 1
            history = history + reply["tokens"] + TOKENIZER.encode(user_turn(0, turn + 1))
        # A lease keeps the second instance out while the first has the session open.
        assert "error" not in a.ask(op="hold", session="chat", tokens=history)
        busy = b.ask(op="generate", session="chat", tokens=history, max_new=4)
        assert busy["error"] == "SessionBusyError" and "engine-a" in busy["message"]
        a.ask(op="release", session="chat")
        after = b.ask(op="generate", session="chat", tokens=history, max_new=4)
        assert after["tokens"] == after["reference"] and after["cached"] > 0
    finally:
        a.stop()
        b.stop()

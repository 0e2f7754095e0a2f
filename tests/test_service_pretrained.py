"""A real small model end to end: SmolLM2-135M-Instruct prepared by kvswap, served, talked to with
the OpenAI client in its own chat template, and passed on to instances that boot from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kvswap.testing.service import start_serve

API, ADMIN = "api-token-pretrained", "admin-token-pretrained"
TOKENS = {"KVSWAP_API_TOKEN": API, "KVSWAP_ADMIN_TOKEN": ADMIN, "KVSWAP_SEED_TOKEN": ADMIN}
DEVICE = "cuda:0" if os.environ.get("KVSWAP_TEST_DEVICE") == "cuda" else "cpu"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from kvswap.engine.pretrained import prepare

    return prepare("smollm2", progress=False)


def chat(url: str, messages: list[dict], **extra: object) -> object:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API, max_retries=0, timeout=120)
    return client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, **extra)


def test_smollm2_answers_in_its_own_template_and_reuses_its_history(smollm2: Path, tmp_path: Path) -> None:
    shared = ["--meta", f"sqlite:///{tmp_path}/meta.db", "--store", f"file://{tmp_path}/kv",
              "--no-recompute-when-faster", "--device", DEVICE]
    a = start_serve(["--model", "smollm2", *shared], tmp_path / "a.log", env=TOKENS)
    servers = [a]
    try:
        first = chat(a.url, QUESTION, extra_headers={"X-Session-ID": "paris"})
        answer = first.choices[0].message.content
        assert "Paris" in answer and first.choices[0].finish_reason in ("stop", "length")
        turn = [*QUESTION, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
        second = chat(a.url, turn, extra_headers={"X-Session-ID": "paris"})
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        assert second.choices[0].message.content == chat(a.url, turn).choices[0].message.content  # = recompute
        # B boots from A's weights (instance://): same tokenizer and template, same answers, shared KV.
        b = start_serve(["--model", a.url.replace("http://", "instance://"), *shared], tmp_path / "b.log",
                        env=TOKENS)
        servers.append(b)
        assert b.fingerprint == a.fingerprint
        assert chat(b.url, QUESTION).choices[0].message.content == answer
        third = [*turn, {"role": "assistant", "content": second.choices[0].message.content},
                 {"role": "user", "content": "Thanks."}]
        on_b = chat(b.url, third, extra_body={"session_id": "paris"})
        assert on_b.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens
        # C boots from a `kvswap weights seed` of the prepared directory: it advertises config and tokenizer.
        seed = subprocess.Popen([sys.executable, "-m", "kvswap.cli", "weights", "seed", str(smollm2)],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, **TOKENS})
        try:
            uri = json.loads(seed.stdout.readline())["seed"]
            c = start_serve(["--model", uri, "--dir", str(tmp_path / f"c-{uuid.uuid4().hex[:4]}"),
                             "--device", DEVICE], tmp_path / "c.log", env=TOKENS)
            servers.append(c)
            assert chat(c.url, QUESTION).choices[0].message.content == answer
        finally:
            seed.kill()
            seed.wait(10)
    finally:
        for server in servers:
            server.stop()

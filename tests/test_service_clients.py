"""The service as real clients and hostile ones meet it: the official OpenAI client, text that is
not valid Unicode, and stored KV damaged behind the service's back."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvswap.engine import ByteTokenizer
from kvswap.service.client import ServiceClient
from kvswap.testing.service import chat_reference, start_serve

API, ADMIN = "api-token-for-clients", "admin-token-for-clients"
TOKENS = {"KVSWAP_API_TOKEN": API, "KVSWAP_ADMIN_TOKEN": ADMIN}
DEVICE = "cuda:0" if os.environ.get("KVSWAP_TEST_DEVICE") == "cuda" else "cpu"
TOKENIZER = ByteTokenizer()
FEW = settings(max_examples=int(os.environ.get("KVSWAP_FUZZ_EXAMPLES", "25")), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("serve")
    served = start_serve(["--dir", str(directory), "--device", DEVICE, "--hbm-blocks", "256",
                          "--no-recompute-when-faster"], directory / "serve.log", env=TOKENS)
    served.directory = directory
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference():
    return chat_reference(DEVICE)


def render(messages: list[dict]) -> list[int]:
    return TOKENIZER.encode(TOKENIZER.render_chat(messages))


def test_the_openai_client_lists_models_and_chats_with_and_without_a_session(server, reference) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API, max_retries=0, timeout=60)
    models = [m.id for m in client.models.list()]
    assert models == [server.fingerprint.split("|")[0]]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    # No session: answered, computed whole, nothing kept.
    for _ in range(2):
        plain = client.chat.completions.create(model=models[0], messages=messages, max_tokens=5)
        assert plain.usage.prompt_tokens_details.cached_tokens == 0
        assert TOKENIZER.encode(plain.choices[0].message.content) == [
            t for t in reference(render(messages), 5) if t < 256]
    # A session by header (as vLLM takes it) and by body field: the second turn reuses the first.
    for way in ("header", "body"):
        session = f"oa-{way}-{uuid.uuid4().hex[:6]}"
        extra = {"extra_headers": {"X-Session-ID": session}} if way == "header" else {
            "extra_body": {"session_id": session}}
        turn = [*messages]
        first = client.chat.completions.create(model=models[0], messages=turn, max_tokens=5, **extra)
        turn += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and again"}]
        second = client.chat.completions.create(model=models[0], messages=turn, max_tokens=5, **extra)
        assert second.usage.prompt_tokens_details.cached_tokens >= len(render(messages)) - 1
        assert TOKENIZER.encode(second.choices[0].message.content) == [
            t for t in reference(render(turn), 5) if t < 256]
        stream = client.chat.completions.create(model=models[0], messages=turn, max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}, **extra)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            second.choices[0].message.content
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= len(render(turn)) - 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=models[0], messages=messages, max_tokens=5,
                                       extra_headers={"X-Session-ID": "a"}, extra_body={"session_id": "b"})


SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
VALID = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
# Half of them valid text, half with a lone surrogate somewhere (what "\\ud800" in JSON decodes to).
HOSTILE = st.builds(lambda head, bad, tail, broken: head + (bad if broken else "") + tail or "x",
                    VALID, SURROGATE, VALID, st.booleans())


@FEW
@given(text=HOSTILE, where=st.sampled_from(["text", "content", "session_id", "model", "path", "stream"]))
def test_text_that_is_not_unicode_is_refused_in_one_clear_answer(server, text: str, where: str) -> None:
    headers = {"Authorization": f"Bearer {API}", "Content-Type": "application/json"}
    broken = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if where in ("text", "stream", "path"):
        # As a hostile client sends it: the id's UTF-8 bytes (lone surrogates too) percent-encoded.
        sid = quote(text, safe="", errors="surrogatepass") if where == "path" else "hostile"
        response = httpx.post(f"{server.url}/v1/sessions/{sid}/generate", headers=headers, timeout=30,
                              content=json.dumps({"text": text if where != "path" else "hi", "max_tokens": 2,
                                                  "stream": where == "stream"}))
    else:
        body = {"messages": [{"role": "user", "content": text if where == "content" else "hi"}], "max_tokens": 2,
                "session_id": text if where == "session_id" else "hostile-chat"}
        if where == "model":
            body["model"] = text
        # json.dumps escapes a lone surrogate as \\udXXX: valid JSON whose string is not valid Unicode.
        response = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                              content=json.dumps(body))
    assert response.status_code != 500, response.text
    allowed = (400, 404, 422) if broken else (200, 400, 404, 409, 422)
    assert response.status_code in allowed + ((405,) if where == "path" else ()), response.text
    if response.status_code >= 400:
        assert response.json()  # a JSON body that says why


@FEW
@given(which=st.integers(0, 1), where=st.floats(0, 1), bit=st.integers(0, 7),
       how=st.sampled_from(["flip", "flip-header", "truncate", "extend", "delete"]))
def test_damaged_kv_behind_the_service_is_recomputed_exactly(server, reference, which: int, where: float, bit: int,
                                                             how: str) -> None:
    session = f"dmg-{uuid.uuid4().hex[:8]}"
    with ServiceClient(server.url, ADMIN) as admin:
        history = TOKENIZER.encode("a session whose kv is damaged", bos=True)
        history += admin.generate(session, tokens=history, max_tokens=4)["tokens"] + [33, 34]
        history += admin.generate(session, tokens=history, max_tokens=4)["tokens"] + [35]
        admin.swap_out(session, to="store")
        entries = admin.session(session)["entries"]
        assert len(entries) == 2
        path = Path(server.directory) / "kv" / entries[which]["key"]
        data = bytearray(path.read_bytes())
        if how == "delete":
            path.unlink()
        else:
            if how == "flip":
                data[int(where * (len(data) - 1))] ^= 1 << bit
            elif how == "flip-header":
                data[int(where * 7)] ^= 1 << bit
            elif how == "truncate":
                del data[int(where * (len(data) - 1)):]
            else:
                data += b"\0" * (1 + int(where * 5000))
            path.write_bytes(bytes(data))
        reply = admin.generate(session, tokens=history, max_tokens=4)
    assert reply["tokens"] == reference(history, 4)
    assert reply["cached_tokens"] <= entries[which]["token_offset"], (which, where, bit, how, len(data), entries)

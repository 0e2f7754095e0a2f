"""The service's REST API against real ``kvswap serve`` processes: auth, limits, error codes,
admin calls, streaming, chat completions, the CLI, metrics, and booting from a seed instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from kvswap.engine import ByteTokenizer, build_model
from kvswap.errors import ConfigError, NotFoundError
from kvswap.service.client import ServiceClient, ServiceError
from kvswap.session_cache import SessionBusyError
from kvswap.testing.service import chat_reference, start_serve

API, ADMIN = "api-token-for-tests", "admin-token-for-tests"
TOKENIZER = ByteTokenizer()
TOKENS = {"KVSWAP_API_TOKEN": API, "KVSWAP_ADMIN_TOKEN": ADMIN}
# KVSWAP_TEST_DEVICE=cuda: instances and the reference on GPU 0; the seed test boots GPU 1 from GPU 0 (NCCL).
CUDA = os.environ.get("KVSWAP_TEST_DEVICE") == "cuda"
DEVICE = "cuda:0" if CUDA else "cpu"
# B boots from A's GPU: over NCCL from a second GPU, or through host memory (gloo) on the same one.
SECOND_DEVICE = ("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if CUDA else "cpu"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("serve")
    served = start_serve(["--dir", str(directory), "--device", DEVICE, "--hbm-blocks", "256",
                          "--max-new-tokens", "3000",
                          "--max-body", "65536", "--no-recompute-when-faster"], directory / "serve.log", env=TOKENS)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def reference():
    return chat_reference(DEVICE)


@pytest.fixture
def admin(server):
    with ServiceClient(server.url, ADMIN) as client:
        yield client


def _post(server, path: str, token: str | None, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    return httpx.post(server.url + path, headers=headers, timeout=30, **kwargs)


def test_tokens_decide_who_may_call_what(server) -> None:
    body = {"text": "hello", "max_tokens": 2}
    assert _post(server, "/v1/sessions/auth/generate", None, json=body).status_code == 401
    assert _post(server, "/v1/sessions/auth/generate", "wrong", json=body).status_code == 401
    assert _post(server, "/v1/sessions/auth/generate", API, json=body).status_code == 200
    assert _post(server, "/v1/sessions/auth/generate", ADMIN, json=body).status_code == 200
    for token, status in ((None, 401), ("wrong", 401), (API, 403), (ADMIN, 200)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        assert httpx.get(server.url + "/v1/sessions", headers=headers).status_code == status, token
        assert httpx.get(server.url + "/weights/manifest", headers=headers).status_code == (
            200 if token == ADMIN else 401), token
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    # The token never shows: not in errors, not in health, not in the seed manifest.
    for path in ("/health", "/metrics"):
        assert ADMIN not in httpx.get(server.url + path).text and API not in httpx.get(server.url + path).text


def test_oversized_bodies_are_413_declared_or_streamed(server) -> None:
    big = {"tokens": [1] * 40_000, "max_tokens": 1}  # ~120 kB of JSON, the limit is 64 KiB
    assert _post(server, "/v1/sessions/big/generate", API, json=big).status_code == 413

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    response = _post(server, "/v1/sessions/big/generate", API, content=chunks(),
                     headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    # The instance is fine afterwards.
    assert _post(server, "/v1/sessions/big/generate", API, json={"tokens": [1, 2, 3], "max_tokens": 1}).status_code \
        == 200


def test_bad_requests_are_4xx_with_a_reason(server, admin) -> None:
    cases = [({"tokens": [1, 2], "text": "x"}, 422), ({"max_tokens": 2}, 422), ({"tokens": [], "max_tokens": 1}, 400),
             ({"tokens": [99_999], "max_tokens": 1}, 400), ({"tokens": [-1], "max_tokens": 1}, 400),
             ({"tokens": [1], "max_tokens": 5000}, 400), ({"tokens": [1] * 4095, "max_tokens": 8}, 400),
             ({"tokens": [1], "max_tokens": 1, "surprise": 1}, 422)]
    for body, status in cases:
        response = _post(server, "/v1/sessions/bad/generate", API, json=body)
        assert response.status_code == status, (body if len(str(body)) < 100 else "long", response.text)
    response = _post(server, "/v1/sessions/a%01b/generate", API, json={"tokens": [1], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"] == "InvalidKeyError"
    assert _post(server, f"/v1/sessions/{'x' * 300}/generate", API, json={"tokens": [1], "max_tokens": 1}) \
        .status_code == 400
    with pytest.raises(ConfigError, match="not a session cursor"):
        admin.list_sessions(cursor="not-a-cursor!")
    with pytest.raises(ServiceError) as caught:
        admin.list_sessions(limit=0)
    assert caught.value.status == 422


def test_unknown_sessions_are_404(admin) -> None:
    for call in (admin.session, admin.prefetch, admin.swap_out, admin.delete):
        with pytest.raises(NotFoundError):
            call("never-seen")


def test_admin_calls_move_a_session_and_reuse_stays_exact(server, admin, reference) -> None:
    sid = f"admin/{os.urandom(4).hex()} é"  # slashes and unicode travel in the path
    history = TOKENIZER.encode("the first user turn of this chat", bos=True)
    first = admin.generate(sid, tokens=history, max_tokens=10)
    assert first["tokens"] == reference(history, 10) and first["cached_tokens"] == 0
    shown = admin.session(sid)
    stored = len(history) + 9  # write-through: everything but the last new token
    assert shown["stored_tokens"] == stored and shown["local"]["hbm_tokens"] == stored
    assert shown["tiers"][0] == "hbm" and shown["tiers"][1].startswith("file://") and shown["stored_bytes"] > 0
    out = admin.swap_out(sid, to="store")
    assert out["local"]["hbm_tokens"] == 0 and out["local"]["host_tokens"] == 0
    assert admin.session(sid)["tiers"][0].startswith("file://")
    history += first["tokens"] + TOKENIZER.encode(" and a second turn")
    second = admin.generate(sid, tokens=history, max_tokens=10)
    assert second["cached_tokens"] == stored and second["tokens"] == reference(history, 10)
    admin.swap_out(sid, to="store")
    assert admin.prefetch(sid)["resident_tokens"] == len(history) + 9
    assert admin.session(sid)["local"]["hbm_tokens"] == len(history) + 9
    admin.delete(sid)
    with pytest.raises(NotFoundError):
        admin.session(sid)
    third = admin.generate(sid, tokens=history, max_tokens=10)
    assert third["cached_tokens"] == 0 and third["tokens"] == second["tokens"]


def test_listing_pages_through_every_session(admin) -> None:
    prefix = f"list-{os.urandom(3).hex()}-"
    for i in range(7):
        admin.generate(f"{prefix}{i}", tokens=[1, 2, 3 + i], max_tokens=1)
    seen, cursor, pages = [], None, 0
    while True:
        page = admin.list_sessions(limit=3, cursor=cursor)
        seen += [s["id"] for s in page["sessions"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
    ours = [s for s in seen if s.startswith(prefix)]
    assert ours == [f"{prefix}{i}" for i in range(7)] and len(seen) == len(set(seen)) and pages >= 3


def test_swap_out_racing_a_generate_is_409_then_consistent(server, admin, reference) -> None:
    sid = f"race-{os.urandom(3).hex()}"
    history = TOKENIZER.encode("a long answer is coming", bos=True)
    events: list[dict] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/sessions/{sid}/generate", timeout=120,
                          headers={"Authorization": f"Bearer {API}"},
                          json={"tokens": history, "max_tokens": 2500, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, "no token streamed"
    refused = []
    for call in (lambda: admin.swap_out(sid, to="store"), lambda: admin.delete(sid)):
        with pytest.raises(SessionBusyError):
            call()
        refused.append(True)
    assert admin.session(sid)["local"]["pinned"]
    streaming.join(120)
    done = events[-1]
    assert "tokens" in done and [e["token"] for e in events[:-1]] == done["tokens"] and len(done["tokens"]) == 2500
    assert done["tokens"] == reference(history, 2500)
    admin.swap_out(sid, to="store")
    follow = admin.generate(sid, tokens=history + done["tokens"], max_tokens=4)
    assert follow["cached_tokens"] == len(history) + 2499
    assert follow["tokens"] == reference(history + done["tokens"], 4)


def test_chat_completions_reuse_the_session(server, reference) -> None:
    headers = {"Authorization": f"Bearer {API}"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    sid = f"chat-{os.urandom(3).hex()}"
    first = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                       json={"model": "tiny", "messages": messages, "session_id": sid, "max_tokens": 6}).json()
    assert first["object"] == "chat.completion" and first["usage"]["cached_tokens"] == 0
    messages += [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "and again"}]
    second = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                        json={"messages": messages, "session_id": sid, "max_tokens": 6}).json()
    prompt = "<|system|>\nbe brief\n<|user|>\nhello there\n<|assistant|>\n"
    assert second["usage"]["cached_tokens"] == len(prompt)  # the rendered first prompt, byte tokens
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=headers, timeout=30,
                      json={"messages": messages, "session_id": sid, "max_tokens": 6, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) \
        == second["choices"][0]["message"]["content"]


def test_metrics_count_hits_per_tier(server, admin) -> None:
    sid = f"metrics-{os.urandom(3).hex()}"
    admin.generate(sid, tokens=[5, 6, 7, 8], max_tokens=2)
    admin.swap_out(sid, to="store")
    admin.generate(sid, tokens=[5, 6, 7, 8, 9], max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['kvswap_cache_hits_total{tier="store"}'] >= 1
    assert values['kvswap_swap_bytes_total{direction="out"}'] > 0
    assert values["kvswap_hbm_blocks"] == 256
    route = 'route="/v1/sessions/{session_id:path}/generate"'
    assert any(k.startswith("kvswap_http_request_duration_seconds_count") and route
               in k for k in values)


def test_sessions_cli_prints_tables(server, admin) -> None:
    sid = f"cli-{os.urandom(3).hex()}"
    admin.generate(sid, tokens=[1, 2, 3, 4], max_tokens=3)
    env = {**os.environ, "KVSWAP_ADMIN_TOKEN": ADMIN, "KVSWAP_URL": server.url}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kvswap.cli", "sessions", *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = cli("list", "--limit", "0")
    assert listing.splitlines()[0].split() == ["SESSION", "TOKENS", "VERSION", "OWNER", "LAST", "ACCESS",
                                               "FINGERPRINT"]
    assert any(line.startswith(sid + " ") for line in listing.splitlines())
    shown = cli("show", sid)
    assert "tiers" in shown and "hbm, file://" in shown and "SEQ" in shown
    assert "HBM 0 tokens" in cli("swap-out", sid, "--to", "store")
    assert "6 tokens resident" in cli("prefetch", sid)
    assert json.loads(cli("--json", "show", sid))["stored_tokens"] == 6
    assert cli("delete", sid).strip() == f"deleted {sid}"
    done = subprocess.run([sys.executable, "-m", "kvswap.cli", "sessions", "show", sid], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NotFoundError" in done.stderr


def test_an_instance_boots_from_a_checkpoint_and_another_from_it(tmp_path: Path) -> None:
    """serve A from a Hugging Face directory; serve B from A's GPUs (instance://, gloo on CPU);
    both name the weights alike, so B reuses KV A stored; a different model is refused."""
    checkpoint = tmp_path / "checkpoint"
    model, _ = build_model("tiny", seed=3)
    model.save_pretrained(checkpoint)
    shared = ["--meta", f"sqlite:///{tmp_path}/meta.db", "--store", f"file://{tmp_path}/kv",
              "--no-recompute-when-faster"]
    a = start_serve(["--model", str(checkpoint), "--device", DEVICE, *shared], tmp_path / "a.log", env=TOKENS)
    b = None
    try:
        assert a.fingerprint.startswith("weights:sha256:")
        b = start_serve(["--model", a.url.replace("http://", "instance://"), "--device", SECOND_DEVICE,
                         *shared], tmp_path / "b.log",
                        env={**TOKENS, "KVSWAP_SEED_TOKEN": ADMIN})
        assert b.fingerprint == a.fingerprint
        history = TOKENIZER.encode("booted from a seed", bos=True)
        with ServiceClient(a.url, API) as on_a, ServiceClient(b.url, API) as on_b:
            first = on_a.generate("seeded", tokens=history, max_tokens=6)
            history += first["tokens"] + [7, 8, 9]
            second = on_b.generate("seeded", tokens=history, max_tokens=6)
            again = on_a.generate("recomputed", tokens=history, max_tokens=6)
        assert second["cached_tokens"] == len(history) - 4 and second["tokens"] == again["tokens"]
    finally:
        a.stop()
        if b is not None:
            b.stop()

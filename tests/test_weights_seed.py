"""Seed instances on CPU with gloo: transfer, refusal at the handshake, busy, kills on either side."""

from __future__ import annotations

import datetime
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from test_weights import empty_model, logits, make_checkpoint

from kvswap.errors import BackendUnavailableError, ConfigError
from kvswap.weights import load
from kvswap.weights.seed import INIT_ROUTE, SeedBusyError, _rendezvous_store

TOKEN = "seed-test-token"
# KVSWAP_TEST_DEVICE=cuda: the seed on GPU 0 and the client on GPU 1 (NCCL); else both on CPU (gloo).
CUDA = os.environ.get("KVSWAP_TEST_DEVICE") == "cuda"
SEED_DEVICE, CLIENT_DEVICE = ("cuda:0", f"cuda:{min(1, torch.cuda.device_count() - 1)}") if CUDA else ("cpu", "cpu")


class Seed:
    """``kvswap weights seed`` in its own process."""

    def __init__(self, source: str, *, bucket: str = "64KiB", device: str = SEED_DEVICE) -> None:
        env = {**os.environ, "KVSWAP_SEED_TOKEN": TOKEN}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvswap.cli", "weights", "seed", source, "--bucket-size", bucket,
             "--device", device],
            stdout=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        assert line, "seed exited before it was ready"
        self.uri = json.loads(line)["seed"]
        self.port = json.loads(line)["port"]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("seedckpt")
    model = make_checkpoint(directory)
    return directory, {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def seed(checkpoint: tuple[Path, dict]) -> Iterator[Seed]:
    process = Seed(f"file://{checkpoint[0]}")
    yield process
    process.kill()


def test_transfer_and_a_tree_of_seeds(seed: Seed, checkpoint: tuple[Path, dict]) -> None:
    directory, original = checkpoint
    model = empty_model()
    result = load(model, seed.uri, token=TOKEN, timeout=30, progress=False, device=CLIENT_DEVICE)
    for name, tensor in original.items():
        assert torch.equal(result.tensors[name].cpu(), tensor), name
    reference = empty_model()
    load(reference, f"file://{directory}", progress=False, device=CLIENT_DEVICE)
    assert torch.equal(logits(model), logits(reference))
    # The instance that booted from the seed serves the next one (on GPUs: the child boots on
    # the second GPU over NCCL, then serves a client on its own GPU through host memory).
    child = Seed(seed.uri, device=CLIENT_DEVICE)
    try:
        grandchild = load(None, child.uri, token=TOKEN, timeout=30, progress=False, device=CLIENT_DEVICE).tensors
        assert all(torch.equal(grandchild[n].cpu(), t) for n, t in original.items())
    finally:
        child.kill()


def test_handshake_refuses_a_different_model_and_a_wrong_token(seed: Seed, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="refusing the weights of seed .*not in the model"):
        load(empty_model(num_hidden_layers=3), seed.uri, token=TOKEN, progress=False)
    with pytest.raises(ConfigError, match="refusing .*shape"):
        load(empty_model(intermediate_size=96), seed.uri, token=TOKEN, progress=False)
    with pytest.raises(ConfigError, match="refused the token"):
        load(None, seed.uri, token="wrong", progress=False)
    monkeypatch.delenv("KVSWAP_SEED_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="needs its token"):
        load(None, seed.uri, progress=False)


def test_one_transfer_at_a_time_and_a_client_that_never_joins(seed: Seed) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{seed.port}",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        reserved = http.post(INIT_ROUTE, json={"backend": "gloo", "timeout_s": 3})
        assert reserved.status_code == 200, reserved.text
        began = time.monotonic()
        with pytest.raises(SeedBusyError, match="sending to another client"):
            load(None, seed.uri, token=TOKEN, progress=False)
        # The reservation lapses after its timeout; the seed serves again.
        while True:
            try:
                load(None, seed.uri, token=TOKEN, timeout=20, progress=False)
                break
            except SeedBusyError:
                assert time.monotonic() - began < 20, "the abandoned transfer never timed out"
                time.sleep(0.5)
        state = http.get(f"/weights/transfers/{reserved.json()['transfer_id']}").json()["state"]
        assert state.startswith("failed"), state


def test_seed_killed_mid_transfer_fails_the_client_in_time(checkpoint: tuple[Path, dict]) -> None:
    doomed = Seed(f"file://{checkpoint[0]}", bucket="16KiB")
    calls = []

    def kill_seed(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 1:
            doomed.process.send_signal(signal.SIGKILL)

    began = time.monotonic()
    try:
        with pytest.raises(BackendUnavailableError, match="transfer from seed"):
            load(None, doomed.uri, token=TOKEN, timeout=10, progress=False, on_progress=kill_seed,
                 device=CLIENT_DEVICE)
    finally:
        doomed.kill()
    assert calls and calls[-1] < sum(t.numel() * t.element_size() for t in checkpoint[1].values())
    assert time.monotonic() - began < 20


CLIENT_THAT_DIES = """
import os, signal, sys
from kvswap.weights import load
load(None, sys.argv[1], token=sys.argv[2], timeout=10, progress=False, device=sys.argv[3],
     on_progress=lambda done, total: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_client_killed_mid_transfer_leaves_the_seed_serving(seed: Seed, checkpoint: tuple[Path, dict]) -> None:
    dead = subprocess.run([sys.executable, "-c", CLIENT_THAT_DIES, seed.uri, TOKEN, CLIENT_DEVICE], timeout=60)
    assert dead.returncode == -signal.SIGKILL
    began = time.monotonic()
    while True:
        try:
            tensors = load(None, seed.uri, token=TOKEN, timeout=20, progress=False, device=CLIENT_DEVICE).tensors
            break
        except SeedBusyError:
            assert time.monotonic() - began < 30, "the seed stayed busy after its client died"
            time.sleep(0.5)
    assert all(torch.equal(tensors[n].cpu(), t) for n, t in checkpoint[1].items())


def test_the_manifest_carries_what_a_client_boots_with(seed: Seed) -> None:
    from kvswap.weights.files import model_files

    files = model_files(seed.uri, token=TOKEN)
    assert json.loads(files["config.json"])["model_type"] == "llama"
    assert json.loads(files["tokenizer_config.json"]) == {"model_max_length": 4096}


def test_the_rendezvous_listens_where_the_client_was_told_and_only_for_the_secret(seed: Seed) -> None:
    import datetime
    import socket

    import torch.distributed as dist

    with httpx.Client(base_url=f"http://127.0.0.1:{seed.port}",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        offer = http.post(INIT_ROUTE, json={"backend": "gloo", "timeout_s": 3}).json()
    assert offer["master_address"] == "127.0.0.1" and len(offer["rendezvous_key"]) >= 32
    with pytest.raises(ConnectionRefusedError):  # not on every interface: 127.0.0.2 is loopback too
        socket.create_connection(("127.0.0.2", offer["master_port"]), timeout=2).close()
    # A stranger who finds the port but not the secret cannot join the transfer's group.
    store = dist.TCPStore("127.0.0.1", offer["master_port"], 2, False, datetime.timedelta(seconds=2))
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=2)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    with pytest.raises(Exception):
        dist.ProcessGroupGloo(store, 1, 2, options)
    began = time.monotonic()
    while True:  # the abandoned reservation lapses; the real client is served
        try:
            load(None, seed.uri, token=TOKEN, timeout=20, progress=False)
            break
        except SeedBusyError:
            assert time.monotonic() - began < 20
            time.sleep(0.5)


def test_the_rendezvous_store_owns_its_socket_and_closes_nothing_else() -> None:
    # A descriptor closed twice closes whatever took its number in between: in a seed, one of
    # its own HTTP connections (cut without a response: CI saw it once).
    store = _rendezvous_store("127.0.0.1", 5)
    client = torch.distributed.TCPStore("127.0.0.1", store.port, 2, False, datetime.timedelta(seconds=5))
    client.set("k", "v")
    assert store.get("k") == b"v"
    del client, store
    gc.collect()
    near, far = socket.socketpair()  # takes the lowest free numbers: the store's, now closed
    with near, far:
        gc.collect()
        near.sendall(b"x")
        assert far.recv(1) == b"x"

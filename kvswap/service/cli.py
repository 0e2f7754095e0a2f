"""``kvswap serve`` (one instance under uvicorn) and ``kvswap sessions ...`` (a client of its REST API).

Tokens come from the environment, never from flags (flags show in ``ps``):
``KVSWAP_API_TOKEN``, ``KVSWAP_ADMIN_TOKEN`` and, to boot from ``instance://``,
``KVSWAP_SEED_TOKEN`` (the seed instance's admin token).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from kvswap.uri import parse_size

DEFAULT_URL = "http://127.0.0.1:8000"


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run one engine instance as an HTTP service")
    serve.add_argument("--model", default="tiny",
                       help="tiny/small/llama-8b (random weights), smollm2 (a real 135M chat model, prepared once), "
                            "a checkpoint directory, a weights URI (file://, s3://, redis://, valkey://), "
                            "instance://host:port, or none: session admin only, no model (default tiny)")
    serve.add_argument("--model-id", help="names the weights in KV fingerprints (default: their content digest)")
    serve.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    serve.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's; float32 for names)")
    serve.add_argument("--dir", dest="directory", default="/tmp/kvswap-serve",
                       help="where the default SQLite meta and file store live (/tmp/kvswap-serve)")
    serve.add_argument("--meta", help="meta store URI (default $KVSWAP_META, else sqlite:///<dir>/meta.db)")
    serve.add_argument("--store", dest="stores", action="append", default=[],
                       help="KV store URI, repeatable; new KV goes to the first (default $KVSWAP_STORE, comma "
                            "separated, else file://<dir>/kv)")
    serve.add_argument("--hbm-blocks", type=int, default=1024, help="KV pool size in blocks (1024)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per block (16)")
    serve.add_argument("--host-bytes", type=parse_size, default=0, help="host tier size, e.g. 8GiB (0: none)")
    serve.add_argument("--policy", choices=["write-through", "write-back"], default="write-through",
                       help="write-through (default: any instance can resume any session) or write-back")
    serve.add_argument("--instance-id", help="this instance's name in leases (default host-pid-random)")
    serve.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a request's lease lasts (30)")
    serve.add_argument("--session-ttl", type=float, help="seconds an idle session lives (default: forever)")
    serve.add_argument("--recompute-when-faster", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute a history when loading it is predicted slower (default on)")
    serve.add_argument("--max-new-tokens", type=int, default=1024, help="the most one request may ask for (1024)")
    serve.add_argument("--max-body", type=parse_size, default=4 << 20, help="largest request body (4MiB)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one, printed)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow listening beyond loopback with no tokens set")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=serve_command)

    sessions = commands.add_parser("sessions", help="list, show, prefetch, swap out and delete sessions of a "
                                                    "running service (token: KVSWAP_ADMIN_TOKEN)")
    sessions.add_argument("--url", default=os.environ.get("KVSWAP_URL", DEFAULT_URL),
                          help=f"the service or its load balancer (KVSWAP_URL, default {DEFAULT_URL})")
    sessions.add_argument("--json", action="store_true", help="print JSON instead of tables")
    actions = sessions.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="sessions in meta, in id order")
    listing.add_argument("--owner", help="only sessions leased by this instance")
    listing.add_argument("--idle", type=float, help="only sessions idle for at least this many seconds")
    listing.add_argument("--fingerprint", help="only sessions of this model fingerprint")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (50; 0: all)")
    for name, text in (("show", "one session: tiers, entries, bytes, owner"),
                       ("prefetch", "bring a session's KV into HBM"),
                       ("swap-out", "move a session's KV out of HBM"),
                       ("delete", "forget a session everywhere")):
        action = actions.add_parser(name, help=text)
        action.add_argument("session_id")
        if name == "swap-out":
            action.add_argument("--to", choices=["auto", "store"], default="auto")
    actions.add_parser("gc", help="delete expired sessions and unreferenced blobs")
    sessions.set_defaults(run=sessions_command)


# ---- serve ----------------------------------------------------------------------------------------


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from kvswap.service.app import create_app
    from kvswap.service.instance import AdminInstance, Instance, ServeConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_token = os.environ.get("KVSWAP_API_TOKEN") or None
    admin_token = os.environ.get("KVSWAP_ADMIN_TOKEN") or None
    if not (api_token or admin_token) and not _is_loopback(args.host) and not args.insecure_no_auth:
        print(f"kvswap serve: refusing to listen on {args.host} with no token set; set KVSWAP_API_TOKEN and "
              "KVSWAP_ADMIN_TOKEN (or pass --insecure-no-auth)", file=sys.stderr)
        return 2
    config = ServeConfig(model=args.model, model_id=args.model_id, device=args.device, dtype=args.dtype,
                         directory=args.directory, meta=args.meta, stores=args.stores, hbm_blocks=args.hbm_blocks,
                         block_size=args.block_size, host_bytes=args.host_bytes, policy=args.policy,
                         instance_id=args.instance_id, lease_ttl=args.lease_ttl, session_ttl=args.session_ttl,
                         recompute_when_faster=args.recompute_when_faster,
                         max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body, api_token=api_token,
                         admin_token=admin_token, seed_token=os.environ.get("KVSWAP_SEED_TOKEN") or None)
    listener = listening_socket(args.host, args.port)
    port = listener.getsockname()[1]
    instance = AdminInstance(config) if args.model == "none" else Instance(config)
    app = create_app(instance)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(json.dumps({"url": f"http://{host}:{port}", "instance": instance.instance_id,
                      "fingerprint": instance.fingerprint, "seed": bool(admin_token)}), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(), access_log=False,
                                           timeout_graceful_shutdown=30))
    server.run(sockets=[listener])
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listener for uvicorn (port 0: a free one). TCP_NODELAY, which accepted connections
    inherit: a response's head and body go out at once, not 40 ms apart (Nagle waiting for the
    client's delayed ACK on a kept-alive connection)."""
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ---- sessions -------------------------------------------------------------------------------------


def sessions_command(args: argparse.Namespace) -> int:
    from kvswap.service.client import ServiceClient

    with ServiceClient(args.url, os.environ.get("KVSWAP_ADMIN_TOKEN")) as client:
        if args.action == "list":
            idle_since = time.time() - args.idle if args.idle is not None else None
            filters = dict(owner=args.owner, idle_since=idle_since, fingerprint=args.fingerprint)
            rows = []
            for session in client.iter_sessions(page_size=min(args.limit or 1000, 1000), **filters):
                rows.append(session)
                if args.limit and len(rows) >= args.limit:
                    break
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(table(["SESSION", "TOKENS", "VERSION", "OWNER", "LAST ACCESS", "FINGERPRINT"],
                            [[s["id"], s["total_tokens"], s["version"], s["owner"] or "-", _ago(s["last_access"]),
                              _short(s["fingerprint"], 40)] for s in rows]))
            return 0
        if args.action == "gc":
            result = client.gc()
            print(json.dumps(result) if args.json else f"removed {result['sessions']} expired sessions, "
                                                          f"{result['blobs']} unreferenced blobs")
            return 0
        if args.action == "delete":
            client.delete(args.session_id)
            print(json.dumps({"deleted": args.session_id}) if args.json else f"deleted {args.session_id}")
            return 0
        if args.action == "show":
            result = client.session(args.session_id)
        elif args.action == "prefetch":
            result = client.prefetch(args.session_id)
        else:
            result = client.swap_out(args.session_id, to=args.to)
        print(json.dumps(result, indent=2) if args.json else describe(args.action, result))
        return 0


def describe(action: str, result: dict[str, Any]) -> str:
    """A readable rendering of one session command's answer."""
    if action == "prefetch":
        return f"{result['session_id']}: {result['resident_tokens']} tokens resident in HBM"
    local = result["local"]
    held = f"HBM {local['hbm_tokens']} tokens ({local['hbm_blocks']} blocks), host tier {local['host_tokens']} tokens" \
           + (", in use" if local["pinned"] else "") + f" on {local['instance']}"
    if action == "swap-out":
        return f"{result['session_id']}: now {held}"
    session = result["session"] or {}
    lines = [table(["FIELD", "VALUE"], [
        ["session", result["id"]],
        ["tiers", ", ".join(result["tiers"]) or "-"],
        ["stored", f"{result['stored_tokens']} tokens, {_bytes(result['stored_bytes'])} "
                   f"in {len(result['entries'])} entries"],
        ["here", held],
        ["version", session.get("version", "-")],
        ["owner", session.get("owner") or "-"],
        ["last access", _ago(session["last_access"]) if session else "-"],
        ["fingerprint", session.get("fingerprint", "-")],
    ])]
    if result["entries"]:
        lines.append("")
        lines.append(table(["SEQ", "TOKENS", "SIZE", "STORE", "KEY"],
                           [[e["seq"], f"{e['token_offset']}..{e['token_offset'] + e['token_length']}",
                             _bytes(e["size"]), e["connector"], _short(e["key"], 60)] for e in result["entries"]]))
    return "\n".join(lines)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned, two spaces apart."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells] + ([] if rows else ["(none)"]))


def _ago(epoch: float) -> str:
    seconds = max(0.0, time.time() - epoch)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)

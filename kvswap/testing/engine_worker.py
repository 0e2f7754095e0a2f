"""An engine process driven by JSON lines, for tests of several instances, restarts and kills.

``python -m kvswap.testing.engine_worker --meta URI --store URI [...]`` builds an instance
as ``kvswap serve`` does, on the tiny model (same seed: every worker has the same weights),
and answers one JSON object per
line read from stdin:

* ``{"op": "generate", "session": s, "tokens": [...], "max_new": n}`` ->
  ``{"tokens": [...], "cached": c, "computed": k, "reference": [...]}`` (``reference`` is
  the same request recomputed without kvswap, so the caller can check exactness);
* ``{"op": "hold", "session": s, "tokens": [...]}`` opens the session and keeps it open;
  ``{"op": "release", "session": s}`` closes it;
* ``{"op": "swap_out", "session": s}``, ``{"op": "stats"}``, ``{"op": "exit"}``.

Errors come back as ``{"error": "<KVSwapError kind>", "message": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvswap.engine import Engine
from kvswap.errors import KVSwapError
from kvswap.service.instance import Instance, ServeConfig
from kvswap.session_cache import SessionCache, SessionHandle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meta", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--policy", default="write-through")
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--instance", default=None)
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--recompute-when-faster", action="store_true",
                        help="let the cache recompute when a load is predicted slower (off: tests assert hits, "
                             "and the tiny model on a slow CPU can out-run a store)")
    args = parser.parse_args(argv)
    # Assembled as `kvswap serve` assembles an instance (the same function), on the tiny model.
    instance = Instance(ServeConfig(model="tiny", meta=args.meta, stores=[args.store], policy=args.policy,
                                    hbm_blocks=args.blocks, block_size=16, instance_id=args.instance,
                                    lease_ttl=args.lease_ttl, recompute_when_faster=args.recompute_when_faster))
    engine, cache = instance.engine, instance.cache
    held: dict[str, SessionHandle] = {}
    print(json.dumps({"ready": True, "fingerprint": instance.layout.fingerprint}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _serve(request, engine, cache, held)
        except KVSwapError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
        if request["op"] == "exit":
            break
    instance.close()
    return 0


def _serve(request: dict[str, Any], engine: Engine, cache: SessionCache, held: dict[str, SessionHandle]) -> dict:
    op = request["op"]
    if op == "generate":
        result = engine.generate(request["session"], request["tokens"], request["max_new"])
        reference = engine.generate_uncached(request["tokens"], request["max_new"])
        return {"tokens": result.tokens, "cached": result.cached, "computed": result.computed,
                "reference": reference.tokens}
    if op == "hold":
        handle = cache.open(request["session"], request["tokens"])
        held[request["session"]] = handle
        return {"cached": handle.cached}
    if op == "release":
        held.pop(request["session"]).close()
        return {"ok": True}
    if op == "swap_out":
        cache.swap_out(request["session"], to_store=True)
        return {"ok": True}
    if op == "stats":
        return cache.stats.as_dict()
    if op == "exit":
        for handle in held.values():
            handle.close()
        return {"ok": True}
    raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    sys.exit(main())

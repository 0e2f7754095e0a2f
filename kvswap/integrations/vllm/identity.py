"""What names a vLLM instance's weights (for KV fingerprints) and the loader's settings: shared
by the connector's configuration and the model loader, and free of vLLM imports."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from kvswap.errors import ConfigError

#: ``--model-loader-extra-config`` keys of ``--load-format kvswap``.
SETTINGS = ("source", "threads", "token", "batch_bytes")

log = logging.getLogger("vllm.kvswap")  # under vLLM's logger: its handlers show our lines


def loader_settings(extra: Any) -> dict[str, Any]:
    """``--model-loader-extra-config`` checked: a ``source`` URI and known settings only."""
    settings = dict(extra or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown or not isinstance(settings.get("source"), str):
        raise ConfigError(f"--load-format kvswap needs --model-loader-extra-config with a \"source\" URI "
                          f"(settings: {list(SETTINGS)}; unknown: {unknown})")
    return settings


def source_identity(extra: Any) -> str:
    """Names the weights a kvswap source holds, for KV fingerprints: a save by its chunks'
    checksums (content), a local checkpoint by its content digest; other sources need an
    explicit ``model_id`` in the connector's settings."""
    from kvswap.connectors import as_connector
    from kvswap.uri import URI
    from kvswap.weights.manifest import Manifest
    from kvswap.weights.sources import open_source

    source = loader_settings(extra)["source"]
    parsed = URI.parse(source if "://" in source else f"file://{os.path.abspath(source)}")
    if parsed.scheme != "instance":
        with as_connector(parsed, reading=True) as connector:
            opened = open_source(connector)
            if isinstance(opened, Manifest):
                sums = [c.checksum for rank in opened.ranks for c in rank.chunks]
                return f"kvswap-save:{hashlib.sha256(''.join(sums).encode()).hexdigest()[:32]}"
        if parsed.scheme == "file":
            return f"weights:{checkpoint_digest(Path(parsed.path))}"
    raise ConfigError(f"name the weights of {parsed.render()} with model_id in kv_connector_extra_config")


def checkpoint_digest(directory: Path) -> str:
    """xxh3-128 of every ``*.safetensors`` file's bytes, in name order: the weights' content.
    Hashing a large checkpoint takes seconds, so the result is kept in
    ``$KVSWAP_CACHE/digests.json`` by (path, size, mtime) of each file."""
    import xxhash

    from kvswap.paths import cache_dir

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{directory} holds no *.safetensors: name the weights with model_id")
    stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = cache_dir() / "digests.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return str(known[stamp])
    digest = xxhash.xxh3_128()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(64 << 20):
                digest.update(chunk)
    value = f"xxh3_128:{digest.hexdigest()}"
    known[stamp] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known))
        os.replace(temporary, cache_file)
    except OSError as exc:  # a read-only home: hash again next time
        log.warning("could not remember the checkpoint digest: %s", exc)
    return value

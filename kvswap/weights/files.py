"""The small files that come with weights: what a process needs, besides tensors, to boot a model.

``config.json`` builds the model; the tokenizer and generation files let it talk (its
vocabulary, chat template and stop tokens). Every weights source carries them: a kvswap
save (its ``files/``, checksums verified), a checkpoint directory or URI (read as they
are), and a seed instance (its manifest), so an instance that boots from any of them
answers exactly as the one it was copied from.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kvswap.errors import ConfigError, IntegrityError, NotFoundError
from kvswap.uri import URI

if TYPE_CHECKING:
    from kvswap.weights.sources import Opened

#: The files a model boots with, besides its tensors (all but config.json optional).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json", "special_tokens_map.json")
MAX_FILE_BYTES = 64 << 20


def model_files(uri: str | URI, *, token: str | None = None, opened: Opened | None = None) -> dict[str, str]:
    """:data:`MODEL_FILES` of the weights at ``uri`` (name -> text; absent files are left out),
    read through ``opened`` when the caller has the location open already. ConfigError if
    there is no ``config.json``."""
    from kvswap.weights.manifest import Manifest
    from kvswap.weights.sources import SEED_SCHEME, open_location

    parsed = uri if isinstance(uri, URI) else URI.parse(uri if "://" in uri else f"file://{_absolute(uri)}")
    if parsed.scheme == SEED_SCHEME:
        from kvswap.weights.seed import seed_manifest

        manifest = seed_manifest(parsed, token=token)
        files = manifest.get("files") or {}
        if not files and manifest.get("config"):  # a seed that predates files: its config only
            files = {"config.json": json.dumps(manifest["config"])}
        found = {name: text for name, text in files.items() if name in MODEL_FILES and isinstance(text, str)}
    else:
        from kvswap.weights.load import read_files

        location = opened or open_location(parsed)
        try:
            if isinstance(location.source, Manifest):
                found = {name: _text(name, data) for name, data in read_files(location).items()
                         if name in MODEL_FILES}
            else:
                found = {}
                for name in MODEL_FILES:
                    try:
                        found[name] = _text(name, location.connector.get(name, length=MAX_FILE_BYTES))
                    except NotFoundError:
                        continue
        finally:
            if location is not opened:
                location.close()
    if "config.json" not in found:
        raise ConfigError(f"{parsed.render()} has no config.json: the model cannot be built")
    return found


def model_config(files: dict[str, str], where: str) -> dict[str, Any]:
    try:
        config = json.loads(files["config.json"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}: config.json is missing or not JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{where} has no usable config.json (no model_type)")
    return config


def _text(name: str, data: Any) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{name} is not UTF-8 text") from None


def _absolute(path: str) -> str:
    import os

    return os.path.abspath(path)

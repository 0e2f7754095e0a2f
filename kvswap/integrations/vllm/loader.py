"""``--load-format kvswap``: vLLM takes its weights from a kvswap source.

::

    vllm serve /models/llama-8b-config --load-format kvswap \\
        --model-loader-extra-config '{"source": "valkey://cache:6379/0?prefix=llama-8b:"}'

``source`` is anything :func:`kvswap.weights.load` reads: a kvswap save (``file://``,
``redis://``, ``valkey://``, ``s3://``; every chunk's checksum verified), a plain Hugging
Face checkpoint on ``file://`` or ``s3://``, or a seed (``instance://host:port``, with
``token``). ``--model`` still names a directory with the model's config and tokenizer
(``kvswap weights load SOURCE --files-to DIR`` writes them out of a save). The same loading
code as ``kvswap weights load`` runs (parallel verified fetches, a progress bar), then vLLM's
own ``load_weights`` maps the checkpoint's tensors onto its fused layers. vLLM shards full
tensors itself, so the source must hold one rank (a save made with ``--tp 1``, or a
checkpoint); extra settings: ``threads`` (8), ``token`` (or ``KVSWAP_SEED_TOKEN``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.identity import loader_settings

log = logging.getLogger("vllm.kvswap")  # under vLLM's logger: its handlers show our lines

class KVSwapModelLoader(BaseModelLoader):
    """vLLM model loader over :func:`kvswap.weights.load` (see the module docstring)."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        self.settings = loader_settings(load_config.model_loader_extra_config)

    def download_model(self, model_config: Any) -> None:
        return None  # nothing to fetch ahead: load_weights reads the source

    def load_weights(self, model: Any, model_config: Any) -> None:
        import torch

        from kvswap.weights import LoadResult, load
        from kvswap.weights.sources import open_location, seed_uri

        source = self.settings["source"]
        options: dict[str, Any] = dict(rank=0, device="cpu", threads=int(self.settings.get("threads", 8)),
                                       progress=None)
        result: LoadResult | None = None
        if seed_uri(source) is not None:
            result = load(None, source, token=self.settings.get("token") or os.environ.get("KVSWAP_SEED_TOKEN"),
                          **options)
            world = 1 if result.stats.rank == 0 else 2  # a seed of rank r > 0 holds a slice
        else:
            with open_location(source) as opened:  # opened once: the layout check and the load read one manifest
                world = opened.world_size
                if world == 1:
                    result = load(None, opened, **options)
        if result is None or world > 1:
            raise ConfigError(f"{source} is split for tensor parallelism; vLLM shards full tensors itself: save "
                              "the model with --tp 1 for --load-format kvswap")
        log.info("kvswap: %s from %s", result.stats.summary(), result.stats.source)
        with torch.no_grad():
            loaded = model.load_weights(iter(result.tensors.items()))
        expected = {name for name, _ in model.named_parameters()}
        if loaded is not None and expected - set(loaded):
            missing = sorted(expected - set(loaded))
            raise ConfigError(f"{source} left {len(missing)} parameters of the model unset: {missing[:5]}")

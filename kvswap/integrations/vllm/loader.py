"""``--load-format kvswap``: vLLM takes its weights from a kvswap source.

::

    vllm serve /models/llama-8b-config --load-format kvswap \\
        --model-loader-extra-config '{"source": "valkey://cache:6379/0?prefix=llama-8b:"}'

``source`` is anything :func:`kvswap.weights.load` reads: a kvswap save (``file://``,
``redis://``, ``valkey://``, ``s3://``; every chunk's checksum verified), a plain Hugging
Face checkpoint on ``file://`` or ``s3://``, or a seed (``instance://host:port``, with
``token``). ``--model`` still names a directory with the model's config and tokenizer
(``kvswap weights load SOURCE --files-to DIR`` writes them out of a save). The same loading
code as ``kvswap weights load`` runs (parallel verified fetches into pinned buffers), straight
into the model's device in batches (:class:`kvswap.weights.load.TensorStream`): vLLM's own
``load_weights`` maps one batch onto its fused layers while the next is read, so the
checkpoint never passes through host memory whole. vLLM shards full tensors itself, so the
source must hold one rank (a save made with ``--tp 1``, or a checkpoint); extra settings:
``threads`` (8), ``batch_bytes`` (1GiB), ``token`` (or ``KVSWAP_SEED_TOKEN``) for a seed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.identity import loader_settings
from kvswap.uri import parse_size

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

        from kvswap.weights import load
        from kvswap.weights.load import TensorStream
        from kvswap.weights.sources import seed_uri
        from kvswap.weights.targets import device_of

        source = self.settings["source"]
        threads = int(self.settings.get("threads", 8))
        device = device_of(model)
        tensors: Any
        stream: TensorStream | None = None
        if seed_uri(source) is not None:
            result = load(None, source, token=self.settings.get("token") or os.environ.get("KVSWAP_SEED_TOKEN"),
                          rank=0, device="cpu", threads=threads, progress=None)
            if result.stats.rank != 0:  # a seed of rank r > 0 holds a slice
                raise _split_error(source)
            tensors, stats = iter(result.tensors.items()), result.stats
        else:
            # Batches straight into the model's device, the next one loading while vLLM's
            # load_weights maps this one onto its fused layers.
            stream = TensorStream(source, device=device, threads=threads,
                                  batch_bytes=parse_size(str(self.settings.get("batch_bytes", "1GiB"))))
            if stream.opened.world_size > 1:
                stream.close()
                raise _split_error(source)
            tensors, stats = iter(stream), stream.stats
        try:
            with torch.no_grad():
                loaded = model.load_weights(tensors)
        finally:
            if stream is not None:
                tensors.close()  # a model that stops early must not leave the loading thread waiting
                stream.close()  # nor the source open when load_weights failed before reading a tensor
        log.info("kvswap: %s from %s", stats.summary(), stats.source)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the batches' memory goes back before vLLM measures what is free
        expected = {name for name, _ in model.named_parameters()}
        if loaded is not None and expected - set(loaded):
            missing = sorted(expected - set(loaded))
            raise ConfigError(f"{source} left {len(missing)} parameters of the model unset: {missing[:5]}")


def _split_error(source: str) -> ConfigError:
    return ConfigError(f"{source} is split for tensor parallelism; vLLM shards full tensors itself: save "
                       "the model with --tp 1 for --load-format kvswap")

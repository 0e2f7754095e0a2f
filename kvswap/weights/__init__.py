"""Model weights at boot: save per rank through a connector, load from any source.

>>> from kvswap.weights import save, load
>>> save("/models/llama-8b", "valkey://cache:6379?prefix=llama-8b:", tp=2)   # doctest: +SKIP
>>> load(model, "valkey://cache:6379?prefix=llama-8b:", rank=1, device="cuda")  # doctest: +SKIP

Sources: a kvswap save (``redis://``, ``valkey://``, ``file://``, ``s3://``), a plain Hugging
Face checkpoint on ``file://`` or ``s3://`` (sliced per rank on the fly), or a running seed
instance (``instance://host:port``, :mod:`kvswap.weights.seed`).
"""

from kvswap.weights.load import load, read_files
from kvswap.weights.manifest import Manifest, read_manifest
from kvswap.weights.save import collect_garbage, save
from kvswap.weights.targets import LoadResult, LoadStats, materialize

__all__ = ["LoadResult", "LoadStats", "Manifest", "collect_garbage", "load", "materialize", "read_files",
           "read_manifest", "save"]

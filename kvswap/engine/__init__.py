"""The reference engine: a Hugging Face transformers Llama whose attention keeps its KV in a
kvswap pool, so sessions swap in and out through the session cache."""

from kvswap.engine.engine import Engine, Generation
from kvswap.engine.model import MODEL_CONFIGS, build_model
from kvswap.engine.tokenizer import ByteTokenizer

__all__ = ["MODEL_CONFIGS", "ByteTokenizer", "Engine", "Generation", "build_model"]

"""kvswap inside vLLM: a KV connector for chat sessions and a model loader, turned on with flags.

* ``--kv-transfer-config '{"kv_connector": "KVSwapConnector", "kv_connector_module_path":
  "kvswap.integrations.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {...}}'``
  (:mod:`.connector`);
* ``--load-format kvswap --model-loader-extra-config '{"source": "valkey://..."}'``
  (:mod:`.loader`), registered by the ``vllm.general_plugins`` entry point that installing
  kvswap declares (vLLM calls :func:`register` in every process it starts).

Only this package imports vLLM, and only when its connector or loader is asked for.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # vLLM's connector factory: getattr(module, "KVSwapConnector")
    if name == "KVSwapConnector":
        from kvswap.integrations.vllm.connector import KVSwapConnector

        return KVSwapConnector
    raise AttributeError(name)


def register() -> None:
    """vLLM's plugin hook: make ``--load-format kvswap`` known."""
    from vllm.model_executor.model_loader import register_model_loader

    from kvswap.integrations.vllm.loader import KVSwapModelLoader

    register_model_loader("kvswap")(KVSwapModelLoader)


__all__ = ["KVSwapConnector", "register"]

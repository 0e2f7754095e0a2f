"""The kvswap service: one engine instance behind FastAPI (``kvswap serve``), and its client.

>>> from kvswap.service import Instance, ServeConfig, create_app
>>> app = create_app(Instance(ServeConfig(model="tiny", directory="/tmp/kvswap-serve")))

Names are imported when first used: the instance needs torch and the engine, the app FastAPI,
and ``kvswap sessions ...`` (the client) needs neither: it starts in about a second, not ten.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvswap.service.app import create_app
    from kvswap.service.instance import Instance, RequestError, ServeConfig

__all__ = ["Instance", "RequestError", "ServeConfig", "create_app"]

_WHERE = {"Instance": "kvswap.service.instance", "RequestError": "kvswap.service.instance",
          "ServeConfig": "kvswap.service.instance", "create_app": "kvswap.service.app"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kvswap.service' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)

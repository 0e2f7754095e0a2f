"""The kvswap service: one engine instance behind FastAPI (``kvswap serve``), and its client.

>>> from kvswap.service import Instance, ServeConfig, create_app
>>> app = create_app(Instance(ServeConfig(model="tiny", directory="/tmp/kvswap-serve")))
"""

from kvswap.service.instance import Instance, RequestError, ServeConfig

__all__ = ["Instance", "RequestError", "ServeConfig", "create_app"]


def __getattr__(name: str):  # the app needs FastAPI (extra "service"); the instance does not
    if name == "create_app":
        from kvswap.service.app import create_app

        return create_app
    raise AttributeError(name)

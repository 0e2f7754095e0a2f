"""The seed's HTTP side: routes over a :class:`~kvswap.weights.seed.WeightSeed` (admin token).

``seed_router`` is what an instance mounts; ``seed_app`` serves it alone (``kvswap weights
seed``), with the same error handler as the instance. No ``from __future__ import
annotations`` here: FastAPI reads these annotations.
"""

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from kvswap.service.errors import install_error_handlers
from kvswap.weights.seed import INIT_ROUTE, MANIFEST_ROUTE, SEND_ROUTE, WeightSeed


class InitRequest(BaseModel):
    backend: str = Field("gloo", pattern="^(nccl|gloo)$")
    timeout_s: float = Field(60.0, gt=0, le=3600)


class SendRequest(BaseModel):
    transfer_id: str = Field(..., max_length=64)


def seed_router(seed: WeightSeed) -> Any:
    """FastAPI routes of a seed (the service mounts them; :func:`seed_app` serves them alone)."""
    def auth(request: Request) -> None:
        if not seed.authorized(request.headers.get("authorization")):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(dependencies=[Depends(auth)], tags=["seed"])

    @router.get(MANIFEST_ROUTE)
    def manifest() -> dict[str, Any]:
        return seed.manifest()

    @router.post(INIT_ROUTE)
    def init(body: InitRequest, request: Request) -> dict[str, Any]:
        # The local address this connection reached (not the client's Host header). Busy is
        # 409 and a bad setting 400, by the error handler of the app that mounts this.
        server = request.scope.get("server") or ("127.0.0.1", 0)
        return seed.begin(body.backend, body.timeout_s, server[0])

    @router.post(SEND_ROUTE, status_code=202)
    def send(body: SendRequest) -> dict[str, str]:
        try:
            seed.start_sending(body.transfer_id)
        except KeyError:
            raise HTTPException(404, "no such transfer in progress") from None
        return {"state": "sending"}

    @router.get("/weights/transfers/{transfer_id}")
    def transfer_state(transfer_id: str) -> dict[str, str]:
        try:
            return {"state": seed.state(transfer_id)}
        except KeyError:
            raise HTTPException(404, "unknown transfer") from None

    return router


def seed_app(seed: WeightSeed) -> Any:
    app = FastAPI(title="kvswap weight seed")
    install_error_handlers(app)
    app.include_router(seed_router(seed))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app

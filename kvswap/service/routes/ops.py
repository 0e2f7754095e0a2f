"""``/health`` and ``/metrics``: open routes (they carry no secrets)."""

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvswap.service import schemas
from kvswap.service.instance import AdminInstance, Instance
from kvswap.service.metrics import Metrics


def ops_router(instance: Instance | AdminInstance, metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/health", response_model=schemas.Health)
    def health() -> Any:
        return schemas.Health(status="ok", instance=instance.instance_id, fingerprint=instance.fingerprint,
                              uptime_s=time.time() - instance.started)

    @router.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router

"""Session administration (admin token): list, show, prefetch, swap out, delete, gc."""

from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel

from kvswap.meta import Session
from kvswap.service import schemas
from kvswap.service.errors import ERROR_RESPONSES
from kvswap.service.instance import AdminInstance, Instance, SessionView
from kvswap.session_cache import LocalState

_M = TypeVar("_M", bound=BaseModel)


def sessions_router(instance: Instance | AdminInstance, admin: Any) -> APIRouter:
    router = APIRouter(dependencies=[admin], tags=["sessions"])

    @router.get("/v1/sessions", response_model=schemas.SessionList, responses=ERROR_RESPONSES)
    def list_sessions(owner: str | None = Query(None, max_length=256, description="lease holder"),
                      idle_since: float | None = Query(None, ge=0, allow_inf_nan=False,
                                                          description="last access at or before (epoch s)"),
                      fingerprint: str | None = Query(None, max_length=1024),
                      limit: int = Query(100, ge=1, le=1000),
                      cursor: str | None = Query(None, max_length=2048)) -> Any:
        page = instance.meta.list_sessions(owner=owner, idle_since=idle_since, fingerprint=fingerprint,
                                           limit=limit, cursor=cursor)
        return schemas.SessionList(sessions=[_summary(s) for s in page.sessions], cursor=page.cursor)

    @router.get("/v1/sessions/{session_id:path}", response_model=schemas.SessionDetail, responses=ERROR_RESPONSES)
    def get_session(session_id: str = Path(...)) -> Any:
        return _detail(session_id, instance.view(session_id), instance.instance_id)

    @router.post("/v1/sessions/{session_id:path}/prefetch", response_model=schemas.PrefetchResult,
                 responses=ERROR_RESPONSES)
    def prefetch(session_id: str = Path(...)) -> Any:
        """Bring the session's stored KV into HBM ahead of its next request."""
        return schemas.PrefetchResult(session_id=session_id, resident_tokens=instance.prefetch(session_id))

    @router.post("/v1/sessions/{session_id:path}/swap-out", response_model=schemas.SwapOutResult,
                 responses=ERROR_RESPONSES)
    def swap_out(session_id: str = Path(...),
                 to: Literal["auto", "store"] = Query("auto", description="auto: the host tier if it fits, "
                                                      "else the store; store: the store (host copy too)")) -> Any:
        """Move the session's KV out of HBM. 409 while a request holds it."""
        local = instance.swap_out(session_id, to_store=to == "store")
        return schemas.SwapOutResult(session_id=session_id, local=_local(local, instance.instance_id))

    @router.delete("/v1/sessions/{session_id:path}", status_code=204, responses=ERROR_RESPONSES)
    def delete_session(session_id: str = Path(...)) -> Response:
        """Forget the session everywhere: HBM, host tier, meta, stored blobs. 409 while in use."""
        instance.delete(session_id)
        return Response(status_code=204)

    @router.post("/v1/admin/gc", response_model=schemas.GCResult, responses=ERROR_RESPONSES)
    def collect_garbage() -> Any:
        """Delete expired sessions and blobs that no meta entry points to (older than the grace period)."""
        return schemas.GCResult(**instance.gc())

    return router


def _view(model: type[_M], record: Any, **extra: Any) -> _M:
    """An API view of a record (Session, Entry, LocalState): the model's fields read from the
    record by name, so each field list is written once, in the schema."""
    return model(**{name: getattr(record, name) for name in model.model_fields if name not in extra}, **extra)


def _summary(session: Session) -> schemas.SessionSummary:
    return _view(schemas.SessionSummary, session)


def _detail(session_id: str, view: SessionView, instance_id: str) -> schemas.SessionDetail:
    tiers = (["hbm"] if view.local.hbm_tokens else []) + (["host"] if view.local.host_tokens else [])
    tiers += list(dict.fromkeys(e.connector for e in view.entries))
    return schemas.SessionDetail(
        id=session_id, session=_summary(view.session) if view.session else None, tiers=tiers,
        stored_tokens=sum(e.token_length for e in view.entries), stored_bytes=sum(e.size for e in view.entries),
        entries=[_view(schemas.EntryView, entry) for entry in view.entries],
        local=_local(view.local, instance_id))


def _local(local: LocalState, instance_id: str) -> schemas.LocalView:
    return _view(schemas.LocalView, local, instance=instance_id)

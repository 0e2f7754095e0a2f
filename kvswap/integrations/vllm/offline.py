"""Offline ``vllm.LLM`` with its engine core in the caller's process: let the last saves finish.

vLLM commits a connector's finished saves only inside an engine step (the worker reports them
in the step's output; the scheduler half then commits the session's meta). In vLLM's usual
layout the engine core runs in a process of its own and keeps stepping while requests wait on
their saves. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core lives in the caller's
process and ``LLM.generate`` stops stepping once its outputs are answered: the last turn's save
is written but not committed until the next call. :func:`finish_saves` steps it until the
saves are committed, so the session is resumable (here or on another instance) right away.
"""

from __future__ import annotations

import time
from typing import Any


def in_process_core(llm: Any) -> Any | None:
    """The ``EngineCore`` of ``llm`` when it runs in this process (vLLM's ``InprocClient``),
    else None (the engine core steps by itself in its own process)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    core = getattr(client, "engine_core", None)
    return core if hasattr(core, "scheduler") else None


def saves_pending(llm: Any) -> bool:
    """Whether ``llm``'s in-process engine holds finished requests whose saves are not yet
    committed (and no live request: stepping then only polls the connector)."""
    core = in_process_core(llm)
    if core is None:
        return False
    scheduler = core.scheduler
    return bool(scheduler.has_requests() and not scheduler.has_unfinished_requests())


def finish_saves(llm: Any, timeout: float = 120.0, poll: float = 0.005) -> None:
    """Step ``llm`` (a ``vllm.LLM``) until no finished request still waits on kvswap's save.

    A no-op when the engine core runs in its own process (it keeps stepping by itself). Raises
    ``TimeoutError`` if the saves are not committed within ``timeout`` seconds (a store that
    hangs: the request's blocks stay held until its save fails or finishes, as in vLLM's loop)."""
    deadline = time.monotonic() + timeout
    while saves_pending(llm):
        if time.monotonic() > deadline:
            raise TimeoutError(f"kvswap's saves were not committed within {timeout:.0f} s")
        llm.llm_engine.step()
        time.sleep(poll)


__all__ = ["finish_saves", "in_process_core", "saves_pending"]

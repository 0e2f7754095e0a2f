"""A vLLM engine (``vllm.LLM``) driven by JSON lines, for the tests and benchmarks of the vLLM integration.

Runs in vLLM's own environment (``.venv-vllm``)::

    .venv-vllm/bin/python -m kvswap.testing.vllm_driver '{"model": DIR, "connector": {...}, ...}'

The argument is a JSON object: ``model`` (a directory), and optionally ``connector``
(``kv_connector_extra_config``; absent: no connector), ``load`` (``{"source": ...}``: load
with ``--load-format kvswap``; ``"dummy"``: random weights), ``block_size``, ``dtype``
(float32), ``prefix_caching`` (false: every reuse is the connector's), ``max_model_len``,
``eager`` (true; false keeps vLLM's CUDA graphs), ``gpu_memory_utilization``,
``tensor_parallel_size``, ``kv_cache_dtype``, ``in_process`` (true: vLLM's engine core and
worker run in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one import of vLLM instead of
three; between requests the driver steps the engine while saves are pending, as vLLM's own
engine-core loop does).
It prints ``{"ready": true}`` and then answers one JSON object per line read:

* ``{"op": "chat", "messages": [...], "session": s, "max_tokens": n}`` or
  ``{"op": "generate", "tokens": [...], ...}`` -> ``{"tokens", "text", "cached", "prompt",
  "seconds", "ttft", "kvswap"}`` (``session`` absent: served without a session, as vLLM alone
  would; ``kvswap``: what the connector reported for the request, its ``kv_transfer_params``);
* ``{"op": "generate_many", "requests": [{"tokens", "max_tokens", "session"?}, ...]}`` ->
  ``{"tokens": [...], "seconds"}``: the requests in one batch, side by side;
* ``{"op": "update_weights", "match": name, "factor": f}`` -> ``{"changed": n}``: every parameter
  whose name contains ``match`` multiplied by ``f`` in place (a weight update, as an RL trainer
  makes), then ``reset_prefix_cache(reset_connector=True)`` as it would call (``{"reset": ok}``);
* ``{"op": "exit"}`` (in process: once the pending saves are committed).

Errors come back as ``{"error": type, "message": ...}``.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any


def build(spec: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=spec["model"], dtype=spec.get("dtype", "float32"),
                                  enforce_eager=bool(spec.get("eager", True)),
                                  max_model_len=int(spec.get("max_model_len", 4096)),
                                  enable_prefix_caching=bool(spec.get("prefix_caching", False)),
                                  seed=0)
    if "gpu_memory_utilization" in spec:
        kwargs["gpu_memory_utilization"] = float(spec["gpu_memory_utilization"])
    if "block_size" in spec:
        kwargs["block_size"] = int(spec["block_size"])
    if "kv_cache_dtype" in spec:
        kwargs["kv_cache_dtype"] = spec["kv_cache_dtype"]
    if "tensor_parallel_size" in spec:
        kwargs["tensor_parallel_size"] = int(spec["tensor_parallel_size"])
    if spec.get("skip_tokenizer"):
        kwargs["skip_tokenizer_init"] = True
    load = spec.get("load")
    if load == "dummy":
        kwargs["load_format"] = "dummy"
    elif isinstance(load, dict):
        kwargs["load_format"] = "kvswap"
        kwargs["model_loader_extra_config"] = load
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVSwapConnector",
                                        "kv_connector_module_path": "kvswap.integrations.vllm",
                                        "kv_role": "kv_both", "kv_connector_extra_config": spec["connector"]}
    return LLM(**kwargs)


def _params(request: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"session_id": request["session"]}} if request.get("session") else None
    return SamplingParams(max_tokens=int(request.get("max_tokens", 16)), temperature=0.0, extra_args=extra,
                          ignore_eos=bool(request.get("ignore_eos", False)))


def update_weights(llm: Any, match: str, factor: float) -> dict[str, Any]:
    def scale(model: Any) -> int:
        import torch

        with torch.no_grad():
            changed = [param.mul_(factor) for name, param in model.named_parameters() if match in name]
        return len(changed)

    from kvswap.integrations.vllm.offline import finish_saves

    finish_saves(llm)  # the finished requests' blocks are free again (vLLM refuses a reset while they are held)
    changed = sum(llm.apply_model(scale))
    return {"changed": changed, "reset": bool(llm.reset_prefix_cache(reset_connector=True))}


def serve(llm: Any, request: dict[str, Any]) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    if request["op"] == "update_weights":
        return update_weights(llm, str(request["match"]), float(request["factor"]))

    if request["op"] == "generate_many":  # one batch: the requests run side by side
        began = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(r["tokens"])) for r in request["requests"]],
                               [_params(r) for r in request["requests"]], use_tqdm=False)
        return {"seconds": time.perf_counter() - began,
                "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    params = _params(request)
    began = time.perf_counter()
    if request["op"] == "chat":
        outputs = llm.chat(request["messages"], params, use_tqdm=False)
    else:
        outputs = llm.generate(TokensPrompt(prompt_token_ids=list(request["tokens"])), params, use_tqdm=False)
    seconds = time.perf_counter() - began
    result = outputs[0]
    metrics = getattr(result, "metrics", None)
    ttft = getattr(metrics, "first_token_latency", None) if metrics is not None else None
    transfer = getattr(result, "kv_transfer_params", None) or {}
    return {"tokens": list(result.outputs[0].token_ids), "text": result.outputs[0].text,
            "cached": int(result.num_cached_tokens or 0), "prompt": list(result.prompt_token_ids or []),
            "seconds": seconds, "ttft": ttft, "kvswap": transfer.get("kvswap")}


def next_line(llm: Any) -> str:
    """The next request line; while none has come, step an in-process engine whose saves are
    pending (the caller speaks one request at a time, so at most one line is buffered)."""
    from kvswap.integrations.vllm.offline import saves_pending

    while saves_pending(llm) and not select.select([sys.stdin], [], [], 0.01)[0]:
        llm.llm_engine.step()
    return sys.stdin.readline()


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    if spec.get("in_process"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM logs to stdout (its engine process too): the answers get the original stdout,
    # everything else goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    llm = build(spec)

    def answer(reply: dict[str, Any]) -> None:
        answers.write(json.dumps(reply) + "\n")
        answers.flush()

    answer({"ready": True})
    while line := next_line(llm):
        request = json.loads(line)
        if request["op"] == "exit":
            from kvswap.integrations.vllm.offline import finish_saves

            finish_saves(llm, timeout=60.0)  # in process: the last saves are committed before vLLM goes
            answer({"ok": True})
            break
        try:
            reply = serve(llm, request)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            reply = {"error": type(exc).__name__, "message": str(exc)}
        answer(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())

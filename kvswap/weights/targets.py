"""What a weights load fills and reports: the target's tensors, bound and checked against a
source's plan before any byte is copied, and the load's statistics. Shared by every source
(saves, checkpoints, a running seed instance), so no source module imports another."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from kvswap.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from kvswap.weights.sources import TensorInfo


@dataclasses.dataclass
class LoadStats:
    """What a load moved and how fast, per stage.

    ``fetch_seconds`` and ``verify_seconds`` add up the busy time of every worker thread
    (so ``*_thread_gbps`` is one worker's rate); ``copy_seconds`` is the device copy time
    (CUDA events, or host copy time on CPU); ``seconds`` is wall time from plan to last
    tensor in place.
    """

    source: str
    rank: int
    tensors: int = 0
    bytes: int = 0
    read_bytes: int = 0
    seconds: float = 0.0
    plan_seconds: float = 0.0
    fetch_seconds: float = 0.0
    verify_seconds: float = 0.0
    copy_seconds: float = 0.0
    threads: int = 0
    # What was loaded, by content: sha256 over every read's xxh3_128 in plan order (a seed's
    # own identity for instance://). Same source and rank -> same digest; it names the
    # weights in KV fingerprints, so KV of other weights is never reused.
    digest: str = ""

    @staticmethod
    def _rate(nbytes: int, seconds: float) -> float | None:
        return nbytes / seconds / 1e9 if seconds > 0 else None

    @property
    def gbps(self) -> float | None:
        return self._rate(self.bytes, self.seconds)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(gbps=self.gbps, fetch_thread_gbps=self._rate(self.read_bytes, self.fetch_seconds),
                   verify_thread_gbps=self._rate(self.read_bytes, self.verify_seconds),
                   copy_gbps=self._rate(self.bytes, self.copy_seconds))
        return out

    def summary(self) -> str:
        parts = [f"{self.tensors} tensors, {self.bytes / 1e9:.2f} GB in {self.seconds:.2f} s"]
        if self.gbps:
            parts.append(f"{self.gbps:.2f} GB/s")
        return ", ".join(parts)


@dataclasses.dataclass
class LoadResult:
    tensors: dict[str, torch.Tensor]  # the model's own tensors when a model was given
    stats: LoadStats


Target = Any  # torch.nn.Module | MutableMapping[str, torch.Tensor] | None


def device_of(target: Target) -> torch.device:
    """The one device the target's tensors are on (the CPU when none or several)."""
    import torch

    tensors = named_tensors(target) if target is not None else {}
    devices = {t.device for t in tensors.values() if not t.is_meta}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def named_tensors(target: Target) -> dict[str, torch.Tensor]:
    """A model's parameters (tied ones once) and persistent buffers by name, or the mapping itself."""
    import torch

    if isinstance(target, torch.nn.Module):
        named: dict[str, torch.Tensor] = dict(target.named_parameters())  # tied parameters appear once
        for module_name, module in target.named_modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set and buffer is not None:
                    named[f"{module_name}.{name}" if module_name else name] = buffer
        return named
    return dict(target)


def tied_aliases(target: Target) -> dict[str, str]:
    """Names of tied parameters that :func:`named_tensors` leaves out -> the name it keeps
    (``lm_head.weight`` -> ``model.embed_tokens.weight`` with tied embeddings). A source
    that holds the alias fills the kept tensor once; one that holds only the kept name fills
    both."""
    import torch

    if not isinstance(target, torch.nn.Module):
        return {}
    kept: dict[int, str] = {}
    aliases = {}
    for name, param in target.named_parameters(remove_duplicate=False):
        if id(param) in kept:
            aliases[name] = kept[id(param)]
        else:
            kept[id(param)] = name
    return aliases


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device real (uninitialised) storage on ``device``.

    Non-persistent buffers (rotary tables) are not in checkpoints: modules holding them
    are rebuilt from their ``config`` on ``device``.
    """
    import torch

    stale = [(name, module) for name, module in model.named_modules()
             if any(b is not None and b.is_meta for n, b in module.named_buffers(recurse=False)
                    if n in module._non_persistent_buffers_set)]
    model.to_empty(device=device)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # to_empty gave tied parameters (embeddings and LM head) separate storage
    for name, module in stale:
        config = getattr(module, "config", None)
        if config is None:
            raise ConfigError(f"module {name!r} has non-persistent buffers on the meta device and no config "
                              "to rebuild them from; build the model with real buffers")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(device):
            setattr(parent, child, type(module)(config))


def bind_targets(target: Target, plan: dict[str, TensorInfo], device: torch.device, *, strict: bool = True,
                 hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors to fill, checked against the plan (names, shapes, dtypes) before any copy."""
    import torch

    if target is None:
        return {name: torch.empty(info.shape, dtype=getattr(torch, info.dtype), device=device)
                for name, info in plan.items()}
    if isinstance(target, torch.nn.Module) and any(t.is_meta for t in named_tensors(target).values()):
        materialize(target, device)
    named = named_tensors(target)
    tied = tied_aliases(target)
    missing = [n for n in named if n not in plan and not any(tied.get(a) == n for a in plan)]
    extra = [n for n in plan if n not in named and n not in tied]
    if strict and (missing or extra):
        detail = []
        if missing:
            detail.append(f"not in the source: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            detail.append(f"not in the model: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise ConfigError("the source and the model hold different tensors; " + "; ".join(detail))
    bound = {}
    for name, info in plan.items():
        tensor = named.get(name)
        if tensor is None:
            if tied.get(name) in named and tied[name] not in plan:
                tensor = named[tied[name]]  # the source holds the alias only: it fills the kept tensor
            else:
                continue
        if tuple(tensor.shape) != info.shape:
            raise ConfigError(f"tensor {name!r}: the model has shape {list(tensor.shape)}, "
                              f"the source {list(info.shape)}{hint}")
        if str(tensor.dtype).removeprefix("torch.") != info.dtype:
            raise ConfigError(f"tensor {name!r}: the model has dtype {tensor.dtype}, the source {info.dtype}")
        if not tensor.is_contiguous():
            raise ConfigError(f"tensor {name!r} is not contiguous in the model")
        bound[name] = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return bound

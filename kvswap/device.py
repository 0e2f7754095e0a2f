"""Device names from users (``--device``), checked against what this machine has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvswap.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``spec`` as a torch device that exists here; ConfigError saying why not otherwise
    (a malformed name, no CUDA in this torch build or on this machine, no such GPU)."""
    import torch

    if spec is None:
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{spec!r} is not a device (use cpu, cuda or cuda:N): {exc}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {spec!r}: kvswap runs on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise ConfigError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__} {build}); "
                          "use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {spec!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return device

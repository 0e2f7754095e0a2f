"""Tensor-parallel and pipeline-parallel placement of checkpoint tensors.

The split of each tensor follows the model's tensor-parallel plan, as transformers
declares it: the config's ``base_model_tp_plan`` (module patterns relative to the base
model, like ``layers.*.self_attn.q_proj``) plus the model class's ``_tp_plan`` (like
``lm_head``). For an ``nn.Linear`` weight ``[out, in]``:

* ``colwise`` (and ``colwise_gather_output``, ``packed_colwise``...): the weight and the
  bias are split along dim 0 (output features);
* ``rowwise`` (and ``rowwise_split_input``, ``packed_rowwise``...): the weight is split
  along its last dim (input features); the bias is replicated (added after the reduce);
* anything else the plan names (``replicate``, ``sequence_parallel``, ...) and every
  tensor the plan does not name (embeddings, norms, rotary tables): **replicated** — each
  rank stores and loads the whole tensor.

Splits are even: a dim that the TP size does not divide, or attention heads that it does
not divide, is a :class:`ConfigError` naming the tensor. ``packed_*`` styles (fused
gate/up projections) split each of the packed halves, so rank ``r`` gets half ``r`` of
both.

Pipeline stages own contiguous runs of decoder layers (``layers.N``: stage
``N * pp // num_layers``); tensors outside the layers go to the first stage when they are
input embeddings and to the last stage otherwise. A rank's global number is
``pp_rank * tp + tp_rank``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from kvswap.errors import ConfigError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Split:
    """How one tensor is cut across TP ranks: ``dim`` None means replicated."""

    style: str  # the plan's style, or "replicated"
    dim: int | None
    packed: bool = False

    def shard_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        if self.dim is None or tp == 1:
            return tuple(shape)
        out = list(shape)
        out[self.dim] //= tp
        return tuple(out)


REPLICATED = Split("replicated", None)


def tp_plan_for(config: Mapping[str, Any]) -> dict[str, str]:
    """The tensor-parallel plan of a Hugging Face ``config.json``, with full module paths.

    Uses transformers' config class for ``model_type`` (its ``base_model_tp_plan``) and the
    ``architectures`` class (its ``_tp_plan``). Without transformers, or for a model type
    it does not know, the plan is empty: every tensor is replicated.
    """
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - transformers is in the weights extra
        return {}
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return {}
    try:
        config_obj = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError):
        return {}
    plan: dict[str, str] = {}
    base = dict(getattr(config_obj, "base_model_tp_plan", None) or {})
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    prefix = getattr(model_class, "base_model_prefix", "model") if model_class is not None else "model"
    for pattern, style in base.items():
        plan[f"{prefix}.{pattern}"] = style
        plan[pattern] = style  # checkpoints of bare base models have no prefix
    for pattern, style in (getattr(model_class, "_tp_plan", None) or {}).items():
        plan[pattern] = style
    return plan


def split_for(name: str, shape: tuple[int, ...], plan: Mapping[str, str]) -> Split:
    """The split of tensor ``name`` (``<module path>.<weight|bias>``) under ``plan``."""
    module, _, leaf = name.rpartition(".")
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", module)
    style = plan.get(generic) or next((s for p, s in plan.items() if fnmatch.fnmatchcase(module, p)), None)
    if style is None or len(shape) == 0:
        return REPLICATED
    packed = style.startswith("packed_")
    if "colwise" in style:
        return Split(style, 0, packed)
    if "rowwise" in style:
        if leaf == "bias" or len(shape) == 1:
            return Split(style, None)  # added after the all-reduce: whole on every rank
        return Split(style, len(shape) - 1, packed)
    return Split(style, None)


def check_divisible(name: str, shape: tuple[int, ...], split: Split, tp: int,
                    config: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` unless ``tp`` splits this tensor evenly (whole heads too)."""
    if split.dim is None or tp == 1:
        return
    parts = tp * (2 if split.packed else 1)
    if shape[split.dim] % parts:
        raise ConfigError(f"tensor {name!r} of shape {list(shape)}: dim {split.dim} ({shape[split.dim]}) "
                          f"does not split evenly over tp={tp}")
    config = config or {}
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = config.get(key)
        if isinstance(heads, int) and heads % tp and re.search(r"\.(q|k|v|qkv)_proj$", name.rpartition(".")[0]):
            raise ConfigError(f"tensor {name!r}: {key}={heads} does not split over tp={tp}")


def shard(tensor: Any, split: Split, tp: int, tp_rank: int) -> Any:
    """Rank ``tp_rank``'s piece of ``tensor`` (a view; contiguous when split on dim 0)."""
    if split.dim is None or tp == 1:
        return tensor
    if split.packed:
        halves = tensor.chunk(2, dim=split.dim)
        import torch

        return torch.cat([h.chunk(tp, dim=split.dim)[tp_rank] for h in halves], dim=split.dim)
    return tensor.chunk(tp, dim=split.dim)[tp_rank]


def pipeline_stage(name: str, num_layers: int | None, pp: int) -> int:
    """The pipeline stage that owns tensor ``name``."""
    if pp == 1:
        return 0
    match = _LAYER.search(name)
    if match is not None and num_layers:
        return min(int(match.group(1)) * pp // num_layers, pp - 1)
    return 0 if "embed" in name else pp - 1

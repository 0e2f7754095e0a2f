"""The vLLM KV-memory adapter reads and writes exactly the bytes vLLM's CPU attention reads as each
token's K and V (checked against the backend's own view: [blocks, heads, 2 * block_size, dim]
chunked in two), and refuses layouts it does not know."""

from __future__ import annotations

import pytest
import torch

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.kv_cache import LAYOUTS, VLLMKVCache, layout_name

LAYERS, BLOCKS, HEADS, BLOCK, DIM = 3, 20, 2, 32, 16


def caches() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM) for i in range(LAYERS)}


def backend_kv(layer: torch.Tensor, block: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one slot as vLLM's CPU attention reads them (cpu_attn.py)."""
    key_cache, value_cache = layer.view(BLOCKS, HEADS, BLOCK * 2, DIM).chunk(2, dim=2)
    return key_cache[block, :, slot], value_cache[block, :, slot]


@pytest.mark.parametrize("scheduler_block", [BLOCK, 2 * BLOCK])
def test_gather_and_scatter_move_each_tokens_own_k_and_v(scheduler_block: int) -> None:
    tensors = caches()
    kv = VLLMKVCache.register(tensors, LAYOUTS[("cpu", "LBHNC")], num_layers=LAYERS, heads=HEADS, head_dim=DIM,
                              dtype=torch.float32, block_size=scheduler_block)
    block_ids = [3, 1, 4]  # a request's blocks, scattered
    start, stop = 5, 2 * scheduler_block + 7  # partial blocks at both ends
    out = torch.empty(LAYERS, 2, stop - start, HEADS, DIM)
    kv.gather(block_ids, start, stop, out)
    ratio = scheduler_block // BLOCK
    for position in range(start, stop):
        kernel_block = block_ids[position // scheduler_block] * ratio + (position % scheduler_block) // BLOCK
        for layer_index, layer in enumerate(tensors.values()):
            key, value = backend_kv(layer, kernel_block, position % BLOCK)
            assert torch.equal(out[layer_index, 0, position - start], key)
            assert torch.equal(out[layer_index, 1, position - start], value)
    # Scatter into other blocks, gather back: the same; positions outside the range untouched.
    before = {n: t.clone() for n, t in tensors.items()}
    kv.scatter(out, [7, 0, 9], start)
    again = torch.empty_like(out)
    kv.gather([7, 0, 9], start, stop, again)
    assert torch.equal(again, out)
    # Exactly the written slots changed, as the backend sees its memory.
    for name in tensors:
        now, then = (t.view(BLOCKS, HEADS, 2, BLOCK, DIM) for t in (tensors[name], before[name]))
        changed = {(b, s) for b, s in (now != then).any(dim=(1, 2, 4)).nonzero().tolist()}
        written = {([7, 0, 9][p // scheduler_block] * ratio + (p % scheduler_block) // BLOCK, p % BLOCK)
                   for p in range(start, stop)}
        assert changed == written


def test_unknown_layouts_and_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="does not know the KV memory layout cuda/LBNHC"):
        layout_name("cuda", "LBNHC")
    assert layout_name("cpu", "LBHNC") == "cpu/LBHNC"
    with pytest.raises(ConfigError, match="unknown vLLM layout"):
        VLLMKVCache.register(caches(), LAYOUTS[("cpu", "LBHNC")], num_layers=LAYERS, heads=HEADS + 1,
                             head_dim=DIM, dtype=torch.float32, block_size=BLOCK)
    with pytest.raises(ConfigError, match="registered 3 KV layers; the model has 4"):
        VLLMKVCache.register(caches(), LAYOUTS[("cpu", "LBHNC")], num_layers=4, heads=HEADS, head_dim=DIM,
                             dtype=torch.float32, block_size=BLOCK)
    with pytest.raises(ConfigError, match="holds torch.float32"):
        VLLMKVCache.register(caches(), LAYOUTS[("cpu", "LBHNC")], num_layers=LAYERS, heads=HEADS, head_dim=DIM,
                             dtype=torch.bfloat16, block_size=BLOCK)

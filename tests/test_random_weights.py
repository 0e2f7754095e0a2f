"""Random-weight models are the same bits on every device, so their fingerprint names the weights.

(A GPU run once reused KV of a CUDA-drawn model in a CPU-drawn one: same fingerprint, other
weights, wrong tokens. Now the generator is counter-based integer arithmetic.)"""

from __future__ import annotations

import os

import pytest
import torch

from kvswap.engine import build_model
from kvswap.engine.model import _stream_key, random_weights

MASK = (1 << 64) - 1


def splitmix64(key: int, index: int) -> int:
    """The reference, in Python's unbounded integers."""
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_the_generator_is_splitmix64_bit_for_bit() -> None:
    key = _stream_key(0, "model.layers.0.self_attn.q_proj.weight")
    values = torch.empty(5000, dtype=torch.float64)
    random_weights(values, key, std=1.0)
    scale = 3 ** 0.5
    for index in (0, 1, 2, 999, 4321, 4999):
        unit = (splitmix64(key & MASK, index) >> 40) * 2.0 ** -24
        assert values[index].item() == (unit * 2.0 - 1.0) * scale
    assert abs(values.std().item() - 1.0) < 0.05 and abs(values.mean().item()) < 0.05


def test_the_fingerprint_names_config_seed_and_dtype() -> None:
    fingerprints = {build_model("tiny", seed=seed, dtype=dtype)[1].fingerprint
                    for seed in (0, 1) for dtype in ("float32", "bfloat16")}
    assert len(fingerprints) == 4


@pytest.mark.skipif(os.environ.get("KVSWAP_TEST_DEVICE") != "cuda", reason="needs KVSWAP_TEST_DEVICE=cuda")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_and_gpu_build_the_same_weights(dtype: str) -> None:
    on_cpu, cpu_layout = build_model("tiny", dtype=dtype, device="cpu")
    on_gpu, gpu_layout = build_model("tiny", dtype=dtype, device="cuda")
    assert cpu_layout == gpu_layout
    gpu = dict(on_gpu.named_parameters())
    for name, param in on_cpu.named_parameters():
        assert torch.equal(param, gpu[name].cpu()), name

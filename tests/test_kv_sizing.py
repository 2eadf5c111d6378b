"""``kv_blocks`` as vLLM v1 computes ``num_gpu_blocks`` (docs/memory.md, "Sizing the cache")."""

from __future__ import annotations

import pytest

from llmqueue.errors import ConfigError
from llmqueue.model.kv_sizing import (
    DEFAULT_OVERHEAD_BYTES,
    GIB,
    GPUS,
    MODELS,
    kv_blocks_from,
    size_kv_cache,
)


def vllm_num_blocks(total, utilization, non_kv, layers, kv_heads, head, dtype, block):
    """vLLM v1 step by step: Worker.determine_available_memory, AttentionSpec.page_size_bytes (one layer),
    get_num_blocks: int(available // page_size // num_layers)."""
    available = int(total * utilization - non_kv)
    page_size = 2 * block * kv_heads * head * dtype
    return int(available // page_size // layers)


def test_llama31_8b_on_an_a100_80gb_by_hand():
    s = size_kv_cache("Llama-3.1-8B", "A100-80GB")
    # 128 KiB of KV per token (2 · 32 layers · 8 heads · 128 · 2 bytes), 2 MiB per 16-token block
    assert s.bytes_per_block == 2 * 32 * 8 * 128 * 2 * 16 == 2 * 2**20
    assert s.weights_bytes == 8_030_261_248 * 2
    assert s.available_bytes == int(80 * GIB * 0.92 - 16_060_522_496 - 2 * GIB)   # vLLM's default utilisation
    assert s.kv_blocks == s.available_bytes // (2 * 2**20) == 29000
    assert s.usable_tokens == 28999 * 16
    assert kv_blocks_from("Llama-3.1-8B", "A100-80GB") == 29000
    assert kv_blocks_from("Llama-3.1-8B", "A100-80GB", gpu_memory_utilization=0.9) == 28181   # older vLLM


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("gpu", list(GPUS))
def test_every_table_entry_follows_vllms_arithmetic(model, gpu):
    m, g = MODELS[model], GPUS[gpu]
    for tp in (1, 2, 4, 8):
        heads = max(1, m.num_kv_heads // tp)
        weights = -(-m.num_params * 2 // tp)
        expected = vllm_num_blocks(g.memory_bytes, 0.92, weights + DEFAULT_OVERHEAD_BYTES, m.num_layers, heads,
                                   m.head_size, 2, 16)
        if expected < 2:
            with pytest.raises(ConfigError):
                size_kv_cache(model, gpu, tensor_parallel_size=tp)
        else:
            assert size_kv_cache(model, gpu, tensor_parallel_size=tp).kv_blocks == expected


def test_explicit_numbers_and_overrides():
    explicit = size_kv_cache(num_layers=32, num_kv_heads=8, head_size=128, num_params=8_030_261_248,
                             gpu_memory_bytes=80 * GIB)
    assert explicit.kv_blocks == size_kv_cache("Llama-3.1-8B", "A100-80GB").kv_blocks
    assert explicit.model is None and explicit.gpu is None
    # what vLLM logs after profiling can be given as is
    measured = size_kv_cache("llama-3.1-8b", "a100-80gb", gpu_memory_bytes=85_000_000_000, weights_bytes=16 * GIB,
                             overhead_bytes=3 * GIB, gpu_memory_utilization=0.95)
    assert measured.kv_blocks == int(85_000_000_000 * 0.95 - 19 * GIB) // (2 * 2**20)
    assert measured.model == "Llama-3.1-8B"
    assert size_kv_cache("Llama-3.1-8B", "H100-80GB", kv_cache_memory_bytes=10 * GIB).kv_blocks == 5120
    fp8 = size_kv_cache("Llama-3.1-8B", "H100-80GB", kv_dtype_bytes=1, block_size=32)
    assert fp8.bytes_per_block == 2 * 2**20 and fp8.block_size == 32
    assert size_kv_cache("Llama-2-7B", "A100-80GB").bytes_per_block == 4 * size_kv_cache(
        "Mistral-7B", "A100-80GB").bytes_per_block          # 32 KV heads against 8


def test_tensor_parallelism_splits_heads_and_weights():
    one = size_kv_cache("Qwen2.5-7B", "H200-141GB")
    eight = size_kv_cache("Qwen2.5-7B", "H200-141GB", tensor_parallel_size=8)
    assert eight.bytes_per_block == one.bytes_per_block // 4   # 4 KV heads: replicated beyond tp = 4
    assert eight.weights_bytes == -(-7_615_616_512 * 2 // 8)
    assert eight.kv_blocks > one.kv_blocks


def test_more_memory_gives_more_blocks():
    blocks = [size_kv_cache("Mistral-7B", "H100-80GB", gpu_memory_utilization=u).kv_blocks
              for u in (0.3, 0.5, 0.7, 0.9, 1.0)]
    assert blocks == sorted(blocks) and len(set(blocks)) == 5


@pytest.mark.parametrize("kwargs,field,fragment", [
    ({"model": "Llama-9"}, "kv_sizing.model", "Llama-3.1-8B"),
    ({"model": "Llama-3.1-8B", "gpu": "TPU"}, "kv_sizing.gpu", "H200-141GB"),
    ({"gpu": "A100-80GB"}, "kv_sizing.num_layers", "required without kv_sizing.model"),
    ({"model": "Llama-3.1-8B"}, "kv_sizing.gpu_memory_bytes", "required without kv_sizing.gpu"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "num_layers": 0}, "kv_sizing.num_layers", ">= 1"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "block_size": -16}, "kv_sizing.block_size", ">= 1"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "gpu_memory_utilization": 1.5}, "kv_sizing.gpu_memory_utilization",
     "<= 1"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "gpu_memory_utilization": 0}, "kv_sizing.gpu_memory_utilization", "> 0"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "overhead_bytes": -1}, "kv_sizing.overhead_bytes", ">= 0"),
    ({"model": "Llama-3.1-70B", "gpu": "A100-80GB"}, "kv_sizing.gpu_memory_utilization", "at least 2 blocks"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "kv_cache_memory_bytes": 2**20}, "kv_sizing.kv_cache_memory_bytes",
     "at least 2 blocks"),
    ({"model": "Llama-3.1-8B", "gpu": "L4", "tensor_parallel_size": 0}, "kv_sizing.tensor_parallel_size", ">= 1"),
])
def test_bad_input_names_the_key_and_what_is_allowed(kwargs, field, fragment):
    with pytest.raises(ConfigError) as exc:
        size_kv_cache(**kwargs)
    assert exc.value.field == field and fragment in str(exc.value)


def test_the_field_prefix_is_the_callers():
    with pytest.raises(ConfigError) as exc:
        size_kv_cache("nope", "L4", field="engine.kv_sizing")
    assert exc.value.field == "engine.kv_sizing.model"

"""KV-cache size as vLLM computes it: ``kv_blocks`` (vLLM's ``num_gpu_blocks``) from a GPU and a model
(docs/memory.md, "Sizing the cache").

vLLM v1 sizes the cache in two steps:

* ``vllm/v1/worker/gpu_worker.py``, ``Worker.determine_available_memory``: available bytes =
  total GPU memory × ``gpu_memory_utilization`` − non-KV memory, where the non-KV memory
  (``memory_profiling`` in ``vllm/utils/mem_utils.py``: weights + peak activations of a profiling
  forward pass + non-torch allocations) is measured at start-up; ``kv_cache_memory_bytes``, when
  set, replaces the whole computation;
* ``vllm/v1/core/kv_cache_utils.py``, ``get_kv_cache_config_from_groups`` / ``get_num_blocks``:
  ``num_blocks = available // page_size // num_layers``, with ``page_size`` from
  ``vllm/v1/kv_cache_interface.py``, ``AttentionSpec.page_size_bytes``:
  2 (K and V) × ``block_size`` × ``num_kv_heads`` × ``head_size`` × dtype bytes (one layer).

Under tensor parallelism each GPU holds ``max(1, num_kv_heads // tp)`` KV heads (vLLM's
``ModelConfig.get_num_kv_heads``) and, here, ``1/tp`` of the weights.  The profiled overhead cannot
be computed without a GPU: it is an argument (default ``DEFAULT_OVERHEAD_BYTES``, a round figure).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llmqueue.checks import integer, number
from llmqueue.errors import ConfigError
from llmqueue.model.kv import DEFAULT_BLOCK_SIZE

GIB = 1 << 30
DEFAULT_UTILIZATION = 0.92       # vLLM's default (CacheConfig.gpu_memory_utilization, vllm/config/cache.py; 0.92 since at least 0.25, 0.9 earlier)
DEFAULT_OVERHEAD_BYTES = 2 * GIB  # activations + non-torch memory: vLLM profiles it; a round allowance here


@dataclass(frozen=True)
class ModelShape:
    """What the cache size needs from a model's Hugging Face ``config.json``."""

    name: str
    num_layers: int      # num_hidden_layers
    num_kv_heads: int    # num_key_value_heads
    head_size: int       # hidden_size / num_attention_heads
    num_params: int      # parameters (weights = num_params × weight dtype bytes)
    source: str


@dataclass(frozen=True)
class GPUMemory:
    """A GPU's memory as its datasheet states it (read as GiB)."""

    name: str
    memory_bytes: int
    source: str


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


# Parameter counts follow from each config.json's shapes (embeddings and LM head, attention, MLP,
# norms; Qwen2 adds q/k/v biases) and match the counts shown on the models' pages.
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("Llama-3.1-8B", 32, 8, 128, 8_030_261_248, _hf("meta-llama/Llama-3.1-8B")),
    ModelShape("Llama-3.1-70B", 80, 8, 128, 70_553_706_496, _hf("meta-llama/Llama-3.1-70B")),
    ModelShape("Llama-2-7B", 32, 32, 128, 6_738_415_616, _hf("meta-llama/Llama-2-7b-hf")),
    ModelShape("CodeLlama-34B", 48, 8, 128, 33_743_970_304, _hf("codellama/CodeLlama-34b-hf")),
    ModelShape("Mistral-7B", 32, 8, 128, 7_241_732_096, _hf("mistralai/Mistral-7B-v0.1")),
    ModelShape("Qwen2.5-7B", 28, 4, 128, 7_615_616_512, _hf("Qwen/Qwen2.5-7B")),
    ModelShape("Qwen2.5-72B", 80, 8, 128, 72_706_203_648, _hf("Qwen/Qwen2.5-72B")),
)}

GPUS: dict[str, GPUMemory] = {g.name: g for g in (
    GPUMemory("A100-40GB", 40 * GIB, "NVIDIA A100 Tensor Core GPU datasheet: 40GB HBM2"),
    GPUMemory("A100-80GB", 80 * GIB, "NVIDIA A100 Tensor Core GPU datasheet: 80GB HBM2e"),
    GPUMemory("H100-80GB", 80 * GIB, "NVIDIA H100 Tensor Core GPU datasheet: 80GB (SXM and PCIe)"),
    GPUMemory("H200-141GB", 141 * GIB, "NVIDIA H200 Tensor Core GPU datasheet: 141GB HBM3e"),
    GPUMemory("L4", 24 * GIB, "NVIDIA L4 Tensor Core GPU datasheet: 24GB GDDR6"),
    GPUMemory("A10G", 24 * GIB, "AWS EC2 G5 instances (NVIDIA A10G): 24 GB per GPU"),
)}


@dataclass(frozen=True)
class KVSizing:
    """The cache one GPU (one tensor-parallel worker) holds, and how it was computed."""

    kv_blocks: int                 # vLLM's num_gpu_blocks (block 0 is reserved: kv_blocks - 1 usable)
    block_size: int                # tokens per block
    bytes_per_block: int           # 2 · layers · kv_heads (per GPU) · head_size · kv dtype bytes · block_size
    available_bytes: int           # memory for the cache: total · utilization − weights − overhead
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int             # per GPU
    overhead_bytes: int
    tensor_parallel_size: int
    model: str | None = None
    gpu: str | None = None

    @property
    def usable_tokens(self) -> int:
        """M = (kv_blocks − 1) · block_size: the tokens requests can hold."""
        return (self.kv_blocks - 1) * self.block_size

    def to_dict(self) -> dict:
        return {**asdict(self), "usable_tokens": self.usable_tokens}


def _lookup(table: dict, name: object, field: str):
    if isinstance(name, str):
        found = table.get(name) or {k.lower(): v for k, v in table.items()}.get(name.lower())
        if found is not None:
            return found
    raise ConfigError(field, name, f"one of {', '.join(table)} (or give the numbers explicitly)")


def size_kv_cache(model: str | None = None, gpu: str | None = None, *, num_layers: int | None = None,
                  num_kv_heads: int | None = None, head_size: int | None = None, num_params: int | None = None,
                  weights_bytes: int | None = None, gpu_memory_bytes: int | None = None,
                  gpu_memory_utilization: float = DEFAULT_UTILIZATION, overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
                  kv_cache_memory_bytes: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                  kv_dtype_bytes: int = 2, weight_dtype_bytes: int = 2, tensor_parallel_size: int = 1,
                  field: str = "kv_sizing") -> KVSizing:
    """vLLM's ``num_gpu_blocks`` for a model on a GPU, named (``MODELS``, ``GPUS``) or given as numbers.

    Explicit numbers override the named entries.  ``weights_bytes`` defaults to ``num_params ×
    weight_dtype_bytes``; ``kv_cache_memory_bytes`` (vLLM's option of that name) skips the memory
    arithmetic.  Per GPU: blocks = floor(available / bytes per block), as ``get_num_blocks``.
    """
    shape = None if model is None else _lookup(MODELS, model, f"{field}.model")
    device = None if gpu is None else _lookup(GPUS, gpu, f"{field}.gpu")

    def pick(value, key: str, fallback, minimum: int, what: str) -> int:
        value = fallback if value is None else value
        if value is None:
            raise ConfigError(f"{field}.{key}", None, f"{what}; required without {field}.model "
                              f"(one of {', '.join(MODELS)})" if key != "gpu_memory_bytes" else
                              f"{what}; required without {field}.gpu (one of {', '.join(GPUS)})")
        return integer(value, f"{field}.{key}", minimum, what=what)

    tp = integer(tensor_parallel_size, f"{field}.tensor_parallel_size", 1, what="GPUs sharing the model")
    size = integer(block_size, f"{field}.block_size", 1, what="tokens per KV block, e.g. 16")
    kv_bytes = integer(kv_dtype_bytes, f"{field}.kv_dtype_bytes", 1, what="2 for float16/bfloat16, 1 for fp8")
    layers = pick(num_layers, "num_layers", shape and shape.num_layers, 1, "the model's num_hidden_layers")
    heads = pick(num_kv_heads, "num_kv_heads", shape and shape.num_kv_heads, 1, "the model's num_key_value_heads")
    head = pick(head_size, "head_size", shape and shape.head_size, 1, "hidden_size / num_attention_heads")
    per_block = 2 * layers * max(1, heads // tp) * head * kv_bytes * size
    total = pick(gpu_memory_bytes, "gpu_memory_bytes", device and device.memory_bytes, 1, "the GPU's memory in bytes")
    utilization = number(gpu_memory_utilization, f"{field}.gpu_memory_utilization", above=0.0, at_most=1.0)
    overhead = integer(overhead_bytes, f"{field}.overhead_bytes", 0,
                       what="activation and non-torch memory, as vLLM's profiling run measures it")
    if weights_bytes is None:
        params = pick(num_params, "num_params", shape and shape.num_params, 1, "the model's parameter count")
        wb = integer(weight_dtype_bytes, f"{field}.weight_dtype_bytes", 1, what="2 for float16/bfloat16")
        weights = math.ceil(params * wb / tp)
    else:
        weights = integer(weights_bytes, f"{field}.weights_bytes", 0, what="the weights' bytes per GPU")
    if kv_cache_memory_bytes is not None:
        available = integer(kv_cache_memory_bytes, f"{field}.kv_cache_memory_bytes", 1, what="bytes for the cache")
    else:
        available = int(total * utilization - weights - overhead)  # determine_available_memory returns int(...)
    blocks = max(available, 0) // per_block
    if blocks < 2:
        key, value = ((f"{field}.kv_cache_memory_bytes", kv_cache_memory_bytes) if kv_cache_memory_bytes is not None
                      else (f"{field}.gpu_memory_utilization", utilization))
        raise ConfigError(key, value, f"memory for at least 2 blocks of {per_block} bytes (block 0 is reserved); "
                          f"{total} B × {utilization:g} − weights {weights} B − overhead {overhead} B leaves "
                          f"{available} B: use a larger GPU, more tensor parallelism, or less overhead")
    return KVSizing(blocks, size, per_block, available, total, utilization, weights, overhead, tp,
                    shape.name if shape else None, device.name if device else None)


def kv_blocks_from(model: str | None = None, gpu: str | None = None, **numbers) -> int:
    """``engine.kv_blocks`` for a model on a GPU: :func:`size_kv_cache`'s ``kv_blocks``."""
    return size_kv_cache(model, gpu, **numbers).kv_blocks


__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_OVERHEAD_BYTES", "DEFAULT_UTILIZATION", "GPUMemory", "GPUS", "KVSizing",
           "MODELS", "ModelShape", "kv_blocks_from", "size_kv_cache"]

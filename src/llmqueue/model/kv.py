"""KV-cache memory of one engine: paged blocks, as vLLM v1 allocates them (docs/memory.md).

The paper's model has no memory; an engine with ``kv_blocks`` set also holds the keys and values
of every token it has computed, in blocks of ``block_size`` tokens:

* ``kv_blocks`` is vLLM's ``num_gpu_blocks``; block 0 is vLLM's reserved null block
  (``vllm/v1/core/block_pool.py``, ``BlockPool``), so ``kv_blocks - 1`` are usable.
* ``kv_policy = "recompute"`` (vLLM v1): a request holds ``ceil(computed / block_size)`` blocks
  after ``computed`` tokens (``KVCacheManager.allocate_slots``: nothing reserved ahead); when a
  running request's next chunk does not fit, the most recently admitted running request is
  preempted (``Scheduler.schedule``, ``_preempt_request``): its blocks are freed and it later
  recomputes its prompt and every token it has generated.
* ``kv_policy = "reserve"`` (Orca / FasterTransformer style): a request is admitted only when
  blocks for its whole prompt + output are free, holds them until it finishes, and is never
  preempted.

Token accounting in this project's terms (docs/model.md: the batch that finishes the prompt
emits the first output token; ``num_output_tokens`` = v_d decode iterations follow): a request
whose sequence is ``seq_len = v_p + (v_d - decode_left)`` tokens long has computed
``seq_len - prefill_left`` of them.  A preempted decoder's recompute is a prefill of its whole
sequence plus its next decode token (vLLM computes ``num_tokens`` = prompt + outputs so far, and
the last chunk samples the next token), so preemption moves one decode token into the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmqueue.checks import BIG, integer
from llmqueue.errors import ConfigError

RECOMPUTE, RESERVE = "recompute", "reserve"
KV_POLICIES = (RECOMPUTE, RESERVE)
DEFAULT_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class KVCache:
    """The cache of one engine: ``blocks`` (vLLM's num_gpu_blocks), ``block_size`` tokens per block,
    and the policy (``recompute`` or ``reserve``)."""

    blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    policy: str = RECOMPUTE

    def __post_init__(self) -> None:
        integer(self.blocks, "engine.kv_blocks", 2, what="vLLM's num_gpu_blocks: block 0 is reserved, so at least "
                "one usable block; or omit kv_blocks for unlimited memory")
        integer(self.block_size, "engine.block_size", 1, what="tokens per KV block, e.g. 16")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ConfigError("engine.block_size", self.block_size, f"at most {MAX_BLOCK_SIZE} tokens per block "
                              "(vLLM uses 1 to 128 for attention; larger blocks are hybrid models' pages)")
        if self.blocks * self.block_size > BIG:
            raise ConfigError("engine.kv_blocks", self.blocks, f"at most {BIG // self.block_size} blocks of "
                              f"{self.block_size} tokens (2**62 tokens in all)")
        if self.policy not in KV_POLICIES:
            raise ConfigError("engine.kv_policy", self.policy, f"one of {', '.join(KV_POLICIES)}")

    @property
    def usable(self) -> int:
        """Blocks requests can hold (block 0 is reserved)."""
        return self.blocks - 1

    @property
    def tokens(self) -> int:
        """Tokens the usable blocks hold."""
        return self.usable * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks holding ``tokens`` tokens: ceil(tokens / block_size)."""
        return -(-tokens // self.block_size)

    def fits(self, prompt: int, output: int) -> bool:
        """Whether a request of ``prompt`` + ``output`` tokens can ever finish in this cache (it holds
        ``prompt + output`` tokens during its last decode iteration)."""
        return self.blocks_for(prompt + output) <= self.usable

    def encode(self) -> tuple[int, int, int]:
        """(blocks, block_size, policy code: 1 recompute, 2 reserve) for the compiled core; (0, 1, 0):
        no cache."""
        return (self.blocks, self.block_size, KV_POLICIES.index(self.policy) + 1)


def make_kv(engine: dict[str, Any]) -> KVCache | None:
    """The cache an ``[engine]`` table asks for (None: no ``kv_blocks``, unlimited memory)."""
    blocks = engine.get("kv_blocks")
    if blocks is None:
        for key in ("block_size", "kv_policy"):
            if engine.get(key) is not None:
                raise ConfigError(f"engine.{key}", engine[key], "set together with engine.kv_blocks (without it "
                                  "memory is unlimited and this key has no effect)")
        return None
    size = engine.get("block_size", DEFAULT_BLOCK_SIZE)
    policy = engine.get("kv_policy", RECOMPUTE)
    return KVCache(integer(blocks, "engine.kv_blocks", 2, what="vLLM's num_gpu_blocks: block 0 is reserved"),
                   integer(size, "engine.block_size", 1, what="tokens per KV block, e.g. 16"), policy)


def computed(request) -> int:
    """Tokens of ``request`` whose KV is held: its sequence so far minus the prefill left."""
    return request.num_prompt_tokens + request.num_output_tokens - request.decode_left - request.prefill_left


__all__ = ["DEFAULT_BLOCK_SIZE", "KVCache", "KV_POLICIES", "RECOMPUTE", "RESERVE", "computed", "make_kv"]

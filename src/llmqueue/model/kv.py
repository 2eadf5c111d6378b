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

Automatic prefix caching (``prefix_caching = true``, docs/prefix_caching.md): :class:`PrefixPool`
keeps vLLM v1's block pool (``vllm/v1/core/block_pool.py``, ``BlockPool``): full blocks are
identified by their content (:func:`block_key`, the exact counterpart of vLLM's chained block hash,
``kv_cache_utils.hash_block_tokens``), shared by reference count, and when freed kept as
"cached free" blocks, evicted least recently freed first when fresh blocks run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmqueue.checks import BIG, integer
from llmqueue.errors import ConfigError, InternalError

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
    prefix_caching: bool = False

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
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError("engine.prefix_caching", self.prefix_caching, "true or false")
        if self.prefix_caching and self.policy != RECOMPUTE:
            raise ConfigError("engine.prefix_caching", True, 'kv_policy = "recompute" (prefix caching is vLLM '
                              "v1's: blocks are shared as they are computed; reserve holds whole requests)")

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
        for key in ("block_size", "kv_policy", "prefix_caching"):
            if engine.get(key) is not None and engine[key] is not False:
                raise ConfigError(f"engine.{key}", engine[key], "set together with engine.kv_blocks (without it "
                                  "memory is unlimited and this key has no effect)")
        return None
    size = engine.get("block_size", DEFAULT_BLOCK_SIZE)
    policy = engine.get("kv_policy", RECOMPUTE)
    prefix = engine.get("prefix_caching", False)
    if prefix is None:
        prefix = False
    return KVCache(integer(blocks, "engine.kv_blocks", 2, what="vLLM's num_gpu_blocks: block 0 is reserved"),
                   integer(size, "engine.block_size", 1, what="tokens per KV block, e.g. 16"), policy, prefix)


def computed(request) -> int:
    """Tokens of ``request`` whose KV is held: its sequence so far minus the prefill left."""
    return request.num_prompt_tokens + request.num_output_tokens - request.decode_left - request.prefill_left


# ---- automatic prefix caching (docs/prefix_caching.md) ---------------------------------------

class _Own:
    """The key of a request's own tokens (the rest of its prompt and all its output): unique to it."""

    __slots__ = ("rid",)

    def __init__(self, rid) -> None:
        self.rid = rid

    def __eq__(self, other) -> bool:
        return type(other) is _Own and other.rid == self.rid

    def __hash__(self) -> int:
        return hash(("llmqueue-own-tokens", self.rid))

    def __repr__(self) -> str:
        return f"own({self.rid!r})"


def own_key(request) -> _Own:
    """The span key of ``request``'s own tokens: a later request whose prompt starts with this
    request's whole sequence (an agent's next hop) names it as ``(own_key(request), length)``."""
    return _Own(request.rid)


def check_content(content, prompt: int, where: str = "content") -> tuple:
    """Validate one request's content description: a tuple of spans ``(key, length)`` (key hashable,
    length an integer >= 1) covering at most its ``prompt`` tokens."""
    if not isinstance(content, tuple):
        raise ConfigError(where, content, "a tuple of (key, length) spans")
    total = 0
    for span in content:
        if not (isinstance(span, tuple) and len(span) == 2):
            raise ConfigError(where, span, "a (key, length) span")
        key, length = span
        hash(key)
        integer(length, f"{where} span length", 1)
        total += length
    if total > prompt:
        raise ConfigError(where, content, f"spans covering at most the prompt's {prompt} tokens")
    return content


def block_key(request, index: int, block_size: int) -> tuple:
    """The identity of block ``index`` (tokens ``index·B .. (index+1)·B − 1``) of ``request``'s
    sequence: its spans truncated to the block's end.  A span ``(key, length)`` is the first
    ``length`` tokens of the text ``key``; the tokens after the spans (the rest of the prompt, then
    the outputs) are the request's own span (:func:`own_key`).  Two sequences get the same key for
    block i iff they agree on their first (i+1)·B tokens: the key determines the whole prefix, as
    vLLM's chained hash ``hash(parent hash, block tokens)`` does (``kv_cache_utils.hash_block_tokens``)."""
    end = (index + 1) * block_size
    total = 0
    out = []
    for key, length in request.content or ():
        if total + length >= end:
            out.append((key, end - total))
            return tuple(out)
        out.append((key, length))
        total += length
    out.append((_Own(request.rid), end - total))
    return tuple(out)


class Block:
    """One physical KV block: its content key once full and cached (None: fresh), the number of
    requests holding it (vLLM's ``ref_cnt``) and an id (order of creation)."""

    __slots__ = ("key", "ref", "bid")

    def __init__(self, bid: int) -> None:
        self.key = None
        self.ref = 1
        self.bid = bid


class PrefixPool:
    """vLLM v1's ``BlockPool`` with prefix caching, for one engine (``vllm/v1/core/block_pool.py``).

    * ``fresh``: free blocks with no cached content; ``lru``: free blocks that still hold a cached
      full block (ref count 0), in eviction order (vLLM's ``FreeKVCacheBlockQueue``: ``free_blocks``
      puts fresh blocks at its front and cached ones at its back, ``get_new_blocks`` pops the front,
      ``_maybe_evict_cached_block`` drops the popped block's hash).  Both count as free.
    * ``table``: content key -> {block id: block} of every cached block, free or in use
      (``BlockHashToBlockMap``: no de-duplication; a lookup takes the first inserted).
    * a request holds ``request.blocks`` (hit blocks first, then its own), ``request.ncached`` of them
      cached (vLLM's ``num_cached_block``).

    It also answers what the engine needs of a :class:`KVCache` (``usable``, ``blocks_for``, ...)."""

    def __init__(self, kv: KVCache) -> None:
        self.cache = kv
        self.blocks, self.block_size, self.policy = kv.blocks, kv.block_size, kv.policy
        self.prefix_caching = True
        self.usable = kv.usable
        self.fresh = kv.usable
        self.lru: dict[int, Block] = {}
        self.table: dict[tuple, dict[int, Block]] = {}
        self._ids = 0
        self.admitted: set[int] = set()     # ids of the requests admitted while planning this batch
        # vLLM's PrefixCacheStats (vllm/v1/metrics/stats.py, recorded at admission): tokens queried
        # (the request's num_tokens) and hit, for new and for previously preempted requests
        self.requests = self.queries = self.hits = 0
        self.preempted_requests = self.preempted_queries = self.preempted_hits = 0
        self.evictions = 0
        # tokens each request found cached at its first admission (rid -> tokens): work it never
        # has to do, unlike a preempted request's hits, which spare a recompute (metrics' backlog)
        self.first_hits: dict[int, int] = {}

    # the KVCache interface
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, prompt: int, output: int) -> bool:
        return self.cache.fits(prompt, output)

    @property
    def free(self) -> int:
        """Free blocks, cached ones included (``BlockPool.get_num_free_blocks``)."""
        return self.fresh + len(self.lru)

    @property
    def in_use(self) -> int:
        """Blocks held by requests (a shared block counted once)."""
        return self.usable - self.fresh - len(self.lru)

    def lookup(self, request, num_tokens: int) -> list[Block]:
        """The longest run of cached full blocks from the start of ``request``'s sequence, at most
        ``num_tokens − 1`` tokens (``KVCacheManager.get_computed_blocks``: ``max_cache_hit_length =
        request.num_tokens - 1``; ``FullAttentionManager.find_longest_cache_hit``)."""
        table = self.table
        if not table:
            return []
        size = self.block_size
        hits = []
        for i in range((num_tokens - 1) // size):
            found = table.get(block_key(request, i, size))
            if not found:
                break
            hits.append(next(iter(found.values())))
        return hits

    def touch(self, request, hits: list[Block]) -> None:
        """Give ``request`` the hit blocks (``BlockPool.touch``: a free one leaves the free queue)."""
        lru = self.lru
        for block in hits:
            if block.ref == 0:
                del lru[block.bid]
            block.ref += 1
        request.blocks = list(hits)
        request.ncached = len(hits)

    def allocate(self, request, n: int) -> None:
        """``n`` new blocks for ``request`` (``BlockPool.get_new_blocks``): fresh ones first, then the
        least recently freed cached ones, evicted."""
        blocks = request.blocks
        for _ in range(n):
            if self.fresh:
                self.fresh -= 1
                self._ids += 1
                blocks.append(Block(self._ids))
                continue
            lru = self.lru
            bid = next(iter(lru))
            block = lru.pop(bid)
            same = self.table[block.key]
            del same[bid]
            if not same:
                del self.table[block.key]
            block.key = None
            block.ref = 1
            self.evictions += 1
            blocks.append(block)

    def cache_blocks(self, request, tokens: int) -> None:
        """Cache the blocks of ``request`` that are full once ``tokens`` tokens are computed
        (``SingleTypeKVCacheManager.cache_blocks`` → ``BlockPool.cache_full_blocks``)."""
        size = self.block_size
        full = tokens // size
        start = request.ncached
        if full <= start:
            return
        blocks = request.blocks
        table = self.table
        for i in range(start, full):
            block = blocks[i]
            if block.key is not None:
                continue    # a hit block: already cached
            key = block_key(request, i, size)
            block.key = key
            same = table.get(key)
            if same is None:
                table[key] = {block.bid: block}
            else:
                same[block.bid] = block
        request.ncached = full

    def free_request(self, request) -> None:
        """Free ``request``'s blocks, its last block first (``SingleTypeKVCacheManager.free``:
        ``reversed(req_blocks)``; ``BlockPool.free_blocks``: fresh ones to the front of the free
        queue, cached ones to its back, so a request's tail is evicted before its head)."""
        lru = self.lru
        for block in reversed(request.blocks):
            block.ref -= 1
            if block.ref == 0:
                if block.key is None:
                    self.fresh += 1
                else:
                    lru[block.bid] = block
        request.blocks = []
        request.ncached = 0

    def record(self, request, tokens: int, hit: int) -> None:
        """Prefix-cache statistics of one admission (``KVCacheManager.record_prefix_cache_stats``)."""
        if request.preemptions:
            self.preempted_requests += 1
            self.preempted_queries += tokens
            self.preempted_hits += hit
        else:
            self.requests += 1
            self.queries += tokens
            self.hits += hit

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a cached full block (in use or free)."""
        return sum(len(d) for d in self.table.values())

    def stats(self) -> dict:
        return {"requests": self.requests, "queries": self.queries, "hits": self.hits,
                "preempted_requests": self.preempted_requests, "preempted_queries": self.preempted_queries,
                "preempted_hits": self.preempted_hits, "evictions": self.evictions,
                "cached_blocks": self.cached_blocks, "cached_free_blocks": len(self.lru)}

    def check(self, holders) -> None:
        """The pool's invariants against the requests holding blocks (``holders``)."""
        refs: dict[int, int] = {}
        seen: dict[int, Block] = {}
        for r in holders:
            for b in r.blocks:
                refs[b.bid] = refs.get(b.bid, 0) + 1
                seen[b.bid] = b
        for bid, n in refs.items():
            if seen[bid].ref != n:
                raise InternalError(f"block {bid}: ref count {seen[bid].ref}, held by {n} requests")
        for bid, b in self.lru.items():
            if b.ref or b.key is None or bid in refs or self.table.get(b.key, {}).get(bid) is not b:
                raise InternalError(f"cached free block {bid} is referenced or not cached")
        if len(refs) + len(self.lru) + self.fresh != self.usable or self.fresh < 0:
            raise InternalError(f"held ({len(refs)}) + cached free ({len(self.lru)}) + fresh ({self.fresh}) "
                                f"!= {self.usable} usable blocks")


__all__ = ["DEFAULT_BLOCK_SIZE", "Block", "KVCache", "KV_POLICIES", "PrefixPool", "RECOMPUTE", "RESERVE",
           "block_key", "check_content", "computed", "make_kv", "own_key"]

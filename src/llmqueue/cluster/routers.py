"""Routers of a replica pool: which replica serves each arriving request (docs/cluster.md).

A router sees what a real one can: what it sent (requests in flight, their tokens), and what the
replicas report (finishes, KV use), optionally with a reporting delay (:class:`View`).  Two kinds:

* **static** routers decide without looking at the replicas (``assign`` draws every decision at
  once, vectorised): round robin, random (weighted), session affinity (consistent hashing);
* **dynamic** routers decide at each arrival from the :class:`View` (``choose``): join the shortest
  queue, least outstanding tokens, power of d choices, least KV use.

Every decision is deterministic per seed: a router draws only from the routing stream it is given.
A router of one's own is a :class:`Router` subclass in one file, named
``cluster.router = "path/to/router.py:ClassName"`` (docs/cluster.md, "A router of one's own").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmqueue.errors import ConfigError


class View:
    """What the router knows of each replica at an arrival (lists indexed by replica).

    ``in_flight``: requests it sent that have not been reported finished; ``outstanding_tokens``:
    their prompt + output tokens (the request's ``max_tokens`` as a real router reads it; here the
    output length); ``kv_use``: the share of usable KV blocks in use at the replica's last reported
    batch (with memory on; else 0); ``capacity_tokens_per_s``: each replica's Theorem 2 capacity
    (static, known to the operator)."""

    __slots__ = ("in_flight", "outstanding_tokens", "kv_use", "capacity_tokens_per_s")

    def __init__(self, capacities: list[float]) -> None:
        n = len(capacities)
        self.in_flight = [0] * n
        self.outstanding_tokens = [0] * n
        self.kv_use = [0.0] * n
        self.capacity_tokens_per_s = list(capacities)


class Router:
    """A routing policy.  Subclasses set ``name``, ``static`` and ``options`` (option name ->
    (type or tuple of types, default, what is allowed)), and define ``assign`` (static) or
    ``choose`` (dynamic).  ``replicas``: the pool's size; ``rng``: the routing stream."""

    name: ClassVar[str] = "router"
    static: ClassVar[bool] = False
    needs_memory: ClassVar[bool] = False
    #: stable below the pooled capacity whatever the replicas (JSQ-type: docs/cluster.md)
    pooled_stable: ClassVar[bool] = False
    options: ClassVar[dict[str, tuple[Any, Any, str]]] = {}

    def __init__(self, replicas: int, rng: np.random.Generator, **options: Any) -> None:
        self.replicas = replicas
        self.rng = rng
        for key, value in options.items():
            setattr(self, key, value)

    def assign(self, prompt: np.ndarray, output: np.ndarray, session: np.ndarray) -> np.ndarray:
        """Static routers: the replica of every request at once (int64, one per request)."""
        raise NotImplementedError

    def choose(self, view: View, prompt: int, output: int, session: int) -> int:
        """Dynamic routers: the replica for a request arriving now."""
        raise NotImplementedError

    def candidates(self) -> list[int] | None:
        """Dynamic routers: the replicas the next ``choose`` will read (None: all of them).  Only
        these are brought up to date before it; the others' view entries may be stale, and are
        refreshed when a later decision reads them (the replicas' runs do not depend on when they
        are advanced)."""
        return None

    def shares(self, capacities: np.ndarray) -> np.ndarray | None:
        """Static routers: the long-run share of the arrivals each replica gets (None: unknown)."""
        return None


def _least(values: list, start: int) -> int:
    """The index of the smallest value; ties go to the first at or after ``start`` (cyclically),
    so that equal replicas take turns rather than the first always winning."""
    n = len(values)
    best, best_value = start, values[start]
    for k in range(1, n):
        j = start + k
        if j >= n:
            j -= n
        if values[j] < best_value:
            best, best_value = j, values[j]
    return best


class RoundRobin(Router):
    """Replica i mod N for the i-th request (vLLM production stack:
    src/vllm_router/routers/routing_logic.py, ``RoundRobinRouter.route_request``)."""

    name = "round-robin"
    static = True

    def assign(self, prompt, output, session):
        return np.arange(len(prompt), dtype=np.int64) % self.replicas

    def shares(self, capacities):
        return np.full(self.replicas, 1.0 / self.replicas)


class Random(Router):
    """Each request to replica j with probability weights[j] / Σ weights (default equal), drawn
    independently; ``weights = "capacity"`` weighs replicas by their Theorem 2 capacity."""

    name = "random"
    static = True
    options = {"weights": ((list, str), None, 'a list of one non-negative number per replica (not all 0), '
                                               'or "capacity"')}
    weights: Any = None

    def probabilities(self, capacities: np.ndarray) -> np.ndarray:
        if self.weights is None:
            return np.full(self.replicas, 1.0 / self.replicas)
        w = np.asarray(capacities if self.weights == "capacity" else self.weights, dtype=np.float64)
        return w / w.sum()

    def assign(self, prompt, output, session):
        p = self.probabilities(self.capacities)
        return np.searchsorted(np.cumsum(p)[:-1], self.rng.random(len(prompt)), side="right").astype(np.int64)

    def shares(self, capacities):
        return self.probabilities(capacities)


class _Least(Router):
    """The replica with the least of one quantity the router sees (``measure``: a View attribute);
    ties take turns, so equal replicas share the arrivals."""

    pooled_stable = True
    measure = ""

    def __init__(self, replicas, rng, **options):
        super().__init__(replicas, rng, **options)
        self._turn = 0

    def choose(self, view, prompt, output, session):
        self._turn = self._turn + 1 if self._turn + 1 < self.replicas else 0
        return _least(getattr(view, self.measure), self._turn)


class JoinShortestQueue(_Least):
    """The replica with the fewest requests in flight (AIBrix ``least-request``; the Gateway API
    inference extension's queue scorer, which llm-d's scheduler loads)."""

    name = "jsq"
    measure = "in_flight"


class LeastTokens(_Least):
    """The replica with the fewest outstanding tokens (prompt + output of its requests in flight)."""

    name = "least-tokens"
    measure = "outstanding_tokens"


class PowerOfD(Router):
    """Sample d distinct replicas uniformly, join the one with the fewest requests in flight
    (Mitzenmacher's supermarket model; ties to the first sampled)."""

    name = "power-of-d"
    options = {"d": (int, None, "an integer from 1 to the number of replicas (default 2, or 1 for one replica)")}
    d: int | None = None
    _BLOCK = 4096   # perf: the d choices of 4096 arrivals drawn in one call (a call per arrival is ~20 µs)

    def __init__(self, replicas, rng, **options):
        super().__init__(replicas, rng, **options)
        if self.d is None:
            self.d = min(2, replicas)
        if not 1 <= self.d <= replicas:
            raise ConfigError("cluster.router_options.d", self.d, f"an integer from 1 to {replicas} (the replicas)")
        self._picks: list[list[int]] = []
        self._next = 0

    def _block(self) -> np.ndarray:
        keys = self.rng.random((self._BLOCK, self.replicas))
        return np.argpartition(keys, self.d - 1, axis=1)[:, :self.d] if self.d < self.replicas \
            else np.argsort(keys, axis=1)

    def _draw(self) -> None:
        self._picks = self._block().tolist()
        self._next = 0

    def picks(self, n: int) -> np.ndarray:
        """The d choices of the next ``n`` arrivals at once (n × d), the draws :meth:`choose` would
        make one block at a time (the compiled pool loop reads them)."""
        out = [np.asarray(self._picks[self._next:self._next + n], dtype=np.int64).reshape(-1, self.d)]
        self._next += len(out[0])
        left = n - len(out[0])
        while left > 0:
            block = self._block()
            out.append(block[:left])
            if left < len(block):
                self._picks, self._next = block.tolist(), left
            else:
                self._picks, self._next = [], 0
            left -= len(out[-1])
        return np.concatenate(out).astype(np.int64, copy=False)

    def _current(self) -> list[int]:
        if self._next >= len(self._picks):
            self._draw()
        return self._picks[self._next]

    def candidates(self):
        # perf: only the d sampled replicas are advanced before a decision (docs/performance.md, "Clusters")
        return self._current()

    def choose(self, view, prompt, output, session):
        picks = self._current()
        self._next += 1
        load = view.in_flight
        best = picks[0]
        for j in picks[1:]:
            if load[j] < load[best]:
                best = j
        return best


class LeastKV(Router):
    """The replica whose KV cache is least used, as last reported (the Gateway API inference
    extension's ``KVCacheUtilizationScorer.Score``: 1 − KV-cache usage); ties: fewest in flight."""

    name = "least-kv"
    needs_memory = True

    def choose(self, view, prompt, output, session):
        use, load = view.kv_use, view.in_flight
        return min(range(self.replicas), key=lambda j: (use[j], load[j]))


def stable_hash(keys: np.ndarray) -> np.ndarray:
    """splitmix64 of integer keys (uint64): a hash that is the same on every machine and run."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SessionAffinity(Router):
    """Every request of a session to one replica, by consistent hashing of the session id: each
    replica owns ``virtual_nodes`` points of a hash ring and a session goes to the first point at or
    after its hash (vLLM production stack: ``SessionRouter.route_request``, a ``uhashring.HashRing``
    of the endpoints).  Without ``cluster.sessions`` every request is its own session."""

    name = "affinity"
    static = True
    options = {"virtual_nodes": (int, 100, "an integer of at least 1")}
    virtual_nodes: int = 100

    def __init__(self, replicas, rng, **options):
        super().__init__(replicas, rng, **options)
        if self.virtual_nodes < 1:
            raise ConfigError("cluster.router_options.virtual_nodes", self.virtual_nodes, "an integer of at least 1")
        points = []
        for j in range(replicas):
            for v in range(self.virtual_nodes):
                digest = hashlib.blake2b(f"replica-{j}-{v}".encode(), digest_size=8).digest()
                points.append((int.from_bytes(digest, "little"), j))
        points.sort()
        self._ring = np.array([p for p, _ in points], dtype=np.uint64)
        self._owner = np.array([j for _, j in points], dtype=np.int64)

    def assign(self, prompt, output, session):
        at = np.searchsorted(self._ring, stable_hash(session), side="left")
        return self._owner[np.where(at == len(self._ring), 0, at)]


ROUTERS: dict[str, type[Router]] = {r.name: r for r in (RoundRobin, Random, JoinShortestQueue, LeastTokens, PowerOfD,
                                                        LeastKV, SessionAffinity)}
HOW = "path/to/router.py:ClassName (docs/cluster.md)"


def router_class(name: Any, base_dir: Path | None = None, field: str = "cluster.router") -> type[Router]:
    """A registered router's class, or the :class:`Router` subclass a file reference names."""
    from llmqueue.schedulers import custom   # the one importer of user files (docs/policies.md)

    if isinstance(name, str) and name in ROUTERS:
        return ROUTERS[name]
    if not custom.is_reference(name):
        raise ConfigError(field, name, f"one of {', '.join(ROUTERS)}, or {HOW}")
    try:
        path, cls_name = custom.split_reference(custom.resolve(name, base_dir, field), field)
        module = custom._import(Path(path), name, field)
    except ConfigError as exc:   # the importer speaks of policy files: say router
        raise ConfigError(field, name, exc.allowed.replace(custom.HOW, HOW).replace("policy file", "router file")
                          .replace("a policy", "a router")) from None
    cls = module.__dict__.get(cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Router) and cls is not Router):
        raise ConfigError(field, name, f"a Router subclass named {cls_name!r} in {path} (llmqueue.cluster.Router)")
    if not cls.static and cls.choose is Router.choose or cls.static and cls.assign is Router.assign:
        raise ConfigError(field, name, f"a router that defines {'assign' if cls.static else 'choose'}() "
                                       f"(static = {cls.static})")
    return cls


def make_router(cls: type[Router], capacities: list[float], rng: np.random.Generator, options: Mapping[str, Any],
                field: str = "cluster.router_options") -> Router:
    """Check ``options`` against the router's declared ones (name, type) and build it."""
    replicas = len(capacities)
    given = dict(options)
    for key, value in given.items():
        if key not in cls.options:
            known = ", ".join(sorted(cls.options)) or "none"
            raise ConfigError(f"{field}.{key}", value, f"an option of router {cls.name!r} (its options: {known})")
        kind, _, allowed = cls.options[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{field}.{key}", value, allowed)
    if "weights" in given and cls is Random:
        w = given["weights"]
        if isinstance(w, str) and w != "capacity" or isinstance(w, list) and (
                len(w) != replicas or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0
                                          for x in w) or not sum(w) > 0):
            raise ConfigError(f"{field}.weights", w, f"a list of {replicas} non-negative numbers (one per replica, not "
                                                     'all 0), or "capacity"')
    full = {k: default for k, (_, default, _) in cls.options.items()}
    full.update(given)
    router = cls(replicas, rng, **full)
    router.capacities = np.asarray(capacities, dtype=np.float64)
    return router


__all__ = ["ROUTERS", "Router", "View", "make_router", "router_class", "stable_hash"]

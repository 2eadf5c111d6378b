"""Built-in cluster scenarios: TOML texts that ``llmqueue cluster simulate|compare|capacity`` accept
(docs/cluster.md).  Each is a complete, commented config with a ``[cluster]`` table."""

from __future__ import annotations

from llmqueue.config import parse_toml
from llmqueue.errors import ConfigError

_FIG1 = """
[engine]
scheduler = "sarathi"
token_budget = 512

[engine.batch_time]
# Paper Eq. 4, CodeLlama-34B on one A100-80GB: t_b = c + a * ceil(b / b0)
model = "staircase"
c_ms = 11.28
a_ms = 35.47
b0 = 128

[workload.prompt]
dist = "poisson"
mean = 129

[workload.output]
dist = "poisson"
mean = 112
"""


def _pool(router: str, load: float, options: str = "", extra: str = "") -> str:
    return f"""# Eight identical Fig. 1 engines (λ* = 13.87 requests/s each) behind the {router} router.
[cluster]
replicas = 8
router = "{router}"
{extra}
{options}
""" + _FIG1 + f"""
[workload]
arrival = "poisson"
load = {load}          # fraction of the pooled λ* (8 × 13.87 requests/s)

[run]
horizon_s = 600.0
seed = 0
"""


_HETERO = """# Two fast replicas (budget 512) and two slow ones (half the speed: the staircase's steps doubled),
# at 0.8 of the pooled capacity.  Equal-weight random routing sends the slow replicas a quarter of
# the arrivals each, 1.2 times what they serve: they overload although the pool has room.
[cluster]
router = "random"

[[cluster.replicas]]
name = "fast"
count = 2

[[cluster.replicas]]
name = "slow"
count = 2
batch_time = { model = "staircase", c_ms = 22.56, a_ms = 70.94, b0 = 128 }
""" + _FIG1 + """
[workload]
arrival = "poisson"
load = 0.8

[run]
horizon_s = 1200.0
seed = 0
"""

_AGENTS = """# An agent workload: 64 sessions whose calls stick to one replica (consistent hashing of the
# session id), on 8 Fig. 1 replicas at 0.7 of the pooled capacity.  Hashing 64 sessions onto 8
# replicas is uneven: the busiest replica gets well over 1/8 of the calls.
[cluster]
replicas = 8
router = "affinity"
sessions = 64

[cluster.router_options]
virtual_nodes = 100
""" + _FIG1 + """
[workload]
arrival = "poisson"
load = 0.7

[run]
horizon_s = 600.0
seed = 0
"""



def _pd(prefill: int, decode: int) -> str:
    return f"""# Prefill/decode disaggregation on {prefill + decode} Fig. 1 GPUs: {prefill} prefill and {decode} decode
# replicas, a KV transfer of 160 kB per prompt token over a 25 GB/s link (~0.8 ms for 129 tokens).
# λ*_PD = min(P C / m_p, D C / m_d) with C = 3342.9 tokens/s per replica; load is a fraction of
# the best split's λ*_PD on 8 GPUs (4:4, 103.7 requests/s), so the unbalanced splits overload.
[cluster]
kv_bytes_per_token = 163840.0
link_bytes_per_s = 25e9

[cluster.prefill]
replicas = {prefill}
router = "jsq"

[cluster.decode]
replicas = {decode}
router = "jsq"
""" + _FIG1 + """
[workload]
arrival = "poisson"
rate = 72.6          # 0.7 of 103.7 requests/s

[run]
horizon_s = 300.0
seed = 0
"""


_LEAST_KV = _pool("least-kv", 0.8).replace(
    "token_budget = 512\n", "token_budget = 512\nkv_blocks = 3000        # 48,000 tokens per replica (block_size 16)\n", 1)


CLUSTER_SCENARIOS: dict[str, tuple[str, str]] = {
    "pool-round-robin": ("8 identical Fig. 1 replicas, round robin, 0.9 of pooled λ*", _pool("round-robin", 0.9)),
    "pool-random": ("8 identical Fig. 1 replicas, random routing, 0.9 of pooled λ*", _pool("random", 0.9)),
    "pool-jsq": ("8 identical Fig. 1 replicas, join the shortest queue, 0.9 of pooled λ*", _pool("jsq", 0.9)),
    "pool-least-tokens": ("8 identical Fig. 1 replicas, least outstanding tokens, 0.9 of pooled λ*",
                          _pool("least-tokens", 0.9)),
    "pool-power-of-two": ("8 identical Fig. 1 replicas, power of two choices, 0.9 of pooled λ*",
                          _pool("power-of-d", 0.9, "[cluster.router_options]\nd = 2")),
    "pool-least-kv": ("8 identical Fig. 1 replicas with 3,000 KV blocks each, least KV use, 0.8 of pooled λ* "
                      "(compare with jsq: reported KV use lags the queues)", _LEAST_KV),
    "pool-heterogeneous": ("2 fast + 2 slow replicas at 0.8 of pooled capacity, equal-weight random routing "
                           "(the slow ones overload; compare with jsq)", _HETERO),
    "pool-agents": ("64 agent sessions on 8 replicas, session affinity by consistent hashing, 0.7 of pooled λ*",
                    _AGENTS),
    "pd-2-6": ("prefill/decode disaggregation, 2 prefill + 6 decode replicas, 72.6 req/s (prefill-bound: overloads)",
               _pd(2, 6)),
    "pd-4-4": ("prefill/decode disaggregation, 4 prefill + 4 decode replicas, 72.6 req/s (the best split of 8)",
               _pd(4, 4)),
    "pd-6-2": ("prefill/decode disaggregation, 6 prefill + 2 decode replicas, 72.6 req/s (decode-bound: overloads)",
               _pd(6, 2)),
}


def scenario_text(name: str) -> str:
    if name not in CLUSTER_SCENARIOS:
        raise ConfigError("scenario", name, f"a cluster config file, or one of {', '.join(CLUSTER_SCENARIOS)}")
    return CLUSTER_SCENARIOS[name][1]


def scenario_data(name: str) -> dict:
    return parse_toml(scenario_text(name), f"scenario {name}")

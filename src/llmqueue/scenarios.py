"""Built-in scenarios: TOML texts that ``llmqueue simulate`` accepts (arXiv 2504.07347 §3.1, §3.2).

Each is a complete, commented config; ``llmqueue scenarios show NAME`` prints it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property

from llmqueue.config import parse_toml
from llmqueue.errors import ConfigError

_STAIRCASE = """
[engine.batch_time]
# Paper Eq. 4, CodeLlama-34B on one A100-80GB: t_b = c + a * ceil(b / b0)
model = "staircase"
c_ms = 11.28
a_ms = 35.47
b0 = 128
"""

SINGLE_SCENARIOS: dict[str, tuple[str, str]] = {
    "fig1": (
        "Paper Fig. 1 workload: Poisson arrivals at 0.9 of λ*, Poisson prompt (mean 129) and output "
        "(mean 112) lengths, staircase batch time, token budget 512 (the default scenario)",
        """# Paper Fig. 1: the four schedulers' contrast at 0.9 of λ* = 13.87 requests/s.
[engine]
scheduler = "sarathi"
token_budget = 512
""" + _STAIRCASE + """
[workload]
arrival = "poisson"
load = 0.9          # fraction of Theorem 2's λ*; or give rate = requests/s

[workload.prompt]
dist = "poisson"
mean = 129

[workload.output]
dist = "poisson"
mean = 112

[run]
horizon_s = 1200.0  # 20 simulated minutes: long enough for a verdict at this load
seed = 0
""",
    ),
    "theorem2": (
        "Theorem 2 check: fixed (v_p, v_d) = (100, 100), budget 512, λ* = 16.71 requests/s; "
        "set workload.load to move across the boundary",
        """# Paper Theorem 2 example: λ* = (512 / t_512) / 200 = 16.71 requests/s.
[engine]
scheduler = "orca"
token_budget = 512
""" + _STAIRCASE + """
[workload]
arrival = "poisson"
load = 1.1          # 10 % above capacity: fluid backlog growth 334 tokens/s

[workload.prompt]
dist = "fixed"
value = 100

[workload.output]
dist = "fixed"
value = 100

[run]
horizon_s = 1800.0
seed = 0
""",
    ),
    "bursty": (
        "Fig. 1 lengths with bursty gamma arrivals (cv 3) at 0.8 of λ*, Sarathi, per-batch records on",
        """[engine]
scheduler = "sarathi"
token_budget = 512
""" + _STAIRCASE + """
[workload]
arrival = "gamma"
cv = 3.0
load = 0.8

[workload.prompt]
dist = "lognormal"
mean = 129
sigma = 0.8

[workload.output]
dist = "geometric"
mean = 112

[run]
horizon_s = 1200.0
seed = 0
record_batches = true
""",
    ),
    "point-c": (
        ("Paper §6.2 / Fig. 14: load exactly at vertex C of the cap's region (cap 100, staircase): one "
         "request every 467.5 ms, 290 prompt + 990 output tokens; Sarathi-128 stays bounded, "
         "Sarathi-1024 diverges (`llmqueue region point-c`)"),
        """# Paper §6.2 (Fig. 14): with at most 100 requests per batch the stability region is 2-D
# (Theorem 10). Its vertex C is batches of 29 prefill + 99 decode tokens every 46.75 ms,
# i.e. (620.3, 2117.6) tokens/s; this workload offers exactly that.
[engine]
scheduler = "sarathi"
token_budget = 128        # try 1024 (diverges), or scheduler = "maxweight" with 1024
max_batch_requests = 100
""" + _STAIRCASE + """
[workload]
arrival = "deterministic"
rate = 2.1390374331550803 # one request every 467.5 ms (1 / 0.4675 s)

[workload.prompt]
dist = "fixed"
value = 290

[workload.output]
dist = "fixed"
value = 990

[run]
horizon_s = 1800.0
seed = 0
""",
    ),
}



class _Scenarios(Mapping[str, tuple[str, str]]):
    """Name -> (description, TOML text): the single-engine scenarios above, then the network ones.

    perf: the network texts live in :mod:`llmqueue.network.scenarios`, and importing it imports the
    network package (50–75 ms; 0.2 s while it imported scipy.sparse at the top); a single-engine
    name is answered without it, so ``llmqueue capacity fig1`` starts fast (docs/performance.md).
    """

    @cached_property
    def _all(self) -> dict[str, tuple[str, str]]:
        from llmqueue.network.scenarios import NETWORK_SCENARIOS  # texts only (arXiv 2504.07347 §5)

        return {**SINGLE_SCENARIOS, **NETWORK_SCENARIOS}

    def __getitem__(self, name: str) -> tuple[str, str]:
        return SINGLE_SCENARIOS[name] if name in SINGLE_SCENARIOS else self._all[name]

    def __contains__(self, name: object) -> bool:
        return name in SINGLE_SCENARIOS or name in self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)


SCENARIOS: Mapping[str, tuple[str, str]] = _Scenarios()

DEFAULT_SCENARIO = "fig1"


def scenario_text(name: str) -> str:
    if name not in SCENARIOS:
        raise ConfigError("scenario", name, f"one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name][1]


def scenario_data(name: str) -> dict:
    return parse_toml(scenario_text(name), f"scenario {name}")


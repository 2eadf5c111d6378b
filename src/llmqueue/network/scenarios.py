"""Built-in network scenarios (paper §5): TOML texts, registered in :mod:`llmqueue.scenarios`.

``llmqueue scenarios show NAME`` prints one; ``llmqueue simulate NAME`` runs it.
"""

from __future__ import annotations

_CONSTANT_1S = 'batch_time = { model = "constant", duration_ms = 1000.0 }   # t_b = 1 (paper §5.4)'
_STAIRCASE = 'batch_time = { model = "staircase", c_ms = 11.28, a_ms = 35.47, b0 = 128 }   # paper Eq. 4'


def _rybko_stolyar(first: str, second: str, comment: str) -> str:
    return f"""# Paper §5.4: the Rybko–Stolyar network of two LLM engines.
# Type A: a short hop at S1 then a long hop at S2; type B: the mirror.  Each engine is
# offered 608 λ tokens/s against 768: ρ = 0.9 at λ = 1.1368 jobs/s per type.
# {comment}
[network]
load = 0.9            # class rates below are relative: scaled so the busiest engine has ρ = 0.9

[[engines]]
name = "S1"
scheduler = "sarathi"
token_budget = 768
{_CONSTANT_1S}
policy = "priority"   # fcfs | priority | max-pressure
class_priority = ["{first}", "{second}"]

[[engines]]
name = "S2"
scheduler = "sarathi"
token_budget = 768
{_CONSTANT_1S}
policy = "priority"
class_priority = ["{second}", "{first}"]

[[classes]]
name = "A"
arrival = "poisson"
rate = 1.0

[[classes.hops]]
id = "short"
engine = "S1"
prompt = {{ dist = "poisson", mean = 32 }}
output = {{ dist = "poisson", mean = 32 }}

[[classes.hops]]
id = "long"
engine = "S2"
prompt = {{ dist = "poisson", mean = 512 }}
output = {{ dist = "poisson", mean = 32 }}

[[classes]]
name = "B"
arrival = "poisson"
rate = 1.0

[[classes.hops]]
id = "short"
engine = "S2"
prompt = {{ dist = "poisson", mean = 32 }}
output = {{ dist = "poisson", mean = 32 }}

[[classes.hops]]
id = "long"
engine = "S1"
prompt = {{ dist = "poisson", mean = 512 }}
output = {{ dist = "poisson", mean = 32 }}

[run]
horizon_s = 6000.0    # batch time 1 s: 6000 batches per engine
seed = 0
"""


_AGENT_LOOP = f"""# Agent loop (paper §5): think on the LLM, call a tool (a delay station), repeat with
# probability 0.7 (at most 10 rounds), then answer.  Each step's prompt grows with the previous output.
[network]
load = 0.9

[[engines]]
name = "llm"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}
policy = "fcfs"       # try "max-pressure", or "priority" with class_priority = ["agent", "chat"]

[[delays]]
name = "tool"
dist = "exponential"  # fixed (value_s) | exponential (mean_s) | uniform (low_s, high_s) | lognormal (mean_s, sigma)
mean_s = 2.0

[[classes]]
name = "agent"
rate = 1.0
add_previous_output = true

[[classes.hops]]
id = "think"
engine = "llm"
prompt = {{ dist = "poisson", mean = 300 }}
output = {{ dist = "poisson", mean = 40 }}

[[classes.hops]]
id = "tool"
delay = "tool"
loop = "think"        # another round ...
continue_p = 0.7      # ... with probability 0.7 (geometric), ...
max_rounds = 10       # ... at most 10 rounds; then on to "answer"

[[classes.hops]]
id = "answer"
engine = "llm"
prompt = {{ dist = "poisson", mean = 50 }}
output = {{ dist = "poisson", mean = 150 }}

[[classes]]
name = "chat"
rate = 2.0

[[classes.hops]]
engine = "llm"
prompt = {{ dist = "poisson", mean = 129 }}
output = {{ dist = "poisson", mean = 112 }}

[run]
horizon_s = 3600.0    # an hour: a warm-up and four relaxation times (about 150 s each) for a verdict
seed = 0
"""

NETWORK_SCENARIOS: dict[str, tuple[str, str]] = {
    "rybko-stolyar": (
        ("Paper §5.4 network of 2 engines at ρ = 0.9, strict priority to the class leaving each engine: "
         "diverges with growing oscillations"),
        _rybko_stolyar("B", "A", "Priority to the class that leaves through each engine (S1: B's long hop, S2: A's): "
                       "diverges.\n# Reverse the lists (or see rybko-stolyar-reverse), or set policy = "
                       "\"fcfs\" / \"max-pressure\" (and drop class_priority): bounded."),
    ),
    "rybko-stolyar-reverse": (
        "The same network with the reverse priority (the class entering each engine first): bounded",
        _rybko_stolyar("A", "B", "Priority to the class that enters the network at each engine: bounded."),
    ),
    "fork-join": (
        ("A planner on engine P forks 3 workers on engine W, joined by a summariser on P; Sarathi, "
         "staircase batch time, at 0.9 of the computed capacity"),
        f"""# Fork-join agent (paper §5): plan on P -> 3 parallel workers on W -> summarise on P.
# Prompts grow with what earlier hops produced (add_previous_output).
[network]
load = 0.9            # fraction of the largest stable scaling (the bottleneck's ρ)

[[engines]]
name = "P"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[engines]]
name = "W"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[classes]]
name = "task"
rate = 1.0            # relative (scaled by [network] load)
add_previous_output = true

[[classes.hops]]
id = "plan"
engine = "P"
prompt = {{ dist = "poisson", mean = 200 }}
output = {{ dist = "poisson", mean = 60 }}
add_previous_output = false
fork = ["work", "work", "work"]     # three parallel workers, each given the plan

[[classes.hops]]
id = "work"
engine = "W"
prompt = {{ dist = "poisson", mean = 100 }}   # plus the plan's output
output = {{ dist = "poisson", mean = 120 }}
next = "summarise"

[[classes.hops]]
id = "summarise"
engine = "P"
join = true                          # waits for all three workers
prompt = {{ dist = "poisson", mean = 50 }}    # plus the three workers' outputs
output = {{ dist = "poisson", mean = 100 }}

[run]
horizon_s = 3600.0    # an hour: a warm-up and four relaxation times (about 200 s each) for a verdict
seed = 0
""",
    ),
    "dag": (
        ("A DAG over four engines: plan, then search and code in parallel, merged on a fourth engine; "
         "acyclic between engines, so the traffic equations predict stability below capacity"),
        f"""# DAG agent (paper §5): plan -> (search || code) -> merge, one engine per step.
[network]
load = 0.9

[[engines]]
name = "plan"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[engines]]
name = "search"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[engines]]
name = "code"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[engines]]
name = "merge"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[classes]]
name = "job"
rate = 1.0
add_previous_output = true

[[classes.hops]]
id = "plan"
engine = "plan"
prompt = {{ dist = "poisson", mean = 150 }}
output = {{ dist = "poisson", mean = 50 }}
fork = ["search", "code"]

[[classes.hops]]
id = "search"
engine = "search"
prompt = {{ dist = "poisson", mean = 300 }}
output = {{ dist = "poisson", mean = 100 }}
next = "merge"

[[classes.hops]]
id = "code"
engine = "code"
prompt = {{ dist = "poisson", mean = 100 }}
output = {{ dist = "geometric", mean = 200 }}
next = "merge"

[[classes.hops]]
id = "merge"
engine = "merge"
join = true
prompt = {{ dist = "poisson", mean = 50 }}
output = {{ dist = "poisson", mean = 80 }}

[run]
horizon_s = 3600.0
seed = 0
""",
    ),
    "agent-loop": (
        ("ReAct-style agent: an LLM step and a tool call repeated a geometric number of rounds "
         "(mean 3.2, at most 10), then an answer; plus plain chat requests on the same engine"),
        _AGENT_LOOP,
    ),
    "agent-pool": (
        ("The agent loop on a pool: the LLM node is 4 replicas of the Fig. 1 engine behind a router with "
         "session affinity (a job's hops stay on one replica); try --set engines.llm.router=jsq"),
        f"""# Agent loop on a pool of replicas (paper §5 network; docs/network.md, "Pools as engines"):
# think on the LLM, call a tool, repeat with probability 0.7 (at most 10 rounds), then answer;
# plus chat requests.  The LLM node is 4 identical replicas behind a router.  With session
# affinity (consistent hashing of the job id, as vLLM's production stack's session router) every
# hop of a job runs on one replica; the hash ring gives the replicas unequal shares of the jobs
# (28.2 %, 25.0 %, 23.8 %, 23.0 %), so at 0.95 of the pooled capacity replica r0 is above its own
# capacity (ρ = 1.015: unstable), while jsq keeps every replica below it.
[network]
load = 0.95           # of the pooled capacity: 4 × 3342.9 tokens/s

[[engines]]
name = "llm"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}
replicas = 4          # or a list of tables overriding this engine's keys (heterogeneous pools)
router = "affinity"   # round-robin | random | jsq | least-tokens | power-of-d | least-kv | affinity | FILE.py:Class
# router_options = {{ virtual_nodes = 100 }}   # affinity's points per replica on the hash ring (default 100)
report_delay_s = 0.0  # the age of the finishes the dynamic routers see
""" + _AGENT_LOOP[_AGENT_LOOP.index("[[delays]]"):],   # the same tool delay, classes and run
    ),
    "tandem": (
        ("A chain of three engines (Orca, Sarathi, Sarathi; budgets 512, 1024, 512), each prompt growing "
         "with the previous output, at 0.9 of the computed capacity"),
        f"""# Tandem chain (paper §5): draft on E1 -> refine on E2 -> check on E3.
[network]
load = 0.9

[[engines]]
name = "E1"
scheduler = "orca"
token_budget = 512
{_STAIRCASE}

[[engines]]
name = "E2"
scheduler = "sarathi"
token_budget = 1024
{_STAIRCASE}

[[engines]]
name = "E3"
scheduler = "sarathi"
token_budget = 512
{_STAIRCASE}

[[classes]]
name = "doc"
rate = 1.0
add_previous_output = true

[[classes.hops]]
id = "draft"
engine = "E1"
prompt = {{ dist = "poisson", mean = 129 }}
output = {{ dist = "poisson", mean = 112 }}

[[classes.hops]]
id = "refine"
engine = "E2"
prompt = {{ dist = "poisson", mean = 64 }}
output = {{ dist = "poisson", mean = 200 }}

[[classes.hops]]
id = "check"
engine = "E3"
prompt = {{ dist = "poisson", mean = 32 }}
output = {{ dist = "poisson", mean = 16 }}

[run]
horizon_s = 3600.0    # an hour: near 0.9 of capacity a verdict needs more than 20 minutes
seed = 0
""",
    ),
}


"""Routes: what a job does after each hop, the route's static checks, and job sampling (arXiv 2504.07347 §5).

After a hop a job (or one branch of it) moves on by the hop's rules, applied in this order:

1. ``loop``: go back to the loop's first hop for another round while fewer than ``rounds``
   rounds are done, or with probability ``continue_p`` (at most ``max_rounds`` rounds): a
   bounded or a geometric number of rounds.  Leaving the loop resets its round counter.
2. ``fork``: spawn one parallel branch per listed hop; the branches end at a ``join`` hop,
   which runs once, when the last branch arrives (the innermost open fork is joined).
3. ``next`` (a hop id or ``exit``; a list with ``p`` for a probabilistic branch; default the
   hop listed after it, or ``exit`` after the last one).

One function, :meth:`Route.outcomes`, gives the possible moves with their probabilities; the
checks, the traffic equations (:mod:`llmqueue.network.analysis`) and the sampling of a job all
use it.  The state of a branch is its hop and the round counters of the loops it is inside
(only loops with a bound keep a counter), so a route is a finite Markov chain on those states
plus forks; :meth:`Route.states` enumerates it and checks, before any simulation, that every
join closes a fork, every fork is joined (its branches all at the same hop, none leaving
before), each hop is reached with one fork nesting, and every state can reach ``exit`` (no
cycle without an exit probability).

A job's route is sampled whole when it arrives (:meth:`Route.sample`): branch choices, round
counts, token lengths and delay times come from the class's own random streams in job order,
so every policy sees the same jobs (common random numbers).  A hop with
``add_previous_output`` adds the previous LLM hop's output length to its prompt (after a
join: the sum of the branches' last outputs; delay hops pass it on).  A hop with
``add_previous_context`` starts its prompt with the job's *context*: the previous LLM visit's
whole sequence, its prompt + output (after a join: the branches' contexts one after another, so
their sum; delay hops pass it on), as an agent that re-sends its conversation does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from llmqueue.errors import ConfigError, InternalError
from llmqueue.network.model import EXIT, ClassSpec, Hop, Network

MAX_STATES = 200_000
Counters = tuple[tuple[int, int], ...]   # (loop hop index, rounds done), sorted


@dataclass(frozen=True, slots=True)
class Outcome:
    prob: float
    counters: Counters
    targets: tuple[int, ...]     # one target, or the branches of a fork
    fork: bool
    loop: bool = False           # another round of a loop (a revisit, never a join arrival)


class Visit:
    """One pre-sampled hop of a job: tokens for an engine hop, seconds for a delay hop."""

    __slots__ = ("delay_duration", "hop", "num_output_tokens", "num_prompt_tokens")

    def __init__(self, hop: Hop, prompt: int, output: int, delay: float) -> None:
        self.hop = hop
        self.num_prompt_tokens = prompt
        self.num_output_tokens = output
        self.delay_duration = delay


class Segment:
    """Visits done one after another, ending at exit/the enclosing join, or in a fork."""

    __slots__ = ("branches", "join", "visits")

    def __init__(self) -> None:
        self.visits: list[Visit] = []
        self.branches: list[Segment] = []    # non-empty: the segment ends in a fork ...
        self.join: Segment | None = None     # ... continued by this segment (its first visit is the join hop)


class _Stream:
    """Draws from one law in chunks (perf: one numpy call per 1024 draws instead of one per draw)."""

    __slots__ = ("buf", "draw", "i", "rng")

    def __init__(self, draw, rng: np.random.Generator) -> None:
        self.draw, self.rng, self.buf, self.i = draw, rng, [], 0

    def __call__(self):
        if self.i == len(self.buf):
            self.buf, self.i = self.draw(self.rng, 1024).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]


def _set(counters: Counters, hop: int, k: int) -> Counters:
    return tuple(sorted({**dict(counters), hop: k}.items()))


def _drop(counters: Counters, hop: int) -> Counters:
    return tuple(c for c in counters if c[0] != hop)


class Route:
    """The compiled route of one class; checks its structure on construction."""

    def __init__(self, cls: ClassSpec, network: Network) -> None:
        self.cls = cls
        self.hops = cls.hops
        self.field = cls.field
        self.network = network
        self.stack: dict[int, tuple[int, ...]] = {}      # hop -> the forks open there (outermost first)
        self.join_of: dict[int, int] = {}                 # fork hop -> its join hop
        self._states: list[tuple[int, Counters]] | None = None
        self.edges: list[tuple[int, int, float, float]] = []   # (from, to, visit weight, carry weight)
        # perf: the moves from a state depend on the state only; computing them once per state instead
        # of once per visit halves the time to sample a network's jobs.
        self._moves: dict[tuple[int, Counters], list[Outcome]] = {}
        self._enumerate()

    # -- moves -----------------------------------------------------------------------------

    def outcomes(self, h: int, counters: Counters) -> list[Outcome]:
        """Every move after hop ``h`` with round counters ``counters``, with its probability."""
        hop = self.hops[h]
        out = []
        leave, rest = 1.0, counters
        if hop.loop is not None:
            done = dict(counters).get(h, 0) + 1
            bounded = hop.rounds is not None or hop.max_rounds is not None
            if hop.rounds is not None:
                back = 1.0 if done < hop.rounds else 0.0
            elif hop.max_rounds is not None and done >= hop.max_rounds:
                back = 0.0
            else:
                back = hop.continue_p
            if back > 0:
                out.append(Outcome(back, _set(counters, h, done) if bounded else counters, (hop.loop,), False, True))
            leave, rest = 1.0 - back, _drop(counters, h)
        if leave > 0:
            if hop.fork:
                out.append(Outcome(leave, rest, hop.fork, True))
            else:
                out.extend(Outcome(leave * p, rest, (t,), False) for t, p in zip(hop.targets, hop.probs) if p > 0)
        return out

    def _outside(self, counters: Counters, fork: int) -> Counters:
        """The counters of loops outside ``fork`` (a join restores the fork's counters)."""
        return tuple(c for c in counters if fork not in self.stack.get(c[0], ()))

    # -- structure ---------------------------------------------------------------------------

    def _hop_field(self, h: int, key: str) -> str:
        return f"{self.field}.hops[{h}].{key}"

    def _place(self, h: int, stack: tuple[int, ...], via: int, key: str) -> None:
        known = self.stack.setdefault(h, stack)
        if known != stack:
            def show(s):
                return "no open fork" if not s else "inside the fork(s) at " + ", ".join(self.hops[f].id for f in s)
            raise ConfigError(self._hop_field(via, key), self.hops[h].id,
                              f"a hop reached with one fork nesting: '{self.hops[h].id}' is reached both with "
                              f"{show(known)} and with {show(stack)}")

    def _enumerate(self) -> None:
        """Walk the state graph from the first hop: check the structure, record the edges."""
        index: dict[tuple[int, Counters], int] = {}
        states: list[tuple[int, Counters]] = []
        terminal: set[int] = set()

        def state(h: int, c: Counters) -> int:
            key = (h, c)
            if key not in index:
                if len(states) >= MAX_STATES:
                    self._too_many_states()
                index[key] = len(states)
                states.append(key)
                queue.append(key)
            return index[key]

        queue: deque[tuple[int, Counters]] = deque()
        if self.hops[0].join:
            raise ConfigError(self._hop_field(0, "join"), True, "false on the first hop (a join without a fork)")
        self.stack[0] = ()
        state(0, ())
        while queue:
            h, c = queue.popleft()
            i = index[(h, c)]
            stack = self.stack[h]
            for o in self.outcomes(h, c):
                if o.fork:
                    for t in o.targets:
                        if self.hops[t].join:
                            raise ConfigError(self._hop_field(h, "fork"), self.hops[t].id,
                                              "hops that start a branch (a join hop cannot start one)")
                        self._place(t, (*stack, h), h, "fork")
                        self.edges.append((i, state(t, o.counters), o.prob, o.prob))
                    continue
                t = o.targets[0]
                key = "loop" if o.loop else "next"
                if t == EXIT:
                    if stack:
                        raise ConfigError(self._hop_field(h, "next"), "exit",
                                          f"a route to the join of the fork at '{self.hops[stack[-1]].id}' "
                                          "(a branch may not leave before it is joined)")
                    terminal.add(i)
                    continue
                if self.hops[t].join and not o.loop:
                    if not stack:
                        raise ConfigError(self._hop_field(t, "join"), True,
                                          f"false: hop '{self.hops[t].id}' is reached with no open fork "
                                          "(a join without a fork)")
                    fork = stack[-1]
                    if self.join_of.setdefault(fork, t) != t:
                        raise ConfigError(self._hop_field(h, key), self.hops[t].id,
                                          f"the join of the fork at '{self.hops[fork].id}', "
                                          f"'{self.hops[self.join_of[fork]].id}' (all branches join at one hop)")
                    self._place(t, stack[:-1], h, key)
                    n = len(self.hops[fork].fork)
                    self.edges.append((i, state(t, self._outside(o.counters, fork)), o.prob / n, o.prob))
                    continue
                self._place(t, stack, h, key)
                self.edges.append((i, state(t, o.counters), o.prob, o.prob))
        self._states = states
        unreached = [h for h in self.hops if h.index not in self.stack]
        if unreached:
            h = unreached[0]
            raise ConfigError(f"{self.field}.hops[{h.index}].id", h.id,
                              f"a hop reached from the first hop: '{h.id}' is never reached "
                              "(check the next/fork/loop targets)")
        # Every state must be able to reach exit: otherwise a cycle has no exit probability.
        back: dict[int, list[int]] = {}
        for a, b, _, _ in self.edges:
            back.setdefault(b, []).append(a)
        ok, todo = set(terminal), list(terminal)
        while todo:
            for a in back.get(todo.pop(), ()):
                if a not in ok:
                    ok.add(a)
                    todo.append(a)
        stuck = [s for s in range(len(states)) if s not in ok]
        if stuck:
            # name the hop that closes the cycle: the source of a back edge between stuck states
            back_edges = [a for a, b, _, _ in self.edges if a not in ok and b not in ok and b <= a]
            hop = self.hops[states[(back_edges or stuck)[0]][0]]
            names = [("exit" if t == EXIT else self.hops[t].id) for t in (hop.targets or hop.fork)]
            key = "next" if hop.targets else "fork"
            raise ConfigError(self._hop_field(hop.index, key), names[0] if len(names) == 1 else names,
                              f"a way out: after hop '{hop.id}' the job can never leave (a cycle without an exit "
                              "probability; give next a list with p that reaches exit, or a loop with rounds "
                              "or continue_p < 1)")

    @property
    def states(self) -> list[tuple[int, Counters]]:
        return self._states

    # -- sampling ----------------------------------------------------------------------------

    def streams(self, seed_seq: np.random.SeedSequence) -> dict:
        """Independent random streams: route choices, and per hop its prompt, output or delay law."""
        children = seed_seq.spawn(1 + 3 * len(self.hops))
        rng = [np.random.default_rng(s) for s in children]
        s = {"u": _Stream(lambda g, n: g.random(n), rng[0])}
        for h in self.hops:
            base = 1 + 3 * h.index
            if h.is_engine:
                s[("p", h.index)] = _Stream(h.prompt.sample, rng[base])
                s[("o", h.index)] = _Stream(h.output.sample, rng[base + 1])
            else:
                law = self.network.delays[h.delay].time
                s[("d", h.index)] = _Stream(law.sample, rng[base + 2])
        return s

    def sample(self, streams: dict) -> tuple[Segment, int]:
        """One job's whole route: its root segment and its total tokens."""
        total = [0]
        seg, _, _, end = self._walk(0, (), 0, 0, streams, total)
        if end != EXIT:
            raise InternalError(f"{self.field}: a sampled route ended at hop {end}, not at exit")
        return seg, total[0]

    def _too_many_states(self) -> None:
        raise ConfigError(f"{self.field}.hops", len(self.hops),
                          f"a route with at most {MAX_STATES} (hop, round-counter) states; lower rounds/max_rounds")

    def sampling_table(self) -> tuple[np.ndarray, ...]:
        """:meth:`sample`'s walk as a table, for the compiled sampler (``_fastcore.sample_jobs``).

        States are the (hop, round counters) the walk visits, numbered from (first hop, none);
        the moves after state i are rows ``ostart[i]:ostart[i+1]`` in the order :meth:`outcomes`
        gives them: probability, kind (0: to state ``a``; 1: fork into the ``b`` states
        ``branches[a:a+b]``, joined at state ``c``; 2: the walk ends, at exit or a join).
        """
        index: dict[tuple[int, Counters], int] = {}
        hops: list[int] = []
        rows: list[list[tuple[float, int, int, int, int]]] = []
        branches: list[int] = []
        todo: list[tuple[int, Counters]] = []

        def state(h: int, c: Counters) -> int:
            key = (h, c)
            if key not in index:
                if len(hops) >= MAX_STATES:
                    self._too_many_states()
                index[key] = len(hops)
                hops.append(h)
                rows.append([])
                todo.append(key)
            return index[key]

        state(0, ())
        while todo:
            h, c = todo.pop()
            out = rows[index[(h, c)]]
            for o in self.outcomes(h, c):
                if o.fork:
                    kids = [state(t, o.counters) for t in o.targets]
                    out.append((o.prob, 1, len(branches), len(kids), state(self.join_of[h], o.counters)))
                    branches.extend(kids)
                    continue
                t = o.targets[0]
                if t == EXIT or (self.hops[t].join and not o.loop):
                    out.append((o.prob, 2, -1, 0, -1))
                else:
                    out.append((o.prob, 0, state(t, o.counters), 0, -1))
        flat = [r for out in rows for r in out]
        i64 = np.int64
        return (np.asarray(hops, i64), np.cumsum([0, *map(len, rows)]).astype(i64),
                np.asarray([r[0] for r in flat], np.float64), np.asarray([r[1] for r in flat], i64),
                np.asarray([r[2] for r in flat], i64), np.asarray([r[3] for r in flat], i64),
                np.asarray([r[4] for r in flat], i64), np.asarray(branches, i64))

    def _choose(self, outcomes: list[Outcome], u: float) -> Outcome:
        acc = 0.0
        for o in outcomes:
            acc += o.prob
            if u < acc:
                return o
        return outcomes[-1]

    def _walk(self, h: int, counters: Counters, carry: int, context: int, s: dict,
              total: list[int]) -> tuple[Segment, int, int, int]:
        """Visits from hop ``h`` until exit or the enclosing join; returns (segment, carry, context, end).

        ``carry`` is the previous LLM visit's output (``add_previous_output``), ``context`` its whole
        sequence, prompt + output (``add_previous_context``); after a join both are the sums over the
        branches, in the fork's order."""
        seg = Segment()
        hops = self.hops
        while True:
            hop = hops[h]
            if hop.engine is not None:
                prompt = s[("p", h)]() + (carry if hop.grow else 0) + (context if hop.context else 0)
                output = s[("o", h)]()
                seg.visits.append(Visit(hop, prompt, output, 0.0))
                total[0] += prompt + output
                carry = output
                context = prompt + output
            else:
                seg.visits.append(Visit(hop, 0, 0, s[("d", h)]()))
            outcomes = self._moves.get((h, counters))
            if outcomes is None:
                outcomes = self._moves[(h, counters)] = self.outcomes(h, counters)
            o = outcomes[0] if len(outcomes) == 1 else self._choose(outcomes, s["u"]())
            if o.fork:
                joined, joined_context, end = 0, 0, EXIT
                for t in o.targets:
                    branch, branch_carry, branch_context, end = self._walk(t, o.counters, carry, context, s, total)
                    seg.branches.append(branch)
                    joined += branch_carry
                    joined_context += branch_context
                seg.join, carry, context, after = self._walk(end, o.counters, joined, joined_context, s, total)
                return seg, carry, context, after
            t = o.targets[0]
            if t == EXIT or (hops[t].join and not o.loop):
                return seg, carry, context, t
            h, counters = t, o.counters

"""The paper's worked example (arXiv 2504.07347 §4, Fig. 8) and other hand-traced runs.

Fig. 8: A, B, C are decoding with 2, 4, 3 decode tokens left; D and E (1 prefill + 1
decode token each) arrive during the first batch.  Batches last one second, D and E
arrive at 0.5 s, so they are admitted at the first batch boundary (t = 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compositions, drive, make_engine

from llmqueue.core import fastcore
from llmqueue.core.simulator import simulate
from llmqueue.model.request import Request
from llmqueue.model.workload import Requests
from llmqueue.worked_example import FIG8_PUBLISHED, parse_sequence, run_fig8

ABC = "ABCDE"


_batches = parse_sequence


# Violations (Eqs. 8–9): a batch violates when its tokens != min(b_max, demand), with
# demand = Σ p_i + #{decoding} over the requests in the engine at the batch's start.
FIG8 = {
    # b_max = 4.  Batch 2: demand = 2 (Dp, Ep) + 3 (A, B, C) = 5, bound min(4, 5) = 4, it
    # holds 2 -> violation.  Batch 3: demand 5 decoders, holds 4 = bound.  Batches 1, 4, 5
    # hold their whole demand (3, 3, 1).  Total 1.
    "vllm": (4, "[Ad Bd Cd] [Dp Ep] [Ad Bd Cd Dd] [Bd Cd Ed] [Bd]", 1),
    # b_max = 5.  Demands 3, 5, 4, 1: every batch holds its whole demand.  Total 0.
    "orca": (5, "[Ad Bd Cd] [Ad Bd Cd Dp Ep] [Bd Cd Dd Ed] [Bd]", 0),
    # b_max = 4.  Batch 2: demand 2 + 3 = 5, bound 4, holds 3.  Batch 3: demand 2 + 2 (B, C)
    # = 4, holds 2.  Batch 4: demand 2 + 1 (B) = 3, holds 1.  Batches 1, 5, 6 hold their
    # whole demand (3, 2, 2).  Total 3.
    "fastertransformer": (4, "[Ad Bd Cd] [Ad Bd Cd] [Bd Cd] [Bd] [Dp Ep] [Dd Ed]", 3),
    # b_max = 4.  Batch 2: demand 5, holds 4 = bound; batch 3: demand 3 + 1 (Ep) = 4, holds
    # 4; batches 1, 4 hold their whole demand (3, 2).  Total 0.
    "sarathi": (4, "[Ad Bd Cd] [Ad Bd Cd Dp] [Bd Cd Dd Ep] [Bd Ed]", 0),
}


def test_reproduce_uses_the_same_published_sequences():
    assert {name: (budget, text) for name, (budget, text, _) in FIG8.items()} == FIG8_PUBLISHED


@pytest.mark.parametrize("name", list(FIG8))
def test_fig8_batches_and_violations(name):
    budget, expected, violations = FIG8[name]
    engine, steps = run_fig8(name, budget)
    assert compositions(steps, ABC) == _batches(expected)
    assert len(steps) == len(_batches(expected))
    assert engine.violations == violations
    assert sum(step.bound != step.plan.num_tokens for step in steps) == violations
    assert not engine.has_work and not engine.state.decoding and not engine.state.prefilling


def test_fig8_vllm_v1_matches_sarathi():
    """vLLM v1, b_max = 4, max_num_seqs 256 (never binding here).

    Batch 1: only A, B, C are running: [Ad Bd Cd].  Batch 2: running A, B, C take 3
    tokens, then waiting D is admitted with the 1 token left; E finds the batch full.
    Batch 3: running B, C, D (A is done) take 3, waiting E gets the last token.
    Batch 4: B (4th token) and E.  The same batches as Sarathi-Serve, no violation.
    """
    engine, steps = run_fig8("vllm-v1", 4)
    assert compositions(steps, ABC) == _batches(FIG8["sarathi"][1])
    assert engine.violations == 0


def test_fig8_vllm_v1_max_num_seqs():
    """max_num_seqs = 3 keeps D and E waiting while three requests run.

    Batch 2: 3 running (A, B, C) -> no admission: [Ad Bd Cd], demand 5, bound 4: violation.
    Batch 3: A is done, 2 running; D admitted (3 running), E must wait: [Bd Cd Dp],
    demand 2 + 2 = 4, holds 3: violation.  Batch 4: C is done; B, D running, E admitted:
    [Bd Dd Ep].  Batch 5: [Ed].  Total 2 violations.
    """
    engine, steps = run_fig8("vllm-v1", 4, max_num_seqs=3)
    assert compositions(steps, ABC) == _batches("[Ad Bd Cd] [Ad Bd Cd] [Bd Cd Dp] [Bd Dd Ep] [Ed]")
    assert engine.violations == 2


def test_vllm_v1_long_prefill_threshold():
    """b_max = 4, chunks capped at 2: A (prompt 10, 1 output) and B (prompt 1, 3 outputs).

    Batch 1: both waiting, A gets 2 (the cap), B its 1.  Batches 2-4: A (running, rid 0)
    gets 2 more each time and B its decode tokens; the spare token stays unused, so each
    of batches 1-4 is a violation (bound 4).  Batch 5: A's last 2.  Batch 6: A's decode.
    """
    engine = make_engine("vllm-v1", 4, long_prefill_token_threshold=2)
    steps = drive(engine, [Request(0, 0.0, 10, 1), Request(1, 0.0, 1, 3)])
    assert compositions(steps, ABC) == _batches(
        "[Ap2 Bp] [Ap2 Bd] [Ap2 Bd] [Ap2 Bd] [Ap2] [Ad]")
    assert engine.violations == 4


def test_vllm_v1_threshold_spares_a_lone_request():
    """b_max = 8, chunks capped at 2 (vLLM >= 0.32, its PR #57951): A (prompt 10, 1 output) alone
    gets the whole budget; once B (prompt 3, 2 outputs) has arrived the cap holds again.

    Batch 1 (t = 0): A alone: 8.  B arrives during it.  Batch 2: A (running) 2, B 2 (both capped).
    Batch 3: A's decode, B's last 1.  Batches 4, 5: B's decodes.  With long_prefill_threshold_when_alone
    (the rule before) A gets 2 in batch 1 as well, and needs three more chunks.
    """
    def requests():
        return [Request(0, 0.0, 10, 1), Request(1, 0.5, 3, 2)]

    steps = drive(make_engine("vllm-v1", 8, long_prefill_token_threshold=2), requests())
    assert compositions(steps, ABC) == _batches("[Ap8] [Ap2 Bp2] [Ad Bp] [Bd] [Bd]")
    old = drive(make_engine("vllm-v1", 8, long_prefill_token_threshold=2, long_prefill_threshold_when_alone=True),
                requests())
    assert compositions(old, ABC) == _batches("[Ap2] [Ap2 Bp2] [Ap2 Bp] [Ap2 Bd] [Ap2 Bd] [Ad]")
    stream = Requests(np.array([0.0, 0.5]), np.array([10, 3]), np.array([1, 2]))
    for alone in (False, True):   # the compiled core gives the same runs (tests/test_core.py at random)
        runs = [simulate(make_engine("vllm-v1", 8, long_prefill_token_threshold=2,
                                     long_prefill_threshold_when_alone=alone), stream, drain=True, method=m)
                for m in ("reference", "fast")]
        assert runs[1].meta["core"] == "compiled" or fastcore.unavailable()
        assert runs[0].batch_tokens.tolist() == runs[1].batch_tokens.tolist() == [
            [8, 4, 2, 1, 1], [2, 4, 3, 3, 3, 1]][alone]


def test_staircase_timeline_sarathi():
    """Exact batch times with the paper's staircase t_b = 11.28 + 35.47·⌈b/128⌉ ms, b_max = 256.

    A (t=0, prompt 200, 2 outputs), B (t=0.05, prompt 100, 1 output), C (t=1, prompt 300,
    no output).  B arrives during batch 1 and waits for its end.
      1  [0, 0.08222]        Ap200           200 tokens -> 11.28 + 2·35.47 = 82.22 ms
      2  [0.08222, 0.12897]  Ad Bp100        101 tokens -> 11.28 + 35.47   = 46.75 ms
      3  [0.12897, 0.17572]  Ad Bd             2 tokens -> 46.75 ms; A and B finish
         idle until C arrives at t = 1
      4  [1, 1.08222]        Cp256           256 tokens -> 82.22 ms
      5  [1.08222, 1.12897]  Cp44             44 tokens -> 46.75 ms; C finishes
    """
    engine = make_engine("sarathi", 256, batch_time=None)
    a, b, c = Request(0, 0.0, 200, 2), Request(1, 0.05, 100, 1), Request(2, 1.0, 300, 0)
    steps = drive(engine, [a, b, c])
    assert compositions(steps, ABC) == _batches("[Ap200] [Ad Bp100] [Ad Bd] [Cp256] [Cp44]")
    exact = pytest.approx
    assert [s.start_time for s in steps] == exact([0.0, 0.08222, 0.12897, 1.0, 1.08222], abs=1e-12)
    assert [s.end_time for s in steps] == exact([0.08222, 0.12897, 0.17572, 1.08222, 1.12897], abs=1e-12)
    assert (a.first_token_time, a.finish_time) == exact((0.08222, 0.17572), abs=1e-12)
    assert (b.first_token_time, b.finish_time) == exact((0.12897, 0.17572), abs=1e-12)
    assert (c.first_token_time, c.finish_time) == exact((1.12897, 1.12897), abs=1e-12)
    assert [[r.rid for r in s.finished] for s in steps] == [[], [], [0, 1], [], [2]]
    assert engine.violations == 0


# ---- the split_prompts option of the two non-mixed schedulers (§4, open point) ----

NON_MIXED = ["fastertransformer", "vllm"]


@pytest.mark.parametrize("name", NON_MIXED)
def test_prompt_over_budget_rejected_without_split(name):
    engine = make_engine(name, 4)
    request = Request(0, 0.0, 6, 1)
    assert engine.admit(request) is False
    assert engine.rejected == [request]
    assert not engine.has_work and not engine.state.prefilling and engine.state.total_prefill_left == 0


@pytest.mark.parametrize("name", NON_MIXED)
def test_prompt_over_budget_chunked_with_split(name):
    engine = make_engine(name, 4, split_prompts=True)
    steps = drive(engine, [Request(0, 0.0, 6, 1)])
    assert engine.rejected == []
    assert compositions(steps, ABC) == _batches("[Ap4] [Ap2] [Ad]")


@pytest.mark.parametrize("name,split,expected", [
    # strict FCFS: B (3) does not fit behind A (2) and nothing may skip it.
    ("vllm", False, "[Ap2] [Bp3] [Ad Bd]"),
    ("vllm", True, "[Ap2 Bp2] [Bp] [Ad Bd]"),
    # decode first: A's decode token pre-empts B's remaining prefill.
    ("fastertransformer", False, "[Ap2] [Ad] [Bp3] [Bd]"),
    ("fastertransformer", True, "[Ap2 Bp2] [Ad] [Bp] [Bd]"),
])
def test_prompt_behind_prompt(name, split, expected):
    engine = make_engine(name, 4, split_prompts=split)
    steps = drive(engine, [Request(0, 0.0, 2, 1), Request(1, 0.0, 3, 1)])
    assert compositions(steps, ABC) == _batches(expected)

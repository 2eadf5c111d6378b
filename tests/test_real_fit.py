"""The mix-aware batch-time model, calibration fits and the Vidur-derived models (no torch needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from llmqueue.model.batch import BatchPlan
from llmqueue.model.batch_time import PrefillDecode, attention_pairs, make_batch_time
from llmqueue.cli import main
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.real.fit import (
    Samples,
    batch_time_toml,
    fit_all,
    fit_prefill_decode,
    fit_staircase,
    fit_table,
    workload_mix,
)
from llmqueue.model.request import Request
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import simulate
from llmqueue.model.workload import Requests

VIDUR = Path(__file__).resolve().parents[2] / "shared" / "data" / "vidur_profiles"
SPEC = {"model": "prefill_decode", "c_ms": 5.0, "prefill_ms_per_token": 0.1, "decode_ms_per_token": 0.5,
        "context_ms_per_token": 0.001, "prefill_fraction": 0.25, "mean_context_tokens": 40}


def _plan() -> BatchPlan:
    fresh = Request(0, 0.0, 10, 3)                  # 4 prefill tokens at context 0
    half = Request(1, 0.0, 10, 3)                   # 4 more after 6 computed
    half.prefill_left = 4
    dec = Request(2, 0.0, 5, 4)                     # 2 of 4 decode tokens done: KV holds 5 + 2
    dec.prefill_left, dec.decode_left = 0, 2
    return BatchPlan(((fresh, 4), (half, 4)), [dec], 8)


def test_attention_pairs_by_hand():
    # fresh: 1+2+3+4 = 10; half: 4*6 + 10 = 34; decode: 5 + 2 + 1 = 8
    assert attention_pairs(_plan()) == 52


def test_prefill_decode_times_the_plan_and_states_its_mix():
    model = make_batch_time(SPEC)
    assert isinstance(model, PrefillDecode) and not model.tokens_only
    assert model.plan_seconds(_plan()) == pytest.approx((5.0 + 0.1 * 8 + 0.5 * 1 + 0.001 * 52) / 1e3)
    per_token = 0.25 * 0.1 + 0.75 * 0.5 + 0.001 * 40
    assert model(100) == pytest.approx((5.0 + 100 * per_token) / 1e3)
    assert make_batch_time(model.to_dict()).to_dict() == model.to_dict()
    assert "prefill_fraction = 0.25" in model.assumption_warnings(512)[0]
    minimal = make_batch_time({"model": "prefill_decode", "c_ms": 1, "prefill_ms_per_token": 0.1,
                               "decode_ms_per_token": 0.2})
    assert minimal.context == 0 and minimal.prefill_fraction == 0.5


@pytest.mark.parametrize("key, value, words", [
    ("prefill_fraction", 1.5, "<= 1"), ("decode_ms_per_token", -1, ">= 0"), ("context_ms_per_token", "x", "number")])
def test_prefill_decode_rejects_bad_parameters(key, value, words):
    with pytest.raises(ConfigError, match=f"engine.batch_time.{key}.*{words}"):
        make_batch_time({**SPEC, key: value})
    spec = dict(SPEC)
    del spec["decode_ms_per_token"]
    with pytest.raises(ConfigError, match="decode_ms_per_token"):
        make_batch_time(spec)


def test_engine_times_each_batch_by_its_plan():
    model = make_batch_time(SPEC)
    reqs = Requests(np.array([0.0, 0.0, 0.01]), np.array([10, 20, 5]), np.array([3, 2, 4]))
    with pytest.warns(UserWarning):
        result = simulate(Engine(make_scheduler("sarathi"), 16, model), reqs, drain=True, record_batches=True)
    b = result.batches
    assert len(b["duration"]) > 3
    # Without the context term the duration is c + p·P + d·D exactly; with it, strictly more.
    base = (5.0 + 0.1 * b["num_prefill_tokens"] + 0.5 * b["num_decode_tokens"]) / 1e3
    assert np.all(b["duration"] > base)
    assert np.all(b["duration"] < base + 0.001 * 16 * 40 / 1e3)


def _synthetic(c=4e-3, p=1e-4, d=6e-4, x=2e-6, noise=0.0):
    rng = np.random.default_rng(1)
    rows = []
    for pp in (0, 16, 64, 128, 256):
        for dd in (0, 1, 8, 32):
            for k in ((64, 256) if dd else (0,)):
                if pp + dd:
                    pairs = pp * (pp + 1) // 2 + dd * (k + 1)
                    t = c + p * pp + d * dd + x * pairs
                    rows.append((pp, dd, k, pairs, t * (1 + noise * rng.standard_normal())))
    return Samples.from_rows(rows)


def test_prefill_decode_fit_recovers_the_parameters():
    fit = fit_prefill_decode(_synthetic(), context=True)
    m = fit.batch_time
    assert fit.r2 == pytest.approx(1.0)
    assert (m.c, m.prefill, m.decode, m.context) == pytest.approx((4e-3, 1e-4, 6e-4, 2e-6), rel=1e-6)
    without = fit_prefill_decode(_synthetic(), context=False)
    assert without.r2 < fit.r2


def test_staircase_fit_finds_the_step():
    b = np.arange(1, 257, 5)
    t = 0.01 + 0.03 * np.ceil(b / 64)
    s = Samples(b.astype(float), np.zeros(len(b)), np.zeros(len(b)), np.zeros(len(b)), t)
    fit = fit_staircase(s, 256)
    assert fit.batch_time.b0 == 64 and fit.r2 == pytest.approx(1.0)


def test_table_fit_is_non_decreasing_and_valid_far_past_the_grid():
    # The CI failure of 2026-11-29: noisy CPU medians that fall at the last points made linear
    # extrapolation negative at 50 tokens.  The fit must give a table the simulator accepts.
    pts = np.array([1, 4, 8, 9, 12, 32, 33, 36, 36], dtype=float)
    t = np.array([0.65, 1.03, 0.74, 0.82, 1.14, 0.85, 1.33, 1.10, 1.12]) * 1e-3
    z = np.zeros(len(pts))
    fit = fit_table(Samples(pts, z, z, z, t))
    secs = fit.batch_time.seconds(np.arange(1, 65537))
    assert np.all(np.diff(fit.batch_time.secs) >= 0) and np.all(secs > 0)
    make_batch_time(fit.batch_time.to_dict()).table(65536)
    # a first point far from zero with a steep first segment gets a flat start, not a negative one
    pts2 = np.array([64, 128, 256], dtype=float)
    fit2 = fit_table(Samples(pts2, z[:3], z[:3], z[:3], np.array([1e-3, 10e-3, 11e-3])))
    assert fit2.batch_time.seconds(np.array([1.0]))[0] == pytest.approx(1e-3)


def test_fit_all_reports_every_model_and_writes_loadable_configs(tmp_path):
    fits = fit_all(_synthetic(noise=0.02), 256, *workload_mix(64, 32))
    assert [f.name for f in fits] == ["staircase", "piecewise_linear", "table", "prefill_decode",
                                      "prefill_decode+context"]
    assert fits[-1].r2 > 0.95 and fits[-1].r2 > fits[0].r2
    import tomllib

    for fit in fits:
        data = tomllib.loads(batch_time_toml(fit, ["a header"]))
        assert make_batch_time(data["engine"]["batch_time"]).to_dict() == fit.batch_time.to_dict()
    with pytest.raises(LlmqueueError, match="at least 4"):
        fit_all(Samples.from_rows([(1, 0, 0, 1, 0.1)]), 256)


def test_samples_csv_round_trip(tmp_path):
    s = _synthetic()
    s.write_csv(tmp_path / "s.csv")
    back = Samples.read_csv(tmp_path / "s.csv")
    assert np.allclose(back.seconds, s.seconds) and np.array_equal(back.tokens, s.tokens)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LlmqueueError, match="columns"):
        Samples.read_csv(tmp_path / "bad.csv")


def test_workload_mix():
    fraction, pairs = workload_mix(100, 100)
    assert fraction == 0.5
    assert pairs == pytest.approx((100 * 101 / 2 + 100 * 151) / 200)


@pytest.mark.skipif(not VIDUR.exists(), reason="shared Vidur profiles not present")
def test_vidur_attention_formulas_match_the_synthetic_profile():
    import csv

    from llmqueue.real.vidur import attn_decode_ms, attn_prefill_ms
    path = VIDUR / "compute/a100/meta-llama/Llama-2-7b-hf/attention_fitted_synthetic.csv"
    with path.open() as f:
        rows = [r for i, r in enumerate(csv.DictReader(f)) if i % 97 == 0]
    for r in rows:
        kv = float(r["kv_cache_size"])
        if r["is_prefill"] == "True":
            want = float(r["time_stats.attn_prefill.median"])
            got = float(attn_prefill_ms(float(r["prefill_chunk_size"]), kv))
        else:
            want = float(r["time_stats.attn_decode.median"])
            got = float(attn_decode_ms(float(r["batch_size"]), kv))
        assert got == pytest.approx(want, rel=0.02, abs=2e-4)


@pytest.mark.skipif(not VIDUR.exists(), reason="shared Vidur profiles not present")
def test_vidur_profiles_give_growing_batch_times_and_fits():
    from llmqueue.real.vidur import load_profile, profile_samples

    p = load_profile(VIDUR, "llama-2-7b", "a100")
    # README example: Llama-2-7B A100 TP1 at 4096 tokens, the listed medians sum to ~8.17 ms per layer.
    assert np.interp(4096, p.tokens, p.layer_ms) == pytest.approx(1.911 + 0.611 + 3.3655 + 1.604 + 0.266 + 0.149
                                                                   + 0.105 + 0.104 + 0.055, rel=0.02)
    t = p.batch_seconds(np.array([64, 256, 512]), np.zeros(3), np.zeros(3))
    assert np.all(np.diff(t) > 0)
    gqa = load_profile(VIDUR, "llama-3-8b", "a100")
    assert gqa.kv_ratio == 0.25
    s = profile_samples(p, [0, 128, 512], [0, 32], [512, 2048], 1024)
    assert fit_all(s, 1024)[-1].r2 > 0.8
    with pytest.raises(LlmqueueError, match="allowed: llama-2-7b"):
        load_profile(VIDUR, "gpt-2", "a100")
    with pytest.raises(LlmqueueError, match="no Vidur profile"):
        load_profile(VIDUR, "llama-3-8b", "h100")


def test_calibrate_from_samples_needs_no_torch(tmp_path, capsys):
    _synthetic(noise=0.01).write_csv(tmp_path / "s.csv")
    assert main(["calibrate", "--samples", str(tmp_path / "s.csv"), "--max-tokens", "256", "--out",
                 str(tmp_path / "out"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "prefill_decode+context" in out and "R²" in out
    assert (tmp_path / "out" / "batch_time.toml").exists()


def test_real_commands_without_torch_say_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now raises ImportError
    (tmp_path / "c.toml").write_text("[engine]\nscheduler = 'sarathi'\n")
    for argv in (["engine", "run", str(tmp_path / "c.toml")], ["engine", "validate", str(tmp_path / "c.toml")],
                 ["calibrate"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == "llmqueue: error: install the cpu extra: pip install 'llmqueue[cpu]'"


def test_only_the_real_engine_modules_import_torch_at_load_time():
    """Importing the core, the CLI or the numpy-only fitting never loads torch."""
    import ast

    import llmqueue

    package = Path(llmqueue.__file__).parent
    torch_ok = {"model.py", "kvcache.py", "serve.py", "calibrate.py", "validate.py"}
    for path in package.rglob("*.py"):
        if path.parent.name == "real" and path.name in torch_ok:
            continue
        top = ast.parse(path.read_text()).body   # module level only: lazy imports inside functions are fine
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        bad = {m for m in names if m.split(".")[0] == "torch"
               or (m.startswith("llmqueue.real.") and m.rsplit(".", 1)[1] + ".py" in torch_ok)}
        assert not bad, (path, bad)


def test_models_are_chosen_by_held_out_error():
    """The mix-aware model predicts batches it was not fitted to better than the token-only ones
    on mix-dependent data, and best_fit keeps the lowest held-out RMSE (not the highest R²)."""
    from llmqueue.real.fit import best_fit, heldout_rmse

    s = _synthetic(noise=0.02)
    fits = fit_all(s, 256, *workload_mix(64, 32))
    held = {f.name: f.heldout_rmse for f in fits}
    assert all(v is not None and v > 0 for v in held.values())
    assert held["prefill_decode+context"] < held["staircase"]
    assert best_fit(fits).heldout_rmse == min(held.values())
    assert fits[0].to_dict()["heldout_rmse_ms"] == pytest.approx(held["staircase"] * 1e3)
    tiny = Samples(*(getattr(s, c)[:6] for c in ("prefill_tokens", "decode_tokens", "context_tokens",
                                                  "attention_pairs", "seconds")))
    assert heldout_rmse(tiny, lambda x: fit_prefill_decode(x, False)) is None   # too few for 5 folds


def test_a_token_only_model_that_cannot_be_fitted_is_left_out_with_its_reason():
    """Noisy timings that fall with the token count: the staircase has no positive step, so it is
    skipped (named), while the prefill_decode fits remain (a calibration does not fail on noise)."""
    p = np.array([0, 8, 32, 0, 8, 32, 0, 8, 32, 16, 24, 4], dtype=float)
    d = np.array([1, 1, 1, 4, 4, 4, 8, 8, 8, 0, 0, 2], dtype=float)
    z = np.zeros_like(p)
    y = 1e-3 * (2.0 - 0.01 * (p + d))
    s = Samples(p, d, z, p * (p + 1) / 2 + d, y)
    skipped: list[str] = []
    names = [f.name for f in fit_all(s, 64, skipped=skipped)]
    assert "staircase" not in names and "prefill_decode+context" in names
    assert any("staircase fit" in r for r in skipped)
    with pytest.raises(LlmqueueError, match="staircase fit"):
        fit_all(s, 64)


def test_an_inconclusive_capacity_trial_above_the_served_plateau_is_unstable():
    """engine capacity's side of a trial too short to call (docs/real_engine.md, "Capacity on the real
    engine"): measured on the small model, a trial at 69.75 req/s served 59.75 and ended with 217 in
    system against 159.7 on average; by growth alone it counted stable, but an overloaded trial had
    served 60.45 req/s at most, so it is unstable."""
    from llmqueue.real.capacity import classify

    trial = {"verdict": "inconclusive", "throughput_rps": 59.75, "final_in_system": 217, "mean_in_system": 159.7}
    assert classify(trial, 69.75)[0] == "stable"                    # the growth rule alone
    side, why = classify(trial, 69.75, plateau=60.45)
    assert side == "unstable" and "above the 60.45" in why
    # near the plateau, or keeping up with its arrivals: the growth rule decides
    assert classify(trial, 62.0, plateau=60.45)[0] == "stable"
    keeping_up = {**trial, "throughput_rps": 68.0}
    assert classify(keeping_up, 69.75, plateau=60.45)[0] == "stable"
    assert classify({**trial, "verdict": "stable"}, 69.75, plateau=60.45) == ("stable", "verdict stable")

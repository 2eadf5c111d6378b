"""Machine-relative runs (tiny model): calibration files, the calibration cache, the drift probe,
and the real engine against the simulator with bounds a noisy machine keeps (docs/real_engine.md,
"Machine-relative runs" and "Error bars").

Marked ``real``; skipped without PyTorch.  No test asserts a duration.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from llmqueue.cli import main  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")]

MACHINE_TOML = """
[engine]
scheduler = "sarathi"
token_budget = 64
[engine.batch_time]
calibration = "machine"
[workload]
arrival = "poisson"
load = 0.5
prompt = {dist = "poisson", mean = 20}
output = {dist = "poisson", mean = 8}
[run]
horizon_s = 1.5
seed = 1
[real]
model = {preset = "tiny"}
kv_capacity_tokens = 8192
warmup_batches = 1
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "llmqueue"


def _config(tmp_path, text=MACHINE_TOML, name="machine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmqueue: error: "), err
    return err[0]


def test_cached_calibration_is_measured_once_then_reused(tmp_path, cache, capsys):
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    assert main(["engine", "run", cfg, "--out", str(out), "--no-plot"]) == 0
    io = capsys.readouterr()
    assert "calibrating this machine (no calibration" in io.err
    (entry,) = cache.glob("calibration-*.json")
    assert "from a calibration measured just now" in io.out
    # The "wrote" line names exactly the files written.
    wrote = io.out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {out}/: ")
    for name in wrote.split(": ", 1)[1].split(", "):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    drift = summary["real"]["drift"]
    assert {"probe_before", "probe_after", "run_batches", "cpu_per_wall", "low", "high"} <= set(drift)
    assert drift["low"] <= 1 <= drift["high"]
    # Reused: no second measurement.
    assert main(["engine", "run", cfg, "--out", str(out), "--no-plot", "--json"]) == 0
    io = capsys.readouterr()
    assert "batch times: this machine's calibration from" in io.err and "calibrating" not in io.err
    # A stale entry is measured again, with a note saying why.
    data = json.loads(entry.read_text())
    data["created_unix"] -= 3 * 86400
    entry.write_text(json.dumps(data))
    assert main(["engine", "run", cfg, "--out", str(out), "--no-plot", "--json"]) == 0
    assert "h old" in capsys.readouterr().err
    # A damaged entry too; --recalibrate always measures.
    entry.write_text("{not json")
    assert main(["engine", "run", cfg, "--out", str(out), "--no-plot", "--json"]) == 0
    assert "unusable" in capsys.readouterr().err
    assert main(["engine", "run", cfg, "--out", str(out), "--no-plot", "--json", "--recalibrate"]) == 0
    assert "calibrating this machine (--recalibrate)" in capsys.readouterr().err


def test_calibration_file_checked_against_the_run(tmp_path, cache, capsys):
    cfg = _config(tmp_path)
    cal = tmp_path / "cal"
    assert main(["calibrate", "--config", cfg, "--prefill", "0,8,32,64", "--decode", "0,1,4", "--context", "8,32",
                 "--repeats", "1", "--out", str(cal), "--no-plot"]) == 0
    assert "calibration.json" in capsys.readouterr().out
    file = cal / "calibration.json"
    run = ["engine", "run", cfg, "--out", str(tmp_path / "r"), "--no-plot"]
    assert main([*run, "--batch-time", str(file)]) == 0
    assert "from the calibration file's model" in capsys.readouterr().out
    # The config key names the file too (relative to the config), and a batch_time.toml is accepted.
    keyed = _config(tmp_path, MACHINE_TOML.replace('calibration = "machine"', 'file = "cal/calibration.json"'), "k.toml")
    assert main(["engine", "run", keyed, "--out", str(tmp_path / "r"), "--no-plot", "--json"]) == 0
    assert main([*run, "--json", "--batch-time", str(cal / "batch_time.toml")]) == 0
    capsys.readouterr()
    # Bad input: one line each, naming what is wrong.
    assert main([*run, "--batch-time", str(file), "--set", "real.model.num_layers=3"]) == 2
    assert "calibrated for a different model" in _error(capsys)
    assert main([*run, "--batch-time", str(file), "--set", "engine.token_budget=128"]) == 2
    assert "covers batches up to 64 tokens" in _error(capsys)
    assert main([*run, "--batch-time", str(tmp_path / "missing.json")]) == 2
    assert "no such batch-time file" in _error(capsys)
    data = json.loads(file.read_text())
    data["created_unix"] -= 3 * 86400
    (tmp_path / "stale.json").write_text(json.dumps(data))
    assert main([*run, "--batch-time", str(tmp_path / "stale.json")]) == 2
    assert "stale calibration" in _error(capsys)
    del data["samples"]
    (tmp_path / "damaged.json").write_text(json.dumps(data))
    assert main([*run, "--batch-time", str(tmp_path / "damaged.json")]) == 2
    assert "damaged calibration file" in _error(capsys)
    (tmp_path / "other.json").write_text("[1, 2]")
    assert main([*run, "--batch-time", str(tmp_path / "other.json")]) == 2
    assert "not a calibration file" in _error(capsys)
    bad = _config(tmp_path, MACHINE_TOML.replace('calibration = "machine"', 'calibration = "yesterday"'), "b.toml")
    assert main(["engine", "run", bad, "--no-plot"]) == 2
    assert "engine.batch_time.calibration" in _error(capsys)


def test_real_engine_against_the_simulator(tmp_path, cache, capsys):
    """Fresh calibration, load 0.5, 12 s: throughput within 5 % of the simulator (with the machine's
    fresh calibration and with a fit to the run's own batches); and, unless the drift probe flags
    the machine as changed, median TTFT and E2E within 25 % (run fit, fresh calibration, and the
    latter speed-corrected) and the mean number in system within 40 % (run fit) and 35 % (fresh,
    speed-corrected).  Measured on the tiny model on a quiet machine (docs/real_engine.md, "What
    the CI test checks"): fresh −7 to −9 %, run fit within 1.5 %; a CI-like run once had the run
    fit's mean in system off by −73 % with the probe unflagged, hence its wider bound.  The fresh
    fit is labelled as such, the prefill_decode caveat is printed once, and the run fit with the
    run's own correlated scatter (run_fit_noise) is a column too."""
    cfg = _config(tmp_path)
    out = tmp_path / "v"
    # 12 s of arrivals (~7,700 requests): 2 s and 6 s runs missed the bounds by sampling alone
    assert main(["engine", "validate", cfg, "--calibrate", "--out", str(out), "--set", "run.horizon_s=12"]) == 0
    io = capsys.readouterr()
    assert "sim (fresh)" in io.out and "sim (config)" not in io.out and "range (fresh, drift)" in io.out
    assert sum("batch_time.model = prefill_decode" in line for line in io.err.splitlines()) <= 1
    row = json.loads((out / "validation.json").read_text())["rows"][0]
    errors = row["relative_error"]
    assert abs(errors["fresh"]["throughput_rps"]) < 0.05 and abs(errors["run_fit"]["throughput_rps"]) < 0.05
    if not row["drift"]["changed"]:   # a machine that moved during the run is flagged, not compared
        bounds = {"run_fit": {"ttft_p50_s": 0.25, "e2e_p50_s": 0.25, "mean_in_system": 0.40},
                  "fresh": {"ttft_p50_s": 0.25, "e2e_p50_s": 0.25, "mean_in_system": 0.35},
                  "speed": {"ttft_p50_s": 0.25, "e2e_p50_s": 0.25, "mean_in_system": 0.35}}
        for fit, by in bounds.items():
            for q, bound in by.items():
                assert abs(errors[fit][q]) < bound, (fit, q, errors[fit][q], row["drift"])
    assert {"fresh", "speed", "run_fit", "run_fit_noise"} <= set(errors)
    assert 0 < row["batch_time"]["run_fit_noise"]["noise"]["cv"] and "run_fit_noise = run_fit times" in io.out
    low, high = row["range"]["fresh"]["mean_in_system"]
    assert low <= row["sim"]["fresh"]["mean_in_system"] <= high


def test_vidur_profiles_missing_is_one_line(tmp_path, capsys):
    assert main(["calibrate", "--vidur-model", "llama-2-7b", "--vidur-root", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o"), "--no-plot"]) == 2
    assert "Vidur's GPU profiles are data outside the package" in _error(capsys)


def test_demo_verdicts_hold_on_this_machine(tmp_path, cache, capsys):
    """The docs' demo, loads relative to this machine's calibration: at 0.6 FasterTransformer
    diverges and Sarathi does not; at 0.95 vanilla vLLM diverges."""
    cfg = _config(tmp_path, MACHINE_TOML.replace("kv_capacity_tokens = 8192", "kv_capacity_tokens = 65536"))
    out = tmp_path / "d"
    verdicts, changed = {}, {}
    # vLLM at 0.95: 8 s, since with the calibration's replayed batches λ* is no longer overstated
    # and 3 s was inconclusive (its backlog growing from 392 on average to 707 at the end)
    for load, schedulers, horizon in ((0.6, "sarathi,fastertransformer", 3), (0.95, "vllm", 8)):
        assert main(["engine", "run", cfg, "--schedulers", schedulers, "--set", f"workload.load={load}",
                     "--set", f"run.horizon_s={horizon}", "--out", str(out), "--no-plot", "--json"]) == 0
        for s in json.loads(capsys.readouterr().out)["runs"]:
            verdicts[s["scheduler"], load] = s["verdict"]
            changed[s["scheduler"], load] = s["real"]["drift"]["changed"]
    assert verdicts["fastertransformer", 0.6] == "unstable" and verdicts["sarathi", 0.6] != "unstable"
    # vLLM's margin is smaller: a calibration measured while the machine was busier than during
    # the run makes 0.95 a lower real load; the drift probe must then say so
    assert verdicts["vllm", 0.95] == "unstable" or (changed["vllm", 0.95] and verdicts["vllm", 0.95] != "stable")


def test_grid_covers_later_chunks_and_fits_are_chosen_held_out():
    from llmqueue.real.calibrate import grid_points, measure, run_grid
    from llmqueue.real.fit import best_fit, fit_all
    from llmqueue.real.model import Transformer, model_config

    grid = run_grid(20, 8, 64)
    assert grid["cached"] == [10, 20] and max(grid["decode"]) <= 64 and grid["max_tokens"] == 64
    points = grid_points(grid["prefill"], grid["decode"], grid["context"], 64, grid["cached"])
    later = [p for p in points if len(p) == 4]
    assert later and all(p[0] > 0 and p[0] + p[1] <= 64 for p in later)
    import time

    samples = measure(Transformer.random(model_config({"preset": "tiny"})), points, time.thread_time, repeats=1)
    # a later chunk attends its cached tokens too: P·C + P(P+1)/2 (+ its decodes' pairs)
    i = points.index(later[0])
    p, d, k, c = later[0]
    assert samples.attention_pairs[i] == p * c + p * (p + 1) // 2 + d * (k + 1)
    fits = fit_all(samples, 64)
    assert all(f.heldout_rmse is not None and f.heldout_rmse > 0 for f in fits)
    assert best_fit(fits).heldout_rmse == min(f.heldout_rmse for f in fits)


def test_calibration_from_a_short_run_and_capacity_by_real_runs(tmp_path, cache, capsys):
    cfg = _config(tmp_path)
    cal = tmp_path / "fromrun"
    assert main(["calibrate", "--config", cfg, "--from-run", "0.5", "--out", str(cal), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "fitted by llmqueue calibrate to a 0.5 s real run" in out and "held out" in out
    assert main(["engine", "run", cfg, "--batch-time", str(cal / "calibration.json"), "--no-plot", "--json",
                 "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--from-run", "0.5", "--out", str(cal)]) == 2
    assert "--from-run: needs --config" in _error(capsys)
    out = tmp_path / "cap"
    assert main(["engine", "capacity", cfg, "--horizon", "1", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "real saturation rate" in text and "predicted λ*" in text
    result = json.loads((out / "capacity.json").read_text())
    first = result["trials"][0]
    assert first["load"] == 1.2 and all(t["side"] in ("stable", "unstable") and t["drift"] is not None
                                        for t in result["trials"])
    if first["side"] == "unstable":   # then 2 bisection steps narrow the interval
        assert len(result["trials"]) == 3 and result["unstable_from_load"] <= 1.2
    else:   # a calibration measured on a busier machine understates λ*: stable above 1.2, said so
        assert len(result["trials"]) == 1 and result["stable_up_to_load"] == 1.2 and "above" in text
    assert main(["engine", "capacity", cfg, "--low", "1.5", "--high", "1.0", "--out", str(out)]) == 2
    assert "0 < low < high" in _error(capsys)


def test_the_machine_calibration_times_the_batches_its_scheduler_forms(tmp_path, cache):
    """Beside the grid, the machine calibration simulates the config's scheduler at 0.5–1.0 of the
    grid fit's λ* and times a sample of the batches it forms (docs/real_engine.md, "Calibration that
    transfers"): the spec is part of the cache key, the shapes are the scheduler's, their samples
    join the grid's."""
    import time

    from llmqueue.config import load_config
    from llmqueue.real.calibrate import REPLAY_LOADS, measure_batches, replay_shapes, replay_spec
    from llmqueue.real.model import Transformer, model_config
    from llmqueue.real.machine import read_calibration

    cfg = load_config(_config(tmp_path, MACHINE_TOML.replace('calibration = "machine"', 'model = "prefill_decode"\n'
                                                             'c_ms = 0.5\nprefill_ms_per_token = 0.01\n'
                                                             'decode_ms_per_token = 0.05')))
    spec = replay_spec(cfg)
    assert spec["engine"] == {"scheduler": "sarathi", "token_budget": 64} and spec["loads"] == list(REPLAY_LOADS)
    assert json.loads(json.dumps(spec)) == spec    # compared with the cached file's grid as JSON
    shapes = replay_shapes(spec, cfg.engine["batch_time"])
    assert len(shapes) == len(REPLAY_LOADS) * spec["batches"]
    per_load = [shapes[i * spec["batches"]:(i + 1) * spec["batches"]] for i in range(len(REPLAY_LOADS))]
    tokens = [np.mean([sum(n for n, _ in pre) + len(dec) for pre, dec in part]) for part in per_load]
    assert all(1 <= sum(n for n, _ in pre) + len(dec) <= 64 for pre, dec in shapes)      # within the budget
    assert tokens[0] < tokens[-1]            # fuller batches at capacity than at half load
    assert any(len(pre) > 1 for pre, _ in shapes) and any(c > 0 for pre, _ in shapes for _, c in pre)
    assert replay_shapes(spec, cfg.engine["batch_time"]) == shapes   # seeded
    samples = measure_batches(Transformer.random(model_config({"preset": "tiny"})), shapes[:20], time.thread_time,
                              repeats=1)
    pre, dec = shapes[3]
    assert samples.prefill_tokens[3] == sum(n for n, _ in pre) and samples.decode_tokens[3] == len(dec)
    assert samples.attention_pairs[3] == sum(n * c + n * (n + 1) // 2 for n, c in pre) + sum(k + 1 for k in dec)
    assert np.all(samples.seconds > 0)
    # a trace's lengths are its own: the grid alone
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_time_s,num_prompt_tokens,num_output_tokens\n0,10,4\n0.5,12,3\n")
    data = json.loads(json.dumps(cfg.data))
    data["workload"] = {"arrival": "trace", "trace": str(trace)}
    from llmqueue.config import parse_config

    assert replay_spec(parse_config(data, tmp_path)) is None
    # the machine calibration holds both: grid points, then the replayed batches
    assert main(["engine", "run", _config(tmp_path), "--out", str(tmp_path / "o"), "--no-plot", "--json"]) == 0
    (entry,) = cache.glob("calibration-*.json")
    cal = read_calibration(entry)
    assert cal.grid["replay"]["engine"]["scheduler"] == "sarathi"
    from llmqueue.real.calibrate import grid_points

    g = cal.grid
    points = grid_points(g["prefill"], g["decode"], g["context"], g["max_tokens"], g["cached"])
    assert len(cal.samples.seconds) == len(points) + len(REPLAY_LOADS) * g["replay"]["batches"]


def test_the_replay_reads_an_empirical_length_law_relative_to_its_config(tmp_path, monkeypatch):
    """A config's empirical law names its file relative to the config; the replay's own simulated
    runs (no config directory) find it wherever the command runs."""
    from llmqueue.config import load_config
    from llmqueue.real.calibrate import replay_shapes, replay_spec

    (tmp_path / "lengths.csv").write_text("n\n" + "".join(f"{10 + i % 15}\n" for i in range(40)))
    text = MACHINE_TOML.replace('prompt = {dist = "poisson", mean = 20}',
                                'prompt = {dist = "empirical", trace = "lengths.csv", column = "n"}')
    text = text.replace('calibration = "machine"', 'model = "prefill_decode"\nc_ms = 0.5\nprefill_ms_per_token = 0.01\n'
                                                   'decode_ms_per_token = 0.05')
    cfg = load_config(_config(tmp_path, text))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = replay_spec(cfg)
    assert spec["prompt"]["trace"] == str(tmp_path / "lengths.csv")
    shapes = replay_shapes(spec, cfg.engine["batch_time"])
    assert all(c + n <= 24 for pre, _ in shapes for n, c in pre)     # prompts of the file's 10-24 tokens


def test_the_speed_probe_is_run_like_and_off_the_measured_clock(tmp_path, monkeypatch):
    """The speed probe (docs/real_engine.md, "Error bars"): a few of the calibration's replayed
    batches (at 0.75 and 0.9 of λ*, at 30/60/90 % of their token counts), timed every PROBE_EVERY
    batches of a run; it takes no time on the measured clock: with a timer that advances a fixed
    step per call, a run is the same batch for batch with and without it."""
    from llmqueue.config import load_config
    from llmqueue.real.calibrate import PROBE_EVERY
    from llmqueue.real.machine import PROBE_LOADS, Probe, point_shape, probe_ratio, probe_shapes, probed_run
    from llmqueue.real.model import Transformer, model_config
    from llmqueue.real.serve import TIMERS, RealEngine, real_settings

    loads = [0.5, 0.75, 0.9, 1.0]
    replayed = [(((i + 10 * j, 0),), (5,) * j) for j in range(4) for i in range(10)]   # load j's batches
    picked = probe_shapes(replayed, loads, 10)
    pool = [s for j, load in enumerate(loads) if load in PROBE_LOADS for s in replayed[10 * j:10 * j + 10]]
    assert all(s in pool for s in picked) and len(picked) == 3
    tokens = [sum(n for n, _ in pre) + len(dec) for pre, dec in picked]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]

    class Ticks:   # a timer of exact binary steps: every measured duration is one step
        t = 0.0

        def __call__(self):
            self.t += 2.0 ** -10
            return self.t

    monkeypatch.setitem(TIMERS, "thread_cpu", Ticks())
    cfg = load_config(_config(tmp_path, MACHINE_TOML.replace('calibration = "machine"', 'model = "prefill_decode"\n'
                                                             'c_ms = 0.9\nprefill_ms_per_token = 0.001\n'
                                                             'decode_ms_per_token = 0.002')))
    settings = real_settings({"model": {"preset": "tiny"}, "kv_capacity_tokens": 8192, "warmup_batches": 1})
    engine = RealEngine(settings, model=Transformer.random(model_config({"preset": "tiny"})))
    plain = engine.run(cfg)
    probed = probed_run(engine, cfg, "sarathi", None)
    assert len(plain.result.batches["end_time"]) >= 2 * PROBE_EVERY
    for column in ("start_time", "end_time", "num_prefill_tokens", "num_decode_tokens"):
        assert np.array_equal(plain.result.batches[column], probed.result.batches[column]), column
    d = probed.summary["real"]["drift"]
    assert len(d["probe_series"]) == len(plain.result.batches["end_time"]) // PROBE_EVERY
    assert d["speed"] == d["probe_during"] and d["low"] <= d["probe_during"] <= d["high"]
    # each instance times every probe batch once; ratios of the same speed are 1
    probe = Probe(engine.model, TIMERS["thread_cpu"], [point_shape((8, 2, 16)), point_shape((0, 4, 8))])
    record = probe.repeat(3)
    assert len(record["times"]) == 3 and len(record["seconds"]) == 2 and probe_ratio(record, record) == 1.0


def test_the_speed_probe_divides_a_slower_machine_out(tmp_path, cache, capsys, monkeypatch):
    """After the calibration the machine gets 1.5x slower (a timer scaled by 1.5): the run's batches
    and the probe during the run both say so, the run is flagged, and the speed-corrected simulator
    (the calibration's times scaled by the probe) lands far nearer the real run than the
    calibration's own, which thinks the load is 0.5 where it is about 0.75."""
    import time

    import llmqueue.real.machine as machine
    from llmqueue.real.serve import TIMERS

    scale = {"factor": 1.0}
    monkeypatch.setitem(TIMERS, "thread_cpu", lambda: scale["factor"] * time.thread_time())
    measure = machine.measure_calibration

    def then_slower(*args, **kwargs):
        cal = measure(*args, **kwargs)
        scale["factor"] = 1.5
        return cal

    monkeypatch.setattr(machine, "measure_calibration", then_slower)
    out = tmp_path / "v"
    assert main(["engine", "validate", _config(tmp_path), "--calibrate", "--no-refit", "--out", str(out),
                 "--set", "run.horizon_s=6"]) == 0
    assert "sim (speed)" in capsys.readouterr().out
    row = json.loads((out / "validation.json").read_text())["rows"][0]
    d = row["drift"]
    assert 1.3 < d["probe_during"] < 1.7 and 1.3 < d["run_batches"] < 1.7 and d["changed"], d
    errors = row["relative_error"]
    for q in ("mean_in_system", "e2e_p50_s"):
        assert abs(errors["speed"][q]) < 0.5 * abs(errors["fresh"][q]), (q, errors, d)


def test_run_noise_recovers_a_runs_correlated_scatter():
    """validate's run_fit_noise: the cv and lag-1 correlation of ln(measured / fitted) over a run's
    batches in order, recovered from batches whose times are a fit times a known AR(1) factor."""
    from types import SimpleNamespace

    from llmqueue.model.batch_time import make_batch_time
    from llmqueue.real.validate import run_noise

    bt = make_batch_time({"model": "prefill_decode", "c_ms": 2.0, "prefill_ms_per_token": 0.03,
                          "decode_ms_per_token": 0.3})
    noise = make_batch_time({"model": "constant", "duration_ms": 1.0,
                             "noise": {"cv": 0.2, "correlation": 0.7}}).fresh(3)
    rng = np.random.default_rng(0)
    n = 20_000
    batches = {"num_prefill_tokens": rng.integers(0, 200, n), "num_decode_tokens": rng.integers(0, 60, n),
               "attention_pairs": np.zeros(n, dtype=np.int64)}
    fitted = 2e-3 + 3e-5 * batches["num_prefill_tokens"] + 3e-4 * batches["num_decode_tokens"]
    batches["duration"] = fitted * np.array([noise._next() for _ in range(n)])
    got = run_noise(SimpleNamespace(batch_time=bt), SimpleNamespace(batches=batches))
    assert abs(got["cv"] - 0.2) < 0.01 and abs(got["correlation"] - 0.7) < 0.03, got
    batches["duration"] = fitted       # no scatter: no noise table
    assert run_noise(SimpleNamespace(batch_time=bt), SimpleNamespace(batches=batches)) == {}

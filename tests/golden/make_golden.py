"""Write the golden files tests/golden/{single,stream,network}.npz (see README.md here).

Run it against a pristine checkout of the commit the figures pin (f56e29d), compiled core built:

    git worktree add /tmp/golden-base f56e29d          # then build its _fastcore in place
    PYTHONPATH=/tmp/golden-base/src .venv/bin/python tests/golden/make_golden.py

Do NOT rerun it to make a failing tests/test_golden.py pass: only when a change of results is
intended, and then say so (and why) in the commit and in README.md.

Every single-engine case is run with every method of llmqueue.core.simulator.METHODS and the
streaming cases on both cores; the generator stops if they disagree (so the files hold the one
result all loops give).  Network combinations that the library refuses (ConfigError or
InternalError) are recorded as refused, with the error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest puts it on sys.path
from golden import cases  # noqa: E402  (the case definitions the test uses)


def _check_lists() -> None:
    """The written-out names in cases.py must cover the library's lists."""
    from llmqueue.network.scenarios import NETWORK_SCENARIOS
    from llmqueue.scenarios import SCENARIOS
    from llmqueue.schedulers import SCHEDULERS

    assert tuple(SCHEDULERS) == cases.SCHEDULER_NAMES, tuple(SCHEDULERS)
    single = tuple(n for n in SCENARIOS if n not in NETWORK_SCENARIOS)
    assert single == cases.SINGLE_SCENARIOS, single
    listed = tuple(n for n in NETWORK_SCENARIOS if n not in cases.NETWORK_NOT_GOLDEN)
    assert listed == tuple(cases.NETWORK_ENGINES), listed
    from llmqueue.network import load_network
    for name, engines in cases.NETWORK_ENGINES.items():
        assert tuple(e.name for e in load_network(name).engines) == engines, name


def _same(a: dict, b: dict, where: str) -> None:
    if not cases.same_record(a, b, ignore=()):
        diff = sorted(k for k in set(a) | set(b) if not cases.same_record({k: a.get(k)}, {k: b.get(k)}, ignore=()))
        raise SystemExit(f"{where}: {diff[:5]} differ between runs that must agree; no golden written")


class _Store:
    """The .npz entries, a case whose record equals an earlier one's (bit for bit) stored as
    ``same_as`` that case (the test follows the reference)."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.kept: list[tuple[str, dict]] = []

    def add(self, case_id: str, record: dict) -> str:
        for other, rec in self.kept:
            if cases.same_record(rec, record):
                self.data.update(cases.pack(case_id, {"same_as": other, "meta.overrides": record["meta.overrides"]}))
                return f"(same as {other})"
        self.kept.append((case_id, record))
        self.data.update(cases.pack(case_id, record))
        return ""


def _source_info() -> str:
    import llmqueue
    from llmqueue.core import fastcore

    src = Path(llmqueue.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    return (f"llmqueue from {src}; git {head}{' (DIRTY)' if dirty else ''}; "
            f"compiled core: {fastcore.unavailable() or 'available'}; numpy {np.__version__}")


def single() -> dict:
    from llmqueue.core.simulator import METHODS

    out = _Store()
    for case in cases.SINGLE_CASES:
        started = time.perf_counter()
        records = {}
        for method in METHODS:
            run, engine = case.run(method)
            records[method] = (cases.single_record(run, engine), run.result.meta)
        ref, _ = records["reference"]
        for method, (rec, _) in records.items():
            _same(ref, rec, f"{case.id} {method}")
        if case.records:  # the same run without per-batch records: same results
            for method in METHODS:
                run, engine = case.run(method, record_batches=False)
                rec = cases.single_record(run, engine)
                _same({k: v for k, v in ref.items() if not k.startswith("batches.")}, rec, f"{case.id} {method} no-rec")
        meta = records["fast"][1]
        ref["meta.fast_path"] = meta["method"] == "fast"
        ref["meta.overrides"] = list(case.overrides)
        same = out.add(case.id, ref)
        print(f"  single  {case.id:36s} n={ref['num_requests']:5d} batches={ref['num_batches']:5d} "
              f"fast={meta['method']!r:48s} {time.perf_counter() - started:.2f}s {same}", flush=True)
    return out.data


def stream() -> dict:
    out = _Store()
    for case in cases.STREAM_CASES:
        started = time.perf_counter()
        recs = {c: cases.stream_record(case.run(c)) for c in (True, False)}
        _same(recs[True], recs[False], f"stream {case.id}")
        recs[True]["meta.overrides"] = []
        same = out.add(case.id, recs[True])
        print(f"  stream  {case.id:36s} arrived={recs[True]['summary.arrived']} "
              f"batches={recs[True]['summary.batches']} {time.perf_counter() - started:.2f}s {same}", flush=True)
    return out.data


def network() -> dict:
    from llmqueue.errors import ConfigError, InternalError

    out = _Store()
    for case in cases.NETWORK_CASES:
        started = time.perf_counter()
        try:
            result = case.run()
        except (ConfigError, InternalError) as exc:
            rec = {"refused": f"{type(exc).__name__}: {exc}"}
            print(f"  network {case.id:36s} REFUSED {rec['refused']}", flush=True)
        else:
            rec = cases.network_record(result)
            again = cases.network_record(case.run())
            _same(rec, again, f"network {case.id} (second run)")
        rec["meta.overrides"] = list(case.overrides)
        same = out.add(case.id, rec)
        if "refused" not in rec:
            print(f"  network {case.id:36s} subs={len(rec['finish_time']):5d} jobs={len(rec['job_exit_time']):5d} "
                  f"batches={[rec[f'engine{j}.batches'] for j in range(rec['num_engines'])]} "
                  f"{time.perf_counter() - started:.2f}s {same}", flush=True)
    return out.data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("single", "stream", "network"), action="append")
    p.add_argument("--out", type=Path, default=cases.GOLDEN_DIR,
                   help="folder to write the files to (default: tests/golden; another one to compare runs)")
    p.add_argument("--any-source", action="store_true",
                   help=f"write even if llmqueue is not imported from a clean checkout of {cases.COMMIT}")
    args = p.parse_args()
    from llmqueue.core import fastcore

    info = _source_info()
    print(info)
    if not args.any_source and (f"git {cases.COMMIT}" not in info or "DIRTY" in info):
        raise SystemExit(f"llmqueue must come from a clean checkout of {cases.COMMIT} (see the module doc), "
                         "or pass --any-source (and change COMMIT in cases.py and README.md)")
    if fastcore.unavailable() is not None:
        raise SystemExit(f"the compiled core must be built for the golden run: {fastcore.unavailable()}")
    _check_lists()
    for name, fn, path in (("single", single, cases.SINGLE_FILE), ("stream", stream, cases.STREAM_FILE),
                           ("network", network, cases.NETWORK_FILE)):
        if args.only and name not in args.only:
            continue
        data = fn()
        data["_meta::commit"] = np.str_(cases.COMMIT)
        data["_meta::source"] = np.str_(info)
        path = args.out / path.name
        np.savez_compressed(path, **data)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(data)} arrays)")


if __name__ == "__main__":
    main()

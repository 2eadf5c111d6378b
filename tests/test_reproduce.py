"""``llmqueue reproduce``: the report, its determinism, resumption, and a real browser's view.

The default suite runs the ``--smoke`` scale (every section, tiny horizons, ~10 s on 2 cores);
the ``slow`` test runs ``--quick`` and asserts the verdicts.  The browser checks need Debian's
chromium (``.ci/run`` installs it); without it they skip, unless LLMQUEUE_REQUIRE_BROWSER=1.
Screenshots go to $LLMQUEUE_TEST_ARTIFACTS (default: test-artifacts/ in the checkout).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from browser import check_page, find_chromium

from llmqueue.cli import main
from llmqueue.reproduce import reproduce
from llmqueue.reproduce.sections import BEYOND, DIFFERS, NOT_RUN, REPRODUCED, SECTIONS

ARTIFACTS = Path(os.environ.get("LLMQUEUE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
VERDICTS = {REPRODUCED, DIFFERS, BEYOND, NOT_RUN}
needs_browser = pytest.mark.skipif(
    find_chromium() is None and os.environ.get("LLMQUEUE_REQUIRE_BROWSER") != "1",
    reason="no Chromium (apt-get install chromium; LLMQUEUE_REQUIRE_BROWSER=1 makes this a failure)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce") / "smoke"
    assert main(["reproduce", "--smoke", "--out", str(out), "--jobs", "2"]) == 0
    return out


def _sections(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["sections"]


def test_every_section_is_written_with_its_plots(smoke, capsys):
    doc = json.loads((smoke / "results.json").read_text())
    assert [s["key"] for s in doc["sections"]] == [s.key for s in SECTIONS]
    assert doc["meta"]["mode"] == "smoke" and len(doc["costs"]) == len(SECTIONS)
    for s in doc["sections"]:
        assert s["verdict"] in VERDICTS and s["verdict"] != NOT_RUN, (s["key"], s["verdict_text"])
        assert s["claim"] and s["verdict_text"] and s["tables"] and s["plots"], s["key"]
        for plot in s["plots"]:
            assert (smoke / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    # Fig. 8 is exact even at smoke scale; published values are labelled as such.
    fig8 = doc["sections"][0]
    assert fig8["verdict"] == REPRODUCED
    assert all(fig8["numbers"][n]["matches_paper"] for n in ("vllm", "orca", "fastertransformer", "sarathi"))
    assert fig8["published"]["orca"]["batches"] == "[Ad Bd Cd] [Ad Bd Cd Dp Ep] [Bd Cd Dd Ed] [Bd]"


def test_report_is_self_contained(smoke):
    text = (smoke / "report.html").read_text()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.IGNORECASE)
    images = re.findall(r'<img src="([^"]{0,30})', text)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert len(images) == sum(len(s["plots"]) for s in _sections(smoke))
    assert text.count("<section id=") == len(SECTIONS) + 1          # + the cost section
    assert "Published values (typed in from the paper, not computed)" in text


def test_deterministic_across_reruns_and_job_counts(smoke, tmp_path):
    again = tmp_path / "again"
    reproduce(again, mode="smoke", jobs=1)
    assert _sections(again) == _sections(smoke)


def test_interrupted_run_keeps_finished_runs_and_resumes(tmp_path):
    out = tmp_path / "r"
    seen = {"results": 0}
    starts: list[tuple[int, int]] = []

    def stop_after_five(task, outcome):
        seen["results"] += 1
        if seen["results"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(out, mode="smoke", jobs=1, on_start=lambda todo, stored: starts.append((todo, stored)),
                  on_result=stop_after_five)
    total = starts[0][0]
    assert not (out / "results.json").exists()
    starts.clear()
    doc = reproduce(out, mode="smoke", jobs=2, on_start=lambda todo, stored: starts.append((todo, stored)))
    assert starts[0] == (total - 5, 5)          # the five finished runs are reused, the rest run
    assert all(s["verdict"] != NOT_RUN for s in doc["sections"])
    starts.clear()
    reproduce(out, mode="smoke", jobs=2, on_start=lambda todo, stored: starts.append((todo, stored)))
    assert starts[0] == (0, total)              # nothing left to run: the report is rebuilt from the store


@pytest.mark.parametrize("argv,words", [
    (["--jobs", "0"], "--jobs = 0 is not allowed"),
])
def test_bad_arguments_say_what_is_allowed(argv, words, tmp_path, capsys):
    assert main(["reproduce", "--smoke", "--out", str(tmp_path / "x"), *argv]) == 2
    assert words in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["reproduce", "--smoke", "--out", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_quick_and_smoke_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick", "--smoke"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _browser_check(out: Path, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    page = check_page(out / "report.html", shot)
    assert page.problems() == []
    ids = [s["id"] for s in page.sections]
    assert ids == [s.key for s in SECTIONS] + ["costs"]
    assert all(s["h2"] for s in page.sections)
    plots = sum(len(s["plots"]) for s in _sections(out))
    assert len(page.images) == plots and all(i["naturalWidth"] > 100 and i["width"] > 100 for i in page.images)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_report_renders_in_headless_chromium(smoke):
    _browser_check(smoke, "reproduce_smoke_report")


@pytest.mark.slow
def test_quick_reproduces_the_paper(tmp_path):
    """The --quick scale (about 40 s on 2 cores): every section with a claim is reproduced."""
    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--out", str(out), "--jobs", "2"]) == 0
    verdicts = {s["key"]: (s["verdict"], s["verdict_text"]) for s in _sections(out)}
    for key, (verdict, text) in verdicts.items():
        assert verdict == (BEYOND if key == "latency" else REPRODUCED), (key, text)
    # §5.4: the fluid model's growth per half-cycle, λm/(1 − λm) with m = 544/768, and the simulated waves
    fluid = next(s for s in _sections(out) if s["key"] == "networks")["numbers"]["rs_fluid"]
    lm = 1.1368 * 544 / 768
    assert fluid["fluid_growth_per_half_cycle"] == pytest.approx(lm / (1 - lm), rel=1e-3)
    assert fluid["simulated_peak_ratios"]
    assert fluid["simulated_peak_ratio_geomean"] == pytest.approx(fluid["fluid_growth_per_half_cycle"], rel=0.15)
    if find_chromium() is not None or os.environ.get("LLMQUEUE_REQUIRE_BROWSER") == "1":
        _browser_check(out, "reproduce_quick_report")


def test_a_broken_section_is_reported_not_fatal(smoke, tmp_path, monkeypatch):
    """One section failing to assemble gives it the verdict 'not run' with the error; the rest of
    the report is written (here from the stored runs of the smoke fixture: nothing reruns)."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(smoke, out)
    broken = SECTIONS[3]

    def boom(*args, **kwargs):
        raise ValueError("a plotting failure")

    monkeypatch.setattr(broken, "assemble", boom)
    starts = []
    doc = reproduce(out, mode="smoke", jobs=1, on_start=lambda todo, stored: starts.append(todo))
    assert starts[0] == 0
    verdicts = doc["verdicts"]
    assert verdicts[broken.key] == NOT_RUN
    assert "ValueError: a plotting failure" in doc["sections"][3]["verdict_text"]
    assert all(v != NOT_RUN for k, v in verdicts.items() if k != broken.key)
    assert "a plotting failure" in (out / "report.html").read_text()

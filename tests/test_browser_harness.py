"""Tests of the headless-browser harness (tests/browser.py) on small hand-made pages.

Skipped when no Chromium is installed, unless LLMQUEUE_REQUIRE_BROWSER=1 (then they fail).
"""

from __future__ import annotations

import base64
import os
import struct
import zlib
from pathlib import Path

import pytest
from browser import PageReport, check_page, find_chromium

if find_chromium() is None and os.environ.get("LLMQUEUE_REQUIRE_BROWSER") != "1":
    pytest.skip("no Chromium found (set $LLMQUEUE_CHROMIUM, or LLMQUEUE_REQUIRE_BROWSER=1 to "
                "make this a failure)", allow_module_level=True)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_png(width: int = 4, height: int = 3, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A valid RGB PNG built by hand (signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def page(tmp_path: Path, body: str, title: str = "Report") -> Path:
    path = tmp_path / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"</head><body>{body}</body></html>", encoding="utf-8")
    return path


def section(sid: str, heading: str, src: str, alt: str) -> str:
    return (f"<section id='{sid}'><h2>{heading}</h2>"
            f"<img src='{src}' alt='{alt}' style='width:120px'></section>")


def test_good_page_has_no_problems(tmp_path: Path) -> None:
    data = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    html = page(tmp_path, section("latency", "Latency", data, "latency plot")
                + section("throughput", "Throughput", data, "throughput plot"))
    shot = tmp_path / "shot.png"
    report = check_page(html, shot, timeout_s=30)
    assert report.problems() == []
    assert report.title == "Report"
    assert [(s["id"], s["h2"]) for s in report.sections] == [
        ("latency", "Latency"), ("throughput", "Throughput")]
    assert [(i["naturalWidth"], i["naturalHeight"]) for i in report.images] == [(4, 3), (4, 3)]
    assert report.screenshot == shot
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_broken_image_is_reported(tmp_path: Path) -> None:
    html = page(tmp_path, section("fig", "Figure", "missing.png", "queue length plot"))
    report = check_page(html, None, timeout_s=30)
    assert report.screenshot is None
    problems = report.problems()
    assert any("queue length plot" in p and "broken" in p for p in problems), problems
    assert any("missing.png" in p for p in report.failed_loads), report.failed_loads


@pytest.mark.parametrize(("script", "expected"), [
    ("console.error('boom');", "boom"),
    ("throw new Error('kaboom');", "kaboom"),
])
def test_script_errors_are_reported(tmp_path: Path, script: str, expected: str) -> None:
    data = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    html = page(tmp_path, section("s", "S", data, "ok") + f"<script>{script}</script>")
    problems = check_page(html, None, timeout_s=30).problems()
    assert len(problems) == 1 and expected in problems[0], problems


def test_problems_messages_without_browser() -> None:
    empty = PageReport("t", [], [], [], [], None)
    assert empty.problems() == ["no <section> elements on the page"]
    report = PageReport(
        "t",
        [{"id": "a", "h2": None, "visible": True}, {"id": "b", "h2": "B", "visible": False}],
        [{"src": "x.png", "alt": "tiny", "complete": True, "naturalWidth": 5,
          "naturalHeight": 5, "width": 0, "height": 0}],
        [], [], None, ["render failed"])
    problems = report.problems()
    assert any("#a" in p and "<h2>" in p for p in problems)
    assert any("#b" in p and "not visible" in p for p in problems)
    assert any("'tiny'" in p and "0x0" in p for p in problems)
    assert any("render failed" in p for p in problems)


def test_chromium_that_cannot_start_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQUEUE_CHROMIUM", "/bin/false")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        check_page(page(tmp_path, ""), None, timeout_s=10)

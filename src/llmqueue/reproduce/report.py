"""Writing the reproduction: ``report.html`` (self-contained), ``results.json``, the PNGs.

The HTML has no script and no external resource: images are embedded as data URIs, styles
are inline, so it opens from disk with no server and no network.  ``results.json`` holds the
sections' numbers and verdicts (deterministic for a given mode and version) and, apart, the
run's costs and metadata (which are not).
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmqueue.files import atomic_path
from llmqueue.reproduce.sections import BEYOND, DIFFERS, NOT_RUN, REPRODUCED, Result

BADGE = {REPRODUCED: "#1a7f37", DIFFERS: "#b35900", BEYOND: "#0b5cad", NOT_RUN: "#a40e26"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2.2em; }
.meta { color: #57606a; font-size: 0.9em; }
.claim { background: #f6f8fa; border-left: 4px solid #8c959f; padding: 0.6em 1em; margin: 0.8em 0; }
.badge { display: inline-block; color: white; border-radius: 1em; padding: 0.1em 0.8em; font-weight: 600;
         font-size: 0.9em; }
.verdict { margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
caption { caption-side: top; text-align: left; color: #57606a; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.published { font-size: 0.85em; color: #57606a; }
.note { color: #a40e26; font-size: 0.9em; }
"""


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> floats."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_report(out: Path, results: list[Result], meta: dict, costs: list[dict]) -> dict[str, Any]:
    meta = {**meta, "generated": datetime.now(UTC).isoformat(timespec="seconds")}
    sections = [{"key": r.key, "title": r.title, "claim": r.claim, "published": r.published, "config": r.config,
                 "verdict": r.verdict, "verdict_text": r.verdict_text, "numbers": r.numbers, "notes": r.notes,
                 "tables": [{"caption": t.caption, "header": t.header, "rows": t.rows} for t in r.tables],
                 "plots": [f"plots/{name}" for name, _ in r.plots]} for r in results]
    doc = _clean({"sections": sections, "verdicts": {r.key: r.verdict for r in results}, "meta": meta, "costs": costs})
    _atomic_write(out / "results.json", json.dumps(doc, indent=1, sort_keys=False).encode())
    _atomic_write(out / "report.html", render(results, meta, costs, out / "plots").encode())
    return doc


def _img(path: Path, caption: str) -> str:
    if not path.is_file():
        return f'<p class="note">plot missing: {html.escape(path.name)}</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(caption: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _badge(verdict: str) -> str:
    return f'<span class="badge" style="background:{BADGE.get(verdict, "#57606a")}">{html.escape(verdict)}</span>'


def render(results: list[Result], meta: dict, costs: list[dict], plots: Path) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>llmqueue: reproduction of "
             f"arXiv 2504.07347</title><style>{CSS}</style></head><body>",
             "<h1>Reproduction of Dai, Deng, Li, Peng, <i>Throughput-Optimal Scheduling Algorithms for LLM "
             "Inference and AI Agents</i> (arXiv 2504.07347)</h1>",
             f"<p class='meta'>llmqueue {e(str(meta['version']))} · mode <b>{e(meta['mode'])}</b> · "
             f"{meta['jobs']} worker process(es) · {meta['wall_s']:.0f} s wall · generated {e(meta['generated'])}. "
             "Every number below comes from a simulation run or a closed form computed by this run, except the "
             "values marked <i>published</i>, which are the paper's (arXiv 2504.07347). Rerun with <code>llmqueue reproduce"
             + {"full": "", "quick": " --quick", "smoke": " --smoke"}.get(meta["mode"], "")
             + "</code> (finished runs are reused from <code>runs.db</code> beside this file).</p>"]
    if meta["mode"] != "full":
        parts.append(f"<p class='note'>This is a <b>{e(meta['mode'])}</b> run: shorter horizons and fewer seeds than "
                     "the full reproduction; its verdicts are less certain.</p>")
    parts.append(_table("Verdicts", ["section", "verdict"],
                        [[r.title, r.verdict] for r in results]))
    parts.append("<nav><ul>" + "".join(f"<li><a href='#{r.key}'>{e(r.title)}</a> {_badge(r.verdict)}</li>"
                                        for r in results) + "</ul></nav>")
    for r in results:
        parts.append(f"<section id='{e(r.key)}'><h2>{e(r.title)}</h2>")
        parts.append(f"<div class='claim'><b>The paper's claim.</b> {e(r.claim)}</div>")
        if r.published:
            parts.append("<p class='published'><b>Published values (typed in from the paper, not computed):</b> "
                         + "; ".join(f"{e(k)} = {e(_show(v))}" for k, v in r.published.items())
                         + "</p>")
        parts.append(f"<div class='verdict'>{_badge(r.verdict)} {e(r.verdict_text)}</div>")
        for t in r.tables:
            parts.append(_table(t.caption, t.header, t.rows))
        for name, caption in r.plots:
            parts.append(_img(plots / name, caption))
        for note in r.notes:
            parts.append(f"<p class='note'>{e(note)}</p>")
        if r.config:
            parts.append(f"<details><summary>Configuration</summary><pre>{e(r.config)}</pre></details>")
        parts.append("</section>")
    parts.append("<section id='costs'><h2>What this run cost</h2>")
    parts.append(_table("Runs per section and the CPU seconds they took in the workers (wall time of the whole "
                        f"reproduction: {meta['wall_s']:.0f} s on {meta['jobs']} process(es)).",
                        ["section", "runs", "CPU s", "bisection wall s"],
                        [[c["section"], str(c["runs"]), f"{c['cpu_s']:.1f}",
                          "–" if c["search_wall_s"] is None else f"{c['search_wall_s']:.1f}"] for c in costs]))
    parts.append("</section></body></html>")
    return "\n".join(parts)

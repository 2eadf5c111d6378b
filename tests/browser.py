"""Check an HTML report in a real headless Chromium, for the test suite.

``check_page(html, screenshot)`` opens a local HTML file in headless Chromium and returns a
:class:`PageReport`: the page title, its ``<section>`` elements (id, first ``<h2>``, visible?),
its images (loaded? decoded? rendered size), console errors, uncaught exceptions, failed loads,
plus an optional full-page PNG screenshot.  ``PageReport.problems()`` turns that into readable
messages; an empty list means the page looks right.

Why the Chrome DevTools Protocol (CDP) by hand: it is a JSON protocol over a websocket, so all
that is needed is ``websocket-client`` (the standard library has no websocket client; the HTTP
part, ``/json``, is plain ``urllib``).  Playwright or Puppeteer would pull in Node and their own
browser downloads, which this machine cannot fetch.

Why these flags: the machine's network is closed.  Without ``--disable-background-networking``,
``--disable-component-update``, ``--disable-sync`` and ``--no-first-run`` Chromium keeps trying to
reach Google hosts (updates, safe browsing, sync), which only adds noise and delays.
``--remote-debugging-port=0`` lets Chromium pick a free port, which we read from its stderr
(``DevTools listening on ws://...``) or from ``<user-data-dir>/DevToolsActivePort``.  Each call
uses a fresh profile directory and kills Chromium (its whole process group) afterwards.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

_LOCAL = ["127.0.0.1", "localhost"]
_DEVTOOLS_RE = re.compile(r"DevTools listening on ws://[^:/\s]+:(\d+)/")
# Harmless stderr noise, left out of error messages: no D-Bus in containers, and Debian's
# /usr/bin/chromium wrapper script trips on its own /dev/shm size test.
_NOISE = re.compile(r"dbus/|unexpected operator|^\s*$")

_WAIT_IMAGES_JS = """(async () => {
  const t0 = Date.now();
  while (Date.now() - t0 < 5000 &&
         (document.readyState !== 'complete' || ![...document.images].every(i => i.complete)))
    await new Promise(r => setTimeout(r, 50));
  const decoded = Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  await Promise.race([decoded, new Promise(r => setTimeout(r, 3000))]);
  return true;
})()"""

_INSPECT_JS = """(() => {
  const visible = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  return {
    title: document.title,
    sections: [...document.querySelectorAll('section')].map(s => {
      const h2 = s.querySelector('h2');
      return {id: s.id, h2: h2 ? h2.textContent.trim() : null, visible: visible(s)};
    }),
    images: [...document.images].map(i => {
      const r = i.getBoundingClientRect();
      return {src: (i.getAttribute('src') || '').slice(0, 40), alt: i.alt, complete: i.complete,
              naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
              width: r.width, height: r.height};
    }),
    errors: [...document.querySelectorAll('.error')].map(e => e.textContent.trim()),
  };
})()"""


def find_chromium() -> str | None:
    """$LLMQUEUE_CHROMIUM, else /usr/bin/chromium, else chromium/chromium-browser/google-chrome."""
    env = os.environ.get("LLMQUEUE_CHROMIUM")
    if env:
        return env
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@dataclass
class PageReport:
    title: str
    sections: list[dict[str, Any]]
    images: list[dict[str, Any]]
    console_errors: list[str]
    failed_loads: list[str]
    screenshot: Path | None
    error_texts: list[str] = field(default_factory=list)  # text of elements with class "error"

    def problems(self) -> list[str]:
        out: list[str] = []
        if not self.sections:
            out.append("no <section> elements on the page")
        for s in self.sections:
            name = f"section #{s['id']}" if s["id"] else "section without id"
            if not s["h2"]:
                out.append(f"{name} has no <h2> heading")
            if not s["visible"]:
                out.append(f"{name} is not visible (zero-size bounding box)")
        for i in self.images:
            name = f"image alt={i['alt']!r} src={i['src']!r}"
            if not i["complete"] or i["naturalWidth"] == 0:
                out.append(f"{name} is broken (complete={i['complete']}, "
                           f"naturalWidth={i['naturalWidth']})")
            elif i["width"] == 0 or i["height"] == 0:
                out.append(f"{name} is rendered at size {i['width']}x{i['height']}")
        out += [f"page console: {m}" for m in self.console_errors]
        out += [f"failed load: {m}" for m in self.failed_loads]
        out += [f"page shows an error: {t}" for t in self.error_texts]
        return out


class _Cdp:
    """Minimal CDP session: send commands, dispatch events to collectors while waiting."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws, self.next_id, self.seen = ws, 0, set[str]()
        self.console: list[str] = []
        self.failed: list[str] = []
        self.urls: dict[str, str] = {}

    def _event(self, method: str, p: dict[str, Any]) -> None:
        self.seen.add(method)
        if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
            self.console.append(f"console.{p['type']}: {' '.join(args)}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            self.console.append(f"uncaught exception: {text.splitlines()[0] if text else '?'}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            if p["entry"].get("source") != "network":  # network failures: Network.loadingFailed
                self.console.append(f"log: {p['entry']['text']}")
        elif method == "Network.requestWillBeSent":
            self.urls[p["requestId"]] = p["request"]["url"][:80]
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            url = self.urls.get(p["requestId"], "?")
            self.failed.append(f"{url}: {p.get('errorText') or p.get('blockedReason')}")

    def _recv(self, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for Chromium")
        self.ws.settimeout(left)
        try:
            msg: dict[str, Any] = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise TimeoutError("timed out waiting for Chromium") from None
        if "method" in msg:
            self._event(msg["method"], msg.get("params", {}))
        return msg

    def call(self, method: str, deadline: float, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while (msg := self._recv(deadline)).get("id") != self.next_id:
            pass
        if "error" in msg:
            raise RuntimeError(f"CDP {method} failed: {msg['error']}")
        return msg.get("result", {})

    def wait_event(self, method: str, deadline: float) -> None:
        while method not in self.seen:
            self._recv(deadline)

    def evaluate(self, js: str, deadline: float) -> Any:
        r = self.call("Runtime.evaluate", deadline, expression=js, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")


def _read_lines(proc: subprocess.Popen[bytes], out: collections.deque[str],
                lock: threading.Lock) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        with lock:
            out.append(raw.decode(errors="replace").rstrip())


def _wait_for_port(proc: subprocess.Popen[bytes], profile: Path, stderr: collections.deque[str],
                   lock: threading.Lock, deadline: float) -> int:
    port_file = profile / "DevToolsActivePort"
    while True:
        with lock:
            lines = list(stderr)
        for line in lines:
            if m := _DEVTOOLS_RE.search(line):
                return int(m.group(1))
        with contextlib.suppress(OSError, ValueError):  # both lines present: fully written
            port, _ws_path = port_file.read_text().splitlines()[:2]
            return int(port)
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited with code {proc.returncode} before DevTools")
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium did not open its DevTools port")
        time.sleep(0.05)


def _page_ws_url(port: int, deadline: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env
    while True:
        try:
            with opener.open(f"http://127.0.0.1:{port}/json", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("no page target in DevTools /json")
        time.sleep(0.1)


def _inspect(cdp: _Cdp, html_path: Path, screenshot: Path | None, deadline: float) -> PageReport:
    for domain in ("Runtime", "Log", "Page", "Network"):
        cdp.call(f"{domain}.enable", deadline)
    cdp.seen.discard("Page.loadEventFired")
    nav = cdp.call("Page.navigate", deadline, url=html_path.resolve().as_uri())
    if nav.get("errorText"):
        raise RuntimeError(f"navigation failed: {nav['errorText']}")
    cdp.wait_event("Page.loadEventFired", deadline)
    cdp.evaluate(_WAIT_IMAGES_JS, deadline)
    info = cdp.evaluate(_INSPECT_JS, deadline)
    if screenshot is not None:
        metrics = cdp.call("Page.getLayoutMetrics", deadline)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = cdp.call("Page.captureScreenshot", deadline, format="png",
                        captureBeyondViewport=True, clip=clip)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return PageReport(info["title"], info["sections"], info["images"], list(cdp.console),
                      list(cdp.failed), screenshot, info["errors"])


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # the whole group: browser, zygote, renderers, GPU process
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


def check_page(html_path: Path, screenshot: Path | None, *, timeout_s: float = 60) -> PageReport:
    """Load ``html_path`` in headless Chromium and report what a reader would see."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (set $LLMQUEUE_CHROMIUM)")
    deadline = time.monotonic() + timeout_s
    profile = Path(tempfile.mkdtemp(prefix="llmqueue-chromium-"))
    stderr: collections.deque[str] = collections.deque(maxlen=200)
    lock = threading.Lock()
    reader: threading.Thread | None = None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,1600",
             "about:blank"]
    proc: subprocess.Popen[bytes] | None = None
    ws: websocket.WebSocket | None = None
    step = "starting Chromium"
    try:
        proc = subprocess.Popen([exe, *flags], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        reader = threading.Thread(target=_read_lines, args=(proc, stderr, lock), daemon=True)
        reader.start()
        port = _wait_for_port(proc, profile, stderr, lock, deadline)
        step = f"connecting to DevTools on port {port}"
        url = _page_ws_url(port, deadline)
        ws = websocket.create_connection(url, timeout=max(1.0, deadline - time.monotonic()),
                                         suppress_origin=True, http_no_proxy=_LOCAL)
        step = f"checking {html_path}"
        return _inspect(_Cdp(ws), html_path, screenshot, deadline)
    except (OSError, TimeoutError, RuntimeError, websocket.WebSocketException) as exc:
        with lock:
            tail = "\n".join([x for x in stderr if not _NOISE.search(x)][-20:]) or "(empty)"
        raise RuntimeError(f"headless Chromium ({exe}) failed while {step}: {exc}\n"
                           f"--- Chromium stderr, last lines ---\n{tail}") from exc
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):  # best effort: Chromium is killed next
                ws.close()
        if proc is not None:
            _kill(proc)
            if reader is not None:
                reader.join(2)
            if proc.stderr is not None and not (reader and reader.is_alive()):
                proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)

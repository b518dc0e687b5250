"""Headless Chromium driven over the DevTools protocol, for tests of generated web pages.

The browser is the OS package (``apt-get install -y chromium``); it listens on a
loopback port it picks itself (``--remote-debugging-port=0``, read back from
``DevToolsActivePort``), and one websocket (the ``websocket-client`` package)
carries the protocol. A page visit collects what the browser reports as wrong:
console errors, uncaught exceptions, log entries of level error (a missing image
is one) and failed requests, and reads the page's links, anchors, images and HTML.

Example
-------
>>> with Chromium() as browser:  # doctest: +SKIP
...     page = browser.visit("file:///tmp/site/index.html")
...     page.errors, len(page.links)
([], 42)
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_READ_PAGE = """JSON.stringify({
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  images: Array.from(document.images).map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0})),
  scripts: document.scripts.length,
  globals: Object.keys(window).filter(k => k.startsWith('__')),
  title: document.title,
  html: document.documentElement.outerHTML
})"""


def find_chromium() -> str | None:
    """The path of a Chromium executable on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What loading one URL showed."""

    url: str
    errors: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    scripts: int = 0
    globals: list[str] = field(default_factory=list)
    title: str = ""
    html: str = ""


class Chromium:
    """One headless Chromium with one tab, driven over CDP."""

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 900):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
        self.width, self.height = width, height
        self._id = 0
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        import websocket

        self._profile = tempfile.mkdtemp(prefix="actstore-chromium-")
        self._proc = subprocess.Popen(
            [
                self.executable,
                "--headless=new",
                "--no-sandbox",  # tests run as root in containers
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}{path}", timeout=30, suppress_origin=True
        )
        self._open_tab()
        return self

    def _open_tab(self) -> None:
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._send(f"{domain}.enable", session=True)
        self._send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def __exit__(self, *exc: Any) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            # the browser may close the socket before answering
            with contextlib.suppress(Exception):
                self._send("Browser.close")
            ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = False
    ) -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        while True:
            got = json.loads(self._ws.recv())
            if got.get("id") == self._id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got.get("result", {})
            if "method" in got:
                self._events.append(got)

    def _wait(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self._events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self._ws.settimeout(max(0.05, deadline - time.monotonic()))
            got = json.loads(self._ws.recv())
            if "method" in got:
                self._events.append(got)
        self._ws.settimeout(30)

    def visit(self, url: str) -> PageVisit:
        """Load ``url``, wait for its load event, and report what went wrong and what it holds."""
        self._events.clear()
        nav = self._send("Page.navigate", {"url": url}, session=True)
        out = PageVisit(url)
        if nav.get("errorText"):
            out.errors.append(f"navigation failed: {nav['errorText']}")
            self._open_tab()  # an error page may leave the session detached
            return out
        self._wait("Page.loadEventFired")
        res = self._send(
            "Runtime.evaluate", {"expression": _READ_PAGE, "returnByValue": True}, session=True
        )
        page = json.loads(res["result"]["value"])
        self._send("Runtime.evaluate", {"expression": "1"}, session=True)  # flush late events
        for e in self._events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.errors.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Runtime.exceptionThrown":
                out.errors.append("exception: " + str(p.get("exceptionDetails", {}).get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
            elif m == "Page.javascriptDialogOpening":
                out.errors.append(f"dialog opened: {p.get('message')}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.errors.append(f"request failed: {p.get('errorText')}")
        out.links, out.ids, out.images = page["links"], page["ids"], page["images"]
        out.scripts, out.title, out.html = page["scripts"], page["title"], page["html"]
        out.globals = page["globals"]
        out.errors += [f"image did not load: {i['src']}" for i in out.images if not i["ok"]]
        return out

    def screenshot(self, path: str | Path, *, full_page: bool = False) -> Path:
        """A PNG of the current page (the viewport, or the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self._send("Page.captureScreenshot", params, session=True)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

"""``actstore serve``: the report pages, served from a live store on localhost, read-only.

The pages are the report's own (:func:`~actstore.report.site.build_report`),
kept in a private folder: a request for the index (or any page while the store
has new commits) first updates the site incrementally from the store, so the
pages follow an ingest or analysis that is still writing, and only changed
pages are rendered again. The server answers GET and HEAD only, serves nothing
outside the site, and binds to 127.0.0.1 unless told otherwise.

Example
-------
>>> server = make_server("demo-out/store", port=0)  # doctest: +SKIP
>>> server.server_address  # doctest: +SKIP
('127.0.0.1', 43117)
"""

from __future__ import annotations

import functools
import http.server
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import actstore
from actstore.report.site import ReportOptions, build_report
from actstore.store.store import Store


class _LiveSite:
    """A report folder brought up to date with the store when its commit sequence moves."""

    def __init__(self, store: Store, options: ReportOptions) -> None:
        self.store = store
        self.options = options
        self.dir = Path(tempfile.mkdtemp(prefix="actstore-serve-")) / "site"
        self._seq: Any = None
        self._lock = threading.Lock()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            seq = self.store.sql("SELECT value FROM meta WHERE key = 'commit_seq'").fetchall()
            if force or seq != self._seq:
                build_report(self.store, self.dir, self.options)
                self._seq = seq


class _Handler(http.server.SimpleHTTPRequestHandler):
    site: _LiveSite

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html") or path.endswith(".html"):
            self.site.refresh()
        super().do_GET()

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass


def make_server(
    store: Store | str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    options: ReportOptions | None = None,
) -> http.server.ThreadingHTTPServer:
    """A read-only HTTP server of the store's report pages (call ``serve_forever()``).

    Parameters
    ----------
    store
        A store or its path (opened read-only).
    host, port
        Where to listen (default loopback only; port 0 picks a free one).
    options
        What the pages show (see :class:`~actstore.report.site.ReportOptions`).

    Example
    -------
    >>> srv = make_server("demo-out/store", port=0)  # doctest: +SKIP
    >>> threading.Thread(target=srv.serve_forever, daemon=True).start()  # doctest: +SKIP
    """
    st = store if isinstance(store, Store) else actstore.open(store, read_only=True)
    site = _LiveSite(st, options or ReportOptions())
    handler = type("Handler", (_Handler,), {"site": site})
    bound = functools.partial(handler, directory=str(site.dir))
    return http.server.ThreadingHTTPServer((host, port), bound)

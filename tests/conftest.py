"""Shared fixtures: the real datasets folder and a local HTTP server for the download tests."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real, byte-identical dataset files: $SWEEPER_DATA_DIR, else ../shared/datasets."""
    env = os.environ.get("SWEEPER_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root}; set SWEEPER_DATA_DIR to the shared datasets folder")
    return root.resolve()


class FileServer:
    """A threaded HTTP server on 127.0.0.1 that serves registered bytes and counts GETs per path.

    `serve(path, data)` registers a file; `truncate` holds paths whose body is cut in half after a
    full Content-Length header; `delay` seconds are waited before each response.
    """

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.hits: Counter[str] = Counter()
        self.delay = 0.0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with server._lock:
                    server.hits[self.path] += 1
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404, "not here")
                    return
                time.sleep(server.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.truncate:
                    body = body[: len(body) // 2]
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def serve(self, path: str, data: bytes) -> str:
        """Serve `data` at /path; return its full URL."""
        path = "/" + path.lstrip("/")
        self.routes[path] = data
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()

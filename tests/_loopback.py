"""A loopback HTTP server for download tests (served on 127.0.0.1; nothing leaves the machine)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """Serve ``routes`` (URL path -> bytes, or ``(bytes, headers)``) on 127.0.0.1 and record every request.

    ``requests`` holds ``(method, path)`` with the query string removed, ``paths`` the requested paths with it.
    """

    def __init__(self, routes: dict | None = None) -> None:
        self.routes: dict[str, object] = dict(routes or {})
        self.requests: list[tuple[str, str]] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _respond(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                server.requests.append((self.command, path))
                server.paths.append(self.path)
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                content, headers = route if isinstance(route, tuple) else (route, {})
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def do_GET(self):
                self._respond(body=True)

            def do_HEAD(self):
                self._respond(body=False)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.running = True

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the server down (idempotent)."""
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.running = False


def online_environment(monkeypatch) -> None:
    """Start a test online with no mirror configured, and without pooch's waits between retries."""
    for var in ("SC_DTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SC_DTA_DATA_URL"):
        monkeypatch.delenv(var, raising=False)
    import pooch.core

    monkeypatch.setattr(pooch.core.time, "sleep", lambda _s: None)

"""A real HTTP server on 127.0.0.1 for download tests (Range, cut-short responses, redirects)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Server:
    """A local HTTP server that serves `files`, honours Range and can cut a response short."""

    base: str
    files: dict[str, bytes]
    requests: list[dict[str, str]] = field(default_factory=list)
    cut_after: int | None = None  # next full response stops after this many bytes
    redirects: dict[str, str] = field(default_factory=dict)  # raw request path -> Location
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class bound to `state`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            key = self.path.lstrip("/")
            state.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
            if key in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[key])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = state.files.get(key)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if rng := self.headers.get("Range"):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if state.send_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.close_connection = True
            self.end_headers()
            if state.cut_after is not None:
                body, state.cut_after = body[: state.cut_after], None
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def local_server() -> Iterator[Server]:
    """Run a threaded http.server on 127.0.0.1 with an ephemeral port for the block."""
    state = Server("", {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()

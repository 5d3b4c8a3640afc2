"""A real HTTP server on 127.0.0.1 for fetch tests: a small image mirror plus fault endpoints.

`FixtureServer` is a ThreadingHTTPServer (HTTP/1.1, keep-alive) on an ephemeral port in a daemon
thread. It serves real JPEGs (skimage photos re-encoded at ~500 px) in the Multimedia Commons
layout and these faults (paths in `FAULTS`):

    /fault/flaky-500          500 twice, then the image
    /fault/429                429 with Retry-After: 1 once, then the image
    /fault/429-long           429 with Retry-After: 3600 once, then the image (tests the cap)
    /fault/always-503         503 forever
    /fault/slow               sleeps `slow_seconds` before answering (past the client's timeout)
    /fault/truncated          Content-Length larger than the bytes sent, then closes
    /fault/reset              closes the connection without answering
    /fault/placeholder        302 to /photo_unavailable.gif (Flickr's dead-photo redirect)
    /fault/redirect-metadata  302 to http://169.254.169.254/latest/meta-data/ (never contacted)
    /fault/redirect-localhost 302 to http://localhost:PORT/... (another host name: disallowed)
    /fault/redirect-ok        302 to a mirror image on this host
    /fault/oversize           OVERSIZE_BYTES with a Content-Length
    /fault/oversize-stream    OVERSIZE_BYTES without Content-Length (connection-close delimited)
    /fault/html               an HTML page (text/html)
    /fault/html-as-jpeg       an HTML body served as image/jpeg
    /fault/drip-body          the image's headers, then its body at 1 byte/s (DRIP_SECONDS at most)
    /fault/drip-body-close    the same without Content-Length (connection-close delimited)
    /fault/drip-headers       the status line, then the headers at 1 byte/s
    /fault/robots-noai        the image with X-Robots-Tag: noai
    /fault/robots-ours        the image with X-Robots-Tag: fdh-beam: noimageai
    /fault/robots-other       the image with X-Robots-Tag: otherbot: noai, and unavailable_after

Every request is logged (`log`: path, start, end) and the server tracks the largest number of
requests it handled at once (`max_in_flight`); `delay_seconds` slows every image answer so that
concurrency caps can be observed. Use the `http_server` pytest fixture (one server per test).
"""
from __future__ import annotations

import functools
import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from transforms.mirror_layout import mirror_relative_path

OVERSIZE_BYTES = 3 * 1024 * 1024
DRIP_SECONDS = 12  # a drip endpoint gives up after this long (the server thread must end)
PHOTO_NAMES = ("astronaut", "coffee", "chelsea")
FAULTS = ("flaky-500", "429", "429-long", "always-503", "slow", "truncated", "reset", "placeholder",
          "redirect-metadata", "redirect-localhost", "redirect-ok", "oversize", "oversize-stream",
          "html", "html-as-jpeg", "drip-body", "drip-body-close", "drip-headers", "robots-noai",
          "robots-ours", "robots-other")


@functools.lru_cache(maxsize=None)
def sample_jpegs(side: int = 500, quality: int = 90) -> dict[str, bytes]:
    """Real photos from skimage.data re-encoded as JPEG with the longer side = `side`."""
    from skimage import data

    photos = {}
    for name in PHOTO_NAMES:
        image = Image.fromarray(np.asarray(getattr(data, name)()))
        scale = side / max(image.size)
        image = image.convert("RGB").resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        photos[name] = buffer.getvalue()
    return photos


def placeholder_gif() -> bytes:
    """A small 2-colour GIF like Flickr's photo_unavailable placeholder."""
    image = Image.new("P", (500, 374), 0)
    image.putpalette([230, 230, 230, 120, 120, 120] + [0] * 762)
    image.paste(1, (200, 150, 300, 220))
    buffer = io.BytesIO()
    image.save(buffer, "GIF")
    return buffer.getvalue()


def mirror_path(photo_hash: str) -> str:
    """Multimedia Commons object path of a YFCC hash."""
    return "/" + mirror_relative_path(photo_hash)


@dataclass
class LoggedRequest:
    path: str
    start: float
    end: float = 0.0
    status: int = 0


class FixtureServer:
    """The loopback server; see the module docstring. `start()` / `stop()` or use the fixture."""

    def __init__(self, slow_seconds: float = 3.0, delay_seconds: float = 0.0):
        self.slow_seconds = slow_seconds
        self.delay_seconds = delay_seconds
        self.files: dict[str, tuple[bytes, str]] = {}
        self.log: list[LoggedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.add_file("/photo_unavailable.gif", placeholder_gif(), "image/gif")

    # -- set-up -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add_file(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.files[path] = (data, content_type)
        return path

    def add_mirror_image(self, photo_hash: str, data: bytes) -> str:
        """Serve `data` at the mirror path of `photo_hash`; returns the path."""
        return self.add_file(mirror_path(photo_hash), data)

    def start(self) -> "FixtureServer":
        sample_jpegs()  # encode once here, not inside a client's read timeout on a loaded machine
        handler = functools.partial(_Handler, self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                        name="fixture-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)

    # -- inspection ---------------------------------------------------------------------------

    def requests_to(self, path: str) -> int:
        """How many requests reached `path`."""
        with self._lock:
            return sum(1 for entry in self.log if entry.path == path)

    def _begin(self, path: str) -> tuple[LoggedRequest, int]:
        with self._lock:
            entry = LoggedRequest(path, time.monotonic())
            self.log.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._counts[path] = self._counts.get(path, 0) + 1
            return entry, self._counts[path]

    def _answered(self, entry: LoggedRequest, status: int) -> None:
        with self._lock:
            entry.status = status

    def _end(self, entry: LoggedRequest, status: int) -> None:
        with self._lock:
            entry.end, entry.status = time.monotonic(), entry.status or status
            self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, server_state: FixtureServer, *args, **kwargs):
        self.state = server_state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        # Log the status before the body goes out: a client may act on the answer (and a test
        # read the log) before this handler has returned.
        self.state._answered(self._entry, code)
        super().send_response(code, message)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        entry, nth = self.state._begin(path)
        self._entry = entry
        status = 0
        try:
            status = self._route(path, nth)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.state._end(entry, status)

    # -- answers ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/jpeg",
              headers: Optional[dict] = None, length: Optional[int] = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None or status != 200 or body:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        return status

    def _redirect(self, location: str) -> int:
        return self._send(302, b"", "text/plain", {"Location": location})

    def _image(self) -> bytes:
        return sample_jpegs()["astronaut"]

    def _route(self, path: str, nth: int) -> int:
        state = self.state
        if path in state.files:
            if state.delay_seconds:
                time.sleep(state.delay_seconds)
            data, content_type = state.files[path]
            return self._send(200, data, content_type)
        if not path.startswith("/fault/"):
            return self._send(404, b"not found", "text/plain")
        fault = path[len("/fault/"):]
        routes: dict[str, Callable[[], int]] = {
            "flaky-500": lambda: self._send(500, b"oops", "text/plain") if nth <= 2
            else self._send(200, self._image()),
            "429": lambda: self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
            if nth == 1 else self._send(200, self._image()),
            "429-long": lambda: self._send(429, b"slow down", "text/plain", {"Retry-After": "3600"})
            if nth == 1 else self._send(200, self._image()),
            "always-503": lambda: self._send(503, b"unavailable", "text/plain"),
            "slow": self._slow,
            "truncated": self._truncated,
            "reset": self._reset,
            "placeholder": lambda: self._redirect("/photo_unavailable.gif"),
            "redirect-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "redirect-localhost": lambda: self._redirect(f"http://localhost:{state.port}/fault/html"),
            "redirect-ok": lambda: self._redirect(sorted(p for p in state.files if p.endswith(".jpg"))[0]
                                                  if any(p.endswith(".jpg") for p in state.files)
                                                  else "/fault/html"),
            "oversize": lambda: self._send(200, bytes(OVERSIZE_BYTES)),
            "oversize-stream": self._oversize_stream,
            "html": lambda: self._send(200, b"<!DOCTYPE html><html><body>Not here</body></html>",
                                       "text/html; charset=utf-8"),
            "html-as-jpeg": lambda: self._send(200, b"  <html><body>error</body></html>", "image/jpeg"),
            "drip-body": lambda: self._drip_body(with_length=True),
            "drip-body-close": lambda: self._drip_body(with_length=False),
            "drip-headers": self._drip_headers,
            "robots-noai": lambda: self._send(200, self._image(), headers={"X-Robots-Tag": "noai"}),
            "robots-ours": lambda: self._send(200, self._image(),
                                              headers={"X-Robots-Tag": "fdh-beam: noimageai"}),
            "robots-other": lambda: self._send(200, self._image(), headers={
                "X-Robots-Tag": "otherbot: noai, noindex",
                "x-robots-tag": "unavailable_after: 25 Jun 2030 15:00:00 PST"}),
        }
        if fault not in routes:
            return self._send(404, b"no such fault", "text/plain")
        return routes[fault]()

    def _slow(self) -> int:
        time.sleep(self.state.slow_seconds)
        return self._send(200, self._image())

    def _truncated(self) -> int:
        body = self._image()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body) + 1000))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        return 200

    def _drip(self, data: bytes) -> None:
        """Send `data` one byte per second (stop after DRIP_SECONDS or when the client is gone)."""
        for byte in data[:DRIP_SECONDS]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(1.0)
        self.close_connection = True

    def _drip_body(self, with_length: bool) -> int:
        body = self._image()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        self._drip(body)
        return 200

    def _drip_headers(self) -> int:
        self.state._answered(self._entry, 200)
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._drip(b"Content-Type: image/jpeg\r\nX-Padding: " + b"a" * 64 + b"\r\n\r\n")
        return 200

    def _reset(self) -> int:
        self.close_connection = True
        return 0

    def _oversize_stream(self) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = bytes(64 * 1024)
        for _ in range(OVERSIZE_BYTES // len(chunk)):
            self.wfile.write(chunk)
        self.close_connection = True
        return 200


@pytest.fixture
def http_server():
    """A started FixtureServer on 127.0.0.1 (function scope: request counts start at zero)."""
    server = FixtureServer().start()
    try:
        yield server
    finally:
        server.stop()

"""The HTTP endpoint of a watcher or worker: /metrics, /healthz and /readyz, and nothing else."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def serve(
    port: int, bind: str, collect: Callable[[], bytes], unready: Callable[[], str | None]
) -> ThreadingHTTPServer:
    """Serve /metrics (the bytes *collect* returns), /healthz (the process runs) and /readyz
    (200 once *unready* returns None, else 503 with its reason) on a thread; any other path
    is a 404. Raises OSError if the port cannot be bound."""
    server_class = _Server6 if ":" in bind else ThreadingHTTPServer
    server = server_class((bind, port), _handler(collect, unready))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def exposition(registry: CollectorRegistry) -> Callable[[], bytes]:
    """The text exposition of a prometheus_client registry."""
    return lambda: bytes(generate_latest(registry))


def can_bind(port: int, bind: str) -> str | None:
    """None if *bind*:*port* can be listened on now, else why not (one line)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # bind = "::" or another IPv6 address


def _handler(
    collect: Callable[[], bytes], unready: Callable[[], str | None]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, collect(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                why = unready()
                if why is None:
                    self._send(200, b"ready\n")
                else:
                    self._send(503, why.encode("utf-8", "backslashreplace") + b"\n")
            else:
                self._send(404, b"not found: /metrics, /healthz and /readyz are served\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # no access log: scrapes every few seconds would drown the real one

    return Handler

"""The daemon's small HTTP endpoint: /metrics, /healthz, /readyz (gevent.pywsgi, loopback by default).

/healthz answers from the daemon's own gevent hub, so a 200 proves the event loop still runs (a blocked hub
cannot answer). /readyz asks the daemon whether it can take calls now (ESL up, WebSocket server listening), so
a load balancer or an operator's check sees the difference between "alive" and "useful".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app

from controller.metrics import Metrics

log = logging.getLogger("forkbridge.http")

ReadyCheck = Callable[[], tuple[bool, str]]
_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


class WsgiService:
    """A small gevent WSGI server on (host, port); port 0 picks a free port, readable as `.port` after start()."""

    what = "http endpoint"

    def __init__(self, host: str, port: int, max_clients: int = 32) -> None:
        self.host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self._max_clients = max_clients

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in the background; raises OSError at once if the address is taken."""
        if self._server is not None:
            return
        server = WSGIServer((self.host, self._requested_port), self._app, spawn=Pool(self._max_clients),
                            log=None, error_log=log)
        server.start()
        self._server = server
        log.info("%s on %s", self.what, self.url)

    def stop(self, timeout: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(timeout=timeout)
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise NotImplementedError


class HttpApi(WsgiService):
    """Serves /metrics, /healthz and /readyz."""

    what = "http endpoint (/metrics /healthz /readyz)"

    def __init__(self, host: str, port: int, metrics: Metrics | CollectorRegistry, ready: ReadyCheck,
                 max_clients: int = 32) -> None:
        """`metrics`: a daemon's Metrics, or a registry of its own (the parent of workers: the merged series)."""
        super().__init__(host, port, max_clients)
        self._ready = ready
        self._metrics_app = make_wsgi_app(metrics if isinstance(metrics, CollectorRegistry) else metrics.registry)

    # ---- WSGI

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", "method not allowed\n", method,
                          [("Allow", "GET, HEAD")])
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            return _reply(start_response, "200 OK", "ok\n", method)
        if path == "/readyz":
            try:
                ok, reason = self._ready()
            except Exception as exc:  # a broken check must read as "not ready", never as a 500 page
                log.warning("readiness check failed: %s", exc)
                ok, reason = False, f"readiness check failed: {type(exc).__name__}"
            if ok:
                return _reply(start_response, "200 OK", f"ready{': ' + reason if reason else ''}\n", method)
            return _reply(start_response, "503 Service Unavailable", f"not ready: {reason or 'unknown'}\n", method)
        return _reply(start_response, "404 Not Found", "not found\n", method)


def _reply(start_response: Callable[..., Any], status: str, body: str, method: str,
           headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = body.encode()
    start_response(status, [*_TEXT, ("Content-Length", str(len(data))), *(headers or [])])
    return [] if method == "HEAD" else [data]

"""The parent's call API (`api.listen`, daemon.workers above 1): each request goes to the worker that owns it.

Every worker serves the same API (controller.callapi) on a private loopback port; the parent checks the bearer
token and forwards, so a client sees one API exactly as with a single daemon:

- POST /calls goes to the worker that owns the route's name (controller.shard.owner): all of a route's outbound
  calls live in one worker, so its `max_concurrent` is counted in one place and stays exact;
- GET and DELETE /calls/<id> go to the worker that owns that id (the placing worker drew an id it owns);
- GET /calls is every worker's list, concatenated.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import gevent

from controller.callapi import MAX_BODY, bearer_ok, json_reply
from controller.httpapi import WsgiService
from controller.shard import owner

log = logging.getLogger("forkbridge.api")
FORWARD_TIMEOUT = 10.0
# the workers are on loopback: never through an http_proxy from the environment (it would get the bearer token)
TO_WORKER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiRouter(WsgiService):
    what = "outbound call API (/calls), forwarded to the workers"

    def __init__(self, host: str, port: int, token: str, count: int, api_port: Callable[[int], int | None],
                 max_clients: int = 32) -> None:
        super().__init__(host, port, max_clients)
        self._token = token.encode()
        self.count = count
        self._api_port = api_port  # worker K's private port, None while it is (re)starting

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
        if not parts or parts[0] != "calls" or len(parts) > 2:
            return _error(start_response, 404, "not found")
        if not bearer_ok(environ.get("HTTP_AUTHORIZATION", ""), self._token):
            return json_reply(start_response, 401, b'{"error":"missing or wrong bearer token"}\n',
                              [("WWW-Authenticate", 'Bearer realm="forkbridge"')])
        if len(parts) == 1 and method == "GET":
            return self._list(environ, start_response)
        if len(parts) == 1 and method != "POST":
            return json_reply(start_response, 405, _message(f"{method} is not allowed on /calls"),
                              [("Allow", "GET, POST")])
        body = b""
        if len(parts) == 1 and method == "POST":
            body = _read_body(environ)
            key = _route_of(body)
        else:
            key = parts[1]
        status, data, headers = self._forward(owner(key, self.count), method, environ, body)
        return json_reply(start_response, status, data, headers)

    def _list(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        jobs = [gevent.spawn(self._forward, k, "GET", environ, b"") for k in range(self.count)]
        gevent.joinall(jobs, timeout=FORWARD_TIMEOUT + 1)
        calls: list[Any] = []
        for k, job in enumerate(jobs):
            status, data, _headers = job.value if job.value is not None else (502, b"", [])
            if status != 200:
                return _error(start_response, 503, f"worker {k} did not answer; try again")
            calls += json.loads(data).get("calls", [])
        return json_reply(start_response, 200, (json.dumps({"calls": calls}, separators=(",", ":")) + "\n").encode())

    def _forward(self, k: int, method: str, environ: dict[str, Any],
                 body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        """(status, JSON body, headers to pass on) of worker k's answer."""
        port = self._api_port(k)
        if port is None:
            return 503, _message(f"worker {k}, which handles this request, is restarting; try again"), []
        request = urllib.request.Request(f"http://127.0.0.1:{port}{environ.get('PATH_INFO', '')}",
                                         data=body or None, method=method)
        request.add_header("Authorization", environ.get("HTTP_AUTHORIZATION", ""))
        if body:
            request.add_header("Content-Type", "application/json")
        try:
            with TO_WORKER.open(request, timeout=FORWARD_TIMEOUT) as reply:
                status, data, headers = reply.status, reply.read(), reply.headers
        except urllib.error.HTTPError as exc:
            status, data, headers = exc.code, exc.read(), exc.headers
        except OSError as exc:
            log.warning("worker %d did not answer the call API: %s", k, exc)
            return 502, _message(f"worker {k} did not answer; try again"), []
        passed = [(name, headers[name]) for name in ("Location", "Allow") if headers.get(name)]
        return status, data, passed


def _read_body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return b""
    return environ["wsgi.input"].read(length) if 0 < length <= MAX_BODY else b""


def _route_of(body: bytes) -> str:
    """The route a POST /calls names; a body without one goes anywhere (worker 0 answers it with the 400)."""
    try:
        route = json.loads(body).get("route")
    except (ValueError, AttributeError):
        return ""
    return route if isinstance(route, str) else ""


def _message(text: str) -> bytes:
    return (json.dumps({"error": text}) + "\n").encode()


def _error(start_response: Callable[..., Any], status: int, text: str) -> list[bytes]:
    return json_reply(start_response, status, _message(text))

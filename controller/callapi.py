"""The local HTTP API that places outbound calls: POST /calls, GET /calls[/<id>], DELETE /calls/<id>.

It answers JSON, is bound to loopback by default (`api.listen`) and refuses every request without the bearer
token from `api.token` (compared in constant time). It only ever calls the Dialer, which checks the route, the
number and the cap before anything reaches FreeSWITCH.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from controller.httpapi import WsgiService
from controller.outbound import Dialer, OutboundError

log = logging.getLogger("forkbridge.api")
MAX_BODY = 64 * 1024


class CallApi(WsgiService):
    what = "outbound call API (/calls)"

    def __init__(self, host: str, port: int, token: str, dialer: Dialer, max_clients: int = 32) -> None:
        super().__init__(host, port, max_clients)
        self._token = token.encode()
        self.dialer = dialer

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
        if not parts or parts[0] != "calls" or len(parts) > 2:
            return _json(start_response, 404, {"error": "not found"})
        if not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return _json(start_response, 401, {"error": "missing or wrong bearer token"},
                         [("WWW-Authenticate", 'Bearer realm="forkbridge"')])
        try:
            if len(parts) == 1 and method == "POST":
                attempt = self.dialer.place(**_placement(environ))
                return _json(start_response, 201, attempt.to_dict(), [("Location", f"/calls/{attempt.id}")])
            if len(parts) == 1 and method == "GET":
                live = [a.to_dict() for a in self.dialer.attempts.values() if a.state != "ended"]
                return _json(start_response, 200, {"calls": live})
            if len(parts) == 2 and method == "GET":
                attempt = self.dialer.get(parts[1])
                if attempt is None:
                    return _json(start_response, 404, {"error": f"no call {parts[1]!r}"})
                return _json(start_response, 200, attempt.to_dict())
            if len(parts) == 2 and method == "DELETE":
                return _json(start_response, 202, self.dialer.cancel(parts[1]).to_dict())
        except OutboundError as exc:
            log.warning("outbound call refused (%d): %s", exc.status, exc)
            return _json(start_response, exc.status, {"error": str(exc)})
        allow = "GET, POST" if len(parts) == 1 else "GET, DELETE"
        return _json(start_response, 405, {"error": "method not allowed"}, [("Allow", allow)])

    def _authorized(self, header: str) -> bool:
        return bearer_ok(header, self._token)


def bearer_ok(header: str, token: bytes) -> bool:
    """`Authorization: Bearer <api.token>`, compared in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def _placement(environ: dict[str, Any]) -> dict[str, Any]:
    """POST /calls body: {"route": ..., "to": ..., "variables": {...}, "context": "..."}."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        raise OutboundError(400, f"send a JSON body of at most {MAX_BODY} bytes")
    try:
        body = json.loads(environ["wsgi.input"].read(length))
    except (ValueError, UnicodeDecodeError):
        raise OutboundError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise OutboundError(400, "the body must be a JSON object")
    unknown = set(body) - {"route", "to", "variables", "context"}
    if unknown:
        raise OutboundError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    route, to, context = body.get("route"), body.get("to"), body.get("context", "")
    variables = body.get("variables") or {}
    if not isinstance(route, str) or not route or not isinstance(to, str) or not to:
        raise OutboundError(400, "route and to are required strings")
    if not isinstance(variables, dict) or not isinstance(context, str):
        raise OutboundError(400, "variables must be an object and context a string")
    return {"route_name": route, "to": to, "variables": variables, "context": context}


def _json(start_response: Callable[..., Any], status: int, body: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    return json_reply(start_response, status, (json.dumps(body, separators=(",", ":")) + "\n").encode(), headers)


def json_reply(start_response: Callable[..., Any], status: int, data: bytes,
               headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    """A JSON body already encoded (ours, or a worker's answer the parent passes on)."""
    reason = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 429: "Too Many Requests",
              502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                                          ("Content-Length", str(len(data))), *(headers or [])])
    return [data]

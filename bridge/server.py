"""The WebSocket server FreeSWITCH's mod_audio_fork / mod_audio_stream dials: /calls/<uuid>?token=...

The token is checked before the upgrade (gevent-websocket's pre-start hook), so a bad peer gets a plain
HTTP 401/404 and never a socket; FreeSWITCH then reports connect_failed. Works with and without the
`audio.drachtio.org` subprotocol (mod_audio_stream offers none; we never insist on one).
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.server import WebSocketServer

from bridge import wsframes
from bridge.session import MediaSession
from bridge.tokens import TokenBook

wsframes.install()

log = logging.getLogger("forkbridge.bridge")

_PATH = re.compile(r"^/calls/([0-9A-Za-z-]{1,64})/?$")
_STATUS = {"bad_path": "404 Not Found", "unknown_call": "404 Not Found", "not_websocket": "400 Bad Request"}


class BridgeServer:
    def __init__(self, host: str, port: int, tokens: TokenBook, lookup: Callable[[str], MediaSession | None],
                 max_frame_bytes: int, on_refused: Callable[[str], None] | None = None,
                 on_fork_closed: Callable[[str, str], None] | None = None) -> None:
        self.tokens = tokens
        self.lookup = lookup
        self.max_frame_bytes = max_frame_bytes
        self.on_refused = on_refused or (lambda _reason: None)
        self.on_fork_closed = on_fork_closed or (lambda _uuid, _why: None)
        self.server = WebSocketServer((host, port), self._app, handler_class=WebSocketHandler, log=None,
                                      error_log=None)
        self.server.pre_start_hook = self._pre_start
        self.refusals: dict[str, int] = {}

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def listening(self) -> bool:
        return self.server.started

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _refuse(self, environ: dict[str, Any], reason: str) -> bool:
        environ["forkbridge.refusal"] = reason
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self.on_refused(reason)
        log.warning("refused WebSocket from %s for %s: %s", environ.get("REMOTE_ADDR", "?"),
                    _PATH.sub(r"/calls/\1", environ.get("PATH_INFO", "")), reason)
        return True

    def _pre_start(self, handler: WebSocketHandler) -> bool:
        """Decide before upgrading. Returning True keeps the request plain HTTP (refused)."""
        environ = handler.environ
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return self._refuse(environ, "not_websocket")
        match = _PATH.match(environ.get("PATH_INFO", ""))
        if not match:
            return self._refuse(environ, "bad_path")
        uuid = match.group(1)
        token = parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
        if not token:
            return self._refuse(environ, "no_token")
        verdict = self.tokens.check(uuid, token)
        if verdict:
            return self._refuse(environ, verdict)
        if self.lookup(uuid) is None:
            return self._refuse(environ, "unknown_call")
        environ["forkbridge.uuid"] = uuid
        # Streamed audio and killAudio go out as small frames: never hold them back for Nagle.
        handler.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        environ["forkbridge.socket"] = handler.socket  # the session sets its receive low-water mark
        return False

    def _app(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        refusal = environ.get("forkbridge.refusal")
        ws = environ.get("wsgi.websocket")
        if refusal or ws is None:
            status = _STATUS.get(refusal or "not_websocket", "401 Unauthorized")
            start_response(status, [("Content-Type", "text/plain")])
            return [f"{refusal or 'not_websocket'}\n".encode()]
        uuid = environ["forkbridge.uuid"]
        session = self.lookup(uuid)
        if session is None:  # the call ended between the check and the upgrade
            return []
        why = session.attach(ws, self.max_frame_bytes, environ.get("forkbridge.socket"))
        log.debug("fork socket for %s ended: %s", uuid, why)
        if why == "oversized":
            self.refusals["oversized_frame"] = self.refusals.get("oversized_frame", 0) + 1
            self.on_refused("oversized_frame")
        self.on_fork_closed(uuid, why)
        return []

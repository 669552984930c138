"""Test helpers for fsim: a recording gevent-websocket server and a tiny raw ESL client."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import gevent
import gevent.event
from gevent.pywsgi import WSGIServer
from geventwebsocket import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket


@dataclass
class WSConn:
    """One accepted WebSocket connection as the server saw it."""

    path: str
    query: str
    headers: dict[str, str]
    ws: Any
    messages: list[tuple[float, str | bytes]] = field(default_factory=list)
    closed: gevent.event.Event = field(default_factory=gevent.event.Event)

    @property
    def texts(self) -> list[str]:
        return [m for _t, m in self.messages if isinstance(m, str)]

    @property
    def binaries(self) -> list[bytes]:
        return [m for _t, m in self.messages if isinstance(m, bytes)]

    @property
    def binary_times(self) -> list[float]:
        return [t for t, m in self.messages if isinstance(m, bytes)]

    def send(self, msg: str | bytes) -> None:
        self.ws.send(msg, binary=isinstance(msg, bytes))

    def close(self, code: int = 1000, reason: bytes = b"") -> None:
        """gevent-websocket 0.10.1 ignores ``code``: send a real close frame by hand (esl.md §8)."""
        with contextlib.suppress(WebSocketError):
            self.ws.send_frame(struct.pack("!H", code) + reason, WebSocket.OPCODE_CLOSE)


class WSRecorder:
    """A plain-function WSGI app (so no subprotocol is echoed, like the bridge) that records everything."""

    def __init__(self, on_open: Callable[[WSConn], None] | None = None, status: int | None = None,
                 echo_protocol: str | None = None) -> None:  # fmt: skip
        self.conns: list[WSConn] = []
        self.on_open = on_open
        self.status = status
        self.echo_protocol = echo_protocol
        # gevent-websocket answers 101 before the app runs, so a refusing server is a plain WSGI server.
        kw = {} if status is not None else {"handler_class": WebSocketHandler}
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, **kw)
        self.server.start()
        self.port = self.server.server_port

    def url(self, path: str = "/fork") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if self.status is not None:
            start_response(f"{self.status} Refused", [("Content-Type", "text/plain")])
            return [b"no"]
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("404 Not Found", [])
            return [b""]
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        conn = WSConn(environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), headers, ws)
        self.conns.append(conn)
        if self.on_open:
            gevent.spawn(self.on_open, conn)
        try:
            for _ in range(1_000_000):
                msg = ws.receive()
                if msg is None:
                    break
                conn.messages.append((time.monotonic(), bytes(msg) if isinstance(msg, bytearray) else msg))
        except WebSocketError:
            pass
        finally:
            conn.closed.set()
        return []

    def stop(self) -> None:
        self.server.stop(timeout=1)


class RawESL:
    """A byte-level ESL client, to check framing exactly (and to survive a frame cut mid-body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, cmd: str) -> None:
        self.sock.sendall(cmd.encode() + b"\n\n")

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_frame(self, timeout: float = 5.0) -> tuple[list[tuple[str, str]], bytes, bytes] | None:
        """(outer headers in order, body, raw frame bytes); None on EOF. Raises EOFError on a cut body."""
        self.sock.settimeout(timeout)
        for _ in range(10_000):
            if b"\n\n" in self.buf:
                break
            if not self._fill():
                return None
        head, _, rest = self.buf.partition(b"\n\n")
        headers = [tuple(line.split(": ", 1)) for line in head.decode().split("\n")]
        length = int(dict(headers).get("Content-Length", "0"))
        self.buf = rest
        for _ in range(10_000):
            if len(self.buf) >= length:
                break
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {length} body bytes")
        body, self.buf = self.buf[:length], self.buf[length:]
        raw = head + b"\n\n" + body
        return headers, body, raw  # type: ignore[return-value]

    def read_until(self, pred: Callable[[list[tuple[str, str]], bytes], bool], limit: int = 500) -> Any:
        for _ in range(limit):
            f = self.read_frame()
            if f is None:
                return None
            if pred(f[0], f[1]):
                return f
        raise AssertionError("frame not seen")

    def auth(self, password: str = "ClueCon") -> None:
        assert self.read_frame()[0] == [("Content-Type", "auth/request")]
        self.send(f"auth {password}")
        assert ("Reply-Text", "+OK accepted") in self.read_frame()[0]

    def close(self) -> None:
        self.sock.close()


def parse_event_body(body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split an event-plain body like libesl does: decode only header values; the inner body stays raw."""
    text_end = body.find(b"\n\n")
    head = body[:text_end] if text_end >= 0 else body
    headers = []
    for line in head.decode().split("\n"):
        if ": " in line:
            k, v = line.split(": ", 1)
            headers.append((k, unquote(v)))
    inner = body[text_end + 2 :] if text_end >= 0 else b""
    return headers, inner


def esl_client(sw: Any) -> Any:
    """greenswitch connected and authenticated to a running FSim, as a controller would be."""
    import greenswitch

    esl = greenswitch.InboundESL("127.0.0.1", sw.esl_port, "ClueCon", timeout=3)
    esl.connect()
    return esl

"""Loopback fake servers for engine tests, plus the audio and waiting helpers they share.

A fake is a real gevent-websocket server on 127.0.0.1:<ephemeral>. It records every message a client
sends (per connection and overall) and exposes script methods a test calls to make the server act
(send an error, drop the connection, ...). Every wait is bounded and fails the test with a message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event
import gevent.lock
import numpy as np
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from fsim.audio import g711_decode, ulaw_encode

WAIT = 5.0  # seconds; generous, only ever reached when a test fails


class Notifier:
    """Wake every waiter when something changed; waiters re-check their predicate (bounded)."""

    def __init__(self) -> None:
        self._event = gevent.event.Event()

    def notify(self) -> None:
        event, self._event = self._event, gevent.event.Event()
        event.set()

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = gevent.get_hub().loop.now() + timeout
        while True:
            event = self._event
            result = predicate()
            if result:
                return result
            remaining = deadline - gevent.get_hub().loop.now()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            event.wait(min(remaining, 0.25))


class Recorder:
    """An engine event sink that records events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._notifier = Notifier()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._notifier.notify()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def wait_for(self, kind: type, predicate: Callable[[Any], bool] = lambda e: True,
                 timeout: float = WAIT) -> Any:
        def find() -> Any:
            for event in self.events:
                if isinstance(event, kind) and predicate(event):
                    return event
            return None
        return self._notifier.wait_until(find, timeout, f"a {kind.__name__} event")

    def wait_count(self, kind: type, count: int, timeout: float = WAIT) -> list[Any]:
        self._notifier.wait_until(lambda: len(self.of(kind)) >= count, timeout, f"{count} {kind.__name__} events")
        return self.of(kind)


# ---- audio ------------------------------------------------------------------------------------------

def tone(ms: float, rate: int, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    """A sine burst as 16-bit little-endian mono PCM (loud enough for any energy VAD)."""
    n = int(rate * ms / 1000)
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def silence(ms: float, rate: int) -> bytes:
    return b"\x00\x00" * int(rate * ms / 1000)


def rms(pcm: bytes) -> float:
    if len(pcm) < 2:
        return 0.0
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples * samples)))


def lin2ulaw(pcm: bytes) -> bytes:
    """G.711 mu-law encode (ITU-T G.711), written independently of the bridge's codec (fsim's)."""
    return ulaw_encode(np.frombuffer(pcm, dtype="<i2"))


def ulaw2lin(data: bytes) -> bytes:
    return g711_decode(data, "PCMU").astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- server -----------------------------------------------------------------------------------------

class FakeConn:
    """One accepted client connection: what it sent, and how to talk back."""

    def __init__(self, ws: Any, environ: Mapping[str, Any]) -> None:
        self.ws = ws
        self.path = environ.get("PATH_INFO", "")
        self.query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        self.headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        self.received: list[Any] = []  # dicts for JSON text frames, bytes for binary frames
        self.closed = False
        self._lock = gevent.lock.Semaphore()
        self._raw_socket = ws.handler.socket

    def send(self, message: Mapping[str, Any]) -> bool:
        return self._send(json.dumps(message))

    def send_binary(self, data: bytes) -> bool:
        return self._send(bytes(data))

    def _send(self, payload: str | bytes) -> bool:
        with self._lock:
            if self.closed:
                return False
            try:
                self.ws.send(payload, binary=isinstance(payload, bytes))
                return True
            except Exception:
                self.closed = True
                return False

    def close(self, code: int = 1000, reason: str = "") -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                # geventwebsocket's close() drops the status code; send the frame ourselves
                with contextlib.suppress(Exception):
                    self.ws.send_frame(struct.pack("!H", code) + reason.encode()[:120], self.ws.OPCODE_CLOSE)
        self._shutdown()

    def drop(self) -> None:
        """Vanish without a close frame, like a crashed server or a cut network."""
        with self._lock:
            self.closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._raw_socket.shutdown(socket.SHUT_RDWR)


class _Handler(WebSocketHandler):
    def upgrade_websocket(self) -> Any:
        # Engine servers disable Nagle (asyncio, uvicorn and websockets all do): without it every second small
        # message waits for the client's next ACK, up to 40 ms, and a fake "exactly real time" engine is not.
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        refusal = self.server.fake.refuse_upgrade(self.environ)
        if refusal is not None and self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            status, body = refusal
            self.start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        return super().upgrade_websocket()

    def log_request(self) -> None:  # keep test output quiet
        pass


class FakeServer:
    """Base fake: subclasses implement `handle(conn)` (runs in the connection's greenlet)."""

    def __init__(self) -> None:
        self.connections: list[FakeConn] = []
        self.changed = Notifier()
        self._server: WSGIServer | None = None
        self.port = 0

    # lifecycle
    def start(self) -> FakeServer:
        self._server = WSGIServer(("127.0.0.1", 0), self._app, handler_class=_Handler, log=None, error_log=None)
        self._server.fake = self
        self._server.start()
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        for conn in self.connections:
            conn.close(1001)
        if self._server is not None:
            self._server.stop(timeout=1)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # hooks
    def refuse_upgrade(self, environ: Mapping[str, Any]) -> tuple[str, bytes] | None:
        """(status, body) to refuse the WebSocket handshake with plain HTTP, or None to accept."""
        return None

    def http(self, environ: Mapping[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    def handle(self, conn: FakeConn) -> None:
        raise NotImplementedError

    # recording
    @property
    def conn(self) -> FakeConn:
        return self.changed.wait_until(lambda: self.connections[-1] if self.connections else None, WAIT,
                                       "a client connection")

    def record(self, conn: FakeConn, message: Any) -> None:
        conn.received.append(message)
        self.changed.notify()

    def messages(self, type_: str | None = None) -> list[dict[str, Any]]:
        """All JSON messages received on every connection, optionally of one `type`."""
        found = [m for c in self.connections for m in c.received if isinstance(m, dict)]
        return [m for m in found if type_ is None or m.get("type") == type_]

    def wait_message(self, type_: str, predicate: Callable[[dict[str, Any]], bool] = lambda m: True,
                     timeout: float = WAIT, count: int = 1) -> dict[str, Any]:
        """The `count`-th received message of `type_` matching predicate."""
        def find() -> Any:
            hits = [m for m in self.messages(type_) if predicate(m)]
            return hits[count - 1] if len(hits) >= count else None
        return self.changed.wait_until(find, timeout, f"client message {type_!r}")

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            return self.http(environ, start_response)
        conn = FakeConn(ws, environ)
        self.connections.append(conn)
        self.changed.notify()
        try:
            self.handle(conn)
        finally:
            conn.closed = True
            self.changed.notify()
        return []

    def receive_loop(self, conn: FakeConn, on_text: Callable[[dict[str, Any]], None],
                     on_binary: Callable[[bytes], None] | None = None) -> None:
        """Read until the client goes away; record and dispatch every message."""
        while not conn.closed:
            try:
                data = conn.ws.receive()
            except Exception:
                break
            if data is None:
                break
            if isinstance(data, bytes | bytearray):
                self.record(conn, bytes(data))
                if on_binary is not None:
                    on_binary(bytes(data))
                continue
            try:
                message = json.loads(data)
            except ValueError:
                self.record(conn, {"type": "<invalid json>", "raw": data})
                continue
            self.record(conn, message)
            on_text(message)

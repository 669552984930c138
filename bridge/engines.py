"""Engine registry, plus the WebSocket plumbing the network engines share.

The registry maps a config `type` to "module:Class" and imports lazily, so a daemon that only uses
the echo engine never imports (or needs) a cloud engine's module, and a broken optional module only
fails the routes that use it.

`WebSocketEngine` owns the parts every network engine gets wrong in the same ways: a bounded
handshake, one reader greenlet, serialised writes, exactly one `Closed`, no events after `close()`,
and error texts that never carry a secret.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.lock
import websocket

from bridge.engine import CallInfo, Closed, Engine, EngineEvent, EngineRefused, EventSink

ENGINE_TYPES: dict[str, str] = {
    "echo": "bridge.echo:EchoEngine",
    "openai_realtime": "bridge.openai_realtime:OpenAIRealtimeEngine",
    "elevenlabs": "bridge.elevenlabs:ElevenLabsEngine",
    "generic": "bridge.generic:GenericEngine",
}

log = logging.getLogger("forkbridge.engine")


class UnknownEngineType(ValueError):
    pass


def engine_class(type_name: str) -> type[Engine]:
    """Import the class for `type_name` on first use."""
    try:
        target = ENGINE_TYPES[type_name]
    except KeyError:
        raise UnknownEngineType(f"unknown engine type {type_name!r}; known: {', '.join(ENGINE_TYPES)}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"{target} is not an Engine")
    return cls


def create_engine(type_name: str, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> Engine:
    """A new, not yet connected engine session for one call."""
    return engine_class(type_name)(config, call, sink)


# ---- helpers ----------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Key-like tokens: provider error texts sometimes echo part of a key ("Incorrect API key provided: sk-ab***").
_KEYLIKE = re.compile(r"\b(?:sk|xi|sess|ek)[-_][A-Za-z0-9_\-*.]{6,}")


def seconds(value: Any, default: float) -> float:
    """Engine options arrive as written in YAML ('5s', '500ms', 5): the config loader does not type them."""
    if value is None or isinstance(value, bool):
        return default
    if isinstance(value, int | float):
        return float(value) if value > 0 else default
    match = _DURATION.match(str(value))
    if not match:
        return default
    result = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return result if result > 0 else default


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets (and anything that looks like a key) from text bound for a log or an event."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


def safe_url(url: str) -> str:
    """The URL without query or credentials: signed URLs carry their token in the query string."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<unparsable url>"


def _text(data: bytes | str) -> str:
    """A text frame's payload as str; invalid UTF-8 raises what websocket-client's validator raised."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise websocket.WebSocketPayloadException("cannot decode: invalid UTF-8 in a text frame") from exc


def close_code(data: bytes) -> tuple[int, str]:
    """Status code and reason of a close frame's payload (1005 when the peer sent none)."""
    if len(data) < 2:
        return 1005, ""
    return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8", "replace")


class WebSocketEngine(Engine):
    """Base for engines that hold one client WebSocket.

    Subclasses implement `_handshake()` (open with `_open()`, exchange the first messages synchronously,
    set `self.formats`) and `_on_text()` / `_on_binary()` / `_on_close()`. After the handshake one reader
    greenlet dispatches every message, so subclass state needs no locks. Events stop for good once
    `Closed` was emitted or `close()` was called; `close()` itself emits nothing (the caller knows).

    websocket-client has no incoming message size limit (unlike `websockets`, 1 MiB by default), so
    the multi-megabyte frames providers have been seen to send are accepted as they are.

    Text frames are checked for UTF-8 here with the C codec (`_text()`), not by websocket-client: without
    the unmaintained `wsaccel` its validator is a per-byte Python loop, which at a few kB of base64 audio per
    delta was most of the daemon's CPU under load. A bad frame still ends the connection as before.
    """

    log_name = "engine"

    def __init__(self, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> None:
        super().__init__(config, call, sink)
        self._ws: websocket.WebSocket | None = None
        self._reader: gevent.Greenlet | None = None
        self._send_lock = gevent.lock.Semaphore()
        self._closing = False  # close() was called: no more events
        self._finished = False  # Closed was emitted
        # the call's uuid and DID on every line, as the controller's call lines carry them
        self.log = logging.LoggerAdapter(logging.getLogger(f"forkbridge.engine.{self.log_name}"),
                                         {"call_uuid": call.uuid, "did": call.did})

    # -- subclass API ---------------------------------------------------------------------------------

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(str(self.config.get(k) or "") for k in ("api_key", "token"))

    @property
    def connect_timeout(self) -> float:
        return seconds(self.config.get("connect_timeout"), 10.0)

    def _handshake(self) -> None:
        raise NotImplementedError

    def _on_text(self, message: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _on_binary(self, data: bytes) -> None:
        self.log.debug("call %s: ignoring %d-byte binary frame", self.call.uuid, len(data))

    def _on_close(self, code: int, reason: str) -> None:
        self._finish("normal" if code == 1000 else f"closed_{code}", clean=code == 1000)

    # -- lifecycle ------------------------------------------------------------------------------------

    def connect(self) -> None:
        try:
            self._handshake()
        except EngineRefused:
            self._abort_socket()
            raise
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            self._abort_socket()
            raise EngineRefused(self._describe(exc)) from None
        assert self._ws is not None
        self._ws.settimeout(None)
        self._reader = gevent.spawn(self._read_loop)

    def close(self) -> None:
        """Send a close frame and return at once; the socket is reaped in the background."""
        if self._closing:
            return
        self._closing = True
        ws = self._ws
        if ws is None:
            return
        try:
            with self._send_lock:
                ws.send_close(websocket.STATUS_NORMAL)
        except (websocket.WebSocketException, OSError):
            pass
        gevent.spawn(self._reap, self._reader)

    def _reap(self, reader: gevent.Greenlet | None) -> None:
        if reader is not None and reader is not gevent.getcurrent():
            reader.join(timeout=2.0)  # the peer answers our close frame and the reader ends
        self._abort_socket()
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=1.0)

    def emit(self, event: EngineEvent) -> None:
        if self._closing or self._finished:
            return
        if isinstance(event, Closed):
            self._finished = True
        try:
            super().emit(event)
        except Exception:  # a faulty sink must not kill the reader and silence the call
            self.log.exception("call %s: event sink failed on %s", self.call.uuid, type(event).__name__)

    @property
    def alive(self) -> bool:
        return self._ws is not None and not (self._closing or self._finished)

    # -- I/O ------------------------------------------------------------------------------------------

    def _open(self, url: str, headers: Mapping[str, str] | None = None) -> websocket.WebSocket:
        header = [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._ws = websocket.create_connection(url, timeout=self.connect_timeout, header=header,
                                               enable_multithread=False, suppress_origin=True,
                                               skip_utf8_validation=True)
        return self._ws

    def _recv_json(self, deadline: float) -> Mapping[str, Any]:
        """One JSON message during the handshake; binary and non-JSON frames are skipped. Bounded by deadline."""
        assert self._ws is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineRefused(f"{self.type_name}: no answer within {self.connect_timeout:g}s")
            self._ws.settimeout(remaining)
            opcode, data = self._ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code, reason = close_code(data)
                text = f"{code} {scrub(reason, self.secrets)}".strip()
                raise EngineRefused(f"{self.type_name}: server closed the connection during setup ({text})")
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            try:
                message = json.loads(_text(data))
            except websocket.WebSocketPayloadException:
                raise
            except ValueError:
                continue
            if isinstance(message, dict):
                return message

    def _deadline(self) -> float:
        return time.monotonic() + self.connect_timeout

    def _setup_send(self, message: Mapping[str, Any]) -> None:
        if not self._send_json(message):
            raise EngineRefused(f"{self.type_name}: connection lost during setup")

    def _await_setup(self, kind: str, deadline: float, refusal: Callable[[Mapping[str, Any]], str],
                     on_other: Callable[[Mapping[str, Any]], None] | None = None) -> Mapping[str, Any]:
        """Read setup messages until one of type `kind`; an `error` message refuses the session."""
        while True:
            message = self._recv_json(deadline)
            got = message.get("type")
            if got == kind:
                return message
            if got == "error":
                raise EngineRefused(refusal(message))
            if on_other is not None:
                on_other(message)

    def _send_json(self, message: Mapping[str, Any]) -> bool:
        return self._send(json.dumps(message, separators=(",", ":")), websocket.ABNF.OPCODE_TEXT)

    def _send_binary(self, data: bytes) -> bool:
        return self._send(data, websocket.ABNF.OPCODE_BINARY)

    def _send(self, payload: str | bytes, opcode: int) -> bool:
        ws = self._ws
        if ws is None or self._closing or self._finished:
            return False
        try:
            with self._send_lock:
                ws.send(payload, opcode)
            return True
        except (websocket.WebSocketException, OSError) as exc:
            self.log.warning("call %s: send failed: %s", self.call.uuid, self._describe(exc))
            self._finish("dropped", clean=False)
            return False

    def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        while not (self._closing or self._finished):
            try:
                opcode, data = ws.recv_data()
            except Exception as exc:  # any failure of the socket is a drop
                if not self._closing:
                    self.log.warning("call %s: connection lost: %s", self.call.uuid, self._describe(exc))
                self._finish("dropped", clean=False)
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code, reason = close_code(data)
                if not self._closing:
                    self.log.info("call %s: server closed %d %s", self.call.uuid, code, scrub(reason, self.secrets))
                    self._on_close(code, reason)
                self._finish("normal", clean=True)  # no-op when _on_close already finished
                break
            try:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    try:
                        text = _text(data)
                    except websocket.WebSocketPayloadException as exc:  # as websocket-client's own check did
                        if not self._closing:
                            self.log.warning("call %s: connection lost: %s", self.call.uuid, self._describe(exc))
                        self._finish("dropped", clean=False)
                        break
                    try:
                        message = json.loads(text)
                    except ValueError:
                        self.log.warning("call %s: ignoring a non-JSON text frame", self.call.uuid)
                        continue
                    if isinstance(message, dict):
                        self._on_text(message)
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self._on_binary(data)
            except Exception:  # one bad message must not end the call's conversation
                self.log.exception("call %s: failed to handle a message", self.call.uuid)
        self._abort_socket()

    def _finish(self, reason: str, clean: bool) -> None:
        """Emit Closed once and drop the socket. Safe from any greenlet."""
        if self._finished or self._closing:
            return
        self.emit(Closed(reason=reason, clean=clean))
        self._abort_socket()

    def _abort_socket(self) -> None:
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(websocket.WebSocketException, OSError):
            ws.shutdown()

    def _describe(self, exc: BaseException) -> str:
        """An error text for logs/exceptions: the exception class and a scrubbed status, never headers or URL query."""
        if isinstance(exc, websocket.WebSocketBadStatusException):
            return f"{self.type_name}: handshake refused with HTTP {exc.status_code}"
        if isinstance(exc, websocket.WebSocketTimeoutException | TimeoutError):
            return f"{self.type_name}: timed out after {self.connect_timeout:g}s"
        text = scrub(str(exc), self.secrets)
        return f"{self.type_name}: {type(exc).__name__}: {text}"[:300]

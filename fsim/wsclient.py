"""The WebSocket client side shared by the mod_audio_fork and mod_audio_stream emulations.

It dials with a gevent socket handed to websocket-client, so it cooperates with the hub even in a process that was
not monkey-patched. One writer greenlet owns all sends (like the lws service thread), one reader greenlet all reads.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.socket
import numpy as np
import soxr
import websocket

if TYPE_CHECKING:
    from .channel import Channel

log = logging.getLogger("fsim.ws")

RAW_EXT = {8000: ".r8", 16000: ".r16", 24000: ".r24", 32000: ".r32", 48000: ".r48", 64000: ".r64"}


class HandshakeError(Exception):
    """The server answered, but not with an acceptable 101."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class MediaBug:
    """State and plumbing common to both modules. Subclasses set the wire details."""

    kind = "bug"
    subclass_prefix = ""

    def __init__(self, ch: Channel, bugname: str, url: str, mix: str, rate: int, metadata: str | None) -> None:
        self.ch = ch
        self.sw = ch.sw
        self.bugname = bugname
        self.url = url
        self.mix = mix
        self.rate = rate
        self.channels = 2 if mix == "stereo" else 1
        self.metadata = metadata
        self.state = "connecting"  # connecting | connected | failed | disconnected | closed
        self.connected = gevent.event.Event()
        self.finished = gevent.event.Event()  # connect failed, server closed, or we closed
        self.paused = False
        self.graceful = False
        self.request_headers: list[str] = []
        self.response_headers: dict[str, str] = {}
        self.frames_sent: list[tuple[float, int]] = []  # (time.monotonic(), bytes) of every binary frame
        self.texts_sent: list[str] = []
        self.texts_received: list[str] = []
        self.binary_received: list[int] = []
        self.events_fired: list[tuple[str, str | None]] = []
        self.audio_bytes = 0
        self.close_code: int | None = None
        self.closed_by: str | None = None  # "switch" | "server" | "cut"
        self.close_answered = False  # the server answered our close frame (before we dropped the connection)
        self.files: list[str] = []
        self._ws: websocket.WebSocket | None = None
        self._sock: Any = None
        self._texts: list[str] = []
        self._audio: list[bytes] = []
        self._wake = gevent.event.Event()
        self._closing = False
        self._close_text: str | None = None
        self._writer: gevent.Greenlet | None = None
        self._reader: gevent.Greenlet | None = None
        self._resamplers: list[Any] = []
        self.attached = True

    # ------------------------------------------------------------------ helpers for tests
    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self.connected.wait(timeout)

    def wait_finished(self, timeout: float = 5.0) -> bool:
        return self.finished.wait(timeout)

    @property
    def frame_sizes(self) -> list[int]:
        return [n for _t, n in self.frames_sent]

    # ------------------------------------------------------------------ connect
    def start(self) -> None:
        self.sw.spawn(self._connect)

    def _handshake_headers(self, host: str, port: int) -> dict[str, Any]:
        raise NotImplementedError

    def _connect(self) -> None:
        try:
            parts = urlsplit(self.url)
            scheme = parts.scheme.lower()
            if scheme not in ("ws", "http"):
                raise HandshakeError("fsim supports only ws:// and http:// URLs")
            host = parts.hostname or ""
            port = parts.port or 80
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            delay = self.sw.faults.fork_connect_delay
            if delay:
                gevent.sleep(delay)
            if self.sw.faults._take_refusal(self.ch.uuid, self.url):
                raise ConnectionRefusedError(111, "Connection refused")
            sock = gevent.socket.create_connection((host, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # libwebsockets disables Nagle too
            self._sock = sock
            opts = self._handshake_headers(host, port)
            ws = websocket.WebSocket(enable_multithread=False)
            ws.connect(f"ws://{host}:{port}{path}", socket=sock, timeout=10, **opts)
            self.response_headers = {k.lower(): v for k, v in (ws.getheaders() or {}).items()}
            self._check_response()
            sock.settimeout(None)
            ws.sock.settimeout(None)
            self._ws = ws
        except HandshakeError as e:
            self._close_sock()
            self._on_connect_failed(e.reason, handshake=True, status=e.status)
            return
        except websocket.WebSocketBadStatusException as e:
            self._close_sock()
            self._on_connect_failed(f"HS: ws upgrade response not 101 ({e.status_code})", handshake=True,
                                    status=e.status_code)  # fmt: skip
            return
        except Exception as e:
            self._close_sock()
            self._on_connect_failed(str(e), handshake=False, status=0)
            return
        if not self.attached:
            self._close_sock()
            return
        self.state = "connected"
        self._on_connected()
        self.connected.set()
        self._writer = self.sw.spawn(self._write_loop)
        self._reader = self.sw.spawn(self._read_loop)

    def _check_response(self) -> None:
        pass

    def _close_sock(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()

    def _on_connected(self) -> None:
        raise NotImplementedError

    def _on_connect_failed(self, reason: str, handshake: bool, status: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ audio from the channel
    def _resample(self, idx: int, frame: np.ndarray) -> np.ndarray:
        if self.ch.rate == self.rate:
            return frame
        for _ in range(len(self._resamplers), idx + 1):
            self._resamplers.append(soxr.ResampleStream(self.ch.rate, self.rate, 1, dtype="int16", quality="QQ"))
        return np.asarray(self._resamplers[idx].resample_chunk(frame), dtype=np.int16)

    def _mix_frame(self, read: np.ndarray, write: np.ndarray | None) -> bytes | None:
        """mono = caller; mixed/stereo need a frame the channel wrote, else the core returns nothing."""
        if self.mix == "mono":
            return self._resample(0, read).astype("<i2").tobytes()
        if write is None:
            return None
        if self.mix == "mixed":
            m = np.clip(read.astype(np.int32) + write, -32768, 32767).astype(np.int16)
            return self._resample(0, m).astype("<i2").tobytes()
        left = self._resample(0, read)
        right = self._resample(1, write)
        n = min(len(left), len(right))
        out = np.empty(2 * n, dtype=np.int16)
        out[0::2], out[1::2] = left[:n], right[:n]
        return out.astype("<i2").tobytes()

    def on_frame(self, read: np.ndarray, write: np.ndarray | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ writer / reader
    def queue_text(self, text: str) -> bool:
        """Queue a text frame; silently dropped unless connected (the API still says +OK)."""
        if self.state != "connected" or self._closing:
            return False
        self._texts.append(text)
        self._wake.set()
        return True

    def _send(self, data: bytes | str, binary: bool) -> None:
        assert self._ws is not None
        lag = self.sw.faults.fork_write_lag
        if lag:
            gevent.sleep(lag)
        if binary:
            self._ws.send_bytes(bytes(data) if not isinstance(data, bytes) else data)
            self.frames_sent.append((time.monotonic(), len(data)))
            self.audio_bytes += len(data)
        else:
            self._ws.send(data)
            self.texts_sent.append(str(data))

    def _take_texts(self) -> list[str]:
        texts, self._texts = self._texts, []
        return texts

    def _write_loop(self) -> None:
        try:
            while True:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                if self._ws is None:
                    return
                for text in self._take_texts():
                    self._send_text(text)
                if self._audio:
                    self._flush_audio()
                if self._closing and not self._texts:
                    self._send_close()
                    return
        except Exception as e:
            log.debug("writer for %s ended: %s", self.bugname, e)
            self._on_transport_lost()

    def _send_text(self, text: str) -> None:
        self._send(text, binary=False)

    def _flush_audio(self) -> None:
        raise NotImplementedError

    def _send_close(self) -> None:
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(Exception):
            ws.send_close(1000, b"")
        self.close_code = 1000
        # wait briefly for the server's close reply (the reader sees it), then drop the TCP connection
        if self._reader is not None:
            self._reader.join(timeout=1.0)
        self._shutdown_transport()

    def _shutdown_transport(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.shutdown()
        self._close_sock()
        self.finished.set()

    def _read_loop(self) -> None:
        ws = self._ws
        try:
            for _ in range(100_000_000):
                if ws is None:
                    return
                opcode, data = ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    reason = data[2:].decode("utf-8", "replace") if len(data) > 2 else ""
                    if not self._closing:
                        with contextlib.suppress(Exception):
                            ws.send_close(1000, b"")
                        self._on_server_closed(code, reason)
                    else:
                        self.close_answered = True
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                    self.texts_received.append(text)
                    try:
                        self._on_text(text)
                    except Exception:
                        log.exception("handling a server message failed")
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.binary_received.append(len(data))
                    self._on_binary(bytes(data))
        except Exception as e:
            if not self._closing and self.state == "connected":
                log.debug("reader for %s ended: %s", self.bugname, e)
                self._on_transport_lost()

    def _on_server_closed(self, code: int, reason: str) -> None:
        self.closed_by = self.closed_by or "server"
        self.close_code = code
        self.state = "disconnected"
        self._closing = True
        self._wake.set()
        self._ws_gone_event(code, reason)
        self._shutdown_transport()

    def _on_transport_lost(self) -> None:
        if self.state != "connected":
            return
        self.closed_by = self.closed_by or "server"
        self.state = "disconnected"
        self._closing = True
        self._ws_gone_event(1006, "")
        self._shutdown_transport()

    def _ws_gone_event(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def _on_text(self, text: str) -> None:
        raise NotImplementedError

    def _on_binary(self, data: bytes) -> None:
        pass

    # ------------------------------------------------------------------ teardown
    def close(self, final_text: str | None) -> None:
        """FreeSWITCH closes: queued text (and ``final_text``) first, then close 1000, no ESL event."""
        if self.state == "connected" and not self._closing:
            if final_text:
                self._texts.append(final_text)
            self.closed_by = "switch"
            self._closing = True
            self.state = "closed"
            self._wake.set()
        elif self._ws is None:
            self.finished.set()
            if self.state == "connecting":
                self.state = "closed"

    def remove(self, reason: str = "stop", final_text: str | None = None) -> None:
        """Detach the media bug (stop or hangup): close the socket, MEDIA_BUG_STOP, delete temp files."""
        if not self.attached:
            return
        self.attached = False
        self.close(final_text)
        self.ch.fire("MEDIA_BUG_STOP", [("Media-Bug-Function", self.bugname), ("Media-Bug-Target", self.bug_target)])
        self.ch.bugs.pop(self.bugname, None)
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)

    @property
    def bug_target(self) -> str:
        return self.url

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (FreeSWITCH crashed, or a cut)."""
        self.attached = False
        self._closing = True
        ws, self._ws = self._ws, None
        sock = self._sock
        self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
            with contextlib.suppress(OSError):
                sock.close()
        del ws
        self.finished.set()

    def cut(self) -> None:
        """Network failure under a live connection: the module sees the drop like a server close."""
        self.closed_by = "cut"
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)

    # ------------------------------------------------------------------ shared server-message helpers
    def _write_temp(self, data_b64: str, ext: str, n: int) -> str:
        raw = base64.b64decode(data_b64)
        path = os.path.join(self.sw.temp_dir, f"{self.ch.uuid}_{n}.tmp{ext}")
        with open(path, "wb") as f:
            f.write(raw)
        self.files.append(path)
        self.ch.temp_files.append(path)
        return path

    def fire(self, name: str, body: Any = None) -> None:
        if body is not None and not isinstance(body, str):
            body = json.dumps(body, separators=(",", ":"))
        sub = f"{self.subclass_prefix}::{name}"
        self.events_fired.append((sub, body))
        self.ch.fire("CUSTOM", body=body, subclass=sub)

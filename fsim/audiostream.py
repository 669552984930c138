"""mod_audio_stream (community build, libwsc) emulation: no subprotocol, fixed 20 ms messages, its own events."""

from __future__ import annotations

import binascii
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from . import wire
from .wsclient import RAW_EXT, HandshakeError, MediaBug

if TYPE_CHECKING:
    from .channel import Channel
    from .switch import FSim

log = logging.getLogger("fsim.audiostream")

BUGNAME = "audio_stream"
USAGE = (
    "-USAGE: <uuid> [start | stop | send_text | pause | resume | graceful-shutdown ] [wss-url | path] "
    "[mono | mixed | stereo] [8000 | 16000 | 24000 | 32000 | 64000] [metadata]\n"
)
OK = "+OK Success\n"
FAIL = "-ERR Operation Failed\n"
STREAM_EXT = {**RAW_EXT, "wav": ".wav", "mp3": ".mp3", "ogg": ".ogg", "pcmu": ".pcmu", "pcma": ".pcma"}


class StreamBug(MediaBug):
    kind = "stream"
    subclass_prefix = "mod_audio_stream"

    def __init__(self, ch: Channel, url: str, mix: str, rate: int, metadata: str | None) -> None:
        super().__init__(ch, BUGNAME, url, mix, rate, metadata)
        size = ch.variables.get("STREAM_BUFFER_SIZE", "20")
        self.buffer_ms = int(size) if size.isdigit() and int(size) >= 20 and int(size) % 20 == 0 else 20
        self.chunk_bytes = 320 * rate // 8000 * self.channels * self.buffer_ms // 20
        self._acc = b""
        self._file_index = 0

    def _handshake_headers(self, host: str, port: int) -> dict[str, Any]:
        hdr = ["Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; "
               "server_no_context_takeover; client_max_window_bits=9"]  # fmt: skip
        if self.ch.variables.get("STREAM_MESSAGE_DEFLATE", "").lower() in ("true", "1"):
            hdr = []
        extra = self.ch.variables.get("STREAM_EXTRA_HEADERS")
        if extra:
            try:
                for k, v in json.loads(extra).items():
                    if isinstance(v, str):
                        hdr.append(f"{k}: {v}")
            except (ValueError, AttributeError):
                pass
        self.request_headers = [f"Host: {host}:{port}", f"Origin: http://{host}:{port}", *hdr]
        return {"host": f"{host}:{port}", "origin": f"http://{host}:{port}", "header": hdr}

    def _check_response(self) -> None:
        if self.response_headers.get("sec-websocket-extensions"):
            raise HandshakeError("permessage-deflate negotiated (not emulated)")

    def _on_connected(self) -> None:
        self.fire("connect", {"status": "connected"})
        if self.metadata:
            self._texts.append(self.metadata)
            self._wake.set()

    def _on_connect_failed(self, reason: str, handshake: bool, status: int) -> None:
        """On an error the module fires ::error and closes the media bug itself."""
        self.state = "failed"
        self.finished.set()
        text = "WebSocket upgrade failed" if handshake else "Connection refused (system error 111)"
        self.fire("error", {"status": "error", "message": {"code": 6, "error": text}})
        if self.attached:
            self.remove(reason="error")

    def _ws_gone_event(self, code: int, reason: str) -> None:
        self.fire("disconnect", {"status": "disconnected", "message": {"code": code, "reason": reason}})

    def close(self, final_text: str | None) -> None:
        was_connected = self.state == "connected" and not self._closing
        super().close(final_text)
        if was_connected:
            self._ws_gone_event(1000, "Normal closure")

    # ------------------------------------------------------------------ audio: one message per 20 ms packet
    def on_frame(self, read: np.ndarray, write: np.ndarray | None) -> None:
        if self.state != "connected" or self._closing or self.paused:
            return
        data = self._mix_frame(read, write)
        if not data:
            return
        ptime = self.ch.ptime_ms
        if self.buffer_ms == 20:
            if ptime != 20 and self.ch.rate != self.rate:
                # Observed: a 30 ms call resampled 8k→16k lost about a third of its audio (fixed 20 ms chunks).
                data = data[: self.chunk_bytes]
            self._audio.append(data)
        else:
            if ptime != 20:
                return  # the buffer assumes 20 ms packets and never becomes exactly full
            self._acc += data
            if len(self._acc) >= self.chunk_bytes:
                self._audio.append(self._acc[: self.chunk_bytes])
                self._acc = self._acc[self.chunk_bytes :]
        self._wake.set()

    def _flush_audio(self) -> None:
        chunks, self._audio = self._audio, []
        for c in chunks:  # written directly from the media thread: never coalesced
            self._send(c, binary=True)

    # ------------------------------------------------------------------ server → FreeSWITCH
    def _on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "streamAudio" and isinstance(msg.get("data"), dict):
            data = msg["data"]
            dtype = data.get("audioDataType")
            ext = None
            if dtype == "raw":
                ext = RAW_EXT.get(data.get("sampleRate")) if isinstance(data.get("sampleRate"), int) else None
            elif dtype in STREAM_EXT:
                ext = STREAM_EXT[dtype]
            audio = data.get("audioData")
            if ext and isinstance(audio, str):
                try:
                    path = self._write_temp(audio, ext, self._file_index)
                    self._file_index += 1
                except (binascii.Error, ValueError):
                    path = None
                if path:
                    body = {k: v for k, v in data.items() if k != "audioData"}
                    body["file"] = path
                    self.fire("play", body)
                    return
        self.fire("json", text)  # anything else: the raw text, exactly as received

    def _on_binary(self, data: bytes) -> None:
        log.debug("stream: binary frame from server ignored")


def api_uuid_audio_stream(sw: FSim, args: str) -> str:
    argv = wire.separate_string(args, 6)
    if len(argv) < 2:
        return USAGE
    cmd = argv[1]
    if cmd == "start" and len(argv) < 4:
        return USAGE
    ch = sw.channels.get(argv[0])
    if ch is None or not ch.alive:
        return FAIL
    bug = ch.bugs.get(BUGNAME)
    if cmd == "stop":
        if bug is None:
            return FAIL
        bug.remove(reason="stop", final_text=argv[2] if len(argv) > 2 else None)
        return OK
    if cmd in ("pause", "resume"):
        if bug is None:
            return FAIL
        bug.paused = cmd == "pause"
        bug._audio.clear()
        return OK
    if cmd == "send_text":
        if bug is None or len(argv) < 3:
            return FAIL
        bug.queue_text(argv[2])
        return OK
    if cmd != "start":
        return FAIL  # includes graceful-shutdown: advertised, not implemented
    url, mix = argv[2], argv[3]
    if not (url.startswith("ws://") or url.startswith("wss://")) or mix not in ("mono", "mixed", "stereo"):
        return FAIL
    rate = 8000
    if len(argv) > 4:
        tok = argv[4]
        rate = 8000 if tok == "8k" else 16000 if tok == "16k" else int(tok) if tok.isdigit() else 0
    if rate <= 0 or rate % 8000:
        return FAIL
    if bug is not None:
        return FAIL
    metadata = argv[5] if len(argv) > 5 else None
    b = StreamBug(ch, url, mix, rate, metadata)
    ch.bugs[BUGNAME] = b
    ch.all_bugs.append(b)
    ch.fire("MEDIA_BUG_START", [("Media-Bug-Function", BUGNAME), ("Media-Bug-Target", url)])
    b.start()
    return OK

#!/usr/bin/env python3
"""A tiny model server speaking docs/generic-protocol.md: it says back what the caller said.

    python examples/model_server.py --port 9000 [--host 127.0.0.1] [--token SECRET]

It has no model: an energy VAD finds the caller's utterance, and after --silence-ms of silence the
server plays that audio back as a response (with a response id, paced at real time after a short
burst). Speech during a response interrupts it (speech.started, then response.end "interrupted").
`say` and text input are answered with a short tone and a transcript. A few text commands script a
bridge test: "/tool NAME {json}" (a tool call), "/error CODE", "/fatal CODE", "/close", "/drop".
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import socket
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from gevent import monkey

if __name__ == "__main__":
    monkey.patch_all()

import gevent
import gevent.event
import gevent.lock
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

log = logging.getLogger("model_server")
FRAME_MS = 20
BURST_MS = 200  # sent at once at the start of a response, like real engines do (then real time)
IDLE_CLOSE_S = 30.0
MAX_UTTERANCE_MS = 10_000


def rms(pcm: bytes) -> float:
    samples = array("h", pcm[: len(pcm) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def beep(ms: int, rate: int, freq: float = 660.0) -> bytes:
    samples = array("h", (int(6000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(rate * ms // 1000)))
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


@dataclass
class Response:
    id: str
    cancelled: bool = False
    done: bool = False
    sent_ms: float = 0.0
    finished: gevent.event.Event = field(default_factory=gevent.event.Event)


@dataclass
class Call:
    ws: Any
    rate: int = 16000
    started: bool = False
    in_speech: bool = False
    silence_ms: float = 0.0
    utterance: bytearray = field(default_factory=bytearray)
    response: Response | None = None
    pending_tools: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    closed: bool = False
    lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    last_heard: float = 0.0


class ModelServer:
    """One instance serves many calls; each WebSocket is one call."""

    def __init__(self, token: str = "", threshold: float = 500.0, silence_ms: int = 600, speed: float = 1.0) -> None:
        self.token = token
        self.threshold = threshold
        self.silence_ms = silence_ms
        self.speed = speed
        self._ids = itertools.count(1)
        self._server: WSGIServer | None = None
        self.port = 0

    # ---- plumbing ---------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> ModelServer:
        server = self
        handler_base = WebSocketHandler

        class Handler(handler_base):  # refuse a bad token with plain HTTP 401, before the upgrade
            def upgrade_websocket(self) -> Any:
                if server.token and self.environ.get("HTTP_AUTHORIZATION") != f"Bearer {server.token}":
                    self.start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                             ("Content-Length", "12")])
                    return [b"unauthorized"]
                return super().upgrade_websocket()

            def log_request(self) -> None:
                pass

        self._server = WSGIServer((host, port), self._app, handler_class=Handler, log=None, error_log=None)
        self._server.start()
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)

    def serve_forever(self) -> None:
        assert self._server is not None
        self._server.serve_forever()

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("426 Upgrade Required", [("Content-Type", "text/plain")])
            return [b"WebSocket only: see docs/generic-protocol.md"]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        call = Call(ws=ws, last_heard=gevent.get_hub().loop.now())
        log.info("call %s connected", (query.get("call_id") or ["?"])[0])
        watchdog = gevent.spawn(self._idle_watchdog, call)
        try:
            self._serve(call)
        finally:
            watchdog.kill(block=False)
            call.closed = True
        return []

    def _send(self, call: Call, message: dict[str, Any] | bytes) -> bool:
        with call.lock:
            if call.closed:
                return False
            try:
                if isinstance(message, bytes):
                    call.ws.send(message, binary=True)
                else:
                    call.ws.send(json.dumps(message))
                return True
            except Exception:
                call.closed = True
                return False

    def _close(self, call: Call, code: int, reason: str = "") -> None:
        with call.lock:
            if call.closed:
                return
            call.closed = True
            # geventwebsocket's own close() leaves out the status code
            with contextlib.suppress(Exception):
                call.ws.send_frame(struct.pack("!H", code) + reason.encode()[:120], call.ws.OPCODE_CLOSE)
        self._abort(call)

    def _abort(self, call: Call) -> None:
        call.closed = True
        with contextlib.suppress(OSError):
            call.ws.handler.socket.shutdown(socket.SHUT_RDWR)

    def _idle_watchdog(self, call: Call) -> None:
        while not call.closed:
            gevent.sleep(1.0)
            if gevent.get_hub().loop.now() - call.last_heard > IDLE_CLOSE_S:
                self._close(call, 4000, "idle timeout")

    # ---- protocol ---------------------------------------------------------------------------------

    def _serve(self, call: Call) -> None:
        while not call.closed:
            try:
                data = call.ws.receive()
            except Exception:
                break
            if data is None:
                break
            call.last_heard = gevent.get_hub().loop.now()
            if isinstance(data, bytes | bytearray):
                if not call.started:
                    self._protocol_error(call, "audio before session.start")
                    break
                self._on_audio(call, bytes(data))
                continue
            try:
                message = json.loads(data)
            except ValueError:
                self._protocol_error(call, "text frame is not JSON")
                break
            if not isinstance(message, dict):
                self._protocol_error(call, "text frame is not a JSON object")
                break
            self._on_message(call, message)

    def _protocol_error(self, call: Call, text: str) -> None:
        self._send(call, {"type": "error", "code": "protocol_error", "message": text, "fatal": True})
        self._close(call, 1008, "protocol error")

    def _on_message(self, call: Call, m: dict[str, Any]) -> None:
        kind = m.get("type")
        if kind == "session.start":
            audio = m.get("audio") or {}
            rate = audio.get("sample_rate")
            if audio.get("encoding") != "pcm_s16le" or audio.get("channels", 1) != 1 or rate not in (
                    8000, 16000, 24000, 48000):
                self._send(call, {"type": "error", "code": "bad_audio_format",
                                  "message": "need pcm_s16le mono at 8000/16000/24000/48000 Hz", "fatal": True})
                self._close(call, 1008, "bad audio format")
                return
            call.rate, call.started = rate, True
            self._send(call, {"type": "session.started", "session_id": f"s-{next(self._ids)}",
                              "audio_out": {"encoding": "pcm_s16le", "sample_rate": rate, "channels": 1}})
        elif not call.started:
            self._protocol_error(call, "session.start must come first")
        elif kind == "input.text":
            self._on_text_input(call, str(m.get("text", "")), bool(m.get("respond", True)))
        elif kind == "say":
            text = str(m.get("text", ""))
            self._respond(call, beep(min(3000, 40 * len(text) + 200), call.rate, 520.0), text)
        elif kind == "response.cancel":
            response = call.response
            if response is not None and response.id == m.get("response_id") and not response.done:
                response.cancelled = True
            call.history.append(f"assistant turn {m.get('response_id')} heard for {m.get('played_ms')} ms")
        elif kind == "tool.result":
            name = call.pending_tools.pop(str(m.get("call_id")), None)
            if name is not None:
                self._respond(call, beep(300, call.rate, 440.0), f"{name} result: {m.get('output')}")
        elif kind == "ping":
            self._send(call, {"type": "pong", "id": m.get("id")})
        elif kind == "session.end":
            self._close(call, 1000, "")
        # anything else: ignored, as the protocol says

    def _on_text_input(self, call: Call, text: str, respond: bool) -> None:
        command, _, rest = text.partition(" ")
        if command == "/tool":
            name, _, args = rest.partition(" ")
            call_id = f"t{next(self._ids)}"
            call.pending_tools[call_id] = name
            try:
                arguments = json.loads(args or "{}")
            except ValueError:
                arguments = {}
            self._send(call, {"type": "tool.call", "call_id": call_id, "name": name, "arguments": arguments})
        elif command in ("/error", "/fatal"):
            fatal = command == "/fatal"
            self._send(call, {"type": "error", "code": rest or "test_error", "message": "scripted error",
                              "fatal": fatal})
            if fatal:
                self._close(call, 1011, "internal error")
        elif command == "/close":
            self._close(call, 1000, "")
        elif command == "/drop":
            self._abort(call)
        else:
            call.history.append(f"caller text: {text}")
            if respond:
                self._respond(call, beep(400, call.rate, 880.0), f"You said: {text}")

    def _on_audio(self, call: Call, pcm: bytes) -> None:
        frame_ms = len(pcm) / 2 / call.rate * 1000
        loud = rms(pcm) >= self.threshold
        if loud and not call.in_speech:
            call.in_speech, call.silence_ms = True, 0.0
            call.utterance = bytearray()
            self._send(call, {"type": "speech.started"})
            if call.response is not None and not call.response.done:
                call.response.cancelled = True  # server-side barge-in
        if not call.in_speech:
            return
        if len(call.utterance) / 2 / call.rate * 1000 < MAX_UTTERANCE_MS:
            call.utterance += pcm
        call.silence_ms = 0.0 if loud else call.silence_ms + frame_ms
        if call.silence_ms >= self.silence_ms:
            call.in_speech = False
            self._send(call, {"type": "speech.stopped"})
            speech = bytes(call.utterance[: max(0, len(call.utterance) - int(call.silence_ms * call.rate / 1000) * 2)])
            ms = len(speech) // 2 * 1000 // call.rate
            self._send(call, {"type": "transcript", "role": "user", "text": f"({ms} ms of speech)", "final": True})
            self._respond(call, speech, f"(your {ms} ms of speech)")

    def _respond(self, call: Call, audio: bytes, transcript: str) -> None:
        previous = call.response
        if previous is not None and not previous.done:
            previous.cancelled = True
        response = Response(id=f"r{next(self._ids)}")
        call.response = response
        gevent.spawn(self._play, call, response, audio, transcript, previous)

    def _play(self, call: Call, r: Response, audio: bytes, transcript: str, previous: Response | None) -> None:
        if previous is not None:
            previous.finished.wait(timeout=5.0)  # one response at a time on the wire
        self._send(call, {"type": "response.start", "response_id": r.id})
        frame = call.rate * FRAME_MS // 1000 * 2
        start = gevent.get_hub().loop.now()
        for offset in range(0, len(audio), frame):
            if r.cancelled or call.closed:
                break
            ahead = r.sent_ms - BURST_MS - (gevent.get_hub().loop.now() - start) * 1000 * self.speed
            if ahead > 0:
                gevent.sleep(ahead / 1000 / self.speed)
                if r.cancelled:
                    break
            self._send(call, audio[offset: offset + frame])
            r.sent_ms += FRAME_MS
        status = "interrupted" if r.cancelled else "completed"
        if not r.cancelled:
            self._send(call, {"type": "transcript", "role": "assistant", "response_id": r.id, "text": transcript,
                              "final": True})
        self._send(call, {"type": "response.end", "response_id": r.id, "status": status})
        r.done = True
        r.finished.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token", default="", help="require 'Authorization: Bearer <token>'")
    parser.add_argument("--silence-ms", type=int, default=600, help="silence that ends the caller's turn")
    parser.add_argument("--threshold", type=float, default=500.0, help="RMS (16-bit) above which audio is speech")
    parser.add_argument("--speed", type=float, default=1.0, help="playout pace after the burst (1.0 = real time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ModelServer(token=args.token, threshold=args.threshold, silence_ms=args.silence_ms,
                         speed=args.speed).start(args.host, args.port)
    log.info("model server on ws://%s:%d/v1/call", args.host, server.port)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

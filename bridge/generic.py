"""Our own protocol for a self-hosted model server (docs/generic-protocol.md).

Binary frames carry raw PCM (s16le mono) at the call's rate both ways, so the bridge neither resamples
nor base64-encodes; a small JSON control set carries turns, transcripts, tools and barge-in.

Responses: `response_id` is the server's id from `response.start`; every binary frame belongs to the
last `response.start`. `interrupt(response_id, played_ms)` sends `response.cancel` with the played
milliseconds (clamped to the audio received for that response) so the server can cut its history
where the caller stopped hearing, and drops that response's remaining frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import gevent

from bridge.engine import (
    PCM16,
    AudioFormat,
    AudioOut,
    CallInfo,
    EngineError,
    EngineFormats,
    EngineRefused,
    EventSink,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.engines import WebSocketEngine, scrub

PROTOCOL_ENCODING = "pcm_s16le"
PING_INTERVAL = 10.0  # seconds; the server closes after 30 s without audio or ping
RESPONSE_STATUSES = ("completed", "interrupted", "cancelled", "failed")


class GenericEngine(WebSocketEngine):
    type_name = "generic"
    log_name = "generic"

    def __init__(self, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> None:
        super().__init__(config, call, sink)
        self.session_id = ""
        self._current: str | None = None  # response whose frames are arriving
        self._dropping: str | None = None  # response the bridge interrupted: its frames are discarded
        self._received: dict[str, int] = {}  # response id → bytes of audio received
        self._pinger: gevent.Greenlet | None = None
        self._pings = 0

    def session_start(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "session.start", "call_id": self.call.uuid,
            "audio": {"encoding": PROTOCOL_ENCODING, "sample_rate": self.call.sample_rate, "channels": 1},
            "instructions": self.call.instructions, "voice": self.call.voice, "greeting": self.call.greeting,
            "tools": [{"name": t.name, "description": t.description, "parameters": json.loads(json.dumps(t.parameters))}
                      for t in self.call.tools],
            "metadata": {"caller_id": self.call.caller_id, "did": self.call.did},
        }
        return message

    def _refusal_text(self, message: Mapping[str, Any]) -> str:
        text = f"{message.get('code') or 'error'}: {message.get('message') or ''}"
        return f"{self.type_name}: {scrub(text, self.secrets)[:300]}"

    def _handshake(self) -> None:
        url = str(self.config.get("url") or "")
        if not url:
            raise EngineRefused(f"{self.type_name}: url is not set")
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("call_id", self.call.uuid)
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        token = str(self.config.get("token") or "")
        deadline = self._deadline()
        self._open(url, {"Authorization": f"Bearer {token}"} if token else None)
        self._setup_send(self.session_start())
        message = self._await_setup("session.started", deadline, self._refusal_text)
        out = message.get("audio_out") or {}
        if out.get("encoding", PROTOCOL_ENCODING) != PROTOCOL_ENCODING or out.get("channels", 1) != 1:
            raise EngineRefused(f"{self.type_name}: unsupported audio_out {json.dumps(out)[:80]}")
        rate = out.get("sample_rate", self.call.sample_rate)
        if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 48000:
            raise EngineRefused(f"{self.type_name}: unsupported audio_out sample_rate {str(rate)[:20]}")
        self.session_id = str(message.get("session_id") or "")
        self.formats = EngineFormats(input=AudioFormat(PCM16, self.call.sample_rate), output=AudioFormat(PCM16, rate))

    def connect(self) -> None:
        super().connect()
        self._pinger = gevent.spawn(self._ping_loop)

    # ---- bridge → engine -------------------------------------------------------------------------

    def send_audio(self, audio: bytes) -> None:
        if audio:
            self._send_binary(audio)

    def send_text(self, text: str) -> None:
        self._send_json({"type": "input.text", "text": text, "kind": "text", "respond": True})

    def greet(self) -> None:
        if self.call.greeting:
            self._send_json({"type": "say", "text": self.call.greeting})

    def tool_result(self, call_id: str, result: Mapping[str, Any], is_error: bool = False) -> None:
        self._send_json({"type": "tool.result", "call_id": call_id, "output": json.dumps(dict(result), default=str),
                         "is_error": bool(is_error)})

    def interrupt(self, response_id: str, played_ms: int | None) -> None:
        if not response_id:
            return
        if response_id == self._current:
            self._dropping = response_id
        received_ms = 0
        if self.formats is not None:
            received_ms = int(self._received.get(response_id, 0) // self.formats.output.bytes_per_ms)
        played = max(0, min(int(played_ms or 0), received_ms))
        self._send_json({"type": "response.cancel", "response_id": response_id, "played_ms": played})

    def close(self) -> None:
        if not self._closing:
            self._send_json({"type": "session.end", "reason": "hangup"})
        super().close()
        if self._pinger is not None and self._pinger is not gevent.getcurrent():
            self._pinger.kill(block=False)

    def _ping_loop(self) -> None:
        while self.alive:
            gevent.sleep(PING_INTERVAL)
            self._pings += 1
            self._send_json({"type": "ping", "id": self._pings})

    # ---- engine → bridge -------------------------------------------------------------------------

    def _on_binary(self, data: bytes) -> None:
        rid = self._current
        if rid is None or rid == self._dropping:
            return  # frames outside a response, or of one the caller cut off
        self._received[rid] = self._received.get(rid, 0) + len(data)
        self.emit(AudioOut(audio=data, response_id=rid))

    def _on_text(self, m: Mapping[str, Any]) -> None:
        kind = m.get("type")
        if kind == "response.start":
            rid = str(m.get("response_id") or "")
            if self._current is not None:  # the server forgot response.end: close the old one
                self._end(self._current, "completed")
            self._current = rid or None
            self._received[rid] = 0
            while len(self._received) > 16:  # only recent responses can still be interrupted
                del self._received[next(iter(self._received))]
        elif kind == "response.end":
            status = str(m.get("status") or "completed")
            self._end(str(m.get("response_id") or self._current or ""),
                      status if status in RESPONSE_STATUSES else "completed")
        elif kind == "speech.started":
            self.emit(SpeechStarted())
        elif kind == "speech.stopped":
            self.emit(SpeechStopped())
        elif kind == "transcript":
            self.emit(Transcript(role="assistant" if m.get("role") == "assistant" else "user",
                                 text=str(m.get("text") or ""), final=bool(m.get("final", True)),
                                 response_id=str(m.get("response_id") or "")))
        elif kind == "tool.call":
            arguments = m.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    arguments = None
            self.emit(ToolCall(call_id=str(m.get("call_id") or ""), name=str(m.get("name") or ""),
                               arguments=arguments if isinstance(arguments, dict) else {}))
        elif kind == "error":
            code = str(m.get("code") or "error")
            fatal = bool(m.get("fatal", False))
            message = scrub(str(m.get("message") or code), self.secrets)[:300]
            self.log.warning("call %s: engine error %s: %s", self.call.uuid, code, message)
            self.emit(EngineError(code=code, message=message, fatal=fatal))
            if fatal:
                self._finish(code, clean=False)

    def _end(self, rid: str, status: str) -> None:
        if rid == self._current:
            self._current = None
        if rid == self._dropping and status == "completed":
            status = "interrupted"
        if rid == self._dropping:
            self._dropping = None
        self.emit(ResponseDone(response_id=rid, status=status))

    def _on_close(self, code: int, reason: str) -> None:
        # 1000: the server ended the conversation on purpose (hang up); anything else needs the fallback.
        self._finish("ended" if code == 1000 else f"closed_{code}", clean=code == 1000)

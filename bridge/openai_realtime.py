"""OpenAI Realtime (GA interface only) over WebSocket.

Formats: an 8 kHz call uses `audio/pcmu` both ways (PCMU@8000: companding only, no resampling); any
other call sends `audio/pcm` at 24 kHz (PCM16@24000; the bridge resamples), and hears `audio/pcmu` too when its
channel is 8 kHz (24 kHz would only be resampled down), else `audio/pcm` at 24 kHz. `session.updated` must
echo both formats, or the session is refused (a model that silently ignored the format would play
noise to the caller).

Responses: `AudioOut.response_id` is OpenAI's `resp_…` id. The engine counts the decoded bytes of each
assistant audio item, so `interrupt(response_id, played_ms)` can truncate the right item at a point
that never exceeds the audio received (reference §9). After `interrupt()` no further AudioOut for that
response is emitted. Every response that started ends with exactly one ResponseDone.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websocket

from bridge.engine import (
    PCM16,
    PCMU,
    AudioFormat,
    AudioOut,
    EngineError,
    EngineFormats,
    EngineRefused,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.engines import WebSocketEngine, scrub

DEFAULT_URL = "wss://api.openai.com/v1/realtime"
DEFAULT_MODEL = "gpt-realtime"
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
PCM_24K = AudioFormat(PCM16, 24000)
PCMU_8K = AudioFormat(PCMU, 8000)

# Errors after which the session cannot serve the caller any more: the bridge must fall back.
FATAL_CODES = frozenset({"session_expired", "beta_api_shape_disabled", "model_not_found", "invalid_api_key",
                         "insufficient_quota", "session_not_found"})
# Expected in normal operation (races between our barge-in and the server's own cancel).
IGNORED_CODES = frozenset({"response_cancel_not_active"})
_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'
_VAD_KEYS = {"server_vad": ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"),
             "semantic_vad": ("eagerness",)}


@dataclass
class _Response:
    id: str
    items: list[str] = field(default_factory=list)  # assistant audio items, in order
    done: bool = False
    interrupted: bool = False
    server_cancelling: bool = False  # speech_started arrived while active, with interrupt_response on


class OpenAIRealtimeEngine(WebSocketEngine):
    type_name = "openai_realtime"
    log_name = "openai"
    session_limit_codes = frozenset({"session_expired"})  # 60 min (reference §11)

    def __init__(self, config: Mapping[str, Any], call: Any, sink: Any) -> None:
        super().__init__(config, call, sink)
        self._responses: dict[str, _Response] = {}
        self._active: _Response | None = None
        self._item_bytes: dict[str, int] = {}
        self._pending_create = False  # a response.create waits for the active response to finish
        self._turn_detection: dict[str, Any] = {}
        self._events = 0

    # ---- setup -----------------------------------------------------------------------------------

    def _url(self) -> str:
        parts = urlsplit(str(self.config.get("url") or DEFAULT_URL))
        query = dict(parse_qsl(parts.query))
        query.setdefault("model", str(self.config.get("model") or DEFAULT_MODEL))
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

    def _format(self, direction: str) -> tuple[AudioFormat, dict[str, Any]]:
        """An 8 kHz fork takes and gives audio/pcmu (no resampling). An 8 kHz channel hears audio/pcmu whatever
        the fork's rate: 24 kHz output would be resampled down to 8 kHz anyway, and soxr hands out a 24→8 kHz
        stream in blocks of up to 75 ms (MQ), which the caller would wait for at the start of every reply."""
        rate = self.call.sample_rate if direction == "input" else min(self.call.sample_rate,
                                                                      self.call.channel_rate or 24000)
        if rate == 8000:
            return PCMU_8K, {"type": "audio/pcmu"}
        return PCM_24K, {"type": "audio/pcm", "rate": 24000}

    def _turn_detection_config(self) -> dict[str, Any]:
        raw = self.config.get("turn_detection") or {}
        if not isinstance(raw, Mapping):
            raise EngineRefused(f"{self.type_name}: turn_detection must be a mapping")
        kind = raw.get("type", "server_vad")
        if kind not in _VAD_KEYS:
            raise EngineRefused(f"{self.type_name}: turn_detection.type must be server_vad or semantic_vad")
        td: dict[str, Any] = {"type": kind}
        for key in _VAD_KEYS[kind]:
            if raw.get(key) is not None:
                td[key] = raw[key]
        td["create_response"] = bool(raw.get("create_response", True))
        td["interrupt_response"] = bool(raw.get("interrupt_response", True))
        return td

    def session_update(self) -> dict[str, Any]:
        """The GA `session.update` this call sends (reference §4)."""
        self._turn_detection = self._turn_detection_config()
        output: dict[str, Any] = {"format": dict(self._format("output")[1])}
        voice = self.call.voice or self.config.get("voice")
        if voice:
            output["voice"] = voice
        session: dict[str, Any] = {
            "type": "realtime",
            "model": str(self.config.get("model") or DEFAULT_MODEL),
            "output_modalities": ["audio"],
            "audio": {
                "input": {"format": dict(self._format("input")[1]), "transcription": {"model": TRANSCRIPTION_MODEL},
                          "turn_detection": self._turn_detection},
                "output": output,
            },
        }
        if self.call.instructions:
            session["instructions"] = self.call.instructions
        if self.call.tools:
            session["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                                 "parameters": json.loads(json.dumps(t.parameters))} for t in self.call.tools]
            session["tool_choice"] = "auto"
        return {"type": "session.update", "event_id": "fb_session_1", "session": session}

    def _handshake(self) -> None:
        api_key = str(self.config.get("api_key") or "")
        if not api_key:
            raise EngineRefused(f"{self.type_name}: api_key is not set")
        update = self.session_update()
        deadline = self._deadline()
        self._open(self._url(), {"Authorization": f"Bearer {api_key}"})
        first = self._recv_json(deadline)
        if first.get("type") == "error":
            raise EngineRefused(self._error_text(first))
        if first.get("type") != "session.created":
            raise EngineRefused(f"{self.type_name}: expected session.created, got {str(first.get('type'))[:60]}")
        expires = (first.get("session") or {}).get("expires_at")
        if isinstance(expires, int | float) and not isinstance(expires, bool):
            self.expires_at = float(expires)
        self._setup_send(update)
        message = self._await_setup("session.updated", deadline, self._error_text)
        audio = (message.get("session") or {}).get("audio") or {}
        for direction in ("input", "output"):
            echoed = (audio.get(direction) or {}).get("format")
            wire_fmt = self._format(direction)[1]
            if not _same_format(echoed, wire_fmt):
                raise EngineRefused(f"{self.type_name}: session.updated has {direction} format "
                                    f"{json.dumps(echoed)[:80]}, asked for {json.dumps(wire_fmt)}")
        self.formats = EngineFormats(input=self._format("input")[0], output=self._format("output")[0])

    # ---- bridge → engine -------------------------------------------------------------------------

    def _event_id(self, kind: str) -> str:
        self._events += 1
        return f"fb_{kind}_{self._events}"

    def send_audio(self, audio: bytes) -> None:
        # The hot path (50 per second per call): the same bytes json.dumps would give, without encoding twice.
        if audio:
            self._send(_APPEND_HEAD + base64.b64encode(audio) + b'"}', websocket.ABNF.OPCODE_TEXT)

    def send_text(self, text: str) -> None:
        self._send_json({"type": "conversation.item.create", "event_id": self._event_id("text"),
                         "item": {"type": "message", "role": "user",
                                  "content": [{"type": "input_text", "text": text}]}})
        self._request_response()

    def greet(self) -> None:
        if not self.call.greeting:
            return
        instructions = f"Greet the caller now by saying exactly this, and nothing else: {self.call.greeting}"
        self._request_response({"instructions": instructions})

    def tool_result(self, call_id: str, result: Mapping[str, Any], is_error: bool = False) -> None:
        payload = dict(result)
        if is_error:
            payload.setdefault("ok", False)
        self._send_json({"type": "conversation.item.create", "event_id": self._event_id("tool"),
                         "item": {"type": "function_call_output", "call_id": call_id,
                                  "output": json.dumps(payload, default=str)}})
        self._request_response()

    def _request_response(self, options: Mapping[str, Any] | None = None) -> None:
        """response.create now, or once the active response is done (one may write at a time, §8.3)."""
        if self._active is not None and not self._active.done:
            self._pending_create = True
            return
        message: dict[str, Any] = {"type": "response.create", "event_id": self._event_id("response")}
        if options:
            message["response"] = dict(options)
        self._send_json(message)

    def interrupt(self, response_id: str, played_ms: int | None) -> None:
        """Barge-in per reference §9: truncate what was heard, cancel only if the server won't, drop late audio."""
        response = self._responses.get(response_id)
        if response is None:
            return
        response.interrupted = True
        self._truncate(response, played_ms)
        auto_cancel = response.server_cancelling and self._turn_detection.get("interrupt_response", True)
        if not response.done and not auto_cancel:
            self._send_json({"type": "response.cancel", "event_id": self._event_id("cancel"),
                             "response_id": response.id})

    def _truncate(self, response: _Response, played_ms: int | None) -> None:
        if not played_ms or played_ms <= 0 or self.formats is None:
            return  # nothing heard: truncating would fail (unsupported_content_type) and means nothing
        per_ms = self.formats.output.bytes_per_ms
        remaining = int(played_ms)
        for index, item_id in enumerate(response.items):
            item_ms = int(self._item_bytes.get(item_id, 0) // per_ms)  # floor: never beyond decoded audio
            last = index == len(response.items) - 1
            if remaining < item_ms or (last and not response.done):
                end_ms = min(remaining, item_ms)
                if end_ms > 0:
                    self._send_json({"type": "conversation.item.truncate", "event_id": self._event_id("truncate"),
                                     "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms})
                return
            remaining -= item_ms
        # the whole response had been played: nothing to truncate (reference §9.4)

    # ---- engine → bridge -------------------------------------------------------------------------

    def _on_text(self, m: Mapping[str, Any]) -> None:
        kind = m.get("type")
        if kind == "response.output_audio.delta":
            self._on_audio_delta(m)
        elif kind == "input_audio_buffer.speech_started":
            if self._active is not None and not self._active.done:
                self._active.server_cancelling = bool(self._turn_detection.get("interrupt_response", True))
            self.emit(SpeechStarted())
        elif kind == "input_audio_buffer.speech_stopped":
            self.emit(SpeechStopped())
        elif kind == "response.created":
            rid = str((m.get("response") or {}).get("id") or "")
            if rid:
                self._active = self._responses[rid] = _Response(rid)
        elif kind == "response.output_item.added":
            item = m.get("item") or {}
            if item.get("type") == "message":
                self._add_item(str(m.get("response_id") or ""), str(item.get("id") or ""))
        elif kind == "response.done":
            self._on_response_done(m.get("response") or {})
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.emit(Transcript(role="user", text=str(m.get("transcript") or "")))
        elif kind == "response.output_audio_transcript.done":
            self.emit(Transcript(role="assistant", text=str(m.get("transcript") or ""),
                                 response_id=str(m.get("response_id") or "")))
        elif kind == "response.function_call_arguments.done":
            self._on_function_call(m)
        elif kind == "error":
            self._on_error(m)
        elif kind == "rate_limits.updated":
            self.log.debug("call %s: rate limits %s", self.call.uuid, m.get("rate_limits"))

    def _add_item(self, response_id: str, item_id: str) -> None:
        response = self._responses.get(response_id)
        if response is not None and item_id and item_id not in response.items:
            response.items.append(item_id)
            self._item_bytes.setdefault(item_id, 0)

    def _on_audio_delta(self, m: Mapping[str, Any]) -> None:
        rid = str(m.get("response_id") or "")
        response = self._responses.get(rid)
        if response is None:  # deltas before response.created should not happen; keep the audio anyway
            response = self._responses[rid] = _Response(rid)
        if response.interrupted:
            return  # late audio of a response the caller cut off (§9.6)
        try:
            audio = base64.b64decode(m.get("delta") or "")
        except ValueError:
            self.log.warning("call %s: undecodable audio delta dropped", self.call.uuid)
            return
        item_id = str(m.get("item_id") or "")
        self._add_item(rid, item_id)
        self._item_bytes[item_id] = self._item_bytes.get(item_id, 0) + len(audio)
        if audio:
            self.emit(AudioOut(audio=audio, response_id=rid))

    def _on_response_done(self, body: Mapping[str, Any]) -> None:
        rid = str(body.get("id") or "")
        response = self._responses.get(rid) or _Response(rid)
        response.done = True
        if self._active is response:
            self._active = None
        status = str(body.get("status") or "completed")
        details = body.get("status_details") or {}
        if status == "cancelled":
            status = "interrupted" if response.interrupted or details.get("reason") == "turn_detected" else "cancelled"
        elif status == "incomplete":
            self.log.info("call %s: response %s incomplete (%s)", self.call.uuid, rid, details.get("reason"))
            status = "completed"
        elif status == "failed":
            error = details.get("error") or {}
            self.emit(EngineError(code=str(error.get("code") or "response_failed"),
                                  message=scrub(str(error.get("message") or "response failed"), self.secrets)))
        self.emit(ResponseDone(response_id=rid, status=status))
        self._forget_old_responses()
        if self._pending_create:
            self._pending_create = False
            self._request_response()

    def _forget_old_responses(self, keep: int = 16) -> None:
        """Bound per-call state: only recent responses can still be interrupted."""
        while len(self._responses) > keep:
            old = next(iter(self._responses.values()))
            if not old.done:
                break
            del self._responses[old.id]
            for item_id in old.items:
                self._item_bytes.pop(item_id, None)

    def _on_function_call(self, m: Mapping[str, Any]) -> None:
        raw = m.get("arguments") or "{}"
        try:
            arguments = json.loads(raw)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            self.log.warning("call %s: tool %s sent arguments that are not a JSON object", self.call.uuid,
                             m.get("name"))
            arguments = {}
        self.emit(ToolCall(call_id=str(m.get("call_id") or ""), name=str(m.get("name") or ""), arguments=arguments))

    def _error_text(self, m: Mapping[str, Any]) -> str:
        error = m.get("error") or {}
        text = f"{self.type_name}: {error.get('code') or error.get('type') or 'error'}: {error.get('message') or ''}"
        return scrub(text, self.secrets)[:300]

    def _on_error(self, m: Mapping[str, Any]) -> None:
        error = m.get("error") or {}
        code = str(error.get("code") or error.get("type") or "error")
        if code in IGNORED_CODES:
            self.log.debug("call %s: %s (harmless)", self.call.uuid, code)
            return
        if code == "conversation_already_has_active_response":
            self._pending_create = True  # ours raced a server-created response: retry after it is done
        fatal = code in FATAL_CODES
        message = scrub(str(error.get("message") or code), self.secrets)[:300]
        level = logging.ERROR if fatal else logging.WARNING
        self.log.log(level, "call %s: engine error %s: %s", self.call.uuid, code, message)
        self.emit(EngineError(code=code, message=message, fatal=fatal))
        if fatal:
            self._finish(code, clean=False)

    def _on_close(self, code: int, reason: str) -> None:
        # OpenAI never ends a conversation on purpose: any close we did not ask for needs the fallback.
        self._finish("server_closed" if code == 1000 else f"closed_{code}", clean=False)


def _same_format(echoed: Any, wanted: Mapping[str, Any]) -> bool:
    if not isinstance(echoed, Mapping) or echoed.get("type") != wanted["type"]:
        return False
    return wanted["type"] != "audio/pcm" or echoed.get("rate", 24000) == wanted["rate"]

"""ElevenLabs Agents (Conversational AI) over WebSocket.

Formats are the agent's own settings, read from `conversation_initiation_metadata`; with the agent at
`pcm_8000`/`pcm_16000` matching the call, the bridge passes L16 straight through.

The agent speaks its first message (the route greeting, sent as the `first_message` override) as soon
as the conversation starts, which is before the bridge can play anything. So events are held, in
order, until the bridge is ready: `greet()` or the first `send_audio()` releases them.

Responses: ElevenLabs has no response ids, only integer `event_id`s on audio chunks. A response
("turn") is a run of audio chunks; `response_id` is the `event_id` of its first chunk, as a string.
A new response starts with the first chunk after a boundary: an `agent_response` whose event_id is
above the current turn's chunks, a `user_transcript`, or an interruption. The previous turn then gets
ResponseDone("completed"); it is therefore late, and the bridge must not wait for it to end playback.
Barge-in is the server's: `interruption{event_id}` gives Interrupted(response_id) + ResponseDone
("interrupted"), and every chunk with event_id <= that id is dropped. `interrupt()` sends nothing (the
protocol has no truncate); it only drops the rest of that response locally, and `played_ms` is unused.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bridge.engine import (
    PCM16,
    PCMA,
    PCMU,
    AudioFormat,
    AudioOut,
    CallInfo,
    Closed,
    EngineError,
    EngineEvent,
    EngineFormats,
    EngineRefused,
    EventSink,
    Interrupted,
    ResponseDone,
    SpeechStopped,
    ToolCall,
    Transcript,
)
from bridge.engines import WebSocketEngine, scrub

DEFAULT_URL = "wss://api.elevenlabs.io/v1/convai/conversation"
DTMF_MODES = ("user_message", "contextual_update")
MAX_HELD_EVENTS = 4000  # ~80 s of 20 ms chunks: more means the bridge never became ready
# A server close 1000 after these is the agent ending the call on purpose (end_call, max duration).
_ENCODINGS = {"pcm": PCM16, "ulaw": PCMU, "alaw": PCMA}


def parse_format(name: Any, default: str = "pcm_16000") -> AudioFormat:
    """'pcm_16000' / 'ulaw_8000' → AudioFormat; raises ValueError for anything else."""
    text = str(name or default)
    encoding, _, rate = text.partition("_")
    if encoding not in _ENCODINGS or not rate.isdigit():
        raise ValueError(f"unsupported ElevenLabs audio format {text[:40]!r}")
    return AudioFormat(_ENCODINGS[encoding], int(rate))


class ElevenLabsEngine(WebSocketEngine):
    type_name = "elevenlabs"
    log_name = "elevenlabs"

    def __init__(self, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> None:
        super().__init__(config, call, sink)
        self.conversation_id = ""
        self._ready = False
        self._held: list[EngineEvent] = []
        self._held_overflow = False
        self._turn: str | None = None  # response id of the turn being received
        self._turn_last_eid = -1
        self._boundary = False
        self._last_interrupt = -1
        self._muted = False  # the bridge interrupted: drop audio until the next turn boundary
        self._last_error = ""

    # ---- setup -----------------------------------------------------------------------------------

    def _url(self) -> str:
        agent_id = str(self.config.get("agent_id") or "")
        if self.config.get("signed_url_endpoint"):
            return self._signed_url(agent_id)
        if not agent_id:
            raise EngineRefused(f"{self.type_name}: agent_id is not set")
        return _with_query(str(self.config.get("url") or DEFAULT_URL), {"agent_id": agent_id})

    def _signed_url(self, agent_id: str) -> str:
        """Private agents: GET the single-use signed URL with xi-api-key (never logged: it carries a token)."""
        api_key = str(self.config.get("api_key") or "")
        if not api_key:
            raise EngineRefused(f"{self.type_name}: signed_url_endpoint needs api_key")
        endpoint = str(self.config["signed_url_endpoint"])
        if agent_id:
            endpoint = _with_query(endpoint, {"agent_id": agent_id})
        request = urllib.request.Request(endpoint, headers={"xi-api-key": api_key, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout) as reply:
                body = json.loads(reply.read(65536))
        except urllib.error.HTTPError as exc:
            raise EngineRefused(f"{self.type_name}: signed URL request refused with HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise EngineRefused(f"{self.type_name}: signed URL request failed ({type(exc).__name__})") from None
        url = body.get("signed_url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise EngineRefused(f"{self.type_name}: signed URL reply has no signed_url")
        return url

    def initiation(self) -> dict[str, Any]:
        """conversation_initiation_client_data. Only set fields are overridden: each override must be
        enabled on the agent, and an unexpected one fails the whole conversation (override_error)."""
        agent: dict[str, Any] = {}
        if self.call.instructions:
            agent["prompt"] = {"prompt": self.call.instructions}
        if self.call.greeting:
            agent["first_message"] = self.call.greeting
        override: dict[str, Any] = {}
        if agent:
            override["agent"] = agent
        voice = self.call.voice or self.config.get("voice")
        if voice:
            override["tts"] = {"voice_id": str(voice)}
        message: dict[str, Any] = {"type": "conversation_initiation_client_data"}
        if override:
            message["conversation_config_override"] = override
        message["dynamic_variables"] = {"caller_id": self.call.caller_id, "did": self.call.did,
                                        "call_uuid": self.call.uuid}
        return message

    def _handshake(self) -> None:
        deadline = self._deadline()
        self._open(self._url())
        self._setup_send(self.initiation())
        message = self._await_setup("conversation_initiation_metadata", deadline,
                                    lambda m: f"{self.type_name}: {self._error_text(m)}",
                                    on_other=lambda m: self._pong(m) if m.get("type") == "ping" else None)
        meta = message.get("conversation_initiation_metadata_event") or {}
        self.conversation_id = str(meta.get("conversation_id") or "")
        try:
            fmt_in = parse_format(meta.get("user_input_audio_format"))
            fmt_out = parse_format(meta.get("agent_output_audio_format"))
        except ValueError as exc:
            raise EngineRefused(f"{self.type_name}: {exc}") from None
        self.formats = EngineFormats(input=fmt_in, output=fmt_out)
        self.log.info("call %s: conversation %s, audio in %s out %s", self.call.uuid, self.conversation_id,
                      meta.get("user_input_audio_format"), meta.get("agent_output_audio_format"))

    # ---- event gate (see module doc) -------------------------------------------------------------

    def emit(self, event: EngineEvent) -> None:
        if not self._ready and not isinstance(event, Closed | EngineError):
            if len(self._held) < MAX_HELD_EVENTS:
                self._held.append(event)
            elif not self._held_overflow:
                self._held_overflow = True
                self.log.warning("call %s: bridge not ready; dropping agent events", self.call.uuid)
            return
        super().emit(event)

    def _release(self) -> None:
        """Deliver held events in order. Events the reader emits meanwhile queue behind them."""
        while self._held:
            super().emit(self._held.pop(0))
        self._ready = True

    # ---- bridge → engine -------------------------------------------------------------------------

    def send_audio(self, audio: bytes) -> None:
        if not self._ready:
            self._release()
        if audio:
            self._send_json({"user_audio_chunk": base64.b64encode(audio).decode("ascii")})

    def greet(self) -> None:
        """The greeting is the agent's first message, already spoken at connect: just let it through."""
        self._release()

    def send_text(self, text: str) -> None:
        mode = self.call.dtmf_mode if self.call.dtmf_mode in DTMF_MODES else self.config.get("dtmf_mode")
        if mode == "contextual_update":
            self._send_json({"type": "contextual_update", "text": text})
        else:
            self._send_json({"type": "user_message", "text": text})

    def tool_result(self, call_id: str, result: Mapping[str, Any], is_error: bool = False) -> None:
        self._send_json({"type": "client_tool_result", "tool_call_id": call_id,
                         "result": json.dumps(dict(result), default=str), "is_error": bool(is_error)})

    def interrupt(self, response_id: str, played_ms: int | None) -> None:
        if response_id and response_id == self._turn:
            self._last_interrupt = max(self._last_interrupt, self._turn_last_eid)
            self._muted = True
            self._end_turn("interrupted")

    # ---- engine → bridge -------------------------------------------------------------------------

    def _on_text(self, m: Mapping[str, Any]) -> None:
        kind = m.get("type")
        if kind == "audio":
            self._on_audio(m.get("audio_event") or {})
        elif kind == "ping":
            self._pong(m)
        elif kind == "interruption":
            self._on_interruption(_int((m.get("interruption_event") or {}).get("event_id")))
        elif kind == "agent_response":
            body = m.get("agent_response_event") or {}
            eid = _int(body.get("event_id"))
            if self._turn is not None and (eid is None or eid > self._turn_last_eid):
                self._boundary = True
            if eid is None or eid > self._last_interrupt:
                self._muted = False
            # it comes with the reply's first audio chunk, whose event_id names the reply (see the module doc)
            self.emit(Transcript(role="assistant", text=str(body.get("agent_response") or ""),
                                 response_id="" if eid is None else str(eid)))
        elif kind == "user_transcript":
            self._boundary = self._turn is not None
            self._muted = False
            text = str((m.get("user_transcription_event") or {}).get("user_transcript") or "")
            self.emit(SpeechStopped())  # the closest signal ElevenLabs gives for "caller finished"
            self.emit(Transcript(role="user", text=text))
        elif kind == "tentative_user_transcript":
            text = str((m.get("tentative_user_transcription_event") or {}).get("user_transcript") or "")
            self.emit(Transcript(role="user", text=text, final=False))
        elif kind == "client_tool_call":
            body = m.get("client_tool_call") or {}
            params = body.get("parameters")
            self.emit(ToolCall(call_id=str(body.get("tool_call_id") or ""), name=str(body.get("tool_name") or ""),
                               arguments=params if isinstance(params, dict) else {}))
        elif kind == "agent_response_correction":
            self.log.debug("call %s: agent was cut off; heard text corrected", self.call.uuid)
        elif kind == "error":
            self._on_error(m)

    def _pong(self, m: Mapping[str, Any]) -> None:
        # The reference says to answer at once; ping_ms is the server's RTT estimate, not a delay to honour.
        event_id = (m.get("ping_event") or {}).get("event_id")
        self._send_json({"type": "pong", "event_id": event_id})

    def _on_audio(self, body: Mapping[str, Any]) -> None:
        eid = _int(body.get("event_id"))
        if eid is not None and eid <= self._last_interrupt:
            return  # audio of an interrupted turn (Python SDK rule: <=)
        if self._muted:
            return
        try:
            audio = base64.b64decode(body.get("audio_base_64") or "")
        except ValueError:
            self.log.warning("call %s: undecodable audio chunk dropped", self.call.uuid)
            return
        if self._turn is None or self._boundary:
            self._end_turn("completed")
            self._turn = str(eid if eid is not None else self._turn_last_eid + 1)
            self._boundary = False
        if eid is not None:
            self._turn_last_eid = max(self._turn_last_eid, eid)
        if audio:
            self.emit(AudioOut(audio=audio, response_id=self._turn))

    def _end_turn(self, status: str) -> None:
        if self._turn is not None:
            turn, self._turn = self._turn, None
            self._boundary = False
            self.emit(ResponseDone(response_id=turn, status=status))

    def _on_interruption(self, eid: int | None) -> None:
        if eid is not None:
            self._last_interrupt = max(self._last_interrupt, eid)
        turn = self._turn
        if turn is not None and (eid is None or int(turn) <= eid):
            self.emit(Interrupted(response_id=turn))
            self._end_turn("interrupted")
        else:
            self.emit(Interrupted(response_id=""))

    def _error_text(self, m: Mapping[str, Any]) -> str:
        body = m.get("error_event") or m.get("error") or {}
        if not isinstance(body, Mapping):
            body = {"message": str(body)}
        kind = body.get("error_type") or body.get("code") or "error"
        return scrub(f"{kind}: {body.get('message') or body.get('reason') or ''}", self.secrets)[:300]

    def _on_error(self, m: Mapping[str, Any]) -> None:
        body = m.get("error_event") or m.get("error") or {}
        if not isinstance(body, Mapping):
            body = {}
        code = str(body.get("error_type") or body.get("code") or "error")
        self._last_error = code
        message = self._error_text(m)
        self.log.warning("call %s: engine error %s", self.call.uuid, message)
        # The server closes right after an error; a max-duration end is the agent's normal goodbye.
        self.emit(EngineError(code=code, message=message, fatal=code != "max_duration_exceeded"))

    def _on_close(self, code: int, reason: str) -> None:
        if code == 1000:  # the agent ended the call (end_call, max duration): hang up, no fallback
            self._finish(self._last_error or "ended", clean=True)
        else:
            self._finish(self._last_error or f"closed_{code}", clean=False)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key, value in extra.items():
        query.setdefault(key, value)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

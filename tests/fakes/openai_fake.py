"""A fake OpenAI Realtime (GA) server, written from shared/reference/openai-realtime.md §4-§12.

It validates like the real server where a client bug would otherwise pass silently: beta header and
beta-shaped `session.update` are refused, `audio/pcm` must be 24 kHz, `conversation.item.truncate`
beyond the audio sent for that item (or on an item with no audio) is an error, `response.create`
while a response is active is an error. Responses stream audio deltas faster than real time.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import gevent

from tests.fakes import FakeConn, FakeServer, b64, lin2ulaw, rms, tone, ulaw2lin

BETA_SESSION_KEYS = {"modalities", "input_audio_format", "output_audio_format", "input_audio_transcription",
                     "turn_detection", "voice", "temperature", "max_response_output_tokens",
                     "input_audio_noise_reduction", "speed"}
GA_SESSION_KEYS = {"type", "model", "output_modalities", "instructions", "audio", "tools", "tool_choice",
                   "max_output_tokens", "tracing", "truncation", "prompt", "include"}


def default_session(model: str) -> dict[str, Any]:
    return {
        "type": "realtime", "object": "realtime.session", "id": "sess_fake1", "model": model,
        "output_modalities": ["audio"], "instructions": "",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None, "noise_reduction": None,
                      "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                         "silence_duration_ms": 500, "create_response": True,
                                         "interrupt_response": True}},
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
        },
        "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None, "truncation": "auto",
        "prompt": None, "expires_at": int(time.time()) + 3600, "include": None,
    }


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict) and key != "format":
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class Response:
    id: str
    kind: str  # audio | tool
    transcript: str = ""
    item_id: str = ""
    cancel_reason: str = ""  # turn_detected | client_cancelled
    done: bool = False
    tool: tuple[str, dict[str, Any]] | None = None


@dataclass
class Session:
    conn: FakeConn
    config: dict[str, Any]
    item_audio_ms: dict[str, float] = field(default_factory=dict)  # assistant audio items → ms of audio sent
    active: Response | None = None
    responses: list[Response] = field(default_factory=list)
    call_ids: set[str] = field(default_factory=set)
    in_speech: bool = False
    silence_run_ms: float = 0.0
    audio_in_ms: float = 0.0
    speech_item: str = ""
    truncations: list[dict[str, Any]] = field(default_factory=list)


class OpenAIFake(FakeServer):
    """Script knobs (attributes, set before the client connects or between turns):

    reply_ms / delta_ms / delta_interval: each response is reply_ms of audio in delta_ms deltas, with
    delta_interval seconds between deltas, on a clock (small → faster than real time). late_deltas: deltas still sent
    after a cancel (in flight). echo_output_format: lie about the output format in session.updated.
    tones: the tone frequency of each audio response in turn (330 Hz once the list runs out), so a test can
    tell responses apart in what the caller heard. expire_after: seconds after which each session hits its
    length limit (error session_expired, then the socket closes), as the real one does after 60 minutes.
    created_delay: seconds before session.created (a slow server: a new session takes this long to open).
    announce_expiry: whether session.created's expires_at tells when expire_after ends the session.
    """

    def __init__(self, api_key: str = "sk-test-fake-key-000000", model: str = "gpt-realtime") -> None:
        super().__init__()
        self.api_key = api_key
        self.model = model
        self.reply_ms = 600
        self.delta_ms = 100
        self.delta_interval = 0.005
        self.late_deltas = 0
        self.vad_rms = 500.0
        self.echo_output_format: dict[str, Any] | None = None
        self.tones: list[float] = []
        self.user_transcript = "hello there"
        self.reply_transcript = "Hi, how can I help?"
        self.tool_script: list[tuple[str, dict[str, Any]]] = []  # next responses become these tool calls
        self.sessions: list[Session] = []
        self.expire_after: float | None = None
        self.created_delay = 0.0
        self.announce_expiry = True
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/realtime"

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    # ---- handshake --------------------------------------------------------------------------------

    def refuse_upgrade(self, environ: Any) -> tuple[str, bytes] | None:
        if environ.get("HTTP_AUTHORIZATION") != f"Bearer {self.api_key}":
            return "401 Unauthorized", b'{"error":{"type":"invalid_request_error","code":"invalid_api_key"}}'
        if "model=" not in environ.get("QUERY_STRING", ""):
            return "400 Bad Request", b'{"error":{"code":"missing_model"}}'
        return None

    def handle(self, conn: FakeConn) -> None:
        if "openai-beta" in conn.headers:
            self.error(conn, "beta_api_shape_disabled",
                       "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.")
            conn.close(4000, "invalid_request_error.beta_api_shape_disabled")
            return
        session = Session(conn=conn, config=default_session(conn.query.get("model", self.model)))
        self.sessions.append(session)
        if self.expire_after is not None:
            gevent.spawn_later(self.expire_after, self._expire, session)
            if self.announce_expiry:
                session.config["expires_at"] = time.time() + self.expire_after
        gevent.sleep(self.created_delay)
        self.send(conn, {"type": "session.created", "session": session.config})
        self.receive_loop(conn, lambda m: self._on_message(session, m))

    # ---- script API -------------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        return self.changed.wait_until(lambda: self.sessions[-1] if self.sessions else None, 5, "a session")

    def send(self, conn: FakeConn, event: dict[str, Any]) -> None:
        event.setdefault("event_id", self._id("event"))
        conn.send(event)

    def error(self, conn: FakeConn, code: str, message: str = "", type_: str = "invalid_request_error",
              client_event_id: str | None = None, param: str | None = None) -> None:
        self.send(conn, {"type": "error", "error": {"type": type_, "code": code, "message": message or code,
                                                     "param": param, "event_id": client_event_id}})

    def expire_session(self) -> None:
        """The 60-minute cap: error session_expired, then the socket closes."""
        self._expire(self.session)

    def _expire(self, session: Session) -> None:
        self.fatal_error("session_expired", "Your session hit the maximum duration of 60 minutes.", session)

    def fatal_error(self, code: str, message: str = "", session: Session | None = None) -> None:
        """An error the session does not survive (e.g. insufficient_quota), then the socket closes."""
        conn = (session or self.session).conn
        self.error(conn, code, message or code)
        conn.close(1000, "")

    def drop(self) -> None:
        self.session.conn.drop()

    def start_response(self, kind: str = "audio", instructions: str = "") -> Response:
        """Make the server respond now, as if its VAD had ended a caller turn."""
        return self._create_response(self.session, kind, instructions)

    # ---- client events ----------------------------------------------------------------------------

    def _on_message(self, s: Session, m: dict[str, Any]) -> None:
        handler = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "conversation.item.create": self._item_create,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "conversation.item.truncate": self._truncate,
        }.get(m.get("type", ""))
        if handler is None:
            self.error(s.conn, "invalid_value", f"Invalid value: '{m.get('type')}'", client_event_id=m.get("event_id"),
                       param="type")
            return
        handler(s, m)

    def _session_update(self, s: Session, m: dict[str, Any]) -> None:
        eid = m.get("event_id")
        patch = m.get("session")
        if not isinstance(patch, dict):
            return self.error(s.conn, "missing_required_parameter", "Missing required parameter: 'session'.",
                              client_event_id=eid, param="session")
        beta = sorted(set(patch) & BETA_SESSION_KEYS)
        if beta:
            return self.error(s.conn, "unknown_parameter", f"Unknown parameter: 'session.{beta[0]}'.",
                              client_event_id=eid, param=f"session.{beta[0]}")
        unknown = sorted(set(patch) - GA_SESSION_KEYS)
        if unknown:
            return self.error(s.conn, "unknown_parameter", f"Unknown parameter: 'session.{unknown[0]}'.",
                              client_event_id=eid, param=f"session.{unknown[0]}")
        if patch.get("type") != "realtime":
            return self.error(s.conn, "missing_required_parameter", "Missing required parameter: 'session.type'.",
                              client_event_id=eid, param="session.type")
        if "model" in patch and patch["model"] != s.config["model"]:
            return self.error(s.conn, "invalid_value", "model cannot be changed", client_event_id=eid,
                              param="session.model")
        modalities = patch.get("output_modalities")
        if modalities is not None and modalities not in (["audio"], ["text"]):
            return self.error(s.conn, "invalid_value", "output_modalities must be ['audio'] or ['text']",
                              client_event_id=eid, param="session.output_modalities")
        for direction in ("input", "output"):
            fmt = patch.get("audio", {}).get(direction, {}).get("format")
            if fmt is None:
                continue
            problem = _format_problem(fmt)
            if problem:
                return self.error(s.conn, "invalid_value", problem, client_event_id=eid,
                                  param=f"session.audio.{direction}.format")
        for tool in patch.get("tools") or []:
            if tool.get("type") != "function" or "function" in tool or not tool.get("name"):
                return self.error(s.conn, "invalid_value", "tools must be flat function objects",
                                  client_event_id=eid, param="session.tools")
        td = patch.get("audio", {}).get("input", {}).get("turn_detection")
        if td is not None and td.get("type") not in ("server_vad", "semantic_vad"):
            return self.error(s.conn, "invalid_value", "bad turn_detection.type", client_event_id=eid,
                              param="session.audio.input.turn_detection.type")
        _merge(s.config, patch)
        echoed = copy.deepcopy(s.config)
        if self.echo_output_format is not None:
            echoed["audio"]["output"]["format"] = self.echo_output_format
        self.send(s.conn, {"type": "session.updated", "session": echoed})

    def _fmt(self, s: Session, direction: str) -> dict[str, Any]:
        return s.config["audio"][direction]["format"]

    def _append(self, s: Session, m: dict[str, Any]) -> None:
        try:
            raw = base64.b64decode(m.get("audio", ""), validate=True)
        except ValueError:
            return self.error(s.conn, "invalid_value", "audio is not base64", param="audio")
        fmt = self._fmt(s, "input")
        pcm = raw if fmt["type"] == "audio/pcm" else ulaw2lin(raw)
        rate = 24000 if fmt["type"] == "audio/pcm" else 8000
        chunk_ms = len(pcm) / 2 / rate * 1000
        start_ms = s.audio_in_ms
        s.audio_in_ms += chunk_ms
        td = s.config["audio"]["input"]["turn_detection"]
        if td is None:
            return
        loud = rms(pcm) >= self.vad_rms
        if loud and not s.in_speech:
            s.in_speech, s.silence_run_ms = True, 0.0
            s.speech_item = self._id("item")
            self.send(s.conn, {"type": "input_audio_buffer.speech_started", "audio_start_ms": int(start_ms),
                               "item_id": s.speech_item})
            if s.active is not None and not s.active.done and td.get("interrupt_response", True):
                s.active.cancel_reason = "turn_detected"
        elif s.in_speech:
            s.silence_run_ms = 0.0 if loud else s.silence_run_ms + chunk_ms
            if s.silence_run_ms >= td.get("silence_duration_ms", 500):
                s.in_speech = False
                self._end_of_turn(s, td)

    def _end_of_turn(self, s: Session, td: dict[str, Any]) -> None:
        item = s.speech_item
        self.send(s.conn, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(s.audio_in_ms),
                           "item_id": item})
        self.send(s.conn, {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None})
        user_item = {"id": item, "type": "message", "role": "user", "status": "completed",
                     "content": [{"type": "input_audio", "transcript": None}]}
        self.send(s.conn, {"type": "conversation.item.added", "item": user_item, "previous_item_id": None})
        self.send(s.conn, {"type": "conversation.item.done", "item": user_item, "previous_item_id": None})
        if s.config["audio"]["input"].get("transcription"):
            self.send(s.conn, {"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                               "content_index": 0, "transcript": self.user_transcript})
        if td.get("create_response", True) and (s.active is None or s.active.done):
            self._create_response(s, "audio", "")

    def _item_create(self, s: Session, m: dict[str, Any]) -> None:
        item = dict(m.get("item") or {})
        kind = item.get("type")
        if kind == "function_call_output":
            if item.get("call_id") not in s.call_ids:
                return self.error(s.conn, "invalid_value", "unknown call_id", client_event_id=m.get("event_id"),
                                  param="item.call_id")
            if not isinstance(item.get("output"), str):
                return self.error(s.conn, "invalid_type", "output must be a string",
                                  client_event_id=m.get("event_id"), param="item.output")
        elif kind == "message":
            content = item.get("content") or []
            if item.get("role") not in ("user", "system", "assistant") or not content or any(
                    c.get("type") not in ("input_text", "input_audio", "output_text") for c in content):
                return self.error(s.conn, "invalid_value", "bad message item", client_event_id=m.get("event_id"),
                                  param="item")
        else:
            return self.error(s.conn, "invalid_value", f"bad item type {kind!r}", client_event_id=m.get("event_id"),
                              param="item.type")
        item.setdefault("id", self._id("item"))
        self.send(s.conn, {"type": "conversation.item.added", "item": item, "previous_item_id": None})
        self.send(s.conn, {"type": "conversation.item.done", "item": item, "previous_item_id": None})

    def _response_create(self, s: Session, m: dict[str, Any]) -> None:
        if s.active is not None and not s.active.done:
            return self.error(s.conn, "conversation_already_has_active_response",
                              f"Conversation already has an active response in progress: {s.active.id}.",
                              client_event_id=m.get("event_id"))
        instructions = (m.get("response") or {}).get("instructions", "")
        self._create_response(s, "audio", instructions)

    def _response_cancel(self, s: Session, m: dict[str, Any]) -> None:
        active = s.active
        wanted = m.get("response_id")
        if active is None or active.done or (wanted and wanted != active.id):
            return self.error(s.conn, "response_cancel_not_active", "Cancellation failed: no active response found",
                              client_event_id=m.get("event_id"))
        active.cancel_reason = active.cancel_reason or "client_cancelled"

    def _truncate(self, s: Session, m: dict[str, Any]) -> None:
        eid = m.get("event_id")
        item_id, end_ms = m.get("item_id"), m.get("audio_end_ms")
        record = {"item_id": item_id, "audio_end_ms": end_ms, "item_audio_ms": s.item_audio_ms.get(item_id)}
        s.truncations.append(record)
        if m.get("content_index") != 0:
            return self.error(s.conn, "invalid_value", "content_index must be 0", client_event_id=eid)
        if item_id not in s.item_audio_ms:
            return self.error(s.conn, "invalid_value", f"Item with item_id not found: {item_id}", client_event_id=eid,
                              param="item_id")
        if s.item_audio_ms[item_id] <= 0:
            return self.error(s.conn, "unsupported_content_type", "Only model output audio messages can be truncated",
                              client_event_id=eid)
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            return self.error(s.conn, "invalid_type", "audio_end_ms must be a non-negative integer",
                              client_event_id=eid, param="audio_end_ms")
        if end_ms > s.item_audio_ms[item_id]:
            return self.error(s.conn, "invalid_value",
                              f"Audio content of {s.item_audio_ms[item_id]:.0f}ms is already shorter than {end_ms}ms",
                              client_event_id=eid, param="audio_end_ms")
        record["ok"] = True
        self.send(s.conn, {"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                           "audio_end_ms": end_ms})

    # ---- responses --------------------------------------------------------------------------------

    def _create_response(self, s: Session, kind: str, instructions: str) -> Response:
        tool = self.tool_script.pop(0) if self.tool_script and kind == "audio" else None
        response = Response(id=self._id("resp"), kind="tool" if tool else kind,
                            transcript=instructions or self.reply_transcript, tool=tool)
        s.active = response
        s.responses.append(response)
        gevent.spawn(self._run_response, s, response)
        return response

    def _run_response(self, s: Session, r: Response) -> None:
        conn = s.conn
        self.send(conn, {"type": "response.created", "response": {"id": r.id, "object": "realtime.response",
                                                                  "status": "in_progress", "output": []}})
        self.send(conn, {"type": "rate_limits.updated", "rate_limits": [
            {"name": "tokens", "limit": 20000, "remaining": 19000, "reset_seconds": 1.5}]})
        if r.kind == "tool":
            assert r.tool is not None
            name, args = r.tool
            call_id, item_id = self._id("call"), self._id("item")
            s.call_ids.add(call_id)
            item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": ""}
            self.send(conn, {"type": "response.output_item.added", "response_id": r.id, "output_index": 0,
                             "item": item})
            arguments = json.dumps(args)
            self.send(conn, {"type": "response.function_call_arguments.delta", "response_id": r.id,
                             "item_id": item_id, "output_index": 0, "call_id": call_id, "delta": arguments})
            self.send(conn, {"type": "response.function_call_arguments.done", "response_id": r.id,
                             "item_id": item_id, "output_index": 0, "call_id": call_id, "name": name,
                             "arguments": arguments})
            r.done = True
            self.send(conn, {"type": "response.done", "response": {"id": r.id, "status": "completed",
                                                                   "status_details": None,
                                                                   "output": [dict(item, arguments=arguments)]}})
            return
        r.item_id = item_id = self._id("item")
        s.item_audio_ms[item_id] = 0.0
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        ids = {"response_id": r.id, "item_id": item_id, "output_index": 0, "content_index": 0}
        self.send(conn, {"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item})
        self.send(conn, {"type": "conversation.item.added", "item": item, "previous_item_id": None})
        self.send(conn, {"type": "response.content_part.added", **ids,
                         "part": {"type": "audio", "transcript": ""}})
        fmt = self._fmt(s, "output")
        rate = 24000 if fmt["type"] == "audio/pcm" else 8000
        sent, extra, sends, t0 = 0.0, 0, 0, time.monotonic()
        index = sum(1 for x in s.responses[: s.responses.index(r)] if x.kind == "audio")
        freq = self.tones[index] if index < len(self.tones) else 330.0
        while sent < self.reply_ms:
            if r.cancel_reason:
                if extra >= self.late_deltas:
                    break
                extra += 1
            chunk = tone(self.delta_ms, rate, freq)
            payload = chunk if fmt["type"] == "audio/pcm" else lin2ulaw(chunk)
            self.send(conn, {"type": "response.output_audio_transcript.delta", **ids, "delta": "."})
            self.send(conn, {"type": "response.output_audio.delta", **ids, "delta": b64(payload)})
            sent += self.delta_ms
            s.item_audio_ms[item_id] = sent
            sends += 1  # on a clock: delta_interval == delta_ms / 1000 streams at exactly real time, no drift
            gevent.sleep(max(0.0, t0 + sends * self.delta_interval - time.monotonic()))
        r.done = True
        self.send(conn, {"type": "response.output_audio.done", **ids})
        if r.cancel_reason:
            self.send(conn, {"type": "response.done", "response": {
                "id": r.id, "status": "cancelled",
                "status_details": {"type": "cancelled", "reason": r.cancel_reason}, "output": []}})
            return
        self.send(conn, {"type": "response.output_audio_transcript.done", **ids, "transcript": r.transcript})
        self.send(conn, {"type": "response.content_part.done", **ids, "part": {"type": "audio",
                                                                               "transcript": r.transcript}})
        done_item = dict(item, status="completed", content=[{"type": "output_audio", "transcript": r.transcript}])
        self.send(conn, {"type": "response.output_item.done", "response_id": r.id, "output_index": 0,
                         "item": done_item})
        self.send(conn, {"type": "conversation.item.done", "item": done_item, "previous_item_id": None})
        self.send(conn, {"type": "response.done", "response": {"id": r.id, "status": "completed",
                                                               "status_details": None, "output": [done_item]}})


def _format_problem(fmt: Any) -> str:
    if not isinstance(fmt, dict):
        return f"Invalid value: '{fmt}'. Supported values are: 'audio/pcm', 'audio/pcmu', and 'audio/pcma'."
    kind = fmt.get("type")
    if kind == "audio/pcm":
        return "" if fmt.get("rate", 24000) == 24000 else "audio/pcm rate must be 24000"
    if kind in ("audio/pcmu", "audio/pcma"):
        return "" if set(fmt) == {"type"} else "G.711 formats take no other fields"
    return f"Invalid value: '{kind}'."

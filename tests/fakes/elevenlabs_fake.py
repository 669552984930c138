"""A fake ElevenLabs Agents server, written from shared/reference/elevenlabs-agents.md (§1-§9).

Public mode (`agent_id` in the query) or private mode (`api_key` set: a signed URL from
GET /v1/convai/conversation/get-signed-url with `xi-api-key`, single use). The fake waits for
`conversation_initiation_client_data`, answers `conversation_initiation_metadata` with the agent's
formats, speaks the first message, runs an energy VAD on `user_audio_chunk`s, interrupts a turn that is
still "playing" (by wall clock) when the caller speaks, pings, and scripts tool calls, errors and drops.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent

from tests.fakes import FakeConn, FakeServer, b64, lin2ulaw, rms, tone, ulaw2lin

PATH = "/v1/convai/conversation"
SIGNED_PATH = "/v1/convai/conversation/get-signed-url"
ALLOWED_OVERRIDES = {"prompt", "first_message", "language", "voice_id"}


def _rate(fmt: str) -> int:
    return int(fmt.split("_")[1])


@dataclass
class Turn:
    eid: int
    text: str
    last_eid: int = 0
    started: float = 0.0
    audio_ms: float = 0.0
    interrupted: bool = False
    done: bool = False
    freq: float = 550.0

    def playing(self) -> bool:
        return not self.interrupted and time.monotonic() < self.started + self.audio_ms / 1000.0


@dataclass
class Conversation:
    conn: FakeConn
    initiation: dict[str, Any] | None = None
    turn: Turn | None = None
    turns: list[Turn] = field(default_factory=list)
    in_speech: bool = False
    silence_ms: float = 0.0
    pings: dict[int, float] = field(default_factory=dict)
    pongs: list[int] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    contextual: list[str] = field(default_factory=list)


class ElevenLabsFake(FakeServer):
    """Script knobs (set before connecting): formats, first_message, reply_ms, chunk_ms, chunk_interval,
    audio_ids ("turn": every chunk of a turn carries the turn's event_id; "chunk": each chunk a new id),
    stale_after_interrupt (old-id chunks still sent after an interruption), ping_interval (None: no pings),
    tones (the tone frequency of each agent turn in turn; 550 Hz once the list runs out)."""

    def __init__(self, agent_id: str = "agent_test_1", api_key: str | None = None) -> None:
        super().__init__()
        self.agent_id = agent_id
        self.api_key = api_key
        self.input_format = "pcm_16000"
        self.output_format = "pcm_16000"
        self.first_message = "Hello, this is the agent."
        self.reply_text = "I heard you."
        self.reply_ms = 600
        self.chunk_ms = 100
        self.chunk_interval = 0.005
        self.audio_ids = "turn"
        self.stale_after_interrupt = 0
        self.ping_interval: float | None = None
        self.tones: list[float] = []
        self.vad_rms = 500.0
        self.end_silence_ms = 300
        self.allowed_overrides = set(ALLOWED_OVERRIDES)
        self.conversations: list[Conversation] = []
        self.signed_tokens: set[str] = set()
        self.signed_requests: list[dict[str, str]] = []
        self._eids = itertools.count(1)

    @property
    def url(self) -> str:
        return f"{self.base_url}{PATH}"

    @property
    def signed_url_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{SIGNED_PATH}"

    @property
    def conversation(self) -> Conversation:
        return self.changed.wait_until(lambda: self.conversations[-1] if self.conversations else None, 5,
                                       "a conversation")

    # ---- HTTP / handshake -------------------------------------------------------------------------

    def http(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        from urllib.parse import parse_qs
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        self.signed_requests.append({"path": environ.get("PATH_INFO", ""), "key": environ.get("HTTP_XI_API_KEY", ""),
                                     **query})
        if environ.get("PATH_INFO") != SIGNED_PATH:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"detail":"not found"}']
        if not self.api_key or environ.get("HTTP_XI_API_KEY") != self.api_key:
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [b'{"detail":{"status":"invalid_api_key"}}']
        if query.get("agent_id") != self.agent_id:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"detail":"agent not found"}']
        token = secrets.token_urlsafe(16)
        self.signed_tokens.add(token)
        body = json.dumps({"signed_url": f"{self.url}?agent_id={self.agent_id}&conversation_signature={token}"})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    def refuse_upgrade(self, environ: Any) -> tuple[str, bytes] | None:
        from urllib.parse import parse_qs
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if environ.get("PATH_INFO") != PATH or query.get("agent_id") != self.agent_id:
            return "404 Not Found", b"unknown agent"
        if self.api_key:  # private agent: a valid, unused signature is required
            token = query.get("conversation_signature") or query.get("token")
            if token not in self.signed_tokens:
                return "403 Forbidden", b"invalid signature"
            self.signed_tokens.discard(token)
        return None

    def handle(self, conn: FakeConn) -> None:
        conv = Conversation(conn=conn)
        self.conversations.append(conv)
        try:
            with gevent.Timeout(1.0, False):
                raw = conn.ws.receive()
                first = json.loads(raw) if isinstance(raw, str) else None
                if isinstance(first, dict):
                    self.record(conn, first)
                    if first.get("type") == "conversation_initiation_client_data":
                        conv.initiation = first
        except ValueError:
            pass
        problem = self._override_problem(conv.initiation)
        if problem:
            self.fail("override_error", 1008, problem, conv)
            return
        self.send(conv, {"type": "conversation_initiation_metadata", "conversation_initiation_metadata_event": {
            "conversation_id": f"conv_{secrets.token_hex(4)}", "agent_output_audio_format": self.output_format,
            "user_input_audio_format": self.input_format}})
        override = ((conv.initiation or {}).get("conversation_config_override") or {}).get("agent") or {}
        first_message = override.get("first_message", self.first_message)
        if first_message:
            self.speak(first_message, conv)
        if self.ping_interval:
            gevent.spawn(self._ping_loop, conv)
        self.receive_loop(conn, lambda m: self._on_message(conv, m))

    def _override_problem(self, initiation: dict[str, Any] | None) -> str:
        override = (initiation or {}).get("conversation_config_override") or {}
        used = set((override.get("agent") or {}).keys()) | set((override.get("tts") or {}).keys())
        if "prompt" in used and not isinstance(override["agent"]["prompt"], dict):
            return "agent.prompt must be an object"
        refused = sorted(used - self.allowed_overrides)
        return f"Override for field '{refused[0]}' is not allowed by the agent's config" if refused else ""

    # ---- script API -------------------------------------------------------------------------------

    def send(self, conv: Conversation, message: dict[str, Any]) -> None:
        conv.conn.send(message)

    def next_eid(self) -> int:
        return next(self._eids)

    def speak(self, text: str, conv: Conversation | None = None) -> Turn:
        """An agent turn: agent_response, then audio chunks faster than real time."""
        conv = conv or self.conversation
        index = len(conv.turns)
        turn = Turn(eid=self.next_eid(), text=text, audio_ms=self.reply_ms,
                    freq=self.tones[index] if index < len(self.tones) else 550.0)
        turn.last_eid = turn.eid
        conv.turn = turn
        conv.turns.append(turn)
        self.send(conv, {"type": "agent_response", "agent_response_event": {"agent_response": text,
                                                                             "event_id": turn.eid}})
        turn.started = time.monotonic()
        gevent.spawn(self._stream_turn, conv, turn)
        return turn

    def call_tool(self, name: str, parameters: dict[str, Any], tool_call_id: str = "toolu_01") -> None:
        self.send(self.conversation, {"type": "client_tool_call", "client_tool_call": {
            "tool_name": name, "tool_call_id": tool_call_id, "parameters": parameters, "event_id": self.next_eid()}})

    def fail(self, error_type: str, close_code: int, message: str = "", conv: Conversation | None = None) -> None:
        """The 2026 contract: an `error` event, then the close code for that error type."""
        conv = conv or self.conversation
        self.send(conv, {"type": "error", "error_event": {"code": close_code, "error_type": error_type,
                                                           "message": message or error_type, "reason": None}})
        conv.conn.close(close_code, error_type)

    def end_call(self) -> None:
        """The agent's end_call tool: a normal close."""
        self.conversation.conn.close(1000, "")

    def drop(self) -> None:
        self.conversation.conn.drop()

    # ---- internals --------------------------------------------------------------------------------

    def _stream_turn(self, conv: Conversation, turn: Turn) -> None:
        rate = _rate(self.output_format)
        sent = 0.0
        while sent < turn.audio_ms and not turn.interrupted and not conv.conn.closed:
            chunk = tone(self.chunk_ms, rate, turn.freq)
            payload = lin2ulaw(chunk) if self.output_format.startswith("ulaw") else chunk
            if self.audio_ids == "chunk":
                turn.last_eid = self.next_eid()
            self.send(conv, {"type": "audio", "audio_event": {"audio_base_64": b64(payload),
                                                               "event_id": turn.last_eid}})
            sent += self.chunk_ms
            gevent.sleep(self.chunk_interval)
        turn.done = True

    def _interrupt(self, conv: Conversation, turn: Turn) -> None:
        turn.interrupted = True
        self.send(conv, {"type": "interruption", "interruption_event": {"event_id": turn.last_eid}})
        rate = _rate(self.output_format)
        for _ in range(self.stale_after_interrupt):  # in-flight chunks of the cut turn (ids <= interrupt id)
            payload = tone(self.chunk_ms, rate, turn.freq)
            if self.output_format.startswith("ulaw"):
                payload = lin2ulaw(payload)
            self.send(conv, {"type": "audio", "audio_event": {"audio_base_64": b64(payload),
                                                               "event_id": turn.last_eid}})
        self.send(conv, {"type": "agent_response_correction", "agent_response_correction_event": {
            "original_agent_response": turn.text, "corrected_agent_response": turn.text[:3] + "...",
            "event_id": turn.eid}})

    def _ping_loop(self, conv: Conversation) -> None:
        while not conv.conn.closed:
            gevent.sleep(self.ping_interval)
            eid = self.next_eid()
            conv.pings[eid] = time.monotonic()
            self.send(conv, {"type": "ping", "ping_event": {"event_id": eid, "ping_ms": None}})

    def _on_message(self, conv: Conversation, m: dict[str, Any]) -> None:
        if "user_audio_chunk" in m:
            return self._on_audio(conv, m["user_audio_chunk"])
        kind = m.get("type")
        if kind == "pong":
            conv.pongs.append(m.get("event_id"))
            self.changed.notify()
        elif kind == "user_message":
            self._user_turn(conv, str(m.get("text", "")))
        elif kind == "contextual_update":
            conv.contextual.append(str(m.get("text", "")))
        elif kind == "client_tool_result":
            conv.tool_results.append(m)
            if not m.get("is_error"):
                self.speak(f"Tool said: {m.get('result')}", conv)
        elif kind == "user_activity":
            pass
        else:  # the 2026 contract: invalid_message closes 1008
            self.fail("invalid_message", 1008, f"Invalid message received: {str(kind)[:40]}", conv)

    def _on_audio(self, conv: Conversation, data: str) -> None:
        raw = base64.b64decode(data)
        pcm = ulaw2lin(raw) if self.input_format.startswith("ulaw") else raw
        chunk_ms = len(pcm) / 2 / _rate(self.input_format) * 1000
        loud = rms(pcm) >= self.vad_rms
        if loud and not conv.in_speech:
            conv.in_speech, conv.silence_ms = True, 0.0
            if conv.turn is not None and conv.turn.playing():
                self._interrupt(conv, conv.turn)
        elif conv.in_speech:
            conv.silence_ms = 0.0 if loud else conv.silence_ms + chunk_ms
            if conv.silence_ms >= self.end_silence_ms:
                conv.in_speech = False
                self._user_turn(conv, "caller speech", transcript=True)

    def _user_turn(self, conv: Conversation, text: str, transcript: bool = False) -> None:
        if transcript:
            self.send(conv, {"type": "user_transcript", "user_transcription_event": {
                "user_transcript": text, "event_id": self.next_eid()}})
        if conv.turn is not None and conv.turn.playing():
            self._interrupt(conv, conv.turn)
        self.speak(self.reply_text, conv)

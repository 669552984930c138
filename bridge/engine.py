"""The one small interface every AI engine sits behind.

An engine is one conversation with one model for one call. The bridge feeds it caller audio in the
format the engine declares and gets events back through a sink callback; it never needs to know the
engine's wire protocol. Engines never see FreeSWITCH, and never resample: the bridge converts audio
to and from the formats an engine declares in `formats` (valid once `connect()` returned).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Encodings the bridge can convert to/from the call's L16.
PCM16 = "pcm16"  # signed 16-bit little-endian mono
PCMU = "pcmu"  # G.711 mu-law, 8 kHz
PCMA = "pcma"  # G.711 A-law, 8 kHz


@dataclass(frozen=True)
class AudioFormat:
    encoding: str  # PCM16 | PCMU | PCMA
    rate: int

    @property
    def bytes_per_ms(self) -> float:
        per_sample = 2 if self.encoding == PCM16 else 1
        return per_sample * self.rate / 1000.0


@dataclass(frozen=True)
class EngineFormats:
    """What the engine takes (input) and gives (output)."""

    input: AudioFormat
    output: AudioFormat


@dataclass(frozen=True)
class ToolSpec:
    """A model tool the route allows; `targets` only for transfer."""

    name: str  # hangup | transfer | send_dtmf
    description: str
    parameters: Mapping[str, Any]
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallInfo:
    """What an engine may know about the call it serves."""

    uuid: str
    did: str
    caller_id: str
    sample_rate: int  # the call's L16 rate: 8000 or 16000
    instructions: str = ""
    voice: str = ""
    greeting: str = ""
    tools: tuple[ToolSpec, ...] = ()
    dtmf_mode: str = "message"  # engine-specific delivery hint (e.g. ElevenLabs user_message/contextual_update)
    channel_rate: int = 0  # the call's codec rate (0: not known): output above it is lost in FreeSWITCH anyway


# ---- events out of an engine ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineEvent:
    pass


@dataclass(frozen=True)
class AudioOut(EngineEvent):
    """Model speech in `formats.output`; `response_id` groups the chunks of one reply."""

    audio: bytes
    response_id: str


@dataclass(frozen=True)
class ResponseDone(EngineEvent):
    response_id: str
    status: str = "completed"  # completed | cancelled | interrupted | failed


@dataclass(frozen=True)
class SpeechStarted(EngineEvent):
    """The caller started speaking: barge-in if anything is playing."""


@dataclass(frozen=True)
class SpeechStopped(EngineEvent):
    """The caller stopped speaking (start of the first-audio latency clock)."""


@dataclass(frozen=True)
class Interrupted(EngineEvent):
    """The engine itself cut a response (e.g. ElevenLabs `interruption`): flush that response's audio."""

    response_id: str = ""


@dataclass(frozen=True)
class Transcript(EngineEvent):
    role: str  # user | assistant
    text: str
    final: bool = True
    response_id: str = ""  # the reply an assistant line belongs to (so a barge-in can mark it), when known


@dataclass(frozen=True)
class ToolCall(EngineEvent):
    call_id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineError(EngineEvent):
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class Closed(EngineEvent):
    """The engine session is over; `reason` says why (normal, dropped, session_expired...)."""

    reason: str
    clean: bool = True


EventSink = Callable[[EngineEvent], None]


class EngineRefused(Exception):
    """connect() could not open a usable session (network, auth, bad format)."""


class Engine(ABC):
    """One engine session for one call. Methods are called from gevent greenlets; they must not block
    longer than a network write. Events are delivered by calling `self.emit(event)`."""

    type_name: str = ""
    # EngineError codes that mean "this session reached its length limit": the call goes on in a new session
    session_limit_codes: frozenset[str] = frozenset()

    def __init__(self, config: Mapping[str, Any], call: CallInfo, sink: EventSink) -> None:
        self.config = config
        self.call = call
        self._sink = sink
        self.formats: EngineFormats | None = None
        self.expires_at: float | None = None  # epoch seconds at which the engine says this session will end

    def emit(self, event: EngineEvent) -> None:
        self._sink(event)

    @abstractmethod
    def connect(self) -> None:
        """Open the session; set `self.formats`. Raise EngineRefused when the engine says no."""

    @abstractmethod
    def send_audio(self, audio: bytes) -> None:
        """Caller audio, already in `formats.input`."""

    @abstractmethod
    def send_text(self, text: str) -> None:
        """A text turn from the caller's side (DTMF digits become text); the model replies to it."""

    @abstractmethod
    def interrupt(self, response_id: str, played_ms: int | None) -> None:
        """Barge-in: the caller heard `played_ms` of `response_id` (None: nothing played)."""

    @abstractmethod
    def tool_result(self, call_id: str, result: Mapping[str, Any], is_error: bool = False) -> None:
        """Answer a ToolCall."""

    def greet(self) -> None:
        """Ask the engine to speak the route's greeting (default: a text turn the model answers)."""
        if self.call.greeting:
            self.send_text(f"(The call has just been answered. Greet the caller with: {self.call.greeting})")

    @abstractmethod
    def close(self) -> None:
        """End the session; idempotent. No events after Closed."""
